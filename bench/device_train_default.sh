#!/usr/bin/env bash
# What produced the committed default model, as one script for a GPU machine (no network, no install): run
# from the repo root with the Fashion-MNIST idx files carried in .devcarry/fashion-mnist and $OUT pointing to
# a results folder. It 1) trains and packages the default with scripts/train_default_model.sh, 2) generates
# the quality-study samples (bench/quality_study.py generate), 3) splits both into <16 MB parts under $OUT.
# Reassemble here with: cat default_model.tar.part-* | tar -x; cat samples.npz.part-* > samples.npz
set -euo pipefail
OUT=${OUT:?set OUT to the results folder}
export PYTHONUNBUFFERED=1
# Make `flowturbo` importable without building the C++ extension (pure-Python layers only): link the
# layer folders into the root package folder of this (throw-away) copy of the tree.
for d in kernels training export runtime; do ln -sfn "$PWD/$d" "flowturbo/$d"; done
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
WORK=$(mktemp -d)
BUNDLE=$WORK/default_model
FASHION_MNIST_ROOT=$PWD/.devcarry/fashion-mnist DEVICE=cuda BATCH=${BATCH:-512} \
  bash scripts/train_default_model.sh "$WORK/runs" "$BUNDLE" 2>&1 | tee "$OUT/train.log"
mkdir -p "$BUNDLE/training"
for stage in autoencoder predictor refiner; do
  cp "$WORK/runs/$stage/config.json" "$BUNDLE/training/$stage.config.json"
  find "$WORK/runs/$stage" -name loss_curve.png | head -1 | xargs -I{} cp {} "$BUNDLE/training/$stage.loss_curve.png"
done
tar -cf "$WORK/default_model.tar" -C "$WORK" default_model
split -b 15M "$WORK/default_model.tar" "$OUT/default_model.tar.part-"
python3 bench/quality_study.py generate --model "$BUNDLE" --out "$WORK/quality" --device cuda \
  --num-samples "${NUM_SAMPLES:-2000}" --batch 1000 2>&1 | tail -2 | tee "$OUT/generate.log"
cp "$WORK/quality/generate.json" "$OUT/"
split -b 15M "$WORK/quality/samples.npz" "$OUT/samples.npz.part-"
ls -la "$OUT"
