"""SIGTERM / SIGINT during ``layerfreeze train``: nothing lost, every rank stops together, exit 75.

Slurm sends SIGTERM to every process of a job step before preemption or at the time limit (and
``scancel`` does the same); the tests send it to the whole process group of a real run the same
way (``os.killpg``), once the run has logged a few steps:

* one plain process: exit 75, one log line naming the signal, the step and the checkpoint, and
  the checkpoint of that step on disk; SIGINT with ``checkpoint.on_signal=false`` stops the
  same way without saving;
* two DeepSpeed ranks under torchrun: torchrun itself exits 1 (its agent turns the SIGTERM into
  a ``SignalException``), both workers stop after the same step, each appends its status 75 to
  ``$LAYERFREEZE_EXIT_FILE``; resuming (``resume: auto``) reproduces the losses an
  uninterrupted run has for the remaining steps;
* two Megatron-core pipeline stages (PP=2, through the tests' CPU shim entry): the same stop
  (both stages after the same step, checkpoint saved) and the resubmitted job finishes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.faults._train import launcher_env

REPO = Path(__file__).resolve().parents[2]
STEPS = 40


def _config(tmp: Path, out: Path, **checkpoint) -> Path:
    cfg = {
        "model": {
            "architecture": {
                "model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                "max_position_embeddings": 64, "tie_word_embeddings": False,
            },
            "attn_implementation": "eager",
        },
        "tokenizer": {"vocab_size": 1000},
        "data": {"paths": ["@bundled"], "seq_len": 16, "cache_dir": str(tmp / "cache")},
        "plan": {"spec": "freeze_deep"},
        "deepspeed": {
            "zero_optimization": {"stage": 2},
            "optimizer": {"type": "AdamW", "params": {"torch_adam": True}},
            "steps_per_print": 1000000,
        },
        "optim": {"lr": 3e-3, "warmup_steps": 2, "schedule": "cosine"},
        "train": {"steps": STEPS, "micro_batch_size": 2, "grad_accum_steps": 1, "seed": 3,
                  "num_threads": 1},
        "logging": {"out_dir": str(out), "log_every": 1, "progress": "none"},
        "checkpoint": {"every_steps": 0, "export_final": False, **checkpoint},
        "eval": {"every_steps": 0, "at_end": False},
    }
    path = tmp / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def _cmd(config: Path, nproc: int, module: str = "layerfreeze") -> list[str]:
    launcher = [sys.executable, "-m", module]
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node", str(nproc), "-m", module]
    return [*launcher, "train", "--config", str(config)]


def _train_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:  # a line being written
            continue
        if rec.get("type") == "train":
            steps.append(rec["step"])
    return steps


def _losses(out: Path) -> dict[int, float]:
    from layerfreeze.metrics import read_jsonl

    return {r["step"]: r["loss"] for r in read_jsonl(out / "metrics.jsonl") if r["type"] == "train"}


def _signal_mid_run(config: Path, out: Path, sig: int, nproc: int = 1, env: dict | None = None,
                    module: str = "layerfreeze"):
    """Start the run in its own process group, send ``sig`` to the whole group after step 2."""
    proc = subprocess.Popen(
        _cmd(config, nproc, module), cwd=REPO, env=env or launcher_env(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while max(_train_steps(out), default=0) < 2:
        assert proc.poll() is None, proc.communicate()[1][-4000:]
        assert time.monotonic() < deadline, "the run logged no step in 300 s"
        time.sleep(0.05)
    os.killpg(proc.pid, sig)
    stdout, stderr = proc.communicate(timeout=300)
    return proc.returncode, stderr


def _stop_line(stderr: str, sig: str) -> tuple[int, str]:
    lines = [x for x in stderr.splitlines() if f"stopped by {sig} after step" in x]
    assert len(lines) == 1, stderr[-4000:]  # rank 0 only
    m = re.search(rf"stopped by {sig} after step (\d+) of {STEPS}: (.*)", lines[0])
    assert m, lines[0]
    return int(m.group(1)), m.group(2)


@pytest.mark.slow
def test_sigterm_single_process_saves_and_exits_75(tmp_path):
    out = tmp_path / "run"
    rc, stderr = _signal_mid_run(_config(tmp_path, out), out, signal.SIGTERM)
    assert rc == 75, stderr[-4000:]
    assert "Traceback" not in stderr
    step, where = _stop_line(stderr, "SIGTERM")
    assert 2 <= step < STEPS
    ckpt = out / "checkpoints" / f"step_{step:08d}"
    assert where.startswith(f"checkpoint {ckpt}."), where
    assert ckpt.is_dir()
    assert (out / "checkpoints" / "latest").read_text().strip() == ckpt.name
    assert max(_train_steps(out)) == step  # the metrics file was closed after the last step
    assert not (out / "summary.json").exists()  # not a finished run


@pytest.mark.slow
def test_sigint_with_on_signal_false_stops_without_saving(tmp_path):
    out = tmp_path / "run"
    rc, stderr = _signal_mid_run(_config(tmp_path, out, on_signal=False), out, signal.SIGINT)
    assert rc == 75, stderr[-4000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    step, where = _stop_line(stderr, "SIGINT")
    assert 2 <= step < STEPS
    assert "no checkpoint to continue from yet" in where
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())


@pytest.mark.slow
def test_sigterm_two_ranks_torchrun_then_resume_matches_straight_run(tmp_path):
    exit_file = tmp_path / "exit_status"
    out = tmp_path / "run"
    config = _config(tmp_path, out)
    env = launcher_env(LAYERFREEZE_EXIT_FILE=str(exit_file))
    rc, stderr = _signal_mid_run(config, out, signal.SIGTERM, nproc=2, env=env)
    # torchrun's agent gets the SIGTERM too: it forwards it to the workers, waits for them and
    # exits 1 (SignalException); the workers' 75 reaches the job script through the file.
    assert rc == 1, stderr[-4000:]
    step, where = _stop_line(stderr, "SIGTERM")
    statuses = sorted(exit_file.read_text(encoding="utf-8").splitlines())
    assert [s.split(" stopped by")[0] for s in statuses] == ["rank 0: 75", "rank 1: 75"]
    assert all(f"after step {step} of" in s for s in statuses), statuses  # the same step
    ckpt = out / "checkpoints" / f"step_{step:08d}"
    assert ckpt.is_dir() and where.startswith(f"checkpoint {ckpt}.")

    # resubmit: the same command continues from that checkpoint (resume: auto)
    resumed = subprocess.run(_cmd(config, 2), cwd=REPO, env=launcher_env(), capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"resumed from {ckpt} at step {step}" in resumed.stderr

    straight_out = tmp_path / "straight"
    straight = subprocess.run(_cmd(_config(tmp_path, straight_out), 2), cwd=REPO, env=launcher_env(),
                              capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-4000:]
    expected, got = _losses(straight_out), _losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    for s in range(1, STEPS + 1):  # before the stop and after the resume
        assert got[s] == pytest.approx(expected[s], rel=1e-6, abs=1e-7), (s, step)


@pytest.mark.slow
def test_sigterm_megatron_pipeline_stops_both_stages_at_one_step(tmp_path):
    exit_file = tmp_path / "exit_status"
    out = tmp_path / "run"
    config = _config(tmp_path, out)
    cfg = yaml.safe_load(config.read_text())
    cfg.pop("deepspeed")
    cfg["engine"] = "megatron"
    cfg["model"]["attn_implementation"] = "sdpa"
    cfg["megatron"] = {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 2}
    cfg["train"]["grad_accum_steps"] = 2  # the 1F1B schedule needs >= PP micro-batches
    config.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    entry = "tests.helpers.megatron_train_entry"  # the CPU shim megatron-core needs here
    env = launcher_env(LAYERFREEZE_EXIT_FILE=str(exit_file))
    rc, stderr = _signal_mid_run(config, out, signal.SIGTERM, nproc=2, env=env, module=entry)
    assert rc == 1, stderr[-4000:]  # torchrun's own status (see the DeepSpeed test)
    step, where = _stop_line(stderr, "SIGTERM")
    statuses = sorted(exit_file.read_text(encoding="utf-8").splitlines())
    assert [s.split(" stopped by")[0] for s in statuses] == ["rank 0: 75", "rank 1: 75"]
    assert all(f"after step {step} of" in s for s in statuses), statuses
    ckpt = out / "checkpoints" / f"step_{step:08d}"
    assert ckpt.is_dir() and where.startswith(f"checkpoint {ckpt}.")
    resumed = subprocess.run(_cmd(config, 2, entry), cwd=REPO, env=launcher_env(), capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"resumed from {ckpt} at step {step}" in resumed.stderr
    assert sorted(_losses(out)) == list(range(1, STEPS + 1))


def test_stop_signals_record_the_first_and_a_later_ctrl_c_aborts(monkeypatch):
    """Real signals to this process: the first is recorded (no exception), repeated SIGTERMs
    and a SIGINT right after (torchrun's forward) are ignored, a SIGINT after
    ``ABORT_AFTER_S`` raises KeyboardInterrupt; the old handlers come back."""
    from layerfreeze.train import StopSignals

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    stops = StopSignals()
    stops.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # e.g. while the checkpoint is written
        os.kill(os.getpid(), signal.SIGINT)  # at once: a launcher forwarding the terminal's
        assert stops.received == signal.SIGTERM
        monkeypatch.setattr(StopSignals, "ABORT_AFTER_S", 0.0)
        time.sleep(0.01)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stops.restore()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
