"""The continued pre-training recipe: ``setup() -> train() -> cleanup()``, read top to bottom.

Run it through the CLI (one process, ``torchrun`` or the ``deepspeed`` launcher)::

    layerfreeze train --config configs/tiny_llama/cpt_freeze_deep_deepspeed.yaml train.steps=20
    torchrun --nproc_per_node 2 -m layerfreeze train --config CONFIG [key.sub=value ...]

What a run does: validate everything that can be checked without training (config, plan
against the model's layer count, data files, the checkpoint to resume from) before writing
anything; train or load the tokenizer; tokenize the corpus once into a memory-mapped cache;
have the engine chosen by ``engine:`` (DeepSpeed or Megatron-core) build or load the model,
install every phase's adapters and set ``requires_grad`` from the first plan; then loop:
micro-batches -> optimizer step (skipped when the loss is NaN/Inf on any rank) -> metrics ->
phase switch -> checkpoint -> evaluation. At the end: final checkpoint, final evaluation, merged
Hugging Face export, and a summary of where everything went.

The recipe talks to the engine only through the ``EngineAdapter`` Protocol
(:mod:`layerfreeze.engines.base`); each engine module also provides ``check_run_config``,
``init_distributed`` and ``runner_from_run_config`` for the recipe.

Length: over the ~700-line guide on purpose: the recipe is meant to be read top to bottom in one
file, as torchtune's recipes are (setup checks, the loop, checkpoints, signals, evaluation and the
final export in the order they run); each piece it calls lives in its own module.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import shlex
import shutil
import signal
import threading
import time
import typing
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from layerfreeze.checkpoint import checkpoint_tag, list_checkpoints
from layerfreeze.config import RunConfig
from layerfreeze.engines.common import trained_then_frozen
from layerfreeze.errors import ConfigError
from layerfreeze.modeling import build_model, model_num_layers, special_token_ids
from layerfreeze.optim import WarmupDecayLR, lr_factor
from layerfreeze.plan import LayerPlan
from layerfreeze.schedule import PlanSchedule
from layerfreeze.utils import dist
from layerfreeze.utils.io import atomic_write_json, atomic_write_text
from layerfreeze.utils.logging import get_logger, log_rank0
from layerfreeze.utils.schema import describe_fields, suggest, to_dict
from layerfreeze.utils.seed import get_rng_state, seed_everything, set_rng_state

__all__ = [
    "EXIT_INTERRUPTED",
    "StopSignals",
    "TrainingInterrupted",
    "TrainingStopped",
    "RunSummary",
    "Recipe",
    "run_training",
    "build_schedule",
    "model_num_layers",
    "resolve_run_plans",
    "build_model",
    "lr_factor",
    "describe_schema",
]

logger = get_logger(__name__)

class TrainingStopped(RuntimeError):
    """The run stopped early on purpose (too many consecutive NaN/Inf losses); the message says
    which checkpoint to resume from."""


#: ``layerfreeze train``'s exit status after a SIGTERM / SIGINT stop (``EX_TEMPFAIL``): stopped
#: by a signal, checkpoint saved; resubmit the same job and ``checkpoint.resume: auto`` continues.
EXIT_INTERRUPTED = 75


class TrainingInterrupted(RuntimeError):
    """Every rank stopped at the same step boundary after a SIGTERM / SIGINT (saved per
    ``checkpoint.on_signal``); the message names the signal, the step and the checkpoint.

    Attributes:
        signal_name: ``"SIGTERM"`` or ``"SIGINT"``.
        step: the last finished optimizer step.
        checkpoint: the checkpoint a resubmitted job continues from (None when there is none).
    """

    def __init__(self, message: str, signal_name: str, step: int, checkpoint: str | None):
        super().__init__(message)
        self.signal_name = signal_name
        self.step = step
        self.checkpoint = checkpoint


class StopSignals:
    """Records SIGTERM / SIGINT instead of dying, so the training loop can stop between steps.

    The handler only stores the signal number (the first one wins). Repeats of SIGTERM, e.g.
    a second one while the checkpoint is being written, are ignored; a SIGINT more than
    :attr:`ABORT_AFTER_S` seconds after the first (Ctrl-C pressed again) raises
    ``KeyboardInterrupt`` as usual, so an interactive user can still abort at once (the
    checkpoint commit is atomic: the previous checkpoint survives). Earlier repeats are
    ignored: torchrun's agent forwards the terminal's SIGINT to its workers, which got it too.
    :meth:`Recipe.train` all-reduces the signal at every step boundary, so all ranks stop after
    the same step even when only some of them got it. Installed only in the main thread
    (Python's rule); the previous handlers come back on :meth:`restore`.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)
    ABORT_AFTER_S = 2.0

    def __init__(self) -> None:
        self.received = 0
        self._first_at = 0.0
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if not self.received:
            self.received = signum
            self._first_at = time.monotonic()
        elif signum == signal.SIGINT and time.monotonic() - self._first_at > self.ABORT_AFTER_S:
            raise KeyboardInterrupt

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


# ---------------------------------------------------------------------------------------------
# Pure helpers (no process group, no writes): also used by `layerfreeze validate`.
# ---------------------------------------------------------------------------------------------


def build_schedule(cfg: RunConfig) -> PlanSchedule:
    """The run's plan schedule (a single open-ended phase when ``plan.spec`` is used), with
    ``new_rows(from_id=auto)`` as the first id ``tokenizer.extend_from`` adds."""
    spec, schedule = _with_first_new_id(cfg)
    if schedule is not None:
        from layerfreeze.rotation import RotationConfig, build_rotation_schedule, is_rotation

        if is_rotation(schedule):  # one phase per interval, up to train.steps
            rot = RotationConfig.parse(schedule, path="plan.schedule")
            return build_rotation_schedule(rot, model_num_layers(cfg.model), cfg.train.steps)
        return PlanSchedule.parse(schedule, path="plan.schedule")
    return PlanSchedule.single(LayerPlan.parse(spec, path="plan.spec"))


def _with_first_new_id(cfg: RunConfig) -> tuple[Any, Any]:
    """``plan.spec`` and ``plan.schedule`` with ``from_id=auto`` replaced by the length of
    ``tokenizer.extend_from`` (unchanged without it: the plan then refuses ``auto``)."""
    if not cfg.tokenizer.extend_from:
        return cfg.plan.spec, cfg.plan.schedule
    from layerfreeze.data.extend_run import base_first_new_id
    from layerfreeze.policies.new_rows import substitute_auto_from_id

    try:
        first = base_first_new_id(cfg.tokenizer.extend_from)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return (substitute_auto_from_id(cfg.plan.spec, first),
            substitute_auto_from_id(cfg.plan.schedule, first))


def check_eval_subjects(cfg: RunConfig) -> None:
    """Check ``eval.subjects`` against each benchmark's subject list, without loading questions.

    The list comes from ``eval.data_dir``'s mapping file, or the built-in table when the
    directory is null (hub) or missing. ``layerfreeze validate`` runs this; the training recipe
    loads the questions themselves before training (:meth:`Recipe.setup`).

    Raises:
        ConfigError: an unknown subject, with a did-you-mean and how to list the subjects.
    """
    if not cfg.eval.enabled:
        return
    from layerfreeze.evaluation.data import list_subjects

    data_dir = cfg.eval.data_dir
    source = data_dir if data_dir is not None and Path(data_dir).is_dir() else None
    problems = []
    for benchmark in cfg.eval.benchmarks:
        wanted = cfg.eval.subjects.get(benchmark) or []
        if not wanted:
            continue
        try:
            known = sorted(list_subjects(benchmark, source))
        except ValueError as e:  # a malformed mapping file: named by list_subjects
            problems.append(f"eval.data_dir: {e}")
            continue
        for subject in wanted:
            if subject not in known:
                problems.append(
                    f"eval.subjects: {benchmark} has no subject {subject!r}."
                    f"{suggest(subject, known)} Run `layerfreeze eval --benchmark {benchmark} "
                    f"--list-subjects` for all {len(known)} names."
                )
    if problems:
        raise ConfigError(problems)


def resolve_run_plans(cfg: RunConfig) -> list[str]:
    """Resolve every phase's plan against the model's layer count; return printable tables.

    Raises:
        ConfigError: a plan that does not fit the model (naming the phase and the layers).
    """
    schedule = build_schedule(cfg)
    n = model_num_layers(cfg.model)
    lines: list[str] = []
    problems: list[str] = []
    phases = schedule.phases
    if isinstance(cfg.plan.schedule, Mapping) and len(phases) > 2:  # rotation: fits by build
        phases = phases[:2]
    for i, phase in enumerate(phases):
        path = "plan.spec" if cfg.plan.spec is not None else f"plan.schedule[{i}].plan"
        try:
            resolved = phase.plan.resolve(n, path=path)
        except ConfigError as e:
            problems.extend(e.problems)
            continue
        end = "end" if phase.until_step is None else f"step {phase.until_step}"
        lines.append(f"phase {i} ({phase.plan}) until {end} on a {n}-layer model:")
        lines.append(resolved.table())
    if len(phases) < len(schedule.phases):
        lines.append(f"... {len(schedule.phases) - len(phases)} more rotation phases")
    if problems:
        raise ConfigError(problems)
    return lines


#: Kernel pseudo-filesystems: nothing a run writes can live there (``/proc/x`` cannot be created).
_PSEUDO_FS = {
    "proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "debugfs", "tracefs",
    "securityfs", "configfs", "pstore", "bpf", "fusectl", "mqueue", "binfmt_misc",
}


def _filesystem_type(path: Path) -> str | None:
    """The type of the filesystem holding existing ``path`` (Linux ``/proc/self/mounts``)."""
    try:
        mounts = Path("/proc/self/mounts").read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    best, fs = "", None
    target = str(path.resolve())
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, fs = point, fields[2]
    return fs


def check_output_dirs(cfg: RunConfig) -> None:
    """Check that every directory the run writes can be created, before anything is written.

    For each of ``logging.out_dir``, ``checkpoint.dir``, ``checkpoint.export_dir`` and
    ``data.cache_dir`` the nearest existing ancestor must be a writable directory outside the
    kernel's pseudo-filesystems (``/proc``, ``/sys``, ``/dev``).

    Raises:
        ConfigError: every unusable directory, named by its key.
    """
    wanted = [("logging.out_dir", Path(cfg.logging.out_dir))]  # the defaults of the others
    if cfg.checkpoint.dir:
        wanted.append(("checkpoint.dir", cfg.checkpoint_dir))
    if cfg.checkpoint.export_dir and cfg.checkpoint.export_final:
        wanted.append(("checkpoint.export_dir", cfg.export_dir))
    wanted.append(("data.cache_dir", cfg.data.resolved_cache_dir()))
    problems = []
    for key, path in wanted:
        existing = path.expanduser().absolute()
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        fs = _filesystem_type(existing)
        if fs in _PSEUDO_FS:
            why = f"{existing} is on the kernel's {fs} filesystem, where nothing can be written"
        elif not existing.is_dir():
            why = f"{existing} is not a directory"
        elif (err := _write_probe(existing)) is not None:
            why = f"{existing} is not writable ({err})"
        else:
            continue
        problems.append(f"{key}: cannot create {str(path)!r}: {why}. Choose another directory.")
    if problems:
        raise ConfigError(problems)


def _write_probe(directory: Path) -> str | None:
    """Why this process cannot create a file in ``directory`` (None when it can): a probe file
    is created and removed, since ``os.access`` says yes to root on a read-only mount."""
    import tempfile

    try:
        fd, probe = tempfile.mkstemp(prefix=".layerfreeze-write-probe.", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return e.strerror or str(e)
    return None


def _field_type(cls: type, path: str) -> Any:
    tp: Any = cls
    for part in path.split("."):
        tp = typing.get_type_hints(tp)[part]
    return tp


def describe_schema(cls: type) -> str:
    """Every config field as ``path: type = default`` and its docstring (for ``validate``)."""
    lines: list[str] = []
    for path, tp, default, doc in describe_fields(cls):
        if tp == "section":
            lines.append(f"\n[{path}] {doc}")
            continue
        hint = _field_type(cls, path)
        if typing.get_origin(hint) is typing.Literal:
            tp = " | ".join(repr(a) for a in typing.get_args(hint))
        lines.append(f"  {path}: {tp} = {default!r}")
        for doc_line in doc.splitlines():
            lines.append(f"      {doc_line}")
    return "\n".join(lines).lstrip("\n")


# ---------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------


@dataclass
class RunSummary:
    """Where a finished (or stopped) run put everything; printed at the end."""

    out_dir: str
    steps_done: int
    final_loss: float | None
    skipped_steps: int
    metrics_jsonl: str
    config_file: str
    tokenizer_dir: str | None = None
    wandb_dir: str | None = None
    checkpoint_dir: str | None = None
    checkpoints: list[str] = field(default_factory=list)
    eval_dir: str | None = None
    eval_files: list[str] = field(default_factory=list)
    export_dir: str | None = None
    adapter_dir: str | None = None
    notes: list[str] = field(default_factory=list)

    def render(self) -> str:
        """Human-readable summary (one item per line)."""
        rows = [
            ("output directory", self.out_dir),
            ("steps", f"{self.steps_done} (skipped NaN/Inf steps: {self.skipped_steps})"),
            ("final loss", "n/a" if self.final_loss is None else f"{self.final_loss:.4f}"),
            ("resolved config", self.config_file),
            ("metrics (JSONL)", self.metrics_jsonl),
            ("tokenizer", self.tokenizer_dir or "(from tokenizer.path)"),
            ("wandb (offline)", self.wandb_dir or "disabled (set logging.wandb_project)"),
            ("checkpoints", f"{self.checkpoint_dir} ({', '.join(self.checkpoints) or 'none'})"),
            ("evaluation", self.eval_dir or "skipped"),
            ("merged HF export", self.export_dir or "skipped (checkpoint.export_final=false)"),
        ]
        if self.adapter_dir:
            rows.append(("adapter", self.adapter_dir))
        lines = ["run summary:"] + [f"  {k:<18} {v}" for k, v in rows]
        lines += [f"  {f}" for f in self.eval_files]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


class Recipe:
    """One training run. Call :meth:`setup`, :meth:`train`, then :meth:`cleanup` (always).

    Args:
        cfg: the validated run config.
    """

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.out_dir = Path(cfg.logging.out_dir)
        self.ckpt_dir = cfg.checkpoint_dir
        self.step = 0
        self.skipped_steps = 0
        self.bad_streak = 0
        self.last_loss: float | None = None
        self.saved: list[str] = []
        self.notes: list[str] = []
        self.metrics = None
        self.eval_cb = None
        self.diag = None
        self.diag_records: list[tuple[int, dict[str, float]]] = []
        self.runner = None
        self.lock = None
        self.wandb_run_id: str | None = None
        self.run_meta: dict[str, Any] = {}
        self._created_out_dir = False
        self.signals = StopSignals()

    # -- setup --------------------------------------------------------------------------------

    def setup(self) -> None:
        """Validate, then build tokenizer, data, model, plan and engine; resume if asked."""
        cfg = self.cfg
        # 1. Everything checkable without a process group or a write: DeepSpeed config, plans
        #    against the model's layer count, data paths, the checkpoint to resume from.
        self.engine = load_engine(cfg.engine)
        # WORLD_SIZE from the launcher before init
        for line in self.engine.check_run_config(cfg, dist.get_world_size()):
            log_rank0(logger, line, level=logging.WARNING)
        self.schedule = build_schedule(cfg)
        self.plan_tables = resolve_run_plans(cfg)
        from layerfreeze.data.corpus import resolve_files

        resolve_files(cfg.data.paths, key="data.paths")
        check_output_dirs(cfg)  # every rank, before the process group starts

        # One run per output directory (global rank 0 holds the lock until cleanup()). A
        # failure before training starts releases it and removes an output directory this run
        # created, so a bad input leaves nothing behind.
        self._created_out_dir = not self.out_dir.exists()
        try:
            if dist.is_main_process():
                from layerfreeze.runlock import RunLock

                self.lock = RunLock(self.out_dir)
                self.lock.acquire()
            resume_candidates = self._find_resume()
            self.eval_benchmarks = self._load_eval_benchmarks()
            try:  # one plain process: a free rendezvous port, or the given one if it is free
                dist.single_process_rendezvous()
            except ValueError as e:
                raise ConfigError(str(e)) from None

            self.engine.init_distributed()
            self.resume_from = self._verify_resume(resume_candidates)
            if cfg.train.num_threads:
                torch.set_num_threads(cfg.train.num_threads)
            seed_everything(cfg.train.seed)
            # a resumed run keeps its wandb run id (from the checkpoint); a new run gets its own
            self.wandb_run_id = uuid.uuid4().hex[:12]
            dist.barrier()
            self._build()
        except BaseException:
            self._release_lock()
            self._remove_new_out_dir()
            raise

    def _find_resume(self) -> list:
        """The checkpoints to resume from, in order of preference (validated by file size; the
        content is checked by :meth:`_verify_resume` once the process group is up). Empty for a
        fresh start.

        ``auto`` prefers the checkpoint ``latest`` names, then older ones, and warns about each
        damaged checkpoint it passes over; a run that has checkpoints but none intact stops here
        (exit 2) before anything is written. An explicit path is the only candidate."""
        from layerfreeze.checkpoint import (
            CheckpointError,
            checkpoint_dirs,
            read_latest,
            resolve_checkpoint,
            scan_checkpoints,
        )

        mode = self.cfg.checkpoint.resume
        if mode == "none":
            if checkpoint_dirs(self.ckpt_dir):
                raise ConfigError(
                    f"checkpoint.resume: 'none' but {self.ckpt_dir} already holds checkpoints. "
                    "Use resume=auto to continue, or choose a new logging.out_dir / checkpoint.dir."
                )
            return []
        if mode != "auto":
            try:
                return [resolve_checkpoint(Path(mode))]
            except CheckpointError as e:
                raise ConfigError(f"checkpoint.resume: {e}") from None
        intact, damaged = scan_checkpoints(self.ckpt_dir)
        if not intact and not damaged:
            return []
        if not intact:  # never restart from step 0 over a run's damaged checkpoints
            raise ConfigError(self._no_intact_checkpoint(damaged))
        latest = read_latest(self.ckpt_dir)
        newest_first = sorted(intact, key=lambda c: c.step, reverse=True)
        first = next((c for c in newest_first if c.tag == latest), None)
        if first is not None:  # `latest` may lag behind a complete newer one; it decides
            newest_first = [first] + [c for c in newest_first if c.step < first.step]
        for path, why in damaged:
            if int(path.name.split("_")[1]) > newest_first[0].step:
                self._warn_damaged(path, why, newest_first[0])
        return newest_first

    def _no_intact_checkpoint(self, damaged: list) -> str:
        found = "; ".join(f"{path}: {why}" for path, why in damaged)
        return (
            f"checkpoint.resume: auto found no intact checkpoint in {self.ckpt_dir} ({found}). "
            "Nothing was changed. To go on, resume from a copy you trust "
            "(checkpoint.resume=PATH), or start over in a new directory "
            "(checkpoint.resume=none logging.out_dir=NEW_DIR), or move the damaged checkpoints "
            "away."
        )

    def _warn_damaged(self, path: Path, why: str, instead) -> None:
        note = (
            f"checkpoint.resume: {path} is damaged ({why}); resuming from the newest intact "
            f"checkpoint {instead.path} (step {instead.step}) instead"
        )
        self.notes.append(note)
        log_rank0(logger, note, level=logging.WARNING)

    def _verify_resume(self, candidates: list):
        """The first candidate whose files match their sha256 (collective: the ranks share the
        reading), warning about each one passed over; None for a fresh start.

        Raises:
            ConfigError: no candidate is intact (each named with its changed files).
        """
        from layerfreeze.checkpoint import scan_checkpoints
        from layerfreeze.resume import verify_content

        damaged = []
        for info in candidates:
            problems = verify_content(info)
            if not problems:
                if damaged and self.cfg.checkpoint.resume == "auto":
                    for path, why in damaged:
                        self._warn_damaged(path, why, info)
                if not info.sha256:
                    note = (
                        f"checkpoint.resume: {info.path} has no content checksums (saved by an "
                        "older layerfreeze): checked by file size only"
                    )
                    self.notes.append(note)
                    log_rank0(logger, note)
                return info
            damaged.append((info.path, "; ".join(problems)))
        if not damaged:
            return None
        if self.cfg.checkpoint.resume != "auto":
            path, why = damaged[0]
            raise ConfigError(
                f"checkpoint.resume: {path} is damaged: {why}. Nothing was changed. Resume from "
                "an earlier checkpoint of the run."
            )
        _intact, size_damaged = scan_checkpoints(self.ckpt_dir)
        raise ConfigError(self._no_intact_checkpoint(sorted(size_damaged + damaged)))

    def _load_eval_benchmarks(self) -> dict[str, Any] | None:
        """Load the evaluation questions up front, so a bad ``eval`` section (an unknown subject,
        a malformed file, ``eval.data_dir: null`` with the hub unreachable) stops the run before
        anything is written instead of after training. None when evaluation is off or skipped
        (a missing ``eval.data_dir``, noted by :meth:`_build_eval`)."""
        cfg = self.cfg
        data_dir = cfg.eval.data_dir
        if not cfg.eval.enabled or (data_dir is not None and not Path(data_dir).is_dir()):
            return None
        from layerfreeze.evaluation.data import load_benchmark

        try:
            return {
                b: load_benchmark(
                    b, data_dir, cfg.eval.split_for(b), cfg.eval.subjects.get(b) or None
                )
                for b in cfg.eval.benchmarks
            }
        except ValueError as e:  # load_benchmark names the key ("subjects: ...") or the file
            # Its advice names `layerfreeze eval`'s flag; here the setting is eval.data_dir.
            msg = str(e).replace("pass --data-dir", "set eval.data_dir to their folder")
            msg = msg.replace("Pass --data-dir", "Set eval.data_dir")
            key = msg.split(":", 1)[0]
            raise ConfigError(
                f"eval.{msg}" if key in ("subjects", "split", "data_dir") else f"eval: {msg}"
            ) from None

    def _build(self) -> None:
        cfg = self.cfg
        from layerfreeze.data import build_token_cache, prepare_tokenizer

        # 2. Tokenizer (trained once into <out_dir>/tokenizer when tokenizer.path is empty) and
        #    data: tokenize once (memory-mapped cache), pack, shard over data-parallel ranks.
        self.tokenizer_dir = None if cfg.tokenizer.path else self.out_dir / "tokenizer"
        #    The data modules raise ValueError for bad input (empty corpus, unreadable file,
        #    too little text for one batch): report those like any other config problem.
        try:
            self.tokenizer = prepare_tokenizer(cfg.tokenizer, cfg.data.paths, self.tokenizer_dir)
            cache = build_token_cache(
                cfg.data.paths, self.tokenizer, cfg.data.resolved_cache_dir(),
                text_key=cfg.data.text_key, txt_documents=cfg.data.txt_documents,
                add_bos=cfg.data.add_bos, num_workers=cfg.data.num_workers,
                chunk_bytes=cfg.data.chunk_mb << 20,
            )
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError(str(e)) from None

        # Resume compatibility before any model is built: the engine and plan the checkpoint was
        # saved with, its tokenizer and model architecture (each difference named by field).
        self.run_meta = self._run_meta()
        if self.resume_from is not None:
            self._check_resume_compatible()

        # 3. Model, plan and engine: the engine builds (or loads) the model, installs every
        #    phase's adapters before it partitions anything, sets requires_grad from phase 0,
        #    and builds optimizer groups from the plan with the lr schedule in closed form.
        self.runner = self.engine.runner_from_run_config(
            cfg, schedule=self.schedule, vocab_size=len(self.tokenizer),
            lr_scheduler=lambda opt: WarmupDecayLR(opt, cfg.optim, cfg.train.steps),
            special_ids=special_token_ids(self.tokenizer),  # not the model family's defaults
        )
        # 4. Data, sharded over data-parallel ranks (the ranks of one model replica read alike).
        self.world_size = self.runner.world_size
        self.loader = self._build_loader(cache)

        # 5. Resume: weights, optimizer, scheduler, phase, data position, RNG.
        if self.resume_from is not None:
            from layerfreeze.checkpoint import CheckpointError

            try:
                state = self.runner.load_checkpoint(self.resume_from.path, verify=False)
                self.loader.load_state_dict(state["data"])
            except (CheckpointError, KeyError, ValueError) as e:
                raise ConfigError(
                    f"checkpoint.resume: cannot resume from {self.resume_from.path}: {e}"
                ) from None
            self.step = self.runner.global_step
            self.skipped_steps = self.runner.skipped_steps
            self.wandb_run_id = state.get("wandb_run_id") or self.wandb_run_id
            set_rng_state(state["rng"])
            saved = state.get("lr_schedule") or {}
            for key, value in _lr_settings(cfg).items():
                if key in saved and saved[key] != value:
                    note = (
                        f"resume: {key} is {value!r} in this run config and {saved[key]!r} in "
                        f"the checkpoint; the learning rate follows the run config from step "
                        f"{self.step + 1} on"
                    )
                    self.notes.append(note)
                    log_rank0(logger, note, level=logging.WARNING)
            log_rank0(logger, f"resumed from {self.resume_from.path} at step {self.step}")
            self.saved = [self.resume_from.tag]
        phase = self.runner.phase

        # 6. Outputs: resolved config, metrics, evaluation.
        from layerfreeze.metrics import MetricsLogger

        run_config = to_dict(cfg)
        if dist.is_main_process():
            atomic_write_text(
                self.out_dir / "config.yaml",
                yaml.safe_dump(run_config, sort_keys=False, allow_unicode=True),
            )
        self.metrics = MetricsLogger(
            cfg.logging, cfg.train.steps, self.step, run_config, enabled=dist.is_main_process(),
            run_id=self.wandb_run_id,
        )
        self.metrics.log_plan(self.runner.applied.summary().rows, phase=phase)
        for line in self.plan_tables:
            log_rank0(logger, line)
        self._build_eval()
        self._build_diagnostics()

    def _run_meta(self) -> dict[str, Any]:
        """Engine-neutral metadata every checkpoint of this run records (see
        :mod:`layerfreeze.resume`): the tokenizer's and the model architecture's fingerprints."""
        from layerfreeze.modeling import hf_model_config
        from layerfreeze.resume import model_fingerprint, tokenizer_fingerprint

        model = model_fingerprint(hf_model_config(self.cfg.model, len(self.tokenizer)))
        if self.cfg.tokenizer.extend_from:  # the model the run trains is model.path resized
            model.update(vocab_size=len(self.tokenizer),
                         vocab_resize_init=self.cfg.tokenizer.resize_init)
        return {"tokenizer": tokenizer_fingerprint(self.tokenizer), "model": model}

    def _check_resume_compatible(self) -> None:
        """Exit 2 (ConfigError) when the checkpoint was saved by another engine, with another
        plan schedule, tokenizer or model architecture, naming each differing field."""
        from layerfreeze.resume import allowed_model_changes, engine_problems, run_problems

        meta = self.resume_from.meta
        problems = []
        engine_meta = meta.get("layerfreeze")
        if isinstance(engine_meta, dict):
            problems += engine_problems(
                engine_meta, engine=self.cfg.engine, schedule=self.schedule.to_dict()
            )
        allowed = self.cfg.checkpoint.allow_model_change
        problems += run_problems(meta.get("run") or {}, self.run_meta, allowed)
        changed = allowed_model_changes(meta.get("run") or {}, self.run_meta, allowed)
        if changed and not problems:
            log_rank0(
                logger, "resuming with a changed model config (checkpoint.allow_model_change): %s",
                "; ".join(changed), level=logging.WARNING,
            )
        if problems:
            raise ConfigError(
                f"checkpoint.resume: cannot resume from {self.resume_from.path}: "
                + "; ".join(problems) + "."
            )

    def _build_loader(self, cache):
        from layerfreeze.data import DistributedBatchIterator, PackedDataset

        cfg = self.cfg
        seed = cfg.data.seed if cfg.data.seed is not None else cfg.train.seed
        try:
            return DistributedBatchIterator(
                PackedDataset(cache, cfg.data.seq_len), micro_batch_size=cfg.train.micro_batch_size,
                rank=self.runner.data_parallel_rank, world_size=self.runner.world_size,
                seed=seed, shuffle=cfg.data.shuffle,
            )
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def _build_diagnostics(self) -> None:
        """Sensitivity hooks on a fixed probe batch (this rank's first training sequences);
        the first call, before any step, records the reference for ``drift``."""
        d = self.cfg.diagnostics
        if not d.enabled:
            return
        caps = self.runner.capabilities
        if not caps.sensitivity_measures:
            raise ConfigError(
                f"diagnostics.enabled: the sensitivity hooks do not run with engine: "
                f"{self.cfg.engine}. Set diagnostics.enabled=false and run "
                "`layerfreeze trace` on the exported checkpoint instead."
            )
        dataset = self.loader.dataset
        first = self.runner.data_parallel_rank * d.probe_sequences
        ids = torch.stack(
            [dataset[(first + i) % len(dataset)]["input_ids"] for i in range(d.probe_sequences)]
        )
        measures = []
        for m in d.measures:
            if m in caps.sensitivity_measures:
                measures.append(m)
                continue
            note = f"diagnostics: {caps.why_unsupported(m) or f'{m} is not computed by this engine'}"
            self.notes.append(note)
            log_rank0(logger, note, level=logging.WARNING)
        # ZeRO-3: layers gathered one at a time
        self.diag_gather = self.runner.gathered_parameters if caps.partitioned_params else None
        if not measures:
            return
        self.diag = self.runner.sensitivity_hooks(ids, measures)
        self._diagnose()

    def _diagnose(self) -> None:
        stats = self.diag.compute(self.runner.model, self.step, gather=self.diag_gather)
        self.diag_records.append((self.step, stats))
        self.metrics.log(self.step, stats, kind="diag")

    def _build_eval(self) -> None:
        cfg = self.cfg
        self.eval_dir = None
        if not cfg.eval.enabled:
            return
        data_dir = cfg.eval.data_dir
        if data_dir is not None and not Path(data_dir).is_dir():
            note = (
                f"evaluation skipped: eval.data_dir {data_dir!r} does not exist. Point it at the "
                "folder holding ceval/ and cmmlu/ (or set eval.data_dir=null to download when "
                "online)."
            )
            self.notes.append(note)
            log_rank0(logger, note, level=logging.WARNING)
            return
        from layerfreeze.evaluation import EvalCallback

        self.eval_dir = self.out_dir / "eval"
        self.eval_cb = EvalCallback(
            cfg.eval, self.tokenizer, self.eval_dir, benchmarks=self.eval_benchmarks
        )

    # -- train --------------------------------------------------------------------------------

    def train(self) -> None:
        """Run optimizer steps until ``train.steps`` (or a NaN stop)."""
        cfg = self.cfg
        tokens_per_step = (
            cfg.train.micro_batch_size * cfg.train.grad_accum_steps * cfg.data.seq_len
            * self.world_size
        )
        t_last = time.perf_counter()
        while self.step < cfg.train.steps:
            # Step boundary: every rank learns whether any rank got SIGTERM / SIGINT, so all of
            # them stop here together (none enters a collective the others skip).
            signum = self._agreed_signal()
            if signum:
                self._stop_on_signal(signum)
            phase_before = self.runner.phase
            next_step = self.step + 1
            every = cfg.logging.per_layer_every
            want_norms = bool(every) and next_step % every == 0
            device = self.runner.device
            window = [
                model_batch(self.loader.next_batch(), device)
                for _ in range(cfg.train.grad_accum_steps)
            ]
            out = self.runner.train_step(window, grad_norms=want_norms)  # switches phase if due
            self.step = out.step
            now = time.perf_counter()
            tok_s = tokens_per_step / max(now - t_last, 1e-9)
            t_last = now
            if out.phase != phase_before:
                self.metrics.message(
                    f"step {self.step}: plan-schedule phase {out.phase} "
                    f"({self.schedule.plans[out.phase]})"
                )
                self.metrics.log_plan(self.runner.applied.summary().rows, phase=out.phase)

            if out.skipped:
                self.bad_streak += 1
                self.skipped_steps += 1
                self.metrics.message(
                    f"step {self.step}: loss is NaN/Inf on some rank; update skipped "
                    f"({self.bad_streak}/{cfg.train.nan_tolerance} in a row)", logging.WARNING,
                )
                self.metrics.log(self.step, {
                    "loss": out.loss, "skipped": True, "skipped_steps": self.skipped_steps,
                    "phase": out.phase,
                })
                if self.bad_streak >= cfg.train.nan_tolerance:
                    self._stop_on_nan()
                continue
            self.bad_streak = 0
            self.last_loss = out.loss
            self.metrics.progress(self.step, out.loss, out.lr, tok_s)
            last = self.step == cfg.train.steps
            if self.step % cfg.logging.log_every == 0 or last or out.grad_norms:
                record: dict[str, Any] = {
                    "loss": out.loss, "lr": out.lr, "tokens_per_s": tok_s,
                    "tokens": self.step * tokens_per_step, "phase": out.phase,
                    "bad_micro_batches": out.bad_micro_batches, "skipped_steps": self.skipped_steps,
                }
                if out.grad_norm is not None:
                    record["grad_norm"] = out.grad_norm
                record.update({f"grad_norm/{k}": v for k, v in out.grad_norms.items()})
                self.metrics.log(self.step, record)

            every_ckpt = cfg.checkpoint.every_steps
            at_ckpt = bool(every_ckpt) and self.step % every_ckpt == 0 and not last
            if at_ckpt:
                self._save()
            self._maybe_eval(force=at_ckpt)
            if self.diag is not None and self.step % cfg.diagnostics.every_steps == 0:
                self._diagnose()
            t_last = time.perf_counter()  # tokens/s measures training, not saving or evaluating

    def _save(self) -> None:
        state = {
            "data": self.loader.state_dict(), "rng": get_rng_state(),
            "lr_schedule": _lr_settings(self.cfg), "wandb_run_id": self.wandb_run_id,
        }
        try:
            path = self.runner.save_checkpoint(
                self.ckpt_dir, self.step, state, keep_last=self.cfg.checkpoint.keep_last,
                trainable_only=self.cfg.checkpoint.trainable_only, run_meta=self.run_meta,
            )
        except Exception as e:
            reason = _write_failure(e, self.ckpt_dir)
            if reason is None:
                raise
            from layerfreeze.checkpoint import cleanup_staging, read_latest

            if dist.is_main_process():
                cleanup_staging(self.ckpt_dir)  # nothing half-written stays behind
            previous = read_latest(self.ckpt_dir)
            raise ConfigError(
                f"checkpoint.dir: saving the step-{self.step} checkpoint into {self.ckpt_dir} "
                f"failed: {reason}; the partial save was removed. Free space (or raise the quota) "
                "there or set checkpoint.dir to a filesystem with room, then resume"
                + (f" from {self.ckpt_dir / previous}" if previous else "") + "."
            ) from None
        self.saved.append(path.name)
        self.metrics.message(f"step {self.step}: checkpoint {path}")

    def _maybe_eval(self, force: bool) -> None:
        if self.eval_cb is None:
            return
        shard = (self.runner.data_parallel_rank, self.runner.world_size)
        result = self.eval_cb.maybe_run(
            self.step, self.runner.eval_model(), force=force, shard=shard
        )
        if result:
            self.metrics.log(self.step, result, kind="eval")

    def _agreed_signal(self) -> int:
        """The largest signal number any rank received (0: none); one all-reduce of one int."""
        flag = torch.tensor([self.signals.received], dtype=torch.int64, device=self.runner.device)
        if dist.is_dist() and dist.get_world_size() > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())

    def _stop_on_signal(self, signum: int) -> None:
        """Save (``checkpoint.on_signal``), say so on rank 0 and raise :class:`TrainingInterrupted`."""
        cfg = self.cfg
        name = signal.Signals(signum).name
        already = bool(self.saved) and self.saved[-1] == checkpoint_tag(self.step)
        if cfg.checkpoint.on_signal and self.step > 0 and not already:
            self._save()
        found = list_checkpoints(self.ckpt_dir) if self.ckpt_dir.is_dir() else []
        checkpoint = str(found[-1].path) if found else None
        if checkpoint is None:
            where = "no checkpoint to continue from yet; a resubmitted job starts over"
        elif cfg.checkpoint.on_signal:
            where = f"checkpoint {checkpoint}"
        else:
            where = (
                f"no checkpoint saved (checkpoint.on_signal=false); the newest is {checkpoint}"
            )
        msg = (
            f"stopped by {name} after step {self.step} of {cfg.train.steps}: {where}. Resubmit "
            f"the same job (exit status {EXIT_INTERRUPTED}); checkpoint.resume: auto continues."
        )
        raise TrainingInterrupted(msg, name, self.step, checkpoint)

    def _stop_on_nan(self) -> None:
        cfg = self.cfg
        found = list_checkpoints(self.ckpt_dir) if self.ckpt_dir.is_dir() else []
        if found:
            last = found[-1]
            where = (
                f"The last good checkpoint is {last.path} (step {last.step}); resume from it with "
                f"a lower optim.lr: checkpoint.resume={last.path}"
            )
        else:
            where = (
                "No checkpoint was saved before the failure (set checkpoint.every_steps to keep "
                "one); restart with a lower optim.lr."
            )
        raise TrainingStopped(
            f"training stopped at step {self.step}: the loss was NaN/Inf for "
            f"{self.bad_streak} consecutive steps (train.nan_tolerance={cfg.train.nan_tolerance}; "
            f"{self.skipped_steps} skipped in total). {where}"
        )

    # -- finish / cleanup ---------------------------------------------------------------------

    def finish(self) -> RunSummary:
        """Final checkpoint, evaluation and export; return (and log) the run summary."""
        cfg = self.cfg
        already = bool(self.saved) and self.saved[-1] == checkpoint_tag(self.step)
        if cfg.checkpoint.save_final and not already:
            self._save()
        if self.eval_cb is not None and cfg.eval.at_end:
            self._maybe_eval(force=True)
        eval_files: list[str] = []
        if self.eval_cb is not None:
            self.eval_cb.finalize()
            if self.eval_dir is not None and self.eval_dir.is_dir():
                eval_files = sorted(
                    str(p) for p in self.eval_dir.iterdir() if not p.name.startswith(".")
                )
        if self.diag_records and dist.is_main_process():
            from layerfreeze.diagnostics.series import plot_layer_series
            from layerfreeze.utils.io import atomic_write_bytes

            atomic_write_bytes(self.out_dir / "diagnostics.png", plot_layer_series(self.diag_records))
            self.metrics.message(f"per-layer diagnostics plot: {self.out_dir / 'diagnostics.png'}")
        export_dir = None
        if cfg.checkpoint.export_final:
            export_dir = cfg.export_dir
            self.runner.export_merged(export_dir, tokenizer=self.tokenizer)
            self.metrics.message(f"merged Hugging Face export: {export_dir}")
        adapter_dir = self._export_adapter()
        summary = RunSummary(
            out_dir=str(self.out_dir),
            steps_done=self.step,
            final_loss=self.last_loss,
            skipped_steps=self.skipped_steps,
            metrics_jsonl=str(self.out_dir / cfg.logging.jsonl),
            config_file=str(self.out_dir / "config.yaml"),
            tokenizer_dir=str(self.tokenizer_dir) if self.tokenizer_dir else None,
            wandb_dir=str(self.metrics.wandb_dir) if self.metrics.wandb_dir else None,
            checkpoint_dir=str(self.ckpt_dir),
            checkpoints=[c.tag for c in list_checkpoints(self.ckpt_dir)]
            if self.ckpt_dir.is_dir() else [],
            eval_dir=str(self.eval_dir) if self.eval_dir else None,
            eval_files=eval_files,
            export_dir=str(export_dir) if export_dir else None,
            adapter_dir=str(adapter_dir) if adapter_dir else None,
            notes=self.notes,
        )
        if dist.is_main_process():
            atomic_write_json(self.out_dir / "summary.json", dataclasses.asdict(summary))
        self.metrics.close_progress()
        log_rank0(logger, summary.render())
        return summary

    def _export_adapter(self) -> Path | None:
        """``checkpoint.export_adapter``: the trained tensors + plan in ``<out_dir>/adapter``."""
        cfg = self.cfg
        want = cfg.checkpoint.export_adapter
        if want is False or not self.runner.capabilities.export_adapter:
            return None
        applied = self.runner.applied
        if want is None and not applied.trains_adapters_only():
            return None
        earlier = trained_then_frozen(applied, self.schedule, self.runner.phase)
        if earlier:
            self.notes.append(
                f"no adapter export: earlier plan phases trained {len(earlier)} tensors the final "
                f"plan freezes (e.g. {earlier[0]}), which an adapter of the final plan cannot "
                "hold; the merged export has them"
            )
            return None
        out = cfg.adapter_dir
        self.runner.export_trainable(out)
        self.metrics.message(adapter_export_hint(applied, out, cfg.model.path))
        return out

    def _remove_new_out_dir(self) -> None:
        if self._created_out_dir and dist.is_main_process() and self.out_dir.exists():
            shutil.rmtree(self.out_dir, ignore_errors=True)

    def _release_lock(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def cleanup(self) -> None:
        """Close metrics/wandb, release the engine and the run directory's lock (always
        called)."""
        try:
            if self.metrics is not None:
                self.metrics.close()
            if self.runner is not None:
                self.runner.close()
        finally:
            self._release_lock()


def adapter_export_hint(applied: Any, adapter_dir: str | Path, base_model: str | None) -> str:
    """The end-of-run line about ``checkpoint.export_adapter``'s directory.

    It names the directory and, only when a PEFT LoRA adapter can hold the plan
    (:func:`~layerfreeze.interop.peft.peft_export_problems` finds nothing) and the run started
    from a local checkpoint directory (``model.path``, the base the adapter applies to), the
    ``layerfreeze export`` command that writes one, with shell-quoted arguments.
    """
    from layerfreeze.interop.peft import peft_export_problems

    msg = f"adapter (trained tensors + plan): {adapter_dir}"
    # `export --model` takes a local checkpoint directory (absolute: the command works from anywhere)
    if base_model is None or not Path(base_model).expanduser().is_dir():
        return msg
    if peft_export_problems(applied):
        return msg
    base = Path(base_model).expanduser().absolute()
    cmd = shlex.join([
        "layerfreeze", "export", "--model", str(base), "--adapter-dir", str(adapter_dir),
        "--format", "peft", "--out", str(Path(adapter_dir).parent / "peft_adapter"),
    ])
    return f"{msg}; `{cmd}` writes it as a PEFT LoRA adapter"


def model_batch(batch: dict[str, torch.Tensor], device: Any = None) -> dict[str, torch.Tensor]:
    """The micro-batch an engine's model gets from a packed-data batch.

    The packed data yields ``input_ids = w[:-1]`` and next-token ``labels = w[1:]`` of each
    ``seq_len + 1`` window. Both engines follow the Hugging Face convention instead: ``labels``
    aligned with ``input_ids``, shifted inside the loss (a Hugging Face causal LM's own loss;
    the Megatron runner's ``shift_labels``). Handing them the packed ``labels`` would train
    every position on the token two ahead, so the labels here are ``input_ids`` (the window's
    last target, ``w[-1]``, is not used: one of ``seq_len`` targets per sequence).
    """
    ids = batch["input_ids"]
    if device is not None:
        ids = ids.to(device, non_blocking=True)
    return {"input_ids": ids, "labels": ids}


_WRITE_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                 errno.EFBIG: "file too large for this filesystem or process limit"}
# what torch's and safetensors' writers say when the OS refuses a write (they drop the errno)
_WRITE_TEXTS = ("no space left", "disk quota", "file too large", "storagefull",
                "file write failed", "failed writing file", "iostream error", "unexpected pos")


def _write_failure(exc: BaseException, directory: Path) -> str | None:
    """Why a save into ``directory`` failed when the filesystem refused the writes (disk full,
    quota, file-size limit), else None. torch and safetensors wrap the OS error in their own
    exception without its errno, so the chain and the message are searched, and then the
    process file-size limit and the free space say which it was."""
    import resource

    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:
            return f"{_WRITE_ERRNOS[e.errno]} ({e.filename or e.strerror})"
        text = str(e).lower()
        if any(t in text for t in _WRITE_TEXTS):
            limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
            if limit != resource.RLIM_INFINITY:
                return (
                    f"file too large: this process may write files of {limit} bytes at most "
                    "(ulimit -f)"
                )
            try:
                free = shutil.disk_usage(directory).free
            except OSError:
                free = None
            if free is not None and free < 256 << 20:
                return f"no space left on the device ({free} bytes free)"
            return f"the filesystem refused the write ({str(e).splitlines()[0][:200]})"
        e = e.__cause__ or e.__context__
    return None


def _lr_settings(cfg: RunConfig) -> dict[str, Any]:
    """The run-config values that decide the learning rate at every step."""
    o = cfg.optim
    return {
        "optim.lr": o.lr, "optim.warmup_steps": o.warmup_steps, "optim.schedule": o.schedule,
        "optim.min_lr_ratio": o.min_lr_ratio, "train.steps": cfg.train.steps,
    }


def load_engine(name: str):
    """The adapter module of engine ``name`` (imports the engine package)."""
    from layerfreeze.engines import get_engine

    try:
        return get_engine(name)
    except (ImportError, ValueError) as e:
        raise ConfigError(f"engine: {e}") from None


def run_training(cfg: RunConfig) -> RunSummary:
    """Run the whole recipe for ``cfg``; returns the summary.

    Raises:
        ConfigError: bad input (nothing is left in a newly created output directory).
        TrainingStopped: too many consecutive NaN/Inf losses.
        TrainingInterrupted: SIGTERM / SIGINT; every rank stopped after the same step (and saved
            a checkpoint when ``checkpoint.on_signal``).
    """
    recipe = Recipe(cfg)
    recipe.signals.install()  # a signal during setup stops the run at the first step boundary
    try:
        recipe.setup()
        recipe.train()
        return recipe.finish()
    finally:
        try:
            recipe.cleanup()
        finally:
            recipe.signals.restore()
