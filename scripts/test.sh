#!/usr/bin/env bash
# The whole test suite, as CI runs it: install what is needed (Debian packages, .venv, test-host images),
# then lint, pytest (unit, integration against real Redis and Sidekiq, end to end on the local test hosts)
# and the molecule scenarios.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/bootstrap.sh"
exec make -C "$ROOT" test
