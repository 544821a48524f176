"""Hostile rotating-layer schedule configs: one clear error per problem, each naming its key."""

from __future__ import annotations

import pytest

from layerfreeze.errors import ConfigError
from layerfreeze.rotation import RotationConfig, build_rotation_schedule


def _problems(spec) -> list[str]:
    with pytest.raises(ConfigError) as e:
        RotationConfig.parse(spec)
    return e.value.problems


@pytest.mark.parametrize(
    "spec,expected",
    [
        ({"rotate": "lsia", "layers": 2, "interval": 5},
         "plan.schedule.rotate: unknown rotation, got 'lsia'. Use one of lisa, badam."),
        ({"layers": 2, "interval": 5}, "plan.schedule.rotate: unknown rotation, got None."),
        ({"rotate": "lisa", "interval": 5},
         "plan.schedule.layers: expected an integer >= 1 (a required key for rotate: lisa), got None."),
        ({"rotate": "lisa", "layers": 0, "interval": 5},
         "plan.schedule.layers: expected an integer >= 1 (an integer for rotate: lisa), got 0."),
        ({"rotate": "lisa", "layers": 2, "interval": True},
         "plan.schedule.interval: expected an integer >= 1 (an integer for rotate: lisa), got True."),
        ({"rotate": "lisa", "layers": 2, "interval": 5, "seed": -1},
         "plan.schedule.seed: expected an integer >= 0"),
        ({"rotate": "lisa", "layers": 2, "interval": 5, "block": 2},
         "plan.schedule.block: unknown key for rotate: lisa (valid: layers, interval, seed, always, "
         "optimizer_state)."),
        ({"rotate": "badam", "layers": 2, "interval": 5},
         "plan.schedule.layers: unknown key for rotate: badam"),
        ({"rotate": "badam", "block": 2, "interval": 5, "always": "lm_head"},
         "plan.schedule.always: expected a list of non-layer parts"),
        ({"rotate": "badam", "block": 2, "interval": 5, "always": ["lm_haed"]},
         "plan.schedule.always: unknown part, got 'lm_haed'."),
        ({"rotate": "badam", "block": 2, "interval": 5, "optimizer_state": "keep"},
         "plan.schedule.optimizer_state: unknown value, got 'keep'. Use carry"),
    ],
)
def test_bad_rotation_names_the_key(spec, expected):
    problems = _problems(spec)
    assert any(p.startswith(expected) for p in problems), problems


def test_every_problem_at_once():
    problems = _problems({"rotate": "lisa", "layers": "2", "interval": 0, "sed": 1})
    keys = sorted(p.split(":")[0] for p in problems)
    assert keys == ["plan.schedule.interval", "plan.schedule.layers", "plan.schedule.sed"]
    assert any("Did you mean 'seed'" in p for p in problems), problems


@pytest.mark.parametrize(
    "spec,key", [({"rotate": "lisa", "layers": 5, "interval": 5}, "layers"),
                 ({"rotate": "badam", "block": 5, "interval": 5}, "block")]
)
def test_more_layers_than_the_model(spec, key):
    with pytest.raises(ConfigError, match=rf"plan.schedule.{key}: 5 is more than the model's 4 "
                       rf"layers. Set {key} to at most 4."):
        build_rotation_schedule(RotationConfig.parse(spec), 4, 100)


def test_plan_config_reports_rotation_errors_at_load():
    from layerfreeze.config import PlanConfig

    with pytest.raises(ConfigError, match=r"plan.schedule.interval: expected an integer >= 1"):
        PlanConfig(schedule={"rotate": "badam", "block": 2})
