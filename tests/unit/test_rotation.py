"""Rotating-layer schedules (layerfreeze.rotation): LISA samples against an independent
re-implementation of the documented formula, resume mid-interval, BAdam order, the generated
PlanSchedule (bounded by the run, shared plans, optimizer_state) and the config form."""

from __future__ import annotations

import hashlib
import itertools
from collections import Counter

import pytest

from layerfreeze.rotation import (
    RotationConfig,
    badam_layers,
    build_rotation_schedule,
    interval_layers,
    iter_phases,
    lisa_layers,
)


def _lisa_reference(seed: int, index: int, n: int, k: int) -> tuple[int, ...]:
    """The formula in the docs, written independently: rank the layers by the SHA-256 digest
    of "seed:index:layer" read as a big-endian integer; keep the k smallest (ties impossible)."""
    digests = []
    for layer in range(n):
        hexdigest = hashlib.sha256(":".join(map(str, (seed, index, layer))).encode("ascii")).hexdigest()
        digests.append((int(hexdigest, 16), layer))
    digests.sort()
    return tuple(sorted(layer for _, layer in digests[:k]))


@pytest.mark.parametrize("seed,n,k", [(0, 8, 2), (7, 32, 4), (123, 4, 1), (5, 6, 6)])
def test_lisa_layers_equal_the_formula(seed, n, k):
    for index in range(40):
        assert lisa_layers(seed, index, n, k) == _lisa_reference(seed, index, n, k)


def test_lisa_samples_vary_and_cover_layers_uniformly():
    n, k, intervals = 8, 2, 4000
    counts = Counter(i for idx in range(intervals) for i in lisa_layers(0, idx, n, k))
    expected = intervals * k / n  # 1000 per layer
    # binomial sd ~ sqrt(8000 * 1/8 * 7/8) ~ 29.6; 5 sd
    assert all(abs(counts[i] - expected) < 150 for i in range(n)), counts
    assert lisa_layers(0, 0, n, k) != lisa_layers(1, 0, n, k) or lisa_layers(
        0, 1, n, k
    ) != lisa_layers(1, 1, n, k)


def test_resume_mid_interval_gives_the_same_future_sequence():
    cfg = RotationConfig.parse({"rotate": "lisa", "layers": 2, "interval": 50, "seed": 3})
    straight = [layers for _, layers, _ in itertools.islice(iter_phases(cfg, 16), 30)]
    # a run resumed at step 1234 (interval 24, mid-interval) recomputes from the step alone
    start = 1234 // cfg.interval
    resumed = [layers for _, layers, _ in itertools.islice(iter_phases(cfg, 16, start=start), 6)]
    assert resumed == straight[start : start + 6]
    # and the built schedule agrees: phase_at(step) trains interval(step)'s layers
    sched = build_rotation_schedule(cfg, 16, 1500)
    for step in (0, 49, 50, 1234, 1499):
        plan = sched.plan_at(step).resolve(16)
        trained = tuple(i for i in range(16) if plan.layers[i].name == "full")
        assert trained == interval_layers(cfg, step // 50, 16), step


def test_badam_blocks_in_order_cycling():
    assert [badam_layers(i, 8, 3) for i in range(7)] == [
        (0, 1, 2), (3, 4, 5), (6, 7), (0, 1, 2), (3, 4, 5), (6, 7), (0, 1, 2)
    ]
    assert [badam_layers(i, 4, 2) for i in range(3)] == [(0, 1), (2, 3), (0, 1)]


def test_schedule_is_bounded_by_the_run_and_shares_plans():
    cfg = RotationConfig.parse({"rotate": "lisa", "layers": 2, "interval": 50, "seed": 0})
    sched = build_rotation_schedule(cfg, 8, 1000)
    ends = [p.until_step for p in sched.phases]
    assert ends[-1] is None and len(sched.phases) <= 20
    assert all(e % 50 == 0 for e in ends[:-1]) and ends[:-1] == sorted(ends[:-1])
    # 8 choose 2 = 28 distinct layer sets at most, however many intervals
    big = build_rotation_schedule(cfg, 8, 100_000)
    assert len({id(p.plan) for p in big.phases}) <= 28
    # embeddings and lm_head always trained; final_norm and unsampled layers frozen
    r = sched.phases[0].plan.resolve(8)
    assert r.non_layer("embeddings").name == "full" and r.non_layer("lm_head").name == "full"
    assert r.non_layer("final_norm").name == "freeze"
    assert sum(r.layers[i].name == "full" for i in range(8)) == 2
    # full/freeze plans only: installing every phase installs no adapter
    assert all(p.plan.policy_names() <= {"full", "freeze"} for p in big.phases)


def test_badam_single_block_is_one_phase_and_default_always_is_none():
    cfg = RotationConfig.parse({"rotate": "badam", "block": 4, "interval": 10})
    sched = build_rotation_schedule(cfg, 4, 100)
    assert len(sched.phases) == 1
    r = sched.phases[0].plan.resolve(4)
    assert all(r.non_layer(p).name == "freeze" for p in ("embeddings", "lm_head"))


@pytest.mark.parametrize("state,carry", [("carry", True), ("reset", False)])
def test_optimizer_state_reaches_the_schedule(state, carry):
    cfg = RotationConfig.parse(
        {"rotate": "badam", "block": 1, "interval": 5, "optimizer_state": state}
    )
    assert build_rotation_schedule(cfg, 4, 20).carry_state is carry
    assert RotationConfig.parse(cfg.to_dict()) == cfg


def test_default_optimizer_state_is_carry():
    cfg = RotationConfig.parse({"rotate": "lisa", "layers": 1, "interval": 5})
    assert cfg.optimizer_state == "carry" and cfg.always == ("embeddings", "lm_head")


def test_plan_config_accepts_the_rotation_mapping():
    from layerfreeze.config import PlanConfig

    cfg = PlanConfig(schedule={"rotate": "lisa", "layers": 2, "interval": 50, "seed": 0})
    assert cfg.schedule["rotate"] == "lisa"


def test_long_rotation_installs_each_distinct_plan_once_and_tracks_trained_layers():
    """1000 intervals on a 4-layer model: apply_plan installs the <= 6 distinct plans once (not
    1000 times), and the parameters trained in an earlier interval but frozen now are the
    layers the formula sampled before, minus the current interval's."""
    from layerfreeze.apply import apply_plan
    from layerfreeze.engines.common import trained_then_frozen
    from tests.helpers.tiny_models import build_tiny_model

    cfg = RotationConfig.parse({"rotate": "lisa", "layers": 2, "interval": 1, "seed": 5})
    sched = build_rotation_schedule(cfg, 4, 1000)
    applied = apply_plan(build_tiny_model("llama", num_layers=4), sched.plans[0],
                         install=tuple(sched.plans[1:]))
    assert len(applied.installed) <= 1 + 6  # plans[0] + C(4, 2)
    last = len(sched.phases) - 1
    now = set(interval_layers(cfg, 999, 4))
    before = {i for idx in range(999) for i in interval_layers(cfg, idx, 4)} - now
    want = sorted(n for n, _ in applied.model.named_parameters()
                  if any(n.startswith(f"model.layers.{i}.") for i in before))
    assert trained_then_frozen(applied, sched, last) == want


def test_to_dict_records_the_spec_not_the_phases():
    """Checkpoints record the generator's spec (a resume compares it), not 20k phases; the run
    length is left out, so a resume may extend train.steps."""
    spec = {"rotate": "lisa", "layers": 2, "interval": 50, "seed": 0}
    cfg = RotationConfig.parse(spec)
    short, long = build_rotation_schedule(cfg, 32, 1000), build_rotation_schedule(cfg, 32, 10**6)
    want = {**spec, "always": ["embeddings", "lm_head"], "optimizer_state": "carry",
            "num_layers": 32}
    assert short.to_dict() == long.to_dict() == want
    # extending the run keeps the phase indices of the steps both cover
    assert all(short.phase_at(s) == long.phase_at(s) for s in range(0, 1000, 7))
    assert build_rotation_schedule(cfg, 16, 1000).to_dict() != want  # another model
