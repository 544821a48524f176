"""The real CLI in a fresh process: results on stdout only, whatever DeepSpeed prints or logs goes to
stderr (issue 10). In-process tests cannot see these: DeepSpeed prints at import time and when
its process group starts, once per process."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.dist import find_free_port
from tests.helpers.eval_fixtures import cached_tokenizer_dir
from tests.helpers.tiny_models import build_tiny_model

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def _cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "layerfreeze", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
    )


def test_prune_json_on_stdout_with_deepspeed_guessing_the_accelerator(tmp_path):
    """transformers/accelerate import DeepSpeed while saving; without DS_ACCELERATOR on a machine
    without CUDA DeepSpeed logs 'Setting accelerator to CPU' through its stdout handler, which
    broke ``prune --json | python -m json.tool``."""
    ckpt = tmp_path / "ckpt"
    build_tiny_model("llama", num_layers=4).save_pretrained(str(ckpt))
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    env["OMP_NUM_THREADS"] = "1"
    proc = _cli(["prune", "--model", str(ckpt), "--num-layers", "1", "--strategy", "deepest",
                 "--out", str(tmp_path / "pruned"), "--json"], env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)  # the whole of stdout is the report
    assert report["removed"] == [2] and report["num_layers_after"] == 3
    import torch

    if not torch.cuda.is_available():  # DeepSpeed had to guess, and said so on stderr
        assert "WARNING DeepSpeed: Setting accelerator to CPU" in proc.stderr


def test_train_leaves_stdout_empty(tmp_path):
    """DeepSpeed's CPU communication op prints '... built successfully' with print() when the
    process group starts; train has no stdout result, so that line belongs on stderr."""
    rng = random.Random(0)
    words = ["layer", "freeze", "train", "model", "deep", "plan", "token", "shallow"]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(80))
                                  for _ in range(200)), encoding="utf-8")
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)  # an earlier in-process test may have left its rendezvous here
    # a world of one still opens a rendezvous port: a free one, so parallel runs don't clash
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(find_free_port()))
    out_dir = tmp_path / "run"
    proc = _cli([
        "train", "--config", str(REPO / "configs/tiny_llama/cpt_freeze_deep_deepspeed.yaml"),
        "model.architecture.hidden_size=32", "model.architecture.intermediate_size=64",
        "model.architecture.num_attention_heads=2", "model.architecture.num_key_value_heads=1",
        f"tokenizer.path={cached_tokenizer_dir()}", f"data.paths=[{corpus}]",
        f"data.cache_dir={tmp_path / 'cache'}", "data.seq_len=32", "train.steps=2",
        "train.micro_batch_size=2", "checkpoint.every_steps=0", "eval.at_end=false",
        "logging.wandb_mode=disabled", f"logging.out_dir={out_dir}",
    ], env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == ""
    assert json.loads((out_dir / "summary.json").read_text())["steps_done"] == 2
