#!/usr/bin/env bash
# The main job: set up, then FlowTurbo-sample the embedded default model and print the timing table.
# Extra arguments are passed to `flowturbo sample` (e.g. --classes 0,7,9 --seed 3).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# No --schedule: the bundle's own default (H1R3 since issue 20, chosen by `flowturbo tune`; QUALITY.md).
exec .venv/bin/flowturbo sample --num-images 20 --device cpu --out outputs/main "$@"
