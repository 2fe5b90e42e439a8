#!/usr/bin/env bash
# The test command: set up (idempotent), then the whole suite except `slow` tests.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k fastapi`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -m "not slow" "$@"
