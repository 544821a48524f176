#!/usr/bin/env bash
# Install layerfreeze and everything its tests import into the current Python, CPU-first, at the
# versions the suite last passed with (constraints.txt).
#   bash launch/setup_env.sh            # used by launch/quickstart.sh and tests/run.sh
# Env: PYTHON (default python3), TORCH_SPEC (default torch==2.13.0: the CPU build path on our
# machines; set e.g. TORCH_SPEC=torch to let pip choose), LAYERFREEZE_EXTRAS (default dev: the
# test tools, DeepSpeed, megatron-core, wandb, lm-eval, peft, bitsandbytes),
# LAYERFREEZE_CONSTRAINTS (default constraints.txt; empty = let pip resolve the ranges in setup.py).
# LAYERFREEZE_WITH_VLLM=1 also installs vLLM 0.33 for tests/unit/test_vllm_lora_load.py into its
# own directory LAYERFREEZE_VLLM_DIR (default ~/.cache/layerfreeze/vllm), with --no-deps: its
# wheel pins a CUDA torch. ~340 MB download, ~1 GB on disk; VLLM_SPEC may name a local wheel.
# LAYERFREEZE_WITH_COMPAT=1 also installs transformers $LAYERFREEZE_COMPAT_TRANSFORMERS (the
# release before the constrained one changed Falcon's attention) into its own directory for
# tests/unit/test_transformers_compat.py, which runs the family tests on it as well.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
CONSTRAINTS=${LAYERFREEZE_CONSTRAINTS-constraints.txt}
EXTRAS=${LAYERFREEZE_EXTRAS:-dev}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "[setup] installing ${TORCH_SPEC:-torch==2.13.0} (no torch found)"
  "$PY" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
# "Installed" means: layerfreeze from THIS checkout (checked from outside it), every module the
# tests import, and every version pinned in the constraints file. Anything else reinstalls.
HERE=$(pwd)
if ! (cd / && "$PY" - "$HERE" "$EXTRAS" "$HERE/$CONSTRAINTS" <<'PY'
import importlib, importlib.metadata as md, os, re, sys
here, extras, constraints = sys.argv[1], sys.argv[2], sys.argv[3]
import layerfreeze
if os.path.dirname(os.path.dirname(os.path.realpath(layerfreeze.__file__))) != os.path.realpath(here):
    sys.exit("layerfreeze is installed from another checkout")
if extras == "dev":
    for mod in ("deepspeed", "megatron.core", "peft", "lm_eval", "wandb", "sentencepiece",
                "pytest_timeout", "datasets", "bitsandbytes"):
        importlib.import_module(mod)
if os.path.isfile(constraints):
    for line in open(constraints, encoding="utf-8"):
        m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;#]+)", line)
        if not m:
            continue
        try:
            have = md.version(m[1]).split("+")[0]
        except md.PackageNotFoundError:
            continue  # a pinned package nothing here needs (the pins hold for what is installed)
        if have != m[2]:
            sys.exit(f"{m[1]} {have} installed, constraints pin {m[2]}")
PY
) >/dev/null 2>&1; then
  echo "[setup] installing layerfreeze[$EXTRAS]${CONSTRAINTS:+ with -c $CONSTRAINTS}"
  "$PY" -m pip install -q -e ".[$EXTRAS]" ${CONSTRAINTS:+-c "$CONSTRAINTS"}
fi
# shellcheck disable=SC2086  # the package lists split on purpose
install_apart() {  # DIR "PKGS": pip install --no-deps --target DIR, once per package list
  local dir=$1 pkgs=$2
  if [ "$(cat "$dir/.installed" 2>/dev/null)" != "$pkgs" ]; then
    echo "[setup] installing $pkgs (--no-deps) into $dir"
    rm -rf "$dir.partial"
    "$PY" -m pip install -q --no-deps --target "$dir.partial" $pkgs
    echo "$pkgs" >"$dir.partial/.installed"
    rm -rf "$dir" && mv "$dir.partial" "$dir"
  fi
}
if [ "${LAYERFREEZE_WITH_VLLM:-0}" = 1 ]; then
  # vLLM + what importing its LoRA loader needs that the project's environment lacks (pinned).
  install_apart "${LAYERFREEZE_VLLM_DIR:-$HOME/.cache/layerfreeze/vllm}" \
    "${VLLM_SPEC:-vllm==0.33.0} cbor2==6.3.0 pyzmq==27.3.0 oss-harmony==0.0.11 \
openai==3.57.0 jiter==0.19.0 pybase64==1.5.1 cachetools==8.0.2 msgspec==0.23.0 blake3==1.0.11 \
uvloop==0.23.0 prometheus_client==0.26.0 xgrammar==0.2.8 apache-tvm-ffi==0.1.11 \
fastapi==0.136.3 starlette==1.10.0 partial-json-parser==0.2.1.1.post7 llguidance==1.7.6 \
compressed-tensors==0.17.0 loguru==0.7.3"
fi
if [ "${LAYERFREEZE_WITH_COMPAT:-0}" = 1 ]; then
  v=${LAYERFREEZE_COMPAT_TRANSFORMERS:-5.24.0}
  install_apart "${LAYERFREEZE_COMPAT_DIR:-$HOME/.cache/layerfreeze/transformers-$v}" "transformers==$v"
fi
