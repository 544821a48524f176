"""Plans from evidence: deterministic, within budget (counted by apply_plan), accepted by the
plan command and the run config, and they train exactly the planned parameters."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml

from layerfreeze.apply import apply_plan
from layerfreeze.cli import main as cli_main
from layerfreeze.config import load_config
from layerfreeze.diagnostics.probe import ProbeBatch, ProbeSet, collate
from layerfreeze.diagnostics.recommend import recommend, write_recommendation
from layerfreeze.diagnostics.trace import TraceSettings, run_trace
from layerfreeze.plan import LayerPlan
from tests.helpers.tiny_models import build_tiny_model

REPO = Path(__file__).resolve().parents[2]


def _probe(vocab: int) -> ProbeSet:
    g = torch.Generator().manual_seed(5)
    ids, mask = collate([torch.randint(0, vocab, (n,), generator=g).tolist() for n in (8, 7, 8)])
    return ProbeSet("text", [ProbeBatch(ids, mask)], {"kind": "text"})


def _synthetic_trace(n: int, decodable: int | None) -> dict:
    rows = [{"layer": i, "angular_next": 0.3 - 0.02 * i, "skip": 0.1 / (i + 1)} for i in range(n)]
    lens = {"accuracy": [0.25 + 0.1 * i for i in range(n)], "decodable_layer": decodable}
    return {"layers": rows, "logit_lens": lens}


def _count(model, plan) -> tuple[int, int]:
    """(trainable, base total) counted on a real copy: requires_grad after apply_plan."""
    fresh = copy.deepcopy(model)
    total = sum(p.numel() for p in fresh.parameters())
    apply_plan(fresh, plan)
    return sum(p.numel() for p in fresh.parameters() if p.requires_grad), total


@pytest.fixture(scope="module")
def model():
    return build_tiny_model("llama", num_layers=6, hidden=32)


def test_recommendations_are_deterministic(model):
    probe = _probe(model.config.vocab_size)
    settings = TraceSettings(measures=("angular", "logit_lens", "skip"))
    t1, t2 = run_trace(model, probe, settings), run_trace(model, probe, settings)
    for family in ("freeze", "hlpt"):
        a = recommend(t1, model, 0.3, family).to_dict()
        b = recommend(t2, model, 0.3, family).to_dict()
        assert a == b
        assert a["rationale"] and all(isinstance(x, str) for x in a["rationale"])


def test_freeze_block_stops_at_the_decodable_layer_or_the_budget(model):
    per_layer = sum(p.numel() for p in model.model.layers[0].parameters())
    total = sum(p.numel() for p in model.parameters())
    rec = recommend(_synthetic_trace(6, decodable=2), model, 0.9, "freeze")
    assert str(rec.plan) == "0-1:full"
    assert rec.boundary == 2 and "decodable from layer 2" in rec.boundary_source
    assert any("layers 2-5: freeze" in line for line in rec.rationale)
    # a budget for 3 layers but evidence for 4: the budget binds
    budget = (3 * per_layer + 1) / total
    rec = recommend(_synthetic_trace(6, decodable=4), model, budget, "freeze")
    assert str(rec.plan) == "0-2:full"
    assert any("budget (3 layers fit)" in line for line in rec.rationale)
    trainable, _ = _count(model, rec.plan)
    assert trainable == rec.trainable_params == 3 * per_layer <= budget * total


def test_hlpt_split_and_largest_rank_within_budget(model):
    total = sum(p.numel() for p in model.parameters())
    for budget in (0.03, 0.1, 0.5):
        rec = recommend(_synthetic_trace(6, decodable=4), model, budget, "hlpt")
        rules = rec.plan.to_dict()["rules"]
        assert [r["layers"] for r in rules] == ["0-3", "4-5"]
        assert rules[0]["policy"] == "lora" and rules[1]["policy"] == "prefix"
        assert rules[1]["form"] == "paper" and rules[1]["gated"]  # HLPT's prefix, as hlpt (#17)
        r, t = rules[0]["r"], rules[1]["tokens"]
        trainable, _ = _count(model, rec.plan)
        assert trainable == rec.trainable_params <= budget * total
        if r < 64:  # the next rank up does not fit
            bigger = copy.deepcopy(rec.plan.to_dict())
            bigger["rules"][0]["r"] *= 2
            bigger["rules"][0]["alpha"] = float(bigger["rules"][0]["r"])
            assert _count(model, LayerPlan.parse(bigger))[0] > budget * total
        assert t >= 1


def test_budget_too_small_is_a_clear_error(model):
    with pytest.raises(ValueError, match=r"--budget: 0.001 of .* is less than layer 0"):
        recommend(_synthetic_trace(6, 2), model, 0.001, "freeze")
    with pytest.raises(ValueError, match="smallest hlpt plan"):
        recommend(_synthetic_trace(6, 2), model, 1e-6, "hlpt")
    with pytest.raises(ValueError, match="--family"):
        recommend(_synthetic_trace(6, 2), model, 0.5, "lora")
    with pytest.raises(ValueError, match="--budget"):
        recommend(_synthetic_trace(6, 2), model, 1.5, "freeze")


@pytest.mark.parametrize("family", ["freeze", "hlpt"])
def test_recommended_plan_trains_exactly_the_planned_parameters(model, family):
    rec = recommend(_synthetic_trace(6, decodable=3), model, 0.3, family)
    m = copy.deepcopy(model)
    applied = apply_plan(m, rec.plan)
    planned = set(applied.trainable_names())
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = torch.optim.AdamW(applied.param_groups(lr=1e-2, weight_decay=0.0))
    ids = torch.randint(0, m.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        m(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in m.named_parameters() if not torch.equal(p, before[n])}
    assert changed == planned


def test_plan_file_is_accepted_by_plan_and_train_config(model, tmp_path, capsys):
    rec = recommend(_synthetic_trace(6, decodable=4), model, 0.1, "hlpt")
    files = write_recommendation(rec, tmp_path)
    assert files == ["plan.yaml", "recommendation.json"]
    model.config.save_pretrained(tmp_path / "m")
    assert (
        cli_main(["plan", "--model", str(tmp_path / "m"), "--plan", str(tmp_path / "plan.yaml")])
        == 0
    )
    out = capsys.readouterr().out
    assert "lora" in out and "prefix" in out
    spec = yaml.safe_load((tmp_path / "plan.yaml").read_text())
    assert LayerPlan.parse(spec) == rec.plan
    cfg_path = REPO / "configs" / "tiny_llama" / "cpt_hlpt_deepspeed.yaml"
    cfg = load_config(cfg_path, [rec.to_dict()["train_override"]])
    assert LayerPlan.parse(cfg.plan.spec) == rec.plan
    data = yaml.safe_load(cfg_path.read_text())
    data["plan"] = {"spec": spec}
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump(data))
    assert LayerPlan.parse(load_config(cfg_file).plan.spec) == rec.plan
