"""PlanSchedule: phases of plans ending at given steps."""

from __future__ import annotations

import pytest

from layerfreeze.errors import ConfigError
from layerfreeze.plan import LayerPlan
from layerfreeze.schedule import PlanSchedule

PHASES = [
    {"plan": "full", "until_step": 10},
    {"plan": "0-1:lora(r=2),2-3:full", "until_step": 25},
    {"plan": {"preset": "freeze_deep"}, "until_step": None},
]


def test_phase_at_and_plans():
    s = PlanSchedule.parse(PHASES)
    assert [s.phase_at(i) for i in (0, 9, 10, 24, 25, 10**9)] == [0, 0, 1, 1, 2, 2]
    assert s.boundaries == [10, 25]
    assert s.plans[1] == LayerPlan.parse("0-1:lora(r=2),2-3:full")
    assert s.plan_at(30) == LayerPlan.from_preset("freeze_deep")
    with pytest.raises(ValueError, match="step: must be >= 0"):
        s.phase_at(-1)


def test_round_trip_and_single():
    s = PlanSchedule.parse(PHASES)
    assert PlanSchedule.parse(s.to_dict()) == s
    one = PlanSchedule.single("hlpt")
    assert one.phase_at(0) == one.phase_at(10**6) == 0 and one.boundaries == []
    assert PlanSchedule.parse([{"plan": "hlpt", "until_step": None}]) == one
    assert PlanSchedule.parse(one) is one


def test_errors_collected():
    with pytest.raises(ConfigError) as e:
        PlanSchedule.parse([
            {"plan": "0-1:lorra", "until_step": 10},
            {"plan": "full", "until_step": 10},
            {"plan": "full", "untl_step": 30},
            {"until_step": 40},
            {"plan": "full", "until_step": 50},
        ])
    probs = e.value.problems
    joined = "\n".join(probs)
    assert "schedule[0].plan[0]: unknown policy 'lorra'" in joined
    assert "schedule[1].until_step: must be greater than 10" in joined
    assert "schedule[2].untl_step: unknown key. Did you mean 'until_step'?" in joined
    assert "schedule[2].until_step: expected an integer step" in joined
    assert "schedule[3].plan: required key is missing" in joined
    assert "schedule[4].until_step: the last phase is open-ended" in joined
    assert len(probs) == 6


@pytest.mark.parametrize("bad", [[], "full", {"plan": "full"}, None])
def test_not_a_list(bad):
    with pytest.raises(ConfigError, match="expected a non-empty list of phases"):
        PlanSchedule.parse(bad)


def test_first_boundary_must_be_positive():
    with pytest.raises(ConfigError, match="must be greater than 0"):
        PlanSchedule.parse([{"plan": "full", "until_step": 0}, {"plan": "full", "until_step": None}])
