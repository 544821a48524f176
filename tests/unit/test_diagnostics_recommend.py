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


# ------------------------------------------------------------------------------ the score


def _brute_cut(score: list[float]) -> int:
    """Independent: the cost of every cut written out, ties to the smallest cut."""
    costs = [(sum(score[:b]) + sum(1 - s for s in score[b:]), b) for b in range(1, len(score) + 1)]
    return min(costs)[1]


def test_score_boundary_is_the_cheapest_cut():
    from layerfreeze.diagnostics.recommend import score_boundary

    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 5, 9):
        for _ in range(20):
            s = torch.rand(n, generator=g).tolist()
            assert score_boundary(s) == _brute_cut(s)
    assert score_boundary([0.0, 0.0, 1.0, 1.0]) == 2
    assert score_boundary([1.0, 1.0, 1.0]) == 1  # at least one layer trains
    assert score_boundary([0.0, 0.0, 0.0]) == 3
    assert score_boundary([0.2, 0.5, 0.9]) == 1  # a tie (score 1/2) goes to the smaller cut


def test_layer_scores_follow_the_documented_formula():
    from layerfreeze.diagnostics.recommend import layer_scores

    rows = [{"layer": i, "skip": v} for i, v in enumerate([0.4, -0.1, 0.2, 0.8])]
    trace = {
        "layers": rows,
        "logit_lens": {"accuracy": [0.3, 0.4, 0.7, 0.7], "decodable_layer": 2},
        "sensitivity": {"noise": {"0.01": [9, 9, 9, 9], "0.1": [0.1, 0.5, 0.0, -0.2]}},
        "layer_stability": {"output_change": [0.05, 0.1, 0.2, 0.4]},
    }
    got = layer_scores(trace, 4)
    # relative: clip at 0, divide by twice the median, clip at 1
    skip = [0.4 / 0.6, 0.0, 0.2 / 0.6, 1.0]  # clipped [0.4, 0, 0.2, 0.8], median 0.3
    noise = [1.0, 1.0, 0.0, 0.0]  # the largest scale (0.1): [0.1, 0.5, 0, 0], median 0.05
    sens = [(a + b) / 2 for a, b in zip(skip, noise, strict=True)]
    stab = [0.05 / 0.3, 0.1 / 0.3, 0.2 / 0.3, 1.0]  # median 0.15
    lens = [0.0, 0.0, 1.0, 1.0]
    expect = [0.4 * a + 0.3 * b + 0.3 * c for a, b, c in zip(lens, sens, stab, strict=True)]
    assert got["components"]["sensitivity"] == pytest.approx(sens)
    assert got["components"]["stability"] == pytest.approx(stab)
    assert got["components"]["lens"] == lens
    assert got["score"] == pytest.approx(expect)
    # a component the trace lacks drops out; the others are renormalised
    del trace["layer_stability"]
    got = layer_scores(trace, 4)
    assert got["weights_used"] == pytest.approx({"lens": 4 / 7, "sensitivity": 3 / 7})
    assert got["unused"] == {"stability": "the trace has no layer_stability"}
    del trace["logit_lens"]["decodable_layer"]  # the lens ran but shows no task layer
    assert layer_scores(trace, 4)["unused"]["lens"] == (
        "the logit lens shows no decodable or converged layer"
    )
    assert got["score"] == pytest.approx(
        [(0.4 * a + 0.3 * b) / 0.7 for a, b in zip(lens, sens, strict=True)]
    )


def test_sensitivity_and_stability_move_the_split_and_the_weights_choose(model):
    # lens: answer decodable from layer 4; layer 3 is by far the most sensitive and fragile
    n = 6
    rows = [{"layer": i, "skip": 1.0 if i == 3 else 0.05} for i in range(n)]
    iso = [1.0 if i == 3 else 0.05 for i in range(n)]
    trace = {
        "layers": rows,
        "logit_lens": {"accuracy": [0.3] * 4 + [0.8, 0.8], "decodable_layer": 4},
        "layer_stability": {"output_change": iso},
    }
    # relative values: typical layers 1/2, layer 3 is 1; score_3 = 0.3 + 0.3 = 0.6 > 1/2 (keep),
    # layers 0-2 0.3 (train), 4-5 0.4 + 0.3 = 0.7 (keep): the cut moves down to 3
    rec = recommend(trace, model, 1.0, "freeze")
    assert rec.boundary == 3 and str(rec.plan) == "0-2:full"
    assert rec.score["score"][3] == pytest.approx(0.6)
    # the lens alone puts the cut at the decodable layer
    assert recommend(trace, model, 1.0, "freeze", "lens=1").boundary == 4
    # hlpt: LoRA below the cut, prefix from it
    rules = recommend(trace, model, 0.5, "hlpt").plan.to_dict()["rules"]
    assert [r["layers"] for r in rules] == ["0-2", "3-5"]
    # a deep layer that is neither sensitive nor fragile (a near-identity) is trained:
    # score_4 = 0.4 + 0 < 1/2, so the cut moves up past it (layers 0-3: 0.3, layer 5: 1.0)
    rows[3]["skip"] = 0.05
    iso[3] = 0.05
    rows[4]["skip"], iso[4] = 0.0, 0.0
    rows[5]["skip"], iso[5] = 1.0, 1.0
    rec = recommend(trace, model, 1.0, "freeze")
    assert rec.score["score"][4] == pytest.approx(0.4)
    assert rec.boundary == 5
    assert recommend(trace, model, 1.0, "freeze", {"lens": 1.0}).boundary == 4


def test_score_weights_are_validated():
    from layerfreeze.diagnostics.recommend import parse_weights

    assert parse_weights(None) == {"lens": 0.4, "sensitivity": 0.3, "stability": 0.3}
    assert parse_weights("lens=1, stability=0.5") == {
        "lens": 1.0,
        "sensitivity": 0.0,
        "stability": 0.5,
    }
    with pytest.raises(ValueError, match=r"unknown component 'lense'. Valid: lens"):
        parse_weights("lense=1")
    with pytest.raises(ValueError, match="lens must be a finite number >= 0, got 'nan'"):
        parse_weights("lens=nan")
    with pytest.raises(ValueError, match="every weight is 0"):
        parse_weights("lens=0")
    with pytest.raises(ValueError, match="name=value"):
        parse_weights("lens")


# ------------------------------------------------------------------------------ real models


def _stab_probe(vocab: int) -> ProbeSet:
    from tests.unit.test_diagnostics_measures import _probe as measures_probe

    return measures_probe(vocab, lengths=(12, 10, 12, 9), batch_size=2)


def test_fragile_then_identity_deepest_layer_moves_the_split_on_a_real_model():
    """Stability-only weights on a tiny real Llama; the changed layer is the deepest, so (by the
    isolation of ``layer_stability``) every other layer's raw value stays bit for bit the same
    and only the changed layer's own score moves. Expected directions from the formula: a
    score >= 1/2 votes keep (the cut below it is at least as cheap, ties go down), a score of 0
    votes train."""
    from tests.unit.test_diagnostics_layer_stability import make_fragile
    from tests.unit.test_diagnostics_measures import _zero_residual

    settings = TraceSettings(measures=("layer_stability",), layer_stability_scale=0.05)
    weights = "stability=1"
    base = build_tiny_model("llama", num_layers=6, hidden=32).eval()
    probe = _stab_probe(base.config.vocab_size)
    t0 = run_trace(base, probe, settings)
    r0 = recommend(t0, base, 1.0, "freeze", weights)
    assert r0.boundary == _brute_cut(r0.score["score"]) == 6  # every layer trains

    fragile = copy.deepcopy(base)
    make_fragile(fragile, 5)
    tf = run_trace(fragile, probe, settings)
    raw0, rawf = t0["layer_stability"]["output_change"], tf["layer_stability"]["output_change"]
    assert rawf[:5] == raw0[:5]  # isolation: the layers below are untouched
    rf = recommend(tf, fragile, 1.0, "freeze", weights)
    assert rf.score["components"]["stability"][5] == 1.0  # >= twice the typical layer
    assert rf.boundary == _brute_cut(rf.score["score"]) < r0.boundary
    assert str(rf.plan) == f"0-{rf.boundary - 1}:full"
    rules = recommend(tf, fragile, 0.5, "hlpt", weights).plan.to_dict()["rules"]
    b = rf.boundary
    assert rules[-1]["policy"] == "prefix" and rules[-1]["layers"] == ("5" if b == 5 else f"{b}-5")

    # the same kept layer made an identity instead: it adds nothing, its score is 0, the cut
    # moves up again and the layer is trained
    identity = copy.deepcopy(base)
    _zero_residual(identity, "llama", 5)
    ti = run_trace(identity, probe, settings)
    assert ti["layer_stability"]["output_change"][5] == 0.0
    ri = recommend(ti, identity, 1.0, "freeze", weights)
    assert ri.score["score"][5] == 0.0
    assert ri.boundary == _brute_cut(ri.score["score"]) > rf.boundary
    # here every layer trains again: hlpt then has no prefix layer and says so
    assert ri.boundary == 6
    hl = recommend(ti, identity, 0.5, "hlpt", weights)
    assert [r["policy"] for r in hl.plan.to_dict()["rules"]] == ["lora"]
    assert any("no prefix layer" in line for line in hl.rationale)


def test_default_score_on_a_real_trace_identity_and_fragile_components():
    """All three components from a real trace with the default weights: an identity layer has
    sensitivity and stability exactly 0 (its score is its lens part alone, < 1/2), a fragile
    layer has stability 1, and the cut is the cheapest one for the score."""
    from tests.unit.test_diagnostics_layer_stability import make_fragile
    from tests.unit.test_diagnostics_measures import _zero_residual

    m = build_tiny_model("llama", num_layers=6, hidden=32).eval()
    _zero_residual(m, "llama", 2)
    make_fragile(m, 5)
    probe = _stab_probe(m.config.vocab_size)
    settings = TraceSettings(
        measures=("logit_lens", "skip", "noise", "layer_stability"), noise_scales=(0.1,)
    )
    t = run_trace(m, probe, settings)
    rec = recommend(t, m, 1.0, "freeze")
    comps = rec.score["components"]
    assert comps["sensitivity"][2] == 0.0 and comps["stability"][2] == 0.0
    lens_part = rec.score["weights_used"].get("lens", 0.0) * (comps["lens"] or [0.0] * 6)[2]
    assert rec.score["score"][2] == pytest.approx(lens_part) and rec.score["score"][2] < 0.5
    assert comps["stability"][5] == 1.0
    assert rec.boundary == _brute_cut(rec.score["score"])
    assert rec.to_dict()["score"]["weights"] == {"lens": 0.4, "sensitivity": 0.3, "stability": 0.3}
