"""Helpers for the fault tests: a tiny real ``layerfreeze train`` run in a subprocess and a
byte-level snapshot of a directory tree."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import yaml

from tests.helpers.dist import find_free_port

REPO = Path(__file__).resolve().parents[2]


def tiny_config(out_dir: Path, cache_dir: Path, **sections) -> dict:
    """A 2-layer, hidden-32 Llama trained with DeepSpeed ZeRO-0 for 4 steps, checkpoints every 2."""
    cfg = {
        "model": {
            "architecture": {
                "model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                "max_position_embeddings": 128, "tie_word_embeddings": False,
            },
            "attn_implementation": "eager",
        },
        "tokenizer": {"vocab_size": 1000},
        "data": {"paths": ["@bundled"], "seq_len": 16, "cache_dir": str(cache_dir)},
        "plan": {"spec": "freeze_deep"},
        "deepspeed": {
            "zero_optimization": {"stage": 0},
            "optimizer": {"type": "AdamW", "params": {"torch_adam": True}},
            "steps_per_print": 1000000,
        },
        "optim": {"lr": 3e-3, "warmup_steps": 1},
        "train": {"steps": 4, "micro_batch_size": 2, "grad_accum_steps": 1, "seed": 7,
                  "num_threads": 1},
        "logging": {"out_dir": str(out_dir), "log_every": 1, "progress": "none"},
        "checkpoint": {"every_steps": 2, "keep_last": 3, "export_final": False},
        "eval": {"every_steps": 0, "at_end": False},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def launcher_env(**extra: str) -> dict:
    """The test environment for a child that starts its own ranks (torchrun, the deepspeed
    launcher, a one-process ``layerfreeze train`` picking its port): no rendezvous variables."""
    env = dict(os.environ)
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update({
        "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(REPO),
        **extra,
    })
    return env


def train_env() -> dict:
    env = dict(os.environ)
    env.update({
        "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(REPO),
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(find_free_port()),
    })
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        env.pop(k, None)
    return env


def train_cmd(config: Path, *overrides: str) -> list[str]:
    """The ``layerfreeze train`` command line (run it with :func:`train_env`)."""
    return [sys.executable, "-m", "layerfreeze", "train", "--config", str(config), *overrides]


def train(config: Path, *overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``layerfreeze train`` in a subprocess (one process)."""
    return subprocess.run(
        train_cmd(config, *overrides), cwd=REPO, env=train_env(), capture_output=True, text=True,
        timeout=timeout,
    )


def last_line(text: str) -> str:
    lines = [x for x in text.splitlines() if x.strip()]
    return lines[-1] if lines else ""


def tree_snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` -> sha256 of its bytes (``dir`` for directories)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run_module(module: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m module *args`` from the repository with the launcher environment and a free
    ``MASTER_PORT`` (for the CLI paths that bring up a process group)."""
    env = launcher_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(find_free_port()))
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_refused(proc: subprocess.CompletedProcess, out_dir: Path, *needles: str) -> str:
    """``proc`` exited 2 with no traceback, its last stderr line holds every needle, and
    ``out_dir`` was never created; returns that line."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    line = last_line(proc.stderr)
    for needle in needles:
        assert needle in line, proc.stderr[-4000:]
    assert not out_dir.exists()
    return line
