#!/usr/bin/env bash
# What produced the committed default model: run on a GPU machine (no network, no install) from the repo
# root, with the Fashion-MNIST idx files carried in .devcarry/fashion-mnist and results written under $OUT.
# 1) trains the default with scripts/train_default_model.sh, 2) generates the quality-study samples.
set -uo pipefail
OUT=${OUT:?set OUT to the results folder}
export PYTHONUNBUFFERED=1
# Make `flowturbo` importable without building the C++ extension (pure-Python layers only): link the
# layer folders into the root package folder of this (throw-away) copy of the tree.
for d in kernels training export runtime; do ln -sfn "$PWD/$d" "flowturbo/$d"; done
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
BUNDLE=/tmp/default_model
FASHION_MNIST_ROOT=$PWD/.devcarry/fashion-mnist DEVICE=cuda BATCH=${BATCH:-512} \
  bash scripts/train_default_model.sh /tmp/runs "$BUNDLE" 2>&1 | tee "$OUT/train.log"
mkdir -p "$BUNDLE/training"
for stage in autoencoder predictor refiner; do
  cp /tmp/runs/$stage/config.json "$BUNDLE/training/$stage.config.json" 2>/dev/null
  find /tmp/runs/$stage -name loss_curve.png | head -1 | xargs -I{} cp {} "$BUNDLE/training/$stage.loss_curve.png"
done
tar -cf /tmp/default_model.tar -C /tmp default_model && split -b 15M /tmp/default_model.tar "$OUT/default_model.tar.part-"
timeout 150 python3 bench/quality_study.py generate --model "$BUNDLE" --out /tmp/quality --device cuda \
  --num-samples "${NUM_SAMPLES:-2000}" --batch 1000 2>&1 | tail -5 | tee "$OUT/generate.log"
cp /tmp/quality/generate.json "$OUT/" 2>/dev/null
[ -f /tmp/quality/samples.npz ] && split -b 15M /tmp/quality/samples.npz "$OUT/samples.npz.part-"
ls -la "$OUT"
