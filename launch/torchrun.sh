#!/usr/bin/env bash
# Launch `layerfreeze train` with torchrun: one node or many (run this script once per node).
#
#   bash launch/torchrun.sh configs/tiny_llama/cpt_freeze_deep_deepspeed.yaml
#   NPROC_PER_NODE=8 bash launch/torchrun.sh configs/llama3_8b/cpt_freeze_deep_deepspeed.yaml train.steps=2000
#   # two nodes: on node 0 and node 1 respectively
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 NPROC_PER_NODE=8 bash launch/torchrun.sh CONFIG
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 NPROC_PER_NODE=8 bash launch/torchrun.sh CONFIG
#
# Env: NPROC_PER_NODE (default: GPUs on this node, else 2 CPU ranks), NNODES (1), NODE_RANK (0),
# MASTER_ADDR (127.0.0.1), MASTER_PORT (29500), PYTHON (python3). Without a GPU DeepSpeed runs
# on CPU over gloo (DS_ACCELERATOR=cpu is set for you).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ $# -lt 1 ]; then
  echo "usage: bash launch/torchrun.sh CONFIG.yaml [key.sub=value ...]" >&2
  exit 2
fi
CONFIG=$1; shift
PY=${PYTHON:-python3}
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if [ "$GPUS" = "0" ]; then
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
  NPROC=${NPROC_PER_NODE:-2}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
  NPROC=${NPROC_PER_NODE:-$GPUS}
fi
export WANDB_MODE=${WANDB_MODE:-offline}
# A user error (bad config value, missing file, empty corpus) makes every rank log one
# "ERROR ..." line and exit 2; torchrun then prints its ChildFailedError report and exits 1. The
# ranks also append that line to $LAYERFREEZE_ERROR_FILE, and this script prints it last, as
# "layerfreeze: rank R: <what is wrong>", and exits 2.
ERROR_FILE=$(mktemp "${TMPDIR:-/tmp}/layerfreeze-error.XXXXXX")
trap 'rm -f -- "$ERROR_FILE"' EXIT
export LAYERFREEZE_ERROR_FILE=$ERROR_FILE
set +e
"$PY" -m torch.distributed.run \
  --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "$NPROC" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  -m layerfreeze train --config "$CONFIG" "$@"
rc=$?
set -e
if [ -s "$ERROR_FILE" ]; then
  echo "layerfreeze: $(head -n 1 "$ERROR_FILE")" >&2
  exit 2
fi
exit "$rc"
