"""Prune -> heal -> export, end to end through the real CLIs (Gromov et al.'s recipe in miniature).

``layerfreeze prune`` removes the block with the smallest angular distance from a tiny Llama
saved with its tokenizer; a short ``layerfreeze train`` run with the ``lora_all`` plan on the
pruned checkpoint heals it (loss goes down); its merged export loads with ``from_pretrained``,
keeps the pruned depth, generates, and differs from the pruned weights only where LoRA merged.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from layerfreeze.cli import main
from tests.e2e.test_train_cli import _env
from tests.helpers.dist import find_free_port
from tests.helpers.tiny_models import build_tiny_model

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def test_prune_then_heal_with_lora_then_export_loads(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from layerfreeze.data import train_tokenizer
    from layerfreeze.data.corpus import default_corpus_files
    from layerfreeze.metrics import read_jsonl

    tok_dir = train_tokenizer([default_corpus_files()[0]], tmp_path / "tok", vocab_size=400)
    src = tmp_path / "base"
    model = build_tiny_model("llama", num_layers=4, vocab_size=400, max_positions=256)
    model.save_pretrained(str(src))
    AutoTokenizer.from_pretrained(str(tok_dir)).save_pretrained(str(src))

    pruned = tmp_path / "pruned"
    assert (
        main(
            [
                "prune",
                "--model",
                str(src),
                "--num-layers",
                "1",
                "--out",
                str(pruned),
                "--probe",
                str(default_corpus_files()[0]),
                "--max-tokens",
                "1024",
            ]
        )
        == 0
    )
    removed = json.loads((pruned / "prune.json").read_text())["removed"]
    assert len(removed) == 1

    run = tmp_path / "heal"
    cfg = {
        "model": {"path": str(pruned), "attn_implementation": "eager"},
        "tokenizer": {"path": str(pruned)},
        "data": {
            "paths": [str(default_corpus_files()[0])],
            "seq_len": 32,
            "cache_dir": str(tmp_path / "cache"),
        },
        "plan": {"spec": "lora_all"},
        "deepspeed": {
            "zero_optimization": {"stage": 0},
            "optimizer": {"type": "AdamW", "params": {"torch_adam": True}},
            "steps_per_print": 1000000,
        },
        "optim": {"lr": 1e-2, "warmup_steps": 0, "schedule": "constant"},
        "train": {
            "steps": 8,
            "micro_batch_size": 4,
            "grad_accum_steps": 1,
            "seed": 3,
            "num_threads": 1,
        },
        "logging": {
            "out_dir": str(run),
            "log_every": 1,
            "progress": "none",
            "wandb_mode": "disabled",
        },
        "checkpoint": {"every_steps": 0},
        "eval": {"every_steps": 0, "at_end": False},
    }
    config = tmp_path / "heal.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    env = {**_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(find_free_port())}
    proc = subprocess.run(
        [sys.executable, "-m", "layerfreeze", "train", "--config", str(config)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]

    losses = [r["loss"] for r in read_jsonl(run / "metrics.jsonl") if r["type"] == "train"]
    assert len(losses) == 8 and losses[-1] < losses[0], losses  # healing lowers the loss

    healed = AutoModelForCausalLM.from_pretrained(str(run / "export")).eval()
    before = AutoModelForCausalLM.from_pretrained(str(pruned)).eval()
    assert healed.config.num_hidden_layers == before.config.num_hidden_layers == 3
    got, ref = healed.state_dict(), before.state_dict()
    assert set(got) == set(ref)
    changed = {k for k in ref if not torch.equal(got[k], ref[k])}
    assert changed and all(".layers." in k and k.endswith("proj.weight") for k in changed), changed
    tok = AutoTokenizer.from_pretrained(str(run / "export"))
    ids = torch.tensor([tok("The weather is")["input_ids"]])
    with torch.no_grad():
        out = healed.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == ids.shape[1] + 5
