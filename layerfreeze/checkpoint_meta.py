"""The layerfreeze metadata every engine's checkpoint stores in its manifest: one schema.

A committed checkpoint's manifest (:mod:`layerfreeze.checkpoint`) holds
``meta = {"layerfreeze": <engine metadata>, "run": <run metadata>}``. :class:`CheckpointMeta` is
the ``"layerfreeze"`` part, the same for every engine: which engine saved it, the step, the
plan-schedule phase and the schedule, the plan of that phase, whether only trainable weights
were stored, and the NaN/Inf counters. What only one engine needs travels in ``engine_state``
(DeepSpeed: ``zero_stage``, ``world_size``, ``trained_frozen_params``, ``groups``; Megatron:
``layout``, ``num_layers``, ``global_step``), flat in the same JSON object, so the on-disk keys
are those every layerfreeze checkpoint since format 1 has.

:meth:`CheckpointMeta.from_dict` checks the common fields and
:meth:`CheckpointMeta.check_engine_state` the engine's own; each problem names its field and
the value found. No torch, no process groups.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from layerfreeze.checkpoint import CheckpointError

__all__ = ["META_FORMAT", "META_KEY", "CheckpointMeta"]

#: Key of the engine metadata in a manifest's ``meta``.
META_KEY = "layerfreeze"
#: Version of the metadata schema (both engines write 1).
META_FORMAT = 1

#: The common fields, in their on-disk order (``engine_state`` goes after ``plan``).
_HEAD = ("format", "engine", "step", "phase", "schedule", "plan")
_TAIL = ("trainable_only", "bad_micro_batches", "skipped_steps")
_COMMON = _HEAD + _TAIL

_HOW_TO_FIX = (
    "The checkpoint's metadata is damaged or was not written by layerfreeze; resume from "
    "another checkpoint"
)


def _kind_problem(value: Any, kind: type | tuple[type, ...]) -> str | None:
    """What is wrong with ``value`` for ``kind`` (None when it fits). ``int`` means a
    non-negative int that is not a bool (counters, steps, sizes)."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if int in kinds and isinstance(value, int) and not isinstance(value, bool):
        return None if value >= 0 else "must be a non-negative int"
    if bool in kinds and isinstance(value, bool):
        return None
    if any(k not in (int, bool) and isinstance(value, k) for k in kinds):
        return None
    names = " or ".join(
        {int: "a non-negative int", bool: "true or false", list: "a list", dict: "an object",
         str: "a string"}.get(k, k.__name__) for k in kinds
    )
    return f"must be {names}"


@dataclass
class CheckpointMeta:
    """The ``"layerfreeze"`` metadata of a checkpoint (both engines).

    Attributes:
        engine: the engine that saved it (``deepspeed`` / ``megatron``).
        step: the step the checkpoint is named by.
        phase: the plan-schedule phase it was saved in (an index into ``schedule``).
        schedule: ``PlanSchedule.to_dict()`` of the run: the list of phases, or for a generated
            (rotating-layer) schedule its spec mapping (``{"rotate": ..., "num_layers": ...}``).
        plan: ``LayerPlan.to_dict()`` of the phase's plan.
        trainable_only: only trainable (and once-trained) weights were stored.
        bad_micro_batches: micro-batches skipped for a NaN/Inf loss so far.
        skipped_steps: optimizer steps run at lr 0 (every micro-batch bad) so far.
        engine_state: the saving engine's own fields, stored flat beside the common ones (their
            names must not be common field names).
        format: the schema version (:data:`META_FORMAT`).
    """

    engine: str
    step: int
    phase: int
    schedule: list[dict[str, Any]] | dict[str, Any]
    plan: dict[str, Any]
    trainable_only: bool
    bad_micro_batches: int
    skipped_steps: int
    engine_state: dict[str, Any] = field(default_factory=dict)
    format: int = META_FORMAT

    def __post_init__(self) -> None:
        clash = sorted(set(self.engine_state) & set(_COMMON))
        if clash:
            raise ValueError(
                f"CheckpointMeta.engine_state: {clash} are common fields, got them in the "
                "engine's own part too. Set them as CheckpointMeta fields instead."
            )

    def to_dict(self) -> dict[str, Any]:
        """The JSON object stored under ``"layerfreeze"`` (engine fields flat, after ``plan``)."""
        out: dict[str, Any] = {k: getattr(self, k) for k in _HEAD}
        out.update(self.engine_state)
        out.update({k: getattr(self, k) for k in _TAIL})
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str) -> CheckpointMeta:
        """Read the ``"layerfreeze"`` object of a manifest; every key that is not a common field
        goes to ``engine_state`` (check those with :meth:`check_engine_state`).

        Args:
            data: the stored object.
            source: what to name in errors (the checkpoint directory).

        Raises:
            CheckpointError: naming each missing or invalid common field and the value found.
        """
        if not isinstance(data, Mapping):
            raise CheckpointError(
                f"{source}: manifest.json {META_KEY}: must be an object, got "
                f"{type(data).__name__}. {_HOW_TO_FIX}."
            )
        kinds: dict[str, type | tuple[type, ...]] = {
            "format": int, "engine": str, "step": int, "phase": int, "schedule": (list, dict),
            "plan": dict, "trainable_only": bool, "bad_micro_batches": int, "skipped_steps": int,
        }
        problems = _problems(data, kinds)
        if not problems:
            if data["format"] != META_FORMAT:
                problems.append(
                    f"format: unknown metadata format, got {data['format']!r} (this layerfreeze "
                    f"reads {META_FORMAT})"
                )
            if isinstance(data["schedule"], dict):  # a rotating-layer schedule's spec
                if "rotate" not in data["schedule"]:
                    problems.append(
                        "schedule: a mapping must be a rotating-layer schedule spec with a "
                        f"'rotate' key, got {data['schedule']!r}"
                    )
            elif not data["schedule"] or not all(isinstance(p, dict) for p in data["schedule"]):
                problems.append(
                    f"schedule: must be a non-empty list of phase objects, got {data['schedule']!r}"
                )
            elif data["phase"] >= len(data["schedule"]):
                problems.append(
                    f"phase: {data['phase']} is out of range for a {len(data['schedule'])}-phase "
                    "schedule"
                )
        _raise(source, problems)
        return cls(
            engine=data["engine"],
            step=data["step"],
            phase=data["phase"],
            schedule=(
                dict(data["schedule"]) if isinstance(data["schedule"], dict)
                else list(data["schedule"])
            ),
            plan=dict(data["plan"]),
            trainable_only=data["trainable_only"],
            bad_micro_batches=data["bad_micro_batches"],
            skipped_steps=data["skipped_steps"],
            engine_state={k: v for k, v in data.items() if k not in _COMMON},
            format=data["format"],
        )

    def check_engine_state(
        self, kinds: Mapping[str, type | tuple[type, ...]], *, source: str
    ) -> None:
        """Check the engine's own fields (call after :func:`layerfreeze.resume.engine_problems`
        found the right engine).

        Args:
            kinds: field name -> its type (``int``: a non-negative int; a tuple: any of them).
            source: what to name in errors (the checkpoint directory).

        Raises:
            CheckpointError: naming each missing or invalid field and the value found.
        """
        _raise(source, _problems(self.engine_state, kinds))


def _problems(data: Mapping[str, Any], kinds: Mapping[str, type | tuple[type, ...]]) -> list[str]:
    problems = []
    for key, kind in kinds.items():
        if key not in data:
            problems.append(f"{key}: missing")
        elif (what := _kind_problem(data[key], kind)) is not None:
            problems.append(f"{key}: {what}, got {data[key]!r}")
    return problems


def _raise(source: str, problems: list[str]) -> None:
    """One error for all problems: ``<dir>: manifest.json layerfreeze.<field>: <what>, got <v>``."""
    if problems:
        raise CheckpointError(
            f"{source}: manifest.json "
            + "; ".join(f"{META_KEY}.{p}" for p in problems)
            + f". {_HOW_TO_FIX}."
        )
