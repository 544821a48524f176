"""A rendered Slurm job run end to end on this machine, and ``--scheduler local`` for real.

Stand-in ``srun`` and ``scontrol`` scripts go first on ``PATH``: ``srun`` starts the job step
once per "node" of a 2-node allocation (``SLURM_NODEID`` 0 and 1, both on 127.0.0.1), so the
rendered script's two real torchrun agents meet in a c10d rendezvous and train one CPU rank
each over gloo; ``scontrol show hostnames`` names 127.0.0.1 and any other ``scontrol`` call is
recorded. After the first checkpoint the job gets what ``#SBATCH --signal=TERM@N`` delivers:
SIGTERM to every process of the job step (both torchrun agents and their ranks), not to the
batch shell or srun. Every process must be gone afterwards and nothing requeued; submitted again
the job resumes from the newest checkpoint and finishes the run.
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

from layerfreeze.cli import main
from tests.helpers.dist import find_free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
STEPS = 20
EVERY = 5

SRUN = r"""#!/usr/bin/env bash
# Stand-in srun: run the step once per node of the allocation, here, node i with SLURM_NODEID=i.
while [ $# -gt 0 ] && [ "${1#-}" != "$1" ]; do shift; done  # options (all --key=value)
pids=()
for ((i = 0; i < SLURM_NNODES; i++)); do
  SLURM_NODEID=$i SLURM_PROCID=$i SLURM_LOCALID=0 "$@" >"$STANDIN_LOGS/node$i.log" 2>&1 &
  pids+=($!)
done
stop() { kill -TERM "${pids[@]}" 2>/dev/null; wait; exit 143; }
trap stop TERM INT
rc=0
for p in "${pids[@]}"; do
  wait "$p"; r=$?
  if [ "$r" -ne 0 ] && [ "$rc" -eq 0 ]; then  # --kill-on-bad-exit
    rc=$r; kill -TERM "${pids[@]}" 2>/dev/null
  fi
done
exit "$rc"
"""

SCONTROL = r"""#!/usr/bin/env bash
# Stand-in scontrol: every node of the allocation is this machine.
case "$1" in
  show) [ "$2" = hostnames ] || exit 1
        for ((i = 0; i < SLURM_NNODES; i++)); do echo 127.0.0.1; done ;;
  *) echo "$*" >>"$STANDIN_LOGS/scontrol.log"; exit 1 ;;
esac
"""


def _config(tmp: Path) -> Path:
    cfg = {
        "model": {
            "architecture": {
                "model_type": "llama",
                "hidden_size": 128,
                "intermediate_size": 256,
                "num_hidden_layers": 4,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "max_position_embeddings": 256,
                "tie_word_embeddings": False,
            },
            "attn_implementation": "eager",
        },
        "tokenizer": {"vocab_size": 1000},
        "data": {"paths": ["@bundled"], "seq_len": 64, "cache_dir": str(tmp / "cache")},
        "plan": {"spec": "freeze_deep"},
        "deepspeed": {
            "zero_optimization": {"stage": 2},
            "optimizer": {"type": "AdamW", "params": {"torch_adam": True}},
            "steps_per_print": 1000000,
        },
        "optim": {"lr": 3e-3, "warmup_steps": 2, "schedule": "cosine"},
        "train": {"steps": STEPS, "micro_batch_size": 4, "seed": 11, "num_threads": 1},
        "logging": {
            "out_dir": str(tmp / "run"),
            "log_every": 1,
            "progress": "none",
            "wandb_project": None,
        },
        "checkpoint": {"every_steps": EVERY, "keep_last": 5, "export_final": False},
        "eval": {"every_steps": 0, "at_end": False},
    }
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def _standins(tmp: Path) -> tuple[Path, Path]:
    bin_dir, logs = tmp / "bin", tmp / "standin_logs"
    bin_dir.mkdir()
    logs.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir, logs


def _env(bin_dir: Path, logs: Path) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_"))
    }
    env.update(
        {
            "PATH": f"{bin_dir}{os.pathsep}{os.path.dirname(sys.executable)}{os.pathsep}{env['PATH']}",
            "PYTHON": sys.executable,
            "PYTHONPATH": str(REPO),
            "STANDIN_LOGS": str(logs),
            "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NODELIST": "node[0-1]",
            "SLURM_NNODES": "2",
            "SLURM_SUBMIT_DIR": str(REPO),
            "MASTER_PORT": str(find_free_port()),
            "DS_ACCELERATOR": "cpu",
            "OMP_NUM_THREADS": "1",
            "WANDB_MODE": "disabled",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONWARNINGS": "ignore",
        }
    )
    return env


def _steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["step"] for r in rows if r.get("type") == "train"]


def _procs_mentioning(needle: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if needle.encode() in (d / "cmdline").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                continue
    return pids


def _wait_for(predicate, proc: subprocess.Popen, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        if proc.poll() is not None:
            return predicate()
        time.sleep(0.1)
    return False


def _step_processes(config: Path) -> list[int]:
    """The job step's processes: torchrun agents and ranks (their command lines name the
    config), not the stand-in srun, which runs in the batch step."""
    pids = []
    for pid in _procs_mentioning(str(config)):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not any(a.endswith(b"srun") for a in argv[:2]):
            pids.append(pid)
    return pids


def test_rendered_slurm_job_stops_on_the_time_limit_sigterm_and_resumes(tmp_path):
    config = _config(tmp_path)
    script = tmp_path / "job.sbatch"
    assert (
        main(
            [
                "launch",
                "--scheduler",
                "slurm",
                "--nodes",
                "2",
                "--gpus-per-node",
                "1",
                "--config",
                str(config),
                "--out",
                str(script),
            ]
        )
        == 0
    )
    bin_dir, logs = _standins(tmp_path)
    env = _env(bin_dir, logs)
    out, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    first = ckpts / f"step_{EVERY:08d}"

    job = subprocess.Popen(
        ["bash", str(script)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert _wait_for(first.is_dir, job, timeout=600), (
            job.communicate(timeout=60)[0],
            *(p.read_text() for p in logs.glob("node*.log")),
        )
        assert job.poll() is None, "the run ended before the time-limit signal could be sent"
        step = _step_processes(config)
        assert len(step) >= 4, step  # 2 agents + 2 ranks
        for pid in step:  # what --signal=TERM@N delivers (proctrack/cgroup: the whole step)
            os.kill(pid, signal.SIGTERM)
        text = job.communicate(timeout=180)[0]
    finally:
        if job.poll() is None:
            job.kill()
    # torchrun answers SIGTERM with SignalException (exit 1) whatever its ranks exit with; the
    # ranks saved a checkpoint and wrote 75 to $LAYERFREEZE_EXIT_FILE, so the job exits 75 and
    # is not requeued; submitting it again resumes from that checkpoint.
    assert job.returncode == 75, text
    assert "stopped by a signal after saving a checkpoint" in text, text
    assert not (logs / "scontrol.log").exists()
    stopped_at = max(_steps(out))
    assert EVERY <= stopped_at < STEPS
    assert (ckpts / f"step_{stopped_at:08d}").is_dir()  # checkpoint.on_signal (the default)
    time.sleep(2)
    assert _procs_mentioning(str(config)) == []  # agents and ranks are gone

    # Slurm starts the requeued job again: same script, same environment.
    env["MASTER_PORT"] = str(find_free_port())
    rerun = subprocess.run(
        ["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    node_logs = {p.name: p.read_text() for p in logs.glob("node*.log")}
    assert rerun.returncode == 0, (rerun.stdout, rerun.stderr, node_logs)
    both = "".join(node_logs.values())  # rank 0 may sit on either "node"
    assert "resumed from" in both, node_logs
    resumed_step = int(re.search(r"resumed from \S*step_(\d{8})", both).group(1))
    assert resumed_step == stopped_at  # the checkpoint saved on the signal
    steps = _steps(out)
    # the requeued job continued from the checkpoint to the end of the run
    assert steps[-(STEPS - resumed_step) :] == list(range(resumed_step + 1, STEPS + 1))
    assert set(range(1, STEPS + 1)) <= set(steps)
    assert (ckpts / f"step_{STEPS:08d}").is_dir()


def test_local_scheduler_runs_torchrun(tmp_path):
    config = _config(tmp_path)
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "MASTER_"))
    }
    env.update({"PYTHONPATH": str(REPO), "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"})
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "layerfreeze",
            "launch",
            "--scheduler",
            "local",
            "--gpus-per-node",
            "2",
            "--config",
            str(config),
            "train.steps=4",
            "checkpoint.every_steps=0",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "torch.distributed.run --nnodes 1 --nproc-per-node 2" in proc.stderr
    assert _steps(tmp_path / "run")[-1] == 4
    assert (tmp_path / "run" / "summary.json").is_file()
