"""Training metrics: the JSONL file (always), the rank-0 progress bar, wandb (offline default).

Only global rank 0 writes; other ranks get an object whose methods do nothing, so the recipe
calls them unconditionally. Records are flat dicts; per-layer values use ``/`` in their keys
(``grad_norm/layers.3``) so wandb groups them into panels.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from layerfreeze.config import LoggingConfig
from layerfreeze.utils.io import atomic_write_text
from layerfreeze.utils.logging import get_logger, log_rank0

__all__ = ["MetricsLogger", "redact_secrets", "read_jsonl"]

logger = get_logger(__name__)

# Keys whose values must never reach a log, a metrics file or wandb's config panel.
_SECRET_KEY = re.compile(r"(api[_-]?key|token|secret|password|passwd|credential)", re.IGNORECASE)


def redact_secrets(obj: Any) -> Any:
    """Copy of ``obj`` with the value of every secret-looking key replaced by ``"<redacted>"``."""
    if isinstance(obj, dict):
        return {
            k: ("<redacted>" if isinstance(k, str) and _SECRET_KEY.search(k) else redact_secrets(v))
            for k, v in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        return [redact_secrets(v) for v in obj]
    return obj


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a metrics file written by :class:`MetricsLogger` (one JSON object per line)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _fmt_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m:02d}:{sec:02d}"


def _json_safe(value: Any) -> Any:
    # JSON has no NaN/Inf; keep them readable as strings rather than writing invalid JSON.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLogger:
    """Rank-0 sink for training metrics.

    Args:
        cfg: the ``logging`` section.
        total_steps: the run's last optimizer step (progress bar length, ETA).
        start_step: optimizer steps already done (0, or the resumed checkpoint's step). On a
            resume, records of later steps left in the JSONL by an interrupted run are dropped
            (an atomic rewrite; the run directory's lock keeps other writers out), so the file
            reads as one uninterrupted run. A new run (0) moves an existing non-empty JSONL aside
            (``<name>.<UTC time>``) instead of dropping its rows.
        run_config: the resolved run config (logged to wandb with secrets redacted).
        enabled: write anything at all (pass ``is_main_process()``).
        run_id: the wandb run id: a resumed run passes the one its checkpoint recorded (the
            same wandb run goes on), a new run a new one (None: a new random id).
    """

    def __init__(
        self,
        cfg: LoggingConfig,
        total_steps: int,
        start_step: int = 0,
        run_config: dict[str, Any] | None = None,
        enabled: bool = True,
        run_id: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.enabled = enabled
        self.out_dir = Path(cfg.out_dir)
        self.jsonl_path = self.out_dir / cfg.jsonl
        self.total_steps = total_steps
        self.start_step = start_step
        self.wandb_dir: Path | None = None
        self._wandb = None
        self._bar = None
        self._rich = None
        self._t0 = time.perf_counter()
        self._file = None
        if not enabled:
            return
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if start_step > 0:
            self._truncate_after(start_step)
        else:
            self._move_aside()
        self._file = open(self.jsonl_path, "a", encoding="utf-8")
        if cfg.wandb_project and cfg.wandb_mode != "disabled":
            self._start_wandb(redact_secrets(run_config or {}))
        self._start_progress()

    # -- set-up -------------------------------------------------------------------------------

    def _truncate_after(self, step: int) -> None:
        if not self.jsonl_path.exists():
            return
        kept = [r for r in read_jsonl(self.jsonl_path) if int(r.get("step", 0)) <= step]
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept)
        atomic_write_text(self.jsonl_path, text)

    def _move_aside(self) -> None:
        if self.jsonl_path.is_file() and self.jsonl_path.stat().st_size > 0:
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            kept = self.jsonl_path.with_name(f"{self.jsonl_path.name}.{stamp}")
            os.replace(self.jsonl_path, kept)
            log_rank0(logger, f"metrics: an earlier run's {self.jsonl_path.name} kept as {kept}")

    def _start_progress(self) -> None:
        # Bars redraw with carriage returns: in a log file (batch jobs, CI) they become one huge
        # line, so without a terminal progress goes to log lines every log_every steps.
        if not sys.stderr.isatty():
            return
        if self.cfg.progress == "tqdm":
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=self.total_steps, initial=self.start_step, desc="train", unit="step",
                dynamic_ncols=True, mininterval=0.5,
            )
        elif self.cfg.progress == "rich":
            from rich.progress import (
                BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn,
            )

            self._rich = Progress(
                TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
            )
            self._rich.start()
            self._rich_task = self._rich.add_task(
                "train", total=self.total_steps, completed=self.start_step, info=""
            )

    def _start_wandb(self, run_config: dict[str, Any]) -> None:
        import wandb

        self.wandb_dir = self.out_dir / "wandb"
        self.wandb_dir.mkdir(parents=True, exist_ok=True)
        # The id comes from the recipe: a resumed run continues its wandb run, a new one starts
        # its own (an id per out_dir gave two runs into one directory the same wandb run).
        run_id = self.run_id
        self._wandb = wandb.init(
            project=self.cfg.wandb_project,
            name=self.cfg.wandb_run_name or self.out_dir.name,
            mode=self.cfg.wandb_mode,
            dir=str(self.out_dir),
            id=run_id,
            resume="allow",
            config=run_config,
        )
        log_rank0(logger, f"wandb ({self.cfg.wandb_mode}): {self.wandb_dir}")

    # -- logging ------------------------------------------------------------------------------

    def log(self, step: int, metrics: dict[str, Any], kind: str = "train") -> None:
        """Write one record ``{"type": kind, "step": step, **metrics}`` to JSONL and wandb."""
        if not self.enabled:
            return
        record = {"type": kind, "step": step, **{k: _json_safe(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        if self._wandb is not None:
            numeric = {
                (k if kind == "train" or k.startswith(f"{kind}/") else f"{kind}/{k}"): v
                for k, v in metrics.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)
            }
            self._wandb.log(numeric, step=step)

    def log_plan(self, rows: list[dict[str, Any]], phase: int = 0) -> None:
        """Record the plan's per-layer accounting (trainable/total params per layer)."""
        if not self.enabled:
            return
        record = {"type": "plan", "phase": phase, "step": self.start_step, "rows": rows}
        self._file.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
        self._file.flush()
        if self._wandb is not None:
            import wandb

            columns = ["name", "index", "policy", "trainable_params", "total_params"]
            table = wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])
            self._wandb.log({f"plan/phase{phase}": table}, step=self.start_step)
            for r in rows:
                key = f"trainable_params/{r['name']}/phase{phase}"
                self._wandb.summary[key] = r["trainable_params"]

    def progress(self, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
        """Advance the progress bar to ``step``; show loss, lr and tokens/s (the bar shows ETA)."""
        if not self.enabled:
            return
        info = f"loss={loss:.4f} lr={lr:.2e} tok/s={tokens_per_s:,.0f}"
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix_str(info, refresh=False)
        elif self._rich is not None:
            self._rich.update(self._rich_task, completed=step, info=info)
        elif self.cfg.progress != "none" and step % self.cfg.log_every == 0:
            done = step - self.start_step
            eta = (time.perf_counter() - self._t0) / done * (self.total_steps - step) if done else 0
            log_rank0(logger, f"step {step}/{self.total_steps} {info} eta={_fmt_seconds(eta)}")

    def message(self, msg: str, level: int = logging.INFO) -> None:
        """Log ``msg`` without breaking the progress bar's line."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.clear()
        logger.log(level, msg)
        if self._bar is not None:
            self._bar.refresh()

    def close_progress(self) -> None:
        """Finish the progress bar (before printing a summary below it)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._rich is not None:
            self._rich.stop()
            self._rich = None

    def close(self) -> None:
        """Close the progress bar, the JSONL file and the wandb run (idempotent)."""
        self.close_progress()
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
