#!/usr/bin/env bash
# Train the embedded default model (Fashion-MNIST: autoencoder -> SiT predictor -> FlowTurbo refiner ->
# domain classifier) with flowturbo's own trainers and package it as a bundle with a model card.
#
#   bash scripts/train_default_model.sh RUNS_DIR BUNDLE_DIR
#
# Budgets (wall-clock minutes per stage) and sizes come from the environment, so the same script does the
# real GPU run and a CPU smoke run (tests of the command lines):
#   DEVICE=cuda AE_MIN=0.75 PRED_MIN=2.5 REF_MIN=1.2 CLF_EPOCHS=6 bash scripts/train_default_model.sh ...
set -euo pipefail
RUNS=${1:?usage: train_default_model.sh RUNS_DIR BUNDLE_DIR}
BUNDLE=${2:?usage: train_default_model.sh RUNS_DIR BUNDLE_DIR}
FT=${FT:-"python3 -m flowturbo.runtime.cli"}
DEVICE=${DEVICE:-auto}
ROOT=${FASHION_MNIST_ROOT:-/usr/share/datasets/fashion-mnist}
AE_MIN=${AE_MIN:-0.6}; PRED_MIN=${PRED_MIN:-2.3}; REF_MIN=${REF_MIN:-1.0}
AE_STEPS=${AE_STEPS:-100000}; AE_FT_STEPS=${AE_FT_STEPS:-1500}
PRED_STEPS=${PRED_STEPS:-200000}; REF_STEPS=${REF_STEPS:-100000}
BATCH=${BATCH:-256}; LIMIT=${LIMIT:-}; CLF_EPOCHS=${CLF_EPOCHS:-6}
PRED_MODEL=${PRED_MODEL:-SiT-N/2}
limit_arg=(); [ -n "$LIMIT" ] && limit_arg=(--limit "$LIMIT")
common=(--device "$DEVICE" --fashion-mnist-root "$ROOT" --no-progress --log-every 500 --budget-ends-run
        "${limit_arg[@]}")
mkdir -p "$RUNS"
log() { echo "[train_default $(date +%T)] $*"; }
start=$(date +%s)

log "autoencoder (${AE_MIN} min + mse decoder fine-tune)"
$FT train autoencoder --preset fashion-mnist --out "$RUNS/autoencoder" --steps "$AE_STEPS" \
  --batch-size "$BATCH" --max-minutes "$AE_MIN" --finetune-steps "$AE_FT_STEPS" --finetune-batch-size "$BATCH" \
  --ema-decay 0.999 --ckpt-every 5000 "${common[@]}"

log "predictor $PRED_MODEL (${PRED_MIN} min)"
$FT train predictor --preset fashion-mnist --model "$PRED_MODEL" --out "$RUNS/predictor" \
  --autoencoder "$RUNS/autoencoder" --steps "$PRED_STEPS" --batch-size "$BATCH" --lr 3e-4 --warmup-steps 500 \
  --ema-decay 0.999 --max-minutes "$PRED_MIN" --ckpt-every 10000 "${common[@]}"

log "refiner (${REF_MIN} min)"
$FT train refiner --preset fashion-mnist --teacher "$RUNS/predictor" --autoencoder "$RUNS/autoencoder" \
  --out "$RUNS/refiner" --steps "$REF_STEPS" --batch-size "$BATCH" --lr 2e-4 --ema-decay 0.999 \
  --max-minutes "$REF_MIN" --ckpt-every 10000 "${common[@]}"

log "package bundle"
$FT train package --predictor "$RUNS/predictor" --refiner "$RUNS/refiner" --autoencoder "$RUNS/autoencoder" \
  --schedule H1P5R3 --cfg 1.5 --out "$BUNDLE" --overwrite

log "domain classifier ($CLF_EPOCHS epochs)"
clf_device=(); [ "$DEVICE" != auto ] && clf_device=(--device "$DEVICE")
clf_limit=(); [ -n "$LIMIT" ] && clf_limit=(--train-limit "$LIMIT")
python3 -m flowturbo.training.evaluation.classifier_cli --out "$BUNDLE/classifier" --epochs "$CLF_EPOCHS" \
  --root "$ROOT" "${clf_device[@]}" "${clf_limit[@]}"
log "done in $(( $(date +%s) - start )) s"
