#!/usr/bin/env bash
# The main job: set up, then FlowTurbo-sample the embedded default model and print the timing table.
# Extra arguments are passed to `flowturbo sample` (e.g. --classes 0,7,9 --seed 3).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/flowturbo sample --schedule H1P5R3 --num-images 20 --device cpu --out outputs/main "$@"
