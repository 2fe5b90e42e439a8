#!/usr/bin/env bash
# The main job: set up (idempotent), then the demo on a local six-node cluster.
# Extra arguments go to the demo, e.g. `bash scripts/demo.sh --sessions 20000`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m engine demo "$@"
