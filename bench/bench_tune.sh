#!/usr/bin/env bash
# Tuner wall time vs --num-samples and search mode (successive halving vs exhaustive, same candidates), and
# torchrun sampling throughput with 1 vs 2 CPU processes. Every run starts from an empty cache.
# Results: bench/results/tune/*.json (+ *.log); summarised by bench/summarise_tune.py into BENCHMARKS.md's table.
# `bash bench/bench_tune.sh candidates` runs only the candidate-count scaling runs.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/bench_tune}
RES=bench/results/tune
mkdir -p "$OUT" "$RES"
export OMP_NUM_THREADS=1
SPACE=(--heun 1 --pseudo 0:2 --refiner-steps 0:2 --euler 4 --grids uniform,shift:2 --vnorm-c 0.4
       --budget-ms 1000 --device cpu --threads 1 --no-progress --latency-repeats 3)
run_tune() {  # name, extra args...
  local name=$1; shift
  rm -rf "$OUT/cache-$name"
  .venv/bin/python -m flowturbo tune "${SPACE[@]}" "$@" --cache "$OUT/cache-$name" --out "$OUT/$name" \
    > "$RES/$name.log" 2>&1
  cp "$OUT/$name/tune.json" "$RES/$name.json"
}
if [ "${1:-}" = "candidates" ]; then
  # Wall time vs the number of candidates (500 samples; the 20-candidate pair is halving-500 / exhaustive-500):
  # 10 candidates (one grid) and 40 (four grids), each searched by successive halving and exhaustively.
  for search in halving exhaustive; do
    run_tune "$search-500-c10" --num-samples 500 --search "$search" --grids uniform
    run_tune "$search-500-c40" --num-samples 500 --search "$search" --grids uniform,shift:2,shift:3,power:1.5
  done
  exit 0
fi
run_tune halving-500 --num-samples 500
run_tune exhaustive-500 --num-samples 500 --search exhaustive
run_tune halving-1000 --num-samples 1000
# distributed sampling throughput: 400 images, batches of 50, 1 process vs 2 (torchrun, gloo)
for n in 1 2; do
  rm -rf "$OUT/sample-$n"
  start=$(date +%s.%N)
  if [ "$n" = 1 ]; then
    .venv/bin/python -m flowturbo sample --num-images 400 --batch 50 --device cpu --no-progress --out "$OUT/sample-$n" \
      > "$RES/sample-$n.log" 2>&1
  else
    .venv/bin/python -m torch.distributed.run --standalone --nproc_per_node 2 -m flowturbo sample --num-images 400 \
      --batch 50 --device cpu --no-progress --out "$OUT/sample-$n" > "$RES/sample-$n.log" 2>&1
  fi
  end=$(date +%s.%N)
  echo "{\"processes\": $n, \"images\": 400, \"wall_s\": $(echo "$end - $start" | bc)}" > "$RES/sample-$n.json"
done
cmp -s "$OUT/sample-1/grid.png" "$OUT/sample-2/grid.png" && echo "grid.png identical for 1 and 2 processes"
