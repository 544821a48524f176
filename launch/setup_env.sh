#!/usr/bin/env bash
# Install layerfreeze and its test/engine dependencies into the current Python, CPU-first.
#   bash launch/setup_env.sh            # used by launch/quickstart.sh and tests/run.sh
# Env: PYTHON (default python3), TORCH_SPEC (default torch==2.13.0: the CPU build path on our
# machines; set e.g. TORCH_SPEC=torch to let pip choose), LAYERFREEZE_EXTRAS (default dev).
# LAYERFREEZE_WITH_VLLM=1 also installs vLLM 0.33 for tests/unit/test_vllm_lora_load.py into its
# own directory LAYERFREEZE_VLLM_DIR (default ~/.cache/layerfreeze/vllm), with --no-deps: its
# wheel pins a CUDA torch. ~340 MB download, ~1 GB on disk; VLLM_SPEC may name a local wheel.
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
if [ "${LAYERFREEZE_WITH_VLLM:-0}" = 1 ]; then
  # vLLM + what importing its LoRA loader needs that the project's environment lacks (pinned).
  VLLM_PKGS="${VLLM_SPEC:-vllm==0.33.0} cbor2==6.3.0 pyzmq==27.3.0 oss-harmony==0.0.11 \
openai==3.57.0 jiter==0.19.0 pybase64==1.5.1 cachetools==8.0.2 msgspec==0.23.0 blake3==1.0.11 \
uvloop==0.23.0 prometheus_client==0.26.0 xgrammar==0.2.8 apache-tvm-ffi==0.1.11 \
fastapi==0.136.3 starlette==1.10.0 partial-json-parser==0.2.1.1.post7 llguidance==1.7.6 \
compressed-tensors==0.17.0 loguru==0.7.3"
  VDIR=${LAYERFREEZE_VLLM_DIR:-$HOME/.cache/layerfreeze/vllm}
  if [ "$(cat "$VDIR/.installed" 2>/dev/null)" != "$VLLM_PKGS" ]; then
    echo "[setup] installing vllm (--no-deps) into $VDIR"
    rm -rf "$VDIR.partial"
    # shellcheck disable=SC2086  # the package list splits on purpose
    "$PY" -m pip install -q --no-deps --target "$VDIR.partial" $VLLM_PKGS
    echo "$VLLM_PKGS" >"$VDIR.partial/.installed"
    rm -rf "$VDIR" && mv "$VDIR.partial" "$VDIR"
  fi
fi
