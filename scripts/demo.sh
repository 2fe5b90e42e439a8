#!/usr/bin/env bash
# The main job: set up if needed, then the demo on a local six-node cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] && .venv/bin/python -c "import engine, fastapi" 2>/dev/null || bash scripts/setup.sh
exec .venv/bin/python -m engine demo "$@"
