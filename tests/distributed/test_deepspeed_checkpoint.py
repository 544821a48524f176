"""DeepSpeed checkpoints: a training process killed in the middle of writing a checkpoint leaves
the previous one (and ``latest``) loadable, and resuming from it reproduces the killed run; an
unreadable or foreign checkpoint is a clear error."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.helpers.dist import find_free_port, run_distributed

pytestmark = pytest.mark.slow

_CFG = {
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 1,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.1, "torch_adam": True}},
    "zero_optimization": {"stage": 2},
    "steps_per_print": 10**6,
}

# Trains 2 steps on one rank, checkpoints after step 1, records the loss of step 2, then starts
# the step-2 checkpoint and SIGKILLs itself right after DeepSpeed wrote its first file (argv[4]
# "ds") or right after the first file of the layout-independent part (argv[4] "elastic").
_CHILD = textwrap.dedent(
    """
    import json, os, signal, sys
    import torch
    sys.path.insert(0, sys.argv[3])
    from layerfreeze.engines.deepspeed import DeepSpeedRunner, init_distributed
    from tests.helpers.tiny_models import build_tiny_model

    root, cfg = sys.argv[1], json.loads(sys.argv[2])
    torch.set_num_threads(1)
    init_distributed("gloo")
    runner = DeepSpeedRunner(build_tiny_model("llama", num_layers=2), cfg, plan="freeze_deep")
    def batch(step):
        g = torch.Generator().manual_seed(step)
        ids = torch.randint(0, 128, (2, 8), generator=g)
        return [{"input_ids": ids, "labels": ids}]
    runner.train_step(batch(0))
    runner.save_checkpoint(root, client_state={"next": 1})
    loss = runner.train_step(batch(1)).loss
    with open(os.path.join(root, "..", "child_loss.json"), "w") as f:
        json.dump({"loss": loss}, f)
    import layerfreeze.engines.deepspeed.checkpoint as lfds
    owner, attr = (torch, "save") if sys.argv[4] == "ds" else (lfds, "save_file")
    real_save = getattr(owner, attr)
    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)
    setattr(owner, attr, save_then_die)
    runner.save_checkpoint(root, client_state={"next": 2})
    """
)


def _resume_body(rank: int, world: int, root: str) -> dict:
    from layerfreeze.checkpoint import CheckpointError
    from layerfreeze.engines.deepspeed import DeepSpeedRunner
    from tests.helpers.tiny_models import build_tiny_model

    runner = DeepSpeedRunner(build_tiny_model("llama", num_layers=2), _CFG, plan="freeze_deep")
    client = runner.load_checkpoint(root)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (2, 8), generator=g)
    loss = runner.train_step([{"input_ids": ids, "labels": ids}]).loss
    errors = {}
    # another plan: the checkpoint is refused, naming why
    other = DeepSpeedRunner(build_tiny_model("llama", num_layers=2), _CFG, plan="full")
    try:
        other.load_checkpoint(root)
    except CheckpointError as e:
        errors["plan"] = str(e)
    empty = Path(root).parent / "empty"
    empty.mkdir(exist_ok=True)
    try:
        other.load_checkpoint(empty)
    except CheckpointError as e:
        errors["empty"] = str(e)
    # a damaged file in the DeepSpeed part: detected from the manifest before DeepSpeed reads it
    ds_file = next((Path(root) / "step_00000001" / "ds").glob("*model_states.pt"))
    ds_file.write_bytes(ds_file.read_bytes()[:100])
    try:
        other.load_checkpoint(root)
    except CheckpointError as e:
        errors["damaged"] = str(e)
    return {"client": client, "step": runner.global_step, "loss": loss, "errors": errors}


def test_kill_during_save_keeps_previous_checkpoint_and_resume_matches(tmp_path):
    root = tmp_path / "ckpt"
    env = dict(
        os.environ,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(find_free_port()),
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
        DS_ACCELERATOR="cpu",
    )
    repo = str(Path(__file__).resolve().parents[2])
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(root), json.dumps(_CFG), repo, "ds"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    staging = [p.name for p in root.iterdir() if p.name.startswith(".staging.")]
    assert staging == ["step_00000002".join([".staging.", ""])], "the kill hit the step-2 save"
    assert (root / "latest").read_text().strip() == "step_00000001"
    killed_loss = json.loads((tmp_path / "child_loss.json").read_text())["loss"]

    res = run_distributed(_resume_body, world_size=1, args=(str(root),), timeout=300)[0]
    assert res["client"] == {"next": 1} and res["step"] == 2
    assert res["loss"] == pytest.approx(killed_loss, rel=1e-6)  # resumed == the run that was killed
    # the refusal names the differing fields (freeze_deep vs full), not two whole dicts
    plan_error = res["errors"]["plan"]
    assert "the plan differs (plan.schedule[0].plan.name: 'freeze_deep' in the checkpoint, " \
        "'full' in this run;" in plan_error, plan_error
    assert "{" not in plan_error and len(plan_error) < 700, plan_error
    assert "no checkpoint found" in res["errors"]["empty"]
    assert (
        "checkpoint is damaged" in res["errors"]["damaged"]
        and "model_states.pt" in res["errors"]["damaged"]
    )


def _resume_elastic_body(rank: int, world: int, root: str) -> dict:
    from layerfreeze.engines.deepspeed import DeepSpeedRunner
    from tests.helpers.tiny_models import build_tiny_model

    cfg = {**_CFG, "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    runner = DeepSpeedRunner(build_tiny_model("llama", num_layers=2), cfg, plan="freeze_deep")
    client = runner.load_checkpoint(root)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (2, 8), generator=g)[rank : rank + 1]  # half the batch each
    loss = runner.train_step([{"input_ids": ids, "labels": ids}]).loss
    return {"client": client, "step": runner.global_step, "loss": loss}


def test_kill_during_the_elastic_part_keeps_the_previous_checkpoint_usable_elsewhere(tmp_path):
    """Killed while writing the layout-independent part of the step-2 checkpoint (1 rank,
    ZeRO-2): the step-1 checkpoint resumes on 2 ranks at ZeRO-3 and its step-2 loss (a forward
    at the step-1 weights, the same 2 sequences split over the ranks) is the killed run's."""
    root = tmp_path / "ckpt"
    env = dict(
        os.environ,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(find_free_port()),
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
        DS_ACCELERATOR="cpu",
    )
    repo = str(Path(__file__).resolve().parents[2])
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(root), json.dumps(_CFG), repo, "elastic"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    staging = root / ".staging.step_00000002"
    assert (staging / "elastic" / "rank_00000.safetensors").is_file()  # the kill hit that part
    assert not (staging / "elastic" / "index.json").exists()
    assert (root / "latest").read_text().strip() == "step_00000001"
    killed_loss = json.loads((tmp_path / "child_loss.json").read_text())["loss"]

    res = run_distributed(_resume_elastic_body, world_size=2, args=(str(root),), timeout=300)
    for r in res:
        assert r["client"] == {"next": 1} and r["step"] == 2
        assert r["loss"] == pytest.approx(killed_loss, rel=1e-5)
