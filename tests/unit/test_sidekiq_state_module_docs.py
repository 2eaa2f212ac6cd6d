"""The queue_info documentation and the redis doc fragment must describe exactly the options the module accepts.

ansible-test's validate-modules checks more, but it needs network access to build its environment. This test
keeps the basic agreement checked in every test run.
"""

from __future__ import annotations

from typing import Any

import yaml

from ansible_collections.sidekiq_ops.fleet.plugins.doc_fragments.redis import ModuleDocFragment
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.sidekiq_state import JobSetState, SidekiqState
from ansible_collections.sidekiq_ops.fleet.plugins.modules import queue_info


def documented_options() -> dict[str, dict[str, Any]]:
    module_docs = yaml.safe_load(queue_info.DOCUMENTATION)
    fragment_docs = yaml.safe_load(ModuleDocFragment.DOCUMENTATION)
    assert module_docs["extends_documentation_fragment"] == ["sidekiq_ops.fleet.redis"]
    return {**fragment_docs["options"], **module_docs["options"]}


def test_every_option_documented() -> None:
    assert sorted(documented_options()) == sorted(queue_info.argument_spec())


def test_documented_types_and_defaults_match() -> None:
    documented = documented_options()

    for name, spec in queue_info.argument_spec().items():
        docs = documented[name]
        assert docs["type"] == spec["type"], name
        assert docs.get("default") == spec.get("default"), name
        assert docs.get("elements") == spec.get("elements"), name
        assert docs["description"], name


def test_secrets_are_no_log() -> None:
    spec = queue_info.argument_spec()
    secret_options = ["redis_url", "redis_password", "redis_sentinel_password"]

    for name in secret_options:
        assert spec[name].get("no_log") is True, name


def test_every_result_key_documented() -> None:
    returned = yaml.safe_load(queue_info.RETURN)
    state = SidekiqState(
        now=0.0,
        processed=0,
        failed=0,
        queues={},
        scheduled=JobSetState("schedule", 0, 0, {}, 0),
        retries=JobSetState("retry", 0, 0, {}, 0),
        dead=0,
        processes=(),
        malformed=(),
        sidekiq_data_found=True,
    )

    assert sorted(returned) == sorted([*state.to_dict(), "msg", "redis_target"])


def test_examples_use_the_module() -> None:
    examples = yaml.safe_load(queue_info.EXAMPLES)
    modules = [next(iter(key for key in task if key not in ("name", "register"))) for task in examples]

    assert modules.count("sidekiq_ops.fleet.queue_info") == 2
    assert set(modules) == {"sidekiq_ops.fleet.queue_info", "ansible.builtin.assert", "ansible.builtin.debug"}
