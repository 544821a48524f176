#!/usr/bin/env bash
# Launch `layerfreeze train` with the `deepspeed` launcher (single node, or multi-node with a hostfile).
#
#   bash launch/deepspeed.sh configs/tiny_llama/cpt_freeze_deep_deepspeed.yaml
#   NUM_GPUS=8 bash launch/deepspeed.sh configs/llama3_8b/cpt_freeze_deep_deepspeed.yaml
#   # multi-node: a hostfile with lines "node0 slots=8"; run on node0 only (ssh to the others)
#   HOSTFILE=hostfile NUM_NODES=2 bash launch/deepspeed.sh configs/llama3_8b/cpt_freeze_deep_deepspeed.yaml
#
# Env: NUM_GPUS (default: GPUs on this node, else 2 CPU ranks), HOSTFILE, NUM_NODES,
# MASTER_ADDR, MASTER_PORT (29500), PYTHON (python3). The launcher appends --local_rank=N,
# which the layerfreeze CLI ignores (LOCAL_RANK carries the same).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ $# -lt 1 ]; then
  echo "usage: bash launch/deepspeed.sh CONFIG.yaml [key.sub=value ...]" >&2
  exit 2
fi
CONFIG=$1; shift
PY=${PYTHON:-python3}
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if [ "$GPUS" = "0" ]; then
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  N=${NUM_GPUS:-2}
else
  N=${NUM_GPUS:-$GPUS}
fi
export WANDB_MODE=${WANDB_MODE:-offline}
ARGS=(--num_gpus "$N" --master_port "${MASTER_PORT:-29500}")
if [ -n "${HOSTFILE:-}" ]; then
  ARGS+=(--hostfile "$HOSTFILE" --num_nodes "${NUM_NODES:-1}")
  [ -n "${MASTER_ADDR:-}" ] && ARGS+=(--master_addr "$MASTER_ADDR")
fi
# A user error (bad config value, missing file, empty corpus) makes every rank log one
# "ERROR ..." line and exit 2; the launcher then reports the failed process and exits 1. The
# ranks also append that line to $LAYERFREEZE_ERROR_FILE, and this script prints it last, as
# "layerfreeze: rank R: <what is wrong>", and exits 2.
ERROR_FILE=$(mktemp "${TMPDIR:-/tmp}/layerfreeze-error.XXXXXX")
trap 'rm -f -- "$ERROR_FILE"' EXIT
export LAYERFREEZE_ERROR_FILE=$ERROR_FILE
set +e
"$PY" -m deepspeed.launcher.runner "${ARGS[@]}" --module layerfreeze train --config "$CONFIG" "$@"
rc=$?
set -e
if [ -s "$ERROR_FILE" ]; then
  echo "layerfreeze: $(head -n 1 "$ERROR_FILE")" >&2
  exit 2
fi
exit "$rc"
