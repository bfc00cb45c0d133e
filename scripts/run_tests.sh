#!/usr/bin/env bash
# The test suite: set up, then run pytest on CPU (GPU tests skip with their reason).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest tests -q --timeout 900 "$@"
