#!/usr/bin/env bash
# Rehearse the GPU suite on this CPU machine as close to the lent GPU machine as it gets (issue 18), before
# any device call:
#   * Python 3.12 with the device image's torch 2.11 and triton 3.6 (the registry's torch 2.11.0 wheel is a
#     CUDA 13.0 build: 530.7 MB, ~4.6 GB installed with its nvidia-* dependencies; it runs on the CPU) and the
#     versions of what the image holds (numpy 2.5.2, onnx 1.23.1, onnxruntime 1.30.0, transformers 5.17.0,
#     accelerate 1.15.0, ...; /work/.library/device/KINDS.md), flowturbo NOT installed;
#   * a copy of the working tree as the device tool makes it (tracked + untracked-not-ignored files), plus the
#     carry made by scripts/prepare_gpu_carry.sh (.devcarry: diffusers wheel, nlohmann-json / OpenSSL headers);
#   * the phases exactly as BENCHMARKS.md issues them on the device, with --dry-run but WITHOUT --skip-build:
#     phase 1 builds flowturbo (the C++ runner compiled WITH CUDA against torch 2.11's CUDA headers: the local
#     CUDA 13.0 toolkit or the nvidia-* pip packages) and re-executes itself; then the phase records are merged;
#   * fault injection: a row that raises, a pytest run that times out, a failed build, a budget that forces
#     skips, a capture that falls back, a failed export check — each must still give the JSON and the table.
# Usage: bash scripts/rehearse_device.sh [WORKDIR]      (default /tmp/flowturbo_rehearsal; ~20 min, ~5 GB)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
W=${1:-/tmp/flowturbo_rehearsal}
PY312=${PY312:-$(command -v python3.12 || echo "$HOME/.pyenv/versions/3.12.1/bin/python")}
VENV=$W/venv
mkdir -p "$W"
log() { echo "[rehearse $(date +%H:%M:%S)] $*"; }

# 1. The device's Python packages (installed once; the venv is kept between rehearsals).
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import torch, triton, transformers, scikit_build_core, requests, regex" 2>/dev/null; then
  log "creating $VENV (Python 3.12, torch 2.11.0, triton 3.6.0 and the image's package versions)"
  "$PY312" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q torch==2.11.0 triton==3.6.0
  "$VENV/bin/python" -m pip install -q numpy==2.5.2 safetensors==0.8.0 torchdiffeq==0.2.5 onnx==1.23.1 \
    onnxscript==0.7.2 onnxruntime==1.30.0 transformers==5.17.0 accelerate==1.15.0 huggingface_hub==1.33.0 \
    requests regex httpx filelock pybind11 scikit-build-core cmake ninja pillow tqdm matplotlib scipy pytest \
    pytest-timeout hypothesis
fi
"$VENV/bin/python" -c "import torch, triton; print('rehearsal python', __import__('sys').version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"

# 2. The carry and the tree as the device tool copies it (no .git, no .venv, no build outputs).
bash scripts/prepare_gpu_carry.sh >/dev/null
TREE=$W/tree
rm -rf "$TREE" "$W/out" "$W/state"
mkdir -p "$TREE" "$W/out"
{ git ls-files -z; git ls-files -z --others --exclude-standard; } | xargs -0 -I{} cp --parents {} "$TREE/"
cp -r .devcarry "$TREE/"
# flowturbo must not import before the suite builds it: the rehearsal venv has no editable install of this tree.
"$VENV/bin/python" -m pip uninstall -q -y flowturbo 2>/dev/null || true

SUITE=("$VENV/bin/python" bench/gpu_suite.py --dry-run --state-dir "$W/state")
status=0
check() {  # check <name> <out dir> <expect rc 0|1|any>
  local name=$1 out=$2 want=$3 rc=$4
  if [ ! -s "$out/gpu_suite.json" ]; then log "FAIL $name: no gpu_suite.json"; status=1; return; fi
  if [ "$want" != any ] && [ "$rc" != "$want" ]; then log "FAIL $name: exit $rc, expected $want"; status=1; return; fi
  log "ok   $name (exit $rc; $(ls "$out" | wc -l) files in OUT)"
}

# 3. The phases, back to back, as on the device (each OUT emptied first, as the tool does).
for phase in 1 2 3; do
  out=$W/out/phase$phase
  mkdir -p "$out"
  log "phase $phase"
  set +e
  (cd "$TREE" && PYTHONUNBUFFERED=1 "${SUITE[@]}" --phase "$phase" --out "$out" > "$W/out/phase$phase.stdout" 2>&1)
  rc=$?
  set -e
  tail -n 25 "$W/out/phase$phase.stdout"
  check "phase $phase" "$out" 0 "$rc"
done
"$VENV/bin/python" "$TREE/bench/gpu_suite.py" --merge "$W"/out/phase{1,2,3}/phase*.json --out "$W/out/merged" | tail -n 20
if ! "$VENV/bin/python" - "$W/out/merged/gpu_suite.json" <<'EOF'
import json, sys
merged = json.load(open(sys.argv[1]))
rows = sorted(merged["rows"])
build = merged.get("build", {})
print("merged rows:", rows)
print("runner:", merged.get("preflight", {}).get("p1:runner"))
assert {f"{k}@2" for k in "abcdef"} <= set(rows), rows
assert merged.get("preflight", {}).get("p1:runner", {}).get("ok"), "the C++ runner did not build"
assert "with CUDA" in merged["preflight"]["p1:runner"]["status"], "the runner was not compiled with CUDA"
assert not merged["errors"], merged["errors"]
# row (t), the optional text-to-image row, with the carried diffusers wheel: its four schedules measured in phase 3
assert set(merged.get("text_rows", {})) == {"t:E28", "t:H8", "t:H1P5", "t:H1P5+adaln"}, merged.get("skipped")
EOF
then
  log "FAIL merged record"; status=1
fi

# 4. Fault injection (flowturbo is installed now; each run must still write its JSON and print its table).
fault() {  # fault <name> <expect rc> <suite args...>
  local name=$1 want=$2; shift 2
  local out=$W/out/fault-$name
  mkdir -p "$out"
  set +e
  (cd "$TREE" && "${SUITE[@]}" --out "$out" "$@" > "$out.stdout" 2>&1)
  local rc=$?
  set -e
  grep -q "^targets:" "$out.stdout" || { log "FAIL fault $name: no table printed"; status=1; }
  check "fault $name" "$out" "$want" "$rc"
}
fault row-raises 1 --phase 1 --rows ab --skip-user-commands --inject-fault row:b@2 --inject-fault f64
fault tests-timeout 1 --phase 3 --inject-fault tests-timeout --inject-fault kernel-bench-timeout
fault budget 0 --phase 1 --budget-s 1
fault models 1 --phase 1 --inject-fault models
fault capture-and-check 1 --phase 2 --rows bcf --inject-fault capture --inject-fault export-check
fault build 1 --phase 1 --rows b --skip-user-commands --inject-fault build

log "rehearsal $( [ $status -eq 0 ] && echo PASSED || echo FAILED ); outputs under $W/out"
exit $status
