#!/usr/bin/env bash
# Install layerfreeze and its test/engine dependencies into the current Python, CPU-first.
#   bash launch/setup_env.sh            # used by launch/quickstart.sh and tests/run.sh
# Env: PYTHON (default python3), TORCH_SPEC (default torch==2.13.0: the CPU build path on our
# machines; set e.g. TORCH_SPEC=torch to let pip choose), LAYERFREEZE_EXTRAS (default dev).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "[setup] installing ${TORCH_SPEC:-torch==2.13.0} (no torch found)"
  "$PY" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
# Checked from outside the checkout, so "installed" means installed from THIS checkout.
HERE=$(pwd)
if ! (cd / && "$PY" -c "
import os, sys, layerfreeze, deepspeed, peft, lm_eval, wandb, sentencepiece, pytest_timeout
sys.exit(os.path.dirname(os.path.dirname(os.path.realpath(layerfreeze.__file__))) != os.path.realpath('$HERE'))
") >/dev/null 2>&1; then
  echo "[setup] installing layerfreeze[${LAYERFREEZE_EXTRAS:-dev}]"
  "$PY" -m pip install -q -e ".[${LAYERFREEZE_EXTRAS:-dev}]"
fi
