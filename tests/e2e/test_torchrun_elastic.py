"""``layerfreeze train`` as two nodes on one machine: two real ``torchrun`` agents
(``--nnodes 2``, c10d rendezvous on 127.0.0.1, one CPU rank each over gloo).

* Elastic restart: with ``--max-restarts 1``, one worker is SIGKILLed mid-run; torchrun restarts
  the group, the job resumes from its last checkpoint (``checkpoint.resume=auto``) and runs to the
  end; the steps run again after the restart give the losses they gave before the kill.
* Kill during a save, workers included: every agent and every worker is SIGKILLed while a
  checkpoint is being staged; the previous checkpoint stays valid, no process is left, and a
  second invocation on ONE node (1 rank, ZeRO-1, accumulation 2: the same global batch) resumes
  from it to the end (an elastic resume through the CLI).
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

from tests.helpers.dist import find_free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
STEPS = 30
EVERY = 5


def _config(tmp: Path, name: str = "run.yaml", accum: int = 1, stage: int = 2) -> Path:
    cfg = {
        "model": {
            "architecture": {
                "model_type": "llama",
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "max_position_embeddings": 128,
                "tie_word_embeddings": False,
            },
            "attn_implementation": "eager",
        },
        "tokenizer": {"vocab_size": 1000},
        "data": {"paths": ["@bundled"], "seq_len": 32, "cache_dir": str(tmp / "cache")},
        "plan": {"spec": "freeze_deep"},
        "deepspeed": {
            "zero_optimization": {"stage": stage},
            "optimizer": {"type": "AdamW", "params": {"torch_adam": True}},
            "steps_per_print": 1000000,
        },
        "optim": {"lr": 1e-3, "warmup_steps": 2, "schedule": "cosine"},
        "train": {
            "steps": STEPS,
            "micro_batch_size": 2,
            "grad_accum_steps": accum,
            "seed": 3,
            "num_threads": 1,
        },
        "logging": {
            "out_dir": str(tmp / "run"),
            "log_every": 1,
            "progress": "none",
            "wandb_mode": "disabled",
        },
        "checkpoint": {
            "every_steps": EVERY,
            "keep_last": 3,
            "resume": "auto",
            "export_final": False,
        },
        "eval": {"every_steps": 0, "at_end": False},
    }
    path = tmp / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def _env() -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RANK", "WORLD_SIZE", "MASTER_", "LOCAL_"))
    }
    env.update(
        {
            "DS_ACCELERATOR": "cpu",
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO),
            "WANDB_MODE": "disabled",
            "PYTHONWARNINGS": "ignore",
            "TOKENIZERS_PARALLELISM": "false",
        }
    )
    return env


def _agents(config: Path, logs: Path, tag: str, nodes: int = 2) -> list[subprocess.Popen]:
    port = find_free_port()
    procs = []
    for node in range(nodes):
        log = open(logs / f"{tag}-node{node}.log", "w")  # noqa: SIM115 (closed with the process)
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--nnodes",
                    str(nodes),
                    "--node-rank",
                    str(node),
                    "--nproc-per-node",
                    "1",
                    "--max-restarts",
                    "1",
                    "--monitor-interval",
                    "0.5",
                    "--rdzv-backend",
                    "c10d",
                    "--rdzv-endpoint",
                    f"127.0.0.1:{port}",
                    "--rdzv-id",
                    f"lf-{tag}",
                    "-m",
                    "layerfreeze",
                    "train",
                    "--config",
                    str(config),
                ],
                cwd=REPO,
                env=_env(),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
    return procs


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return out


def _workers(agent: subprocess.Popen) -> list[int]:
    """The agent's worker processes (python children running ``layerfreeze``)."""
    pids = []
    for pid in _children(agent.pid):
        try:
            if b"layerfreeze" in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(pid)
        except OSError:
            continue
    return pids


def _train_rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line being written
            continue
        if row.get("type") == "train" and "loss" in row:
            rows.append(row)
    return rows


def _wait(predicate, procs, timeout: float, poll: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        if all(p.poll() is not None for p in procs):
            return predicate()
        time.sleep(poll)
    return False


def _finish(procs, timeout: float) -> list[int]:
    try:
        return [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def _logs(logs: Path) -> str:
    return "\n".join(f"== {p.name}\n{p.read_text()[-3000:]}" for p in sorted(logs.glob("*.log")))


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_torchrun_restarts_the_group_after_a_worker_dies_and_resumes(tmp_path):
    config, out = _config(tmp_path), tmp_path / "run"
    logs = tmp_path / "logs"
    logs.mkdir()
    agents = _agents(config, logs, "restart")
    killed_after = None
    try:
        first_ckpt = out / "checkpoints" / f"step_{EVERY:08d}"
        ok = _wait(
            lambda: (
                first_ckpt.is_dir()
                and max((r["step"] for r in _train_rows(out)), default=0) >= EVERY + 2
            ),
            agents,
            timeout=300,
        )
        assert ok, _logs(logs)
        victims = _workers(agents[1])
        assert len(victims) == 1, (victims, _logs(logs))
        os.kill(victims[0], signal.SIGKILL)
        # the metrics file is rewritten from the checkpoint's step on resume: keep the killed
        # attempt's losses now
        before = {r["step"]: r["loss"] for r in _train_rows(out)}
        killed_after = max(before)
        assert killed_after < STEPS, "the run ended before the kill"
        codes = _finish(agents, timeout=400)
    finally:
        for a in agents:
            if a.poll() is None:
                a.kill()
    text = _logs(logs)
    assert codes == [0, 0], text
    # the engine and the recipe both log it
    resumed = sorted({int(s) for s in re.findall(r"resumed from \S*step_(\d{8})", text)})
    assert len(resumed) == 1 and resumed[0] % EVERY == 0 and resumed[0] <= killed_after, text
    rows = _train_rows(out)
    steps = [r["step"] for r in rows]
    # the restarted group continued from the checkpoint to the end
    assert steps[-(STEPS - resumed[0]) :] == list(range(resumed[0] + 1, STEPS + 1))
    assert (out / "summary.json").is_file()
    after = {r["step"]: r["loss"] for r in rows[len(rows) - (STEPS - resumed[0]) :]}
    again = sorted(s for s in before if s > resumed[0])
    assert again == list(range(resumed[0] + 1, killed_after + 1)), before.keys()
    for s in again:  # steps run twice give the same loss (2-rank CPU runs agree to ~1e-3)
        assert after[s] == pytest.approx(before[s], rel=3e-3), s


def test_kill_during_save_with_the_workers_killed_keeps_the_previous_checkpoint(tmp_path):
    from layerfreeze.checkpoint import list_checkpoints, read_latest, validate_checkpoint

    config, out = _config(tmp_path), tmp_path / "run"
    ckpts = out / "checkpoints"
    logs = tmp_path / "logs"
    logs.mkdir()
    agents = _agents(config, logs, "kill")
    try:
        # the second save (step 2*EVERY) is being staged: the first one is committed
        ok = _wait(
            lambda: (
                (ckpts / f"step_{EVERY:08d}").is_dir()
                and any(p.name == f".staging.step_{2 * EVERY:08d}" for p in ckpts.iterdir())
            ),
            agents,
            timeout=300,
            poll=0.005,
        )
        assert ok, _logs(logs)
        # Killing the agents alone would leave the workers running (their own sessions):
        # kill the workers and the agents, all with SIGKILL.
        victims = [w for a in agents for w in _workers(a)]
        assert len(victims) == 2, victims
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        for a in agents:
            a.kill()
        _finish(agents, timeout=60)
    finally:
        for a in agents:
            if a.poll() is None:
                a.kill()
    time.sleep(1)
    assert not any(_alive(pid) for pid in victims)
    assert read_latest(ckpts) == f"step_{EVERY:08d}"
    validate_checkpoint(ckpts / f"step_{EVERY:08d}")
    assert [c.step for c in list_checkpoints(ckpts)] == [EVERY]

    # resumed by `layerfreeze train` on ONE node (1 rank, ZeRO-1, accumulation 2: the same global
    # batch): an elastic resume through the CLI
    one_node = _config(tmp_path, "one_node.yaml", accum=2, stage=1)
    again = _agents(one_node, logs, "again", nodes=1)
    codes = _finish(again, timeout=400)
    text = _logs(logs)
    assert codes == [0], text
    assert "elastic resume: checkpoint of 2 ranks at ZeRO-2 onto 1 ranks at ZeRO-1" in text
    assert re.search(rf"resumed from \S*step_{EVERY:08d}", text), text
    steps = [r["step"] for r in _train_rows(out)]
    assert steps[-(STEPS - EVERY) :] == list(range(EVERY + 1, STEPS + 1))
    assert read_latest(ckpts) == f"step_{STEPS:08d}"
