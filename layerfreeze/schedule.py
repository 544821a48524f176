"""Plan schedules: a sequence of layer plans, each active until a given optimizer step.

Written as a list of phases (YAML)::

    - {plan: freeze_deep, until_step: 1000}      # steps [0, 1000)
    - {plan: "0-3:full,4-7:lora(r=8)", until_step: 3000}   # steps [1000, 3000)
    - {plan: full, until_step: null}             # step 3000 onwards (the last phase is open-ended)

Phase ``i`` is active for steps ``until_step[i-1] <= step < until_step[i]``. All phases' adapters
are installed up front (``apply_plan(model, schedule.plans[0], install=schedule.plans[1:])``),
so switching a phase only re-sets ``requires_grad``.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from layerfreeze.errors import ConfigError
from layerfreeze.plan import LayerPlan
from layerfreeze.utils.schema import suggest

__all__ = ["Phase", "PlanSchedule"]

_PHASE_KEYS = ("plan", "until_step")


@dataclass(frozen=True)
class Phase:
    """One schedule phase.

    Attributes:
        plan: the plan trained during the phase.
        until_step: first step of the next phase (exclusive end); None for the last phase.
    """

    plan: LayerPlan
    until_step: int | None


@dataclass(frozen=True)
class PlanSchedule:
    """Ordered phases with strictly increasing end steps; the last one is open-ended.

    ``optimizer_state`` says what a phase switch does with optimizer state: ``carry`` (the
    parameters trainable in both phases keep theirs; the others have none) or ``reset`` (every
    parameter starts fresh). Rotating schedules (``layerfreeze.rotation``) set it.
    """

    phases: tuple[Phase, ...]
    optimizer_state: str = "carry"
    #: The generator's spec for a generated (rotating) schedule; ``to_dict`` records it instead
    #: of thousands of phases.
    source: Mapping[str, Any] | None = field(default=None, compare=False)

    @property
    def carry_state(self) -> bool:
        """Whether a phase switch carries optimizer state (``optimizer_state == "carry"``)."""
        return self.optimizer_state != "reset"

    @classmethod
    def single(cls, plan: LayerPlan | str | Mapping[str, Any]) -> PlanSchedule:
        """A one-phase schedule (the whole run uses ``plan``)."""
        return cls((Phase(LayerPlan.parse(plan), None),))

    @classmethod
    def parse(cls, spec: Sequence[Mapping[str, Any]] | PlanSchedule, path: str = "schedule") -> PlanSchedule:
        """Build a schedule from a list of ``{plan: <plan spec>, until_step: int | null}``.

        Raises:
            ConfigError: every problem at once: malformed phases, plan errors (prefixed with
                the phase's path), non-increasing or missing ``until_step``, a last phase that
                is not open-ended.
        """
        if isinstance(spec, PlanSchedule):
            return spec
        if isinstance(spec, (str, Mapping)) or not isinstance(spec, Sequence) or not spec:
            raise ConfigError(
                f"{path}: expected a non-empty list of phases like "
                f"[{{plan: freeze_deep, until_step: 1000}}, {{plan: full, until_step: null}}], got {spec!r}."
            )
        problems: list[str] = []
        phases: list[Phase] = []
        last_end = 0
        for i, raw in enumerate(spec):
            ppath = f"{path}[{i}]"
            if not isinstance(raw, Mapping):
                problems.append(f"{ppath}: expected a mapping {{plan: ..., until_step: ...}}, got {raw!r}.")
                continue
            for key in raw:
                if key not in _PHASE_KEYS:
                    problems.append(f"{ppath}.{key}: unknown key.{suggest(str(key), _PHASE_KEYS)}")
            if "plan" not in raw:
                problems.append(f"{ppath}.plan: required key is missing.")
                continue
            plan = None
            try:
                plan = LayerPlan.parse(raw["plan"], path=f"{ppath}.plan")
            except ConfigError as e:
                problems.extend(e.problems)
            until = raw.get("until_step")
            is_last = i == len(spec) - 1
            if is_last:
                if until is not None:
                    problems.append(
                        f"{ppath}.until_step: the last phase is open-ended, got {until!r}. "
                        "Set it to null (it trains until the run ends)."
                    )
                    until = None
            elif isinstance(until, bool) or not isinstance(until, int):
                problems.append(
                    f"{ppath}.until_step: expected an integer step (every phase but the last "
                    f"ends), got {until!r}."
                )
                until = None
            elif until <= last_end:
                problems.append(
                    f"{ppath}.until_step: must be greater than {last_end} (the previous phase's "
                    f"end{'' if i else ', the first step'}), got {until}. Phases end at "
                    "strictly increasing steps."
                )
            else:
                last_end = until
            if plan is not None:
                phases.append(Phase(plan, until))
        if problems:
            raise ConfigError(problems)
        return cls(tuple(phases))

    @property
    def plans(self) -> list[LayerPlan]:
        """Each phase's plan, in order."""
        return [p.plan for p in self.phases]

    @property
    def boundaries(self) -> list[int]:
        """Steps at which a new phase starts (``until_step`` of all but the last phase)."""
        return [p.until_step for p in self.phases[:-1]]  # type: ignore[misc]

    def phase_at(self, step: int) -> int:
        """Index of the phase active at optimizer step ``step`` (0-based steps).

        Raises:
            ValueError: negative step.
        """
        if step < 0:
            raise ValueError(f"step: must be >= 0, got {step}.")
        return bisect.bisect_right(self.boundaries, step)

    def plan_at(self, step: int) -> LayerPlan:
        """The plan active at ``step``."""
        return self.phases[self.phase_at(step)].plan

    def to_dict(self) -> list[dict[str, Any]] | dict[str, Any]:
        """List form; ``PlanSchedule.parse(s.to_dict()) == s``. A generated schedule gives its
        ``source`` mapping instead (what checkpoints record and a resume compares)."""
        if self.source is not None:
            return dict(self.source)
        return [{"plan": p.plan.to_dict(), "until_step": p.until_step} for p in self.phases]
