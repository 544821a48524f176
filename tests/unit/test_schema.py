"""Strict dataclass config machinery: unknown keys, types, nested sections, overrides."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from layerfreeze.errors import ConfigError
from layerfreeze.utils.schema import (
    apply_overrides,
    describe_fields,
    field_docs,
    from_dict,
    to_dict,
)


@dataclass
class _Train:
    lr: float = 1e-4
    """Peak learning rate."""
    steps: int = 10
    """Optimizer steps."""
    kind: Literal["cosine", "linear"] = "cosine"

    def __post_init__(self):
        if self.steps <= 0:
            raise ConfigError(f"steps: must be positive, got {self.steps}. Set train.steps >= 1.")


@dataclass
class _Data:
    paths: list[str] = field(default_factory=lambda: ["a.txt"])
    seq_len: int = 8

    def __post_init__(self):
        if self.seq_len < 2:
            raise ConfigError(f"seq_len: must be >= 2, got {self.seq_len}.")


@dataclass
class _Run:
    train: _Train = field(default_factory=_Train)
    data: _Data = field(default_factory=_Data)
    name: str | None = None


def test_round_trip_and_yaml_number_strings():
    cfg = from_dict(_Run, {"train": {"lr": "3e-4", "steps": 5.0}, "data": {"paths": ["x"]}})
    assert cfg.train.lr == pytest.approx(3e-4) and cfg.train.steps == 5
    assert from_dict(_Run, to_dict(cfg)) == cfg


def test_unknown_keys_suggest_and_all_problems_reported_together():
    with pytest.raises(ConfigError) as e:
        from_dict(_Run, {"train": {"lrr": 1, "kind": "step"}, "dta": {}, "data": {"seq_len": "x"}})
    msg = str(e.value)
    assert "train.lrr: unknown key. Did you mean 'lr'?" in msg
    assert "train.kind: must be one of 'cosine', 'linear', got 'step'." in msg
    assert "dta: unknown key. Did you mean 'data'?" in msg
    assert "data.seq_len: expected an integer, got 'x'." in msg
    assert len(e.value.problems) == 4


def test_post_init_of_every_section_runs_even_when_a_sibling_fails():
    # Regression: one shared problem list used to skip later sections' own checks.
    with pytest.raises(ConfigError) as e:
        from_dict(_Run, {"train": {"steps": 0}, "data": {"seq_len": 1}})
    assert any(p.startswith("train.steps: must be positive") for p in e.value.problems)
    assert any(p.startswith("data.seq_len: must be >= 2") for p in e.value.problems)


def test_overrides_are_checked_against_the_schema():
    data = apply_overrides({"train": {"lr": 1.0}}, ["train.lr=2e-4", "data.paths=[a,b]"], _Run)
    cfg = from_dict(_Run, data)
    assert cfg.train.lr == pytest.approx(2e-4) and cfg.data.paths == ["a", "b"]
    with pytest.raises(ConfigError, match=r"unknown key 'lrr' in 'train'. Did you mean 'lr'"):
        apply_overrides({}, ["train.lrr=1"], _Run)
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        apply_overrides({}, ["train.lr"], _Run)


def test_field_docs_and_schema_description():
    assert field_docs(_Train) == {"lr": "Peak learning rate.", "steps": "Optimizer steps."}
    rows = {r[0]: r for r in describe_fields(_Run)}
    assert rows["train.lr"][2] == 1e-4 and rows["train.lr"][3] == "Peak learning rate."
    assert rows["train.kind"][1] == "'cosine' | 'linear'"
    assert rows["train"][1] == "section"
