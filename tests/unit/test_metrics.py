"""MetricsLogger: JSONL always, resume truncation, non-finite values, rank gating, progress bars."""

from __future__ import annotations

import json
import math

import pytest

from layerfreeze.config import LoggingConfig
from layerfreeze.metrics import MetricsLogger, read_jsonl


@pytest.mark.parametrize("progress", ["none", "tqdm", "rich"])
def test_records_are_written_as_json_lines(tmp_path, progress):
    cfg = LoggingConfig(out_dir=str(tmp_path / "run"), progress=progress)
    m = MetricsLogger(cfg, total_steps=3)
    m.log_plan([{"name": "layers.0", "index": 0, "policy": "full", "trainable_params": 10, "total_params": 10}])
    for step in (1, 2, 3):
        m.progress(step, loss=1.0 / step, lr=1e-3, tokens_per_s=100.0)
        m.log(step, {"loss": 1.0 / step, "lr": 1e-3})
    m.log(3, {"eval/ceval/acc_macro": 0.25}, kind="eval")
    m.close()
    m.close()  # idempotent
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["type"] for r in records] == ["plan", "train", "train", "train", "eval"]
    assert [r["step"] for r in records[1:4]] == [1, 2, 3]
    assert records[2]["loss"] == pytest.approx(0.5)
    assert records[0]["rows"][0]["trainable_params"] == 10


def test_non_finite_values_stay_valid_json(tmp_path):
    m = MetricsLogger(LoggingConfig(out_dir=str(tmp_path), progress="none"), total_steps=2)
    m.log(1, {"loss": math.nan, "grad_norm": math.inf})
    m.close()
    line = (tmp_path / "metrics.jsonl").read_text().strip()
    record = json.loads(line)  # strict JSON parsers reject bare NaN
    assert record["loss"] == "nan" and record["grad_norm"] == "inf"
    assert "NaN" not in line


def test_resume_drops_records_after_the_checkpoint_step(tmp_path):
    cfg = LoggingConfig(out_dir=str(tmp_path), progress="none")
    m = MetricsLogger(cfg, total_steps=10)
    for step in range(1, 8):  # the interrupted run got to step 7; its last checkpoint was step 4
        m.log(step, {"loss": float(step)})
    m.close()
    m = MetricsLogger(cfg, total_steps=10, start_step=4)
    for step in range(5, 11):
        m.log(step, {"loss": 100.0 + step})
    m.close()
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 11))
    assert [r["loss"] for r in records] == [1.0, 2.0, 3.0, 4.0] + [100.0 + s for s in range(5, 11)]


def test_disabled_logger_writes_nothing(tmp_path):
    m = MetricsLogger(LoggingConfig(out_dir=str(tmp_path / "run")), total_steps=3, enabled=False)
    m.log(1, {"loss": 1.0})
    m.log_plan([])
    m.progress(1, 1.0, 1e-3, 1.0)
    m.message("hello")
    m.close()
    assert not (tmp_path / "run").exists()


def test_without_a_terminal_progress_is_logged_with_eta(tmp_path):
    import logging

    lines: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    lf_logger = logging.getLogger("layerfreeze")
    handler = _Collect()
    lf_logger.addHandler(handler)
    old_level = lf_logger.level
    lf_logger.setLevel(logging.INFO)
    try:
        # pytest captures stderr, so this is the batch-job path: log lines every log_every steps
        m = MetricsLogger(LoggingConfig(out_dir=str(tmp_path), log_every=2), total_steps=4)
        for step in range(1, 5):
            m.progress(step, loss=2.0, lr=1e-3, tokens_per_s=10.0)
        m.close()
    finally:
        lf_logger.removeHandler(handler)
        lf_logger.setLevel(old_level)
    progress = [line for line in lines if line.startswith("step ")]
    assert [line.split()[1] for line in progress] == ["2/4", "4/4"]
    assert "loss=2.0000 lr=1.00e-03 tok/s=10" in progress[0] and "eta=" in progress[0]
    assert progress[1].endswith("eta=00:00")
