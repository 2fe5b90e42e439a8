#!/usr/bin/env bash
# The test command: set up if needed, then the whole suite except `slow` tests.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/pytest ] || bash scripts/setup.sh
exec .venv/bin/python -m pytest -m "not slow" "$@"
