# The two entry points of the README: `make demo` (the main job on the local test hosts) and `make test`
# (the whole test suite, as CI runs it). Both install what they need first and reuse what is already there.

SHELL := /bin/bash
VENV := $(CURDIR)/.venv
BIN := $(VENV)/bin
export PATH := $(BIN):$(PATH)
export CONTAINERS_CONF := $(CURDIR)/tests/hosts/containers.conf
export ANSIBLE_CONFIG := $(CURDIR)/ansible.cfg
export ANSIBLE_COLLECTIONS_PATH := $(CURDIR)/.collections
export ANSIBLE_NOCOLOR := 1
export ANSIBLE_FORCE_COLOR := 0

MOLECULE_SCENARIOS := redis fleet autoscaler
SANITY_ROOT := $(CURDIR)/.cache/sanity/ansible_collections/sidekiq_ops/fleet
# The pip release ansible-test bootstraps into its sanity environments (ansible-core 2.19: 24.2).
ANSIBLE_TEST_PIP := $(shell $(BIN)/python -c "import re, ansible_test, pathlib; \
  text = (pathlib.Path(ansible_test.__file__).parent / '_internal/python_requirements.py').read_text(); \
  print(re.search(r\"pip='([0-9.]+)'\", text).group(1).replace('.', '_'))" 2>/dev/null)

.PHONY: bootstrap images demo test lint pytest molecule sanity clean-hosts collection

bootstrap:
	scripts/bootstrap.sh

images: bootstrap
	scripts/testhosts.sh images

demo: images
	scripts/demo.sh

test: images
	$(MAKE) lint
	$(MAKE) pytest
	$(MAKE) molecule

pytest:
	$(BIN)/pytest tests

molecule:
	set -e; for scenario in $(MOLECULE_SCENARIOS); do $(BIN)/molecule test -s $$scenario; done

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check plugins tests scripts benchmarks
	$(BIN)/mypy plugins
	$(BIN)/yamllint -s .
	$(BIN)/ansible-lint --profile production
	$(MAKE) sanity

# ansible-test needs the collection under a path ending in ansible_collections/<namespace>/<name>:
# copy the collection's files (the project-only folders stay out, as in a build) there and run.
SANITY_SKIP := ^(\.collections|inventories|molecule|benchmarks|examples|scripts|tests/(unit|integration|e2e|hosts))/
sanity:
	rm -rf $(CURDIR)/.cache/sanity
	mkdir -p $(SANITY_ROOT)
	git ls-files -co --exclude-standard -z | grep -zEv '$(SANITY_SKIP)' \
	  | rsync -a --from0 --files-from=- ./ $(SANITY_ROOT)/
	mkdir -p $(HOME)/.ansible/test/cache
	sed 's|@OUTER_PYTHON@|$(BIN)/python|' tests/sanity/get_pip.py > $(HOME)/.ansible/test/cache/get_pip_$(ANSIBLE_TEST_PIP).py
	cd $(SANITY_ROOT) && git init -q && git add -A && \
	  $(BIN)/ansible-test sanity --python 3.11 --requirements --color no

collection:
	$(BIN)/ansible-galaxy collection build --force --output-path $(CURDIR)/.cache/build

clean-hosts:
	scripts/testhosts.sh down
