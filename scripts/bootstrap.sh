#!/usr/bin/env bash
# Install what sidekiq-ops needs on a fresh Debian or Ubuntu machine, reusing what is already there:
# the Debian packages (podman, redis-server, ruby-sidekiq, ...) and the Python environment in .venv.
# Safe to run again at any time; a run killed halfway is completed by the next one.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
STAMP="$VENV/.installed-from"

APT_PACKAGES=(
  podman runc crun debootstrap slirp4netns uidmap
  redis-server redis-tools ruby ruby-sidekiq
  systemd make git rsync curl ca-certificates
)

log() { printf '[bootstrap] %s\n' "$*"; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

install_debian_packages() {
  local missing=()
  local package
  for package in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
  done
  if [ "${#missing[@]}" -eq 0 ]; then
    log "Debian packages already installed"
    return
  fi
  log "installing Debian packages: ${missing[*]}"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
  # --no-install-recommends keeps redis-server from pulling in extra services. The tests start their own
  # redis-server on free loopback ports, so a distribution instance on 6379 does not get in their way.
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
}

python_interpreter() {
  local candidate
  for candidate in python3.11 python3.12 python3.13 python3; do
    if command -v "$candidate" >/dev/null 2>&1 \
      && "$candidate" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
      command -v "$candidate"
      return
    fi
  done
  log "no Python 3.11 or newer found: install python3 (3.11+) and python3-venv, then run again" >&2
  exit 1
}

install_python_environment() {
  local wanted
  wanted="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
  if [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$wanted" ]; then
    log "Python environment .venv is up to date"
    return
  fi
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating .venv"
    rm -rf "$VENV"
    "$(python_interpreter)" -m venv "$VENV"
  fi
  log "installing Python packages into .venv (pip takes its index settings from this machine's pip config)"
  "$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel
  "$VENV/bin/python" -m pip install -q -e "$ROOT[dev]"
  echo "$wanted" > "$STAMP"
}

# checkov (the Kubernetes policy scanner the tests run) pins older boto3 and packaging releases than the
# project uses, so it gets a virtual environment of its own.
CHECKOV_VENV="$ROOT/.cache/checkov-venv"
CHECKOV_VERSION="3.3.30"
install_checkov() {
  if [ -x "$CHECKOV_VENV/bin/checkov" ] && [ "$(cat "$CHECKOV_VENV/.version" 2>/dev/null)" = "$CHECKOV_VERSION" ]; then
    log "checkov $CHECKOV_VERSION is installed"
    return
  fi
  log "installing checkov $CHECKOV_VERSION into .cache/checkov-venv"
  rm -rf "$CHECKOV_VENV"
  "$(python_interpreter)" -m venv "$CHECKOV_VENV"
  "$CHECKOV_VENV/bin/python" -m pip install -q "checkov==$CHECKOV_VERSION"
  echo "$CHECKOV_VERSION" > "$CHECKOV_VENV/.version"
}

install_debian_packages
install_python_environment
install_checkov
log "ready: activate with 'source .venv/bin/activate'"
