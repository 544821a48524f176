"""Rotating-layer schedules (LISA, BAdam) as plan-schedule phases.

Written as ``plan.schedule`` in mapping form (instead of a list of phases)::

    schedule: {rotate: lisa, layers: 2, interval: 50, seed: 0}     # LISA (Pan et al. 2024)
    schedule: {rotate: badam, block: 2, interval: 50}              # BAdam (Luo et al. 2024)

Every ``interval`` optimizer steps a new phase starts whose plan trains ``full`` the chosen
decoder layers (plus the non-layer parts in ``always``) and freezes everything else. The phase
switch is the engines' ordinary one: the engine is rebuilt over the new trainable set, so a layer
frozen when the run started does train when its turn comes (LISA callbacks that only flip
``requires_grad`` miss that), and the optimizer state follows ``optimizer_state``.

Layer choice is a pure function of ``(seed, interval index)`` (:func:`lisa_layers`,
:func:`badam_layers`): no RNG state exists, so a run resumed mid-interval recomputes the same
past and future samples.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from layerfreeze.errors import ConfigError
from layerfreeze.plan import NON_LAYER_PARTS, LayerPlan
from layerfreeze.schedule import Phase, PlanSchedule
from layerfreeze.utils.schema import suggest

__all__ = [
    "ROTATIONS",
    "OPTIMIZER_STATES",
    "RotationConfig",
    "lisa_layers",
    "badam_layers",
    "interval_layers",
    "iter_phases",
    "build_rotation_schedule",
    "is_rotation",
]

#: Rotation styles and the keys each accepts (besides ``rotate``).
ROTATIONS: dict[str, tuple[str, ...]] = {
    "lisa": ("layers", "interval", "seed", "always", "optimizer_state"),
    "badam": ("block", "interval", "always", "optimizer_state"),
}
#: ``carry``: parameters trainable on both sides of a boundary keep their optimizer state, the
#: layers leaving lose theirs (no engine keeps state of frozen parameters); ``reset``: every
#: parameter starts with fresh optimizer state at each boundary.
OPTIMIZER_STATES = ("carry", "reset")
_DEFAULT_ALWAYS = {"lisa": ("embeddings", "lm_head"), "badam": ()}


def is_rotation(spec: Any) -> bool:
    """True when a ``plan.schedule`` value is the rotation (mapping) form."""
    return isinstance(spec, Mapping)


@dataclass(frozen=True)
class RotationConfig:
    """A rotating-layer schedule.

    Attributes:
        rotate: ``lisa`` (k layers sampled uniformly without replacement per interval) or
            ``badam`` (consecutive blocks of layers in ascending order, cycling).
        interval: optimizer steps per interval (each interval is one schedule phase).
        layers: LISA: layers sampled per interval.
        block: BAdam: layers per block (the last block holds the remainder).
        seed: LISA: the sample sequence's seed.
        always: non-layer parts trained in every interval (LISA default: embeddings and
            lm_head, as in the paper; BAdam default: none).
        optimizer_state: ``carry`` (default) or ``reset``; see ``OPTIMIZER_STATES``.
    """

    rotate: str
    interval: int
    layers: int = 0
    block: int = 0
    seed: int = 0
    always: tuple[str, ...] = ()
    optimizer_state: str = "carry"

    @classmethod
    def parse(cls, spec: Mapping[str, Any], path: str = "plan.schedule") -> RotationConfig:
        """Validate a ``{rotate: ..., ...}`` mapping.

        Raises:
            ConfigError: every problem at once, each naming its key.
        """
        if not isinstance(spec, Mapping):
            raise ConfigError(
                f"{path}: expected a mapping like {{rotate: lisa, layers: 2, interval: 50}}, "
                f"got {spec!r}."
            )
        rotate = spec.get("rotate")
        if rotate not in ROTATIONS:
            raise ConfigError(
                f"{path}.rotate: unknown rotation, got {rotate!r}. Use one of "
                f"{', '.join(ROTATIONS)}.{suggest(str(rotate), tuple(ROTATIONS))}"
            )
        problems: list[str] = []
        allowed = ROTATIONS[rotate]
        for key in spec:
            if key != "rotate" and key not in allowed:
                problems.append(
                    f"{path}.{key}: unknown key for rotate: {rotate} (valid: "
                    f"{', '.join(allowed)}).{suggest(str(key), allowed)}"
                )

        def count(key: str, required: bool, minimum: int) -> int:
            value = spec.get(key)
            if value is None and not required:
                return 0
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                what = "a required key" if value is None else "an integer"
                problems.append(
                    f"{path}.{key}: expected an integer >= {minimum} ({what} for rotate: "
                    f"{rotate}), got {value!r}."
                )
                return 0
            return value

        interval = count("interval", True, 1)
        layers = count("layers", True, 1) if rotate == "lisa" else 0
        block = count("block", True, 1) if rotate == "badam" else 0
        seed = count("seed", False, 0) if rotate == "lisa" else 0
        always = spec.get("always", _DEFAULT_ALWAYS[rotate])
        if isinstance(always, str) or not isinstance(always, (list, tuple)):
            problems.append(
                f"{path}.always: expected a list of non-layer parts ({', '.join(NON_LAYER_PARTS)}"
                f"), got {always!r}."
            )
            always = ()
        for part in always:
            if part not in NON_LAYER_PARTS:
                problems.append(
                    f"{path}.always: unknown part, got {part!r}. Use some of "
                    f"{', '.join(NON_LAYER_PARTS)}.{suggest(str(part), NON_LAYER_PARTS)}"
                )
        state = spec.get("optimizer_state", "carry")
        if state not in OPTIMIZER_STATES:
            problems.append(
                f"{path}.optimizer_state: unknown value, got {state!r}. Use carry (state of "
                "parameters that stay trainable is kept) or reset (fresh state at every interval)."
            )
        if problems:
            raise ConfigError(problems)
        return cls(rotate, interval, layers, block, seed, tuple(always), state)

    def check_layers(self, num_layers: int, path: str = "plan.schedule") -> None:
        """Raise ``ConfigError`` when ``layers``/``block`` do not fit a ``num_layers`` model."""
        key, value = ("layers", self.layers) if self.rotate == "lisa" else ("block", self.block)
        if value > num_layers:
            raise ConfigError(
                f"{path}.{key}: {value} is more than the model's {num_layers} layers. Set "
                f"{key} to at most {num_layers}."
            )

    def to_dict(self) -> dict[str, Any]:
        """Mapping form; ``RotationConfig.parse(c.to_dict()) == c``."""
        keys = ROTATIONS[self.rotate]
        out: dict[str, Any] = {"rotate": self.rotate}
        for key in keys:
            value = getattr(self, key)
            out[key] = list(value) if isinstance(value, tuple) else value
        return out


def lisa_layers(seed: int, index: int, num_layers: int, k: int) -> tuple[int, ...]:
    """LISA's layers for interval ``index``: the ``k`` layers with the smallest
    ``SHA-256("{seed}:{index}:{layer}")`` (big-endian integer), ascending.

    A uniformly random k-subset per interval (the hashes are independent and identically
    distributed), computed from ``(seed, index)`` alone: no state to save or restore.
    """
    def key(layer: int) -> int:
        return int.from_bytes(hashlib.sha256(f"{seed}:{index}:{layer}".encode()).digest(), "big")

    return tuple(sorted(sorted(range(num_layers), key=key)[:k]))


def badam_layers(index: int, num_layers: int, block: int) -> tuple[int, ...]:
    """BAdam's layers for interval ``index``: block ``index mod ceil(N / block)`` of the
    consecutive blocks ``[0, block), [block, 2*block), ...`` (the last one holds the rest)."""
    j = index % math.ceil(num_layers / block)
    return tuple(range(j * block, min((j + 1) * block, num_layers)))


def interval_layers(cfg: RotationConfig, index: int, num_layers: int) -> tuple[int, ...]:
    """The decoder layers trained in interval ``index``."""
    if cfg.rotate == "lisa":
        return lisa_layers(cfg.seed, index, num_layers, cfg.layers)
    return badam_layers(index, num_layers, cfg.block)


def _plan(cfg: RotationConfig, layers: tuple[int, ...]) -> LayerPlan:
    parts = {p: ("full" if p in cfg.always else "freeze") for p in NON_LAYER_PARTS}
    rules = [{"layers": str(i), "policy": "full"} for i in layers]
    return LayerPlan.parse({"default": "freeze", **parts, "rules": rules})


def iter_phases(
    cfg: RotationConfig, num_layers: int, start: int = 0
) -> Iterator[tuple[int, tuple[int, ...], Phase]]:
    """Lazily yield ``(interval index, layers, phase)`` from interval ``start`` on, forever.

    Phase ``i`` covers steps ``[i * interval, (i + 1) * interval)``. Intervals that train the
    same layers share one (immutable) ``LayerPlan`` object.
    """
    plans: dict[tuple[int, ...], LayerPlan] = {}
    i = start
    while True:
        layers = interval_layers(cfg, i, num_layers)
        plan = plans.get(layers)
        if plan is None:
            plan = plans[layers] = _plan(cfg, layers)
        yield i, layers, Phase(plan, (i + 1) * cfg.interval)
        i += 1


def build_rotation_schedule(
    cfg: RotationConfig, num_layers: int, total_steps: int
) -> PlanSchedule:
    """The ``PlanSchedule`` of a run of ``total_steps`` optimizer steps.

    Bounded by the run: ``ceil(total_steps / interval)`` phases (the last open-ended), each a
    ``full``/``freeze`` plan, so installing every phase's adapters installs nothing. Consecutive
    intervals with the same layers are one phase (BAdam with a single block is one phase).

    Raises:
        ConfigError: ``layers``/``block`` larger than the model.
    """
    cfg.check_layers(num_layers)
    count = max(1, math.ceil(total_steps / cfg.interval))
    phases: list[Phase] = []
    last: tuple[int, ...] | None = None
    for i, layers, phase in iter_phases(cfg, num_layers):
        if i >= count:
            break
        if layers == last:
            phases[-1] = Phase(phases[-1].plan, phase.until_step)
        else:
            phases.append(phase)
        last = layers
    phases[-1] = Phase(phases[-1].plan, None)
    # Recorded in checkpoints: the spec and the layer count determine every phase; the run
    # length only where the list ends, so a resume may extend train.steps.
    source = {**cfg.to_dict(), "num_layers": num_layers}
    return PlanSchedule(tuple(phases), optimizer_state=cfg.optimizer_state, source=source)
