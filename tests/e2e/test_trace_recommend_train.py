"""``layerfreeze trace --recommend`` -> ``layerfreeze plan --plan plan.yaml`` ->
``layerfreeze train`` with the recommended plan, as subprocesses on a tiny saved model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.helpers.dist import find_free_port
from tests.helpers.eval_fixtures import save_eval_checkpoint

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def _env() -> dict:
    env = dict(os.environ)
    env.update(
        {
            "DS_ACCELERATOR": "cpu",
            "WANDB_MODE": "offline",
            "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONWARNINGS": "ignore",
            "PYTHONPATH": str(REPO),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(find_free_port()),
        }
    )
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        env.pop(k, None)
    return env


def _cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "layerfreeze", *args],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize("family", ["freeze", "hlpt"])
def test_trace_recommend_plan_train(tmp_path, family):
    save_eval_checkpoint(tmp_path / "model")
    corpus = REPO / "layerfreeze" / "data" / "corpus" / "zh.txt"

    r = _cli(
        "trace",
        "--model",
        str(tmp_path / "model"),
        "--probe",
        str(corpus),
        "--max-tokens",
        "256",
        "--seq-len",
        "64",
        "--batch-size",
        "2",
        "--measures",
        "angular,logit_lens,skip,stability",
        "--stability-steps",
        "1",
        "--out",
        str(tmp_path / "trace"),
        "--recommend",
        "--budget",
        "0.3",
        "--family",
        family,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "recommended plan" in r.stdout
    rec = json.loads((tmp_path / "trace" / "recommendation.json").read_text())

    r = _cli(
        "plan",
        "--model",
        str(tmp_path / "model"),
        "--plan",
        str(tmp_path / "trace" / "plan.yaml"),
        "--json",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["trainable_params"] == rec["trainable_params"]

    cfg = {
        "model": {"path": str(tmp_path / "model"), "attn_implementation": "eager"},
        "tokenizer": {"path": str(tmp_path / "model")},
        "data": {"paths": [str(corpus)], "seq_len": 32, "cache_dir": str(tmp_path / "cache")},
        "plan": {"spec": "full"},
        "deepspeed": {
            "zero_optimization": {"stage": 0},
            "optimizer": {"type": "AdamW", "params": {"torch_adam": True}},
            "steps_per_print": 1000000,
        },
        "optim": {"lr": 1e-2, "warmup_steps": 0, "weight_decay": 0.0},
        "train": {"steps": 3, "micro_batch_size": 2, "seed": 0, "num_threads": 1},
        "logging": {"out_dir": str(tmp_path / "run"), "log_every": 1, "progress": "none"},
        "checkpoint": {"every_steps": 0},
        "eval": {"every_steps": 0, "at_end": False},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    r = _cli("train", "--config", str(tmp_path / "run.yaml"), rec["train_override"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "plan" in (tmp_path / "run" / "config.yaml").read_text()
    if family == "freeze":
        # the frozen layers of the exported model are the saved model's, bit for bit
        k = int(rec["plan_compact"].split(":")[0].split("-")[-1]) + 1
        before = load_file(str(tmp_path / "model" / "model.safetensors"))
        after = load_file(str(tmp_path / "run" / "export" / "model.safetensors"))
        for name, t in before.items():
            frozen = not any(name.startswith(f"model.layers.{i}.") for i in range(k))
            assert torch.equal(t, after[name]) == frozen, name
