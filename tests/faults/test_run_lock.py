"""One run per output directory: a second ``layerfreeze train`` into a directory another run is
using is refused with one line naming the holder (it used to delete the first run's
in-progress save and rewrite its metrics); a lock left by a dead run on this host is taken
over with a warning; one from another host is refused with how to remove it. Every run gets
its own wandb id; a resumed run keeps its id."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.faults._train import (
    REPO, last_line, tiny_config, train, train_cmd, train_env, write_config,
)

pytestmark = pytest.mark.slow

LOCK = ".layerfreeze.lock"


def _train_rows(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:  # a line being written
            continue
        if r.get("type") == "train":
            rows.append(r["step"])
    return rows


def test_second_run_into_a_used_directory_is_refused_and_the_first_is_untouched(tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config(out, tmp_path / "cache", train={"steps": 100000},
                      checkpoint={"every_steps": 5, "keep_last": 2})
    config = write_config(tmp_path / "cfg.yaml", cfg)
    first = subprocess.Popen(
        train_cmd(config), cwd=REPO, env=train_env(), stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while len(_train_rows(out)) < 12:  # training, past its first checkpoints
            assert first.poll() is None, first.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "first run did not start training"
            time.sleep(0.5)
        holder = json.loads((out / LOCK).read_text())
        assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()

        second = train(config)

        assert second.returncode == 2, second.stderr[-3000:]
        line = last_line(second.stderr)
        assert "Traceback" not in second.stderr
        assert f"logging.out_dir: {out} is in use by another training run" in line, line
        assert f"host {socket.gethostname()}, pid {first.pid}" in line, line
        rows_after = _train_rows(out)
        time.sleep(2)
        assert first.poll() is None  # the first run goes on ...
        later = _train_rows(out)
        assert later[: len(rows_after)] == rows_after == list(range(1, len(rows_after) + 1))
        assert len(later) > len(rows_after)  # ... and keeps appending to its metrics
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    # killed: its lock stays behind, stale (same host, PID gone)
    assert json.loads((out / LOCK).read_text())["pid"] == first.pid


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_stale_lock_of_a_dead_run_on_this_host_is_taken_over(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    pid = _dead_pid()
    (out / LOCK).write_text(json.dumps({
        "host": socket.gethostname(), "pid": pid, "started": 0, "command": "layerfreeze train",
    }))
    config = write_config(tmp_path / "cfg.yaml", tiny_config(out, tmp_path / "cache"))
    proc = train(config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warning = next(x for x in proc.stderr.splitlines() if "taking over the lock" in x)
    assert "WARNING" in warning and f"host {socket.gethostname()}, pid {pid}," in warning
    assert not (out / LOCK).exists()  # released at exit


def test_lock_from_another_host_is_refused_with_how_to_remove_it(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    lock = out / LOCK
    lock.write_text(json.dumps({
        "host": "node-elsewhere-17", "pid": 4242, "started": 0, "command": "layerfreeze train",
    }))
    before = lock.read_bytes()
    config = write_config(tmp_path / "cfg.yaml", tiny_config(out, tmp_path / "cache"))
    proc = train(config)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = last_line(proc.stderr)
    assert "host node-elsewhere-17, pid 4242" in line and f"delete {lock}" in line, line
    assert lock.read_bytes() == before and sorted(os.listdir(out)) == [LOCK]


def _wandb_ids(out: Path) -> set[str]:
    return {p.name.rsplit("-", 1)[-1] for p in (out / "wandb").glob("offline-run-*")}


def test_every_run_gets_its_own_wandb_id_and_a_resume_keeps_it(tmp_path):
    out = tmp_path / "run"
    logging_cfg = {"wandb_project": "lf-lock", "wandb_mode": "offline"}
    no_ckpt = {"every_steps": 0, "save_final": False}
    config = write_config(
        tmp_path / "cfg.yaml",
        tiny_config(out, tmp_path / "cache", logging=logging_cfg, checkpoint=no_ckpt),
    )
    assert train(config).returncode == 0
    first = _wandb_ids(out)
    first_rows = (out / "metrics.jsonl").read_text()
    # a new run into the same directory (no checkpoint to resume): a new wandb run
    assert train(config).returncode == 0
    second = _wandb_ids(out) - first
    assert len(first) == 1 and len(second) == 1, (first, second)
    kept = [p for p in out.iterdir() if p.name.startswith("metrics.jsonl.")]
    assert len(kept) == 1 and kept[0].read_text() == first_rows  # the first run's rows kept

    # a run with checkpoints, then its resume: the same wandb id
    out2 = tmp_path / "run2"
    config2 = write_config(
        tmp_path / "cfg2.yaml", tiny_config(out2, tmp_path / "cache", logging=logging_cfg)
    )
    assert train(config2).returncode == 0
    (run_id,) = _wandb_ids(out2)
    proc = train(config2, "train.steps=6")
    assert proc.returncode == 0 and "at step 4" in proc.stderr, proc.stderr[-3000:]
    assert _wandb_ids(out2) >= {run_id} and all(
        i == run_id for i in _wandb_ids(out2)
    ), _wandb_ids(out2)
    assert run_id not in first | second
