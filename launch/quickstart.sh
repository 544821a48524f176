#!/usr/bin/env bash
# README main job: set up the environment, then run a real small continued pre-training job end
# to end on CPU with no network: a tiny Llama-style model built from a config, a SentencePiece
# tokenizer trained on the bundled mixed Chinese/English corpus, 2 DeepSpeed ranks over gloo
# with ZeRO-2 and the freeze_deep plan, a checkpoint with C-Eval/CMMLU evaluation, offline wandb
# logs, a merged Hugging Face export and a final summary of where everything went.
#
#   bash launch/quickstart.sh                                  # a few minutes on 2 CPU cores
#   LAYERFREEZE_EVAL_DATA=/data/eval bash launch/quickstart.sh # folder holding ceval/ and cmmlu/
#   LAUNCHER=deepspeed bash launch/quickstart.sh               # the deepspeed launcher instead of torchrun
#   bash launch/quickstart.sh train.steps=20                   # extra args: config overrides
#
# Env: LAYERFREEZE_EVAL_DATA (default ../shared/data beside the repository), OUT_DIR (default
# runs/quickstart; replaced on each run), NPROC (2), LAUNCHER (torchrun | deepspeed), PYTHON.
# The first run on a fresh machine also compiles DeepSpeed's small CPU communication op (once).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
CONFIG=configs/tiny_llama/cpt_freeze_deep_deepspeed.yaml
OUT_DIR=${OUT_DIR:-runs/quickstart}
NPROC=${NPROC:-2}

bash launch/setup_env.sh

export DS_ACCELERATOR=cpu WANDB_MODE=${WANDB_MODE:-offline} TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# torch.distributed deprecation notices from inside DeepSpeed are not actionable here
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore::FutureWarning}

EVAL_DATA=${LAYERFREEZE_EVAL_DATA:-$ROOT/../shared/data}
EVAL_ARGS=()
if [ -d "$EVAL_DATA/ceval" ] && [ -d "$EVAL_DATA/cmmlu" ]; then
  EVAL_ARGS=("eval.data_dir=$(cd "$EVAL_DATA" && pwd)")
else
  echo "[quickstart] C-Eval/CMMLU data not found at $EVAL_DATA: evaluation is skipped."
  echo "[quickstart] To enable it, set LAYERFREEZE_EVAL_DATA to a folder holding ceval/ and cmmlu/"
  echo "[quickstart] (the released CSV files), or run with eval.data_dir=null when online (hub download)."
  EVAL_ARGS=("eval.data_dir=$EVAL_DATA")
fi

if [ -e "$OUT_DIR" ]; then
  echo "[quickstart] replacing the previous quickstart output $OUT_DIR"
  rm -rf -- "$OUT_DIR"
fi

ARGS=(--config "$CONFIG" "logging.out_dir=$OUT_DIR" "${EVAL_ARGS[@]}" "$@")
echo "[quickstart] $NPROC DeepSpeed ranks (gloo, CPU), config $CONFIG"
# A user error (bad config value, missing file, empty corpus) makes every rank log one
# "ERROR ..." line and exit 2; torchrun then prints its ChildFailedError report and exits 1. The
# ranks also append that line to $LAYERFREEZE_ERROR_FILE, and this script prints it last, as
# "layerfreeze: rank R: <what is wrong>", and exits 2.
ERROR_FILE=$(mktemp "${TMPDIR:-/tmp}/layerfreeze-error.XXXXXX")
trap 'rm -f -- "$ERROR_FILE"' EXIT
export LAYERFREEZE_ERROR_FILE=$ERROR_FILE
set +e
if [ "${LAUNCHER:-torchrun}" = "deepspeed" ]; then
  "$PY" -m deepspeed.launcher.runner --num_gpus "$NPROC" --master_port "${MASTER_PORT:-29511}" \
    --module layerfreeze train "${ARGS[@]}"
else
  "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m layerfreeze train "${ARGS[@]}"
fi
rc=$?
set -e
if [ -s "$ERROR_FILE" ]; then
  echo "layerfreeze: $(head -n 1 "$ERROR_FILE")" >&2
  exit 2
fi
[ "$rc" -eq 0 ] || exit "$rc"
echo "[quickstart] done: see $OUT_DIR/summary.json (metrics: $OUT_DIR/metrics.jsonl, wandb: $OUT_DIR/wandb)"
