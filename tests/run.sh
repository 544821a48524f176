#!/usr/bin/env bash
# The project's test command (README.md and .ci/run call exactly this):
#   bash tests/run.sh            # installs what is missing, then unit + distributed + e2e on CPU
#   bash tests/run.sh -m "not slow"   # extra args go to pytest (quick inner loop)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# the tests also load our LoRA exports with vLLM's own loader (vLLM in its own --no-deps dir)
export LAYERFREEZE_WITH_VLLM=${LAYERFREEZE_WITH_VLLM:-1}   # 0 skips those tests
# ... and run the family tests on the previous transformers too (its own --no-deps dir)
export LAYERFREEZE_WITH_COMPAT=${LAYERFREEZE_WITH_COMPAT:-1}   # 0 skips that test
bash launch/setup_env.sh
export DS_ACCELERATOR=cpu WANDB_MODE=offline TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "${PYTHON:-python3}" -m pytest tests -q --timeout 900 -p no:cacheprovider --durations=25 "$@"
