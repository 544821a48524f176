"""LayerPlan: the three written forms, round trips, exact fraction rounding, presets, validation."""

from __future__ import annotations

import json
import subprocess
import sys
from decimal import ROUND_HALF_UP, Decimal

import pytest
import yaml

from layerfreeze.errors import ConfigError
from layerfreeze.plan import PRESETS, LayerPlan, LayerRange, boundary


def _names(resolved):
    return [s.name for s in resolved.layers]


def _dec_boundary(pct: str, n: int) -> int:
    """Independent implementation of the documented rule: round half up of pct/100 * N."""
    return int((Decimal(pct) / 100 * n).quantize(Decimal(1), rounding=ROUND_HALF_UP))


# ----------------------------------------------------------------------------- forms / round trips

ROUND_TRIP = [
    "0-7:full,8-31:freeze",
    "0%-25%:lora(r=16,target=mlp,gated),-4:-1:prefix(tokens=16,gated)",
    "3:full(lr_scale=0.5,weight_decay=0.0),default:lora(r=4),embeddings:full,lm_head:full(lr_scale=2.0)",
    "all:lora(target=[q_proj,v_proj],alpha=8.0,dropout=0.1)",
    "12.5%-37.5%:prefix(tokens=4,reparam=32),0-1:full",
    "-3--2:full",
    {"rules": [{"layers": "0-3", "policy": "full", "lr_scale": 0.1}, {"layers": 5, "policy": "lora", "r": 2}],
     "default": "freeze", "final_norm": {"policy": "full", "weight_decay": 0.0}},
    "hlpt",
    "h2lpt(r=4,tokens=2)",
    "freeze_deep(fraction=0.25)",
    {"preset": "lora_all", "preset_args": {"r": 4, "target": "attn"}, "lm_head": "full"},
]


@pytest.mark.parametrize("spec", ROUND_TRIP, ids=lambda s: str(s)[:40])
def test_round_trips(spec):
    plan = LayerPlan.parse(spec)
    d = plan.to_dict()
    assert LayerPlan.parse(d) == plan
    assert LayerPlan.parse(json.loads(json.dumps(d))) == plan
    assert LayerPlan.parse(yaml.safe_load(yaml.safe_dump(d))) == plan
    assert LayerPlan.parse(str(plan)) == plan
    assert str(LayerPlan.parse(str(plan))) == str(plan)
    assert plan.resolve(32) == LayerPlan.parse(str(plan)).resolve(32)


def test_compact_and_dict_forms_agree():
    a = LayerPlan.parse("0-7:full,8-11:lora(r=16,target=mlp,gated),embeddings:full")
    b = LayerPlan.parse({
        "embeddings": "full",
        "rules": [{"layers": "0-7", "policy": "full"},
                  {"layers": "8-11", "policy": "lora", "r": 16, "target": "mlp", "gated": True}],
    })
    assert a == b
    assert LayerPlan.parse(a) is a


def test_resolve_examples():
    r = LayerPlan.parse("0-7:full,8-31:freeze").resolve(32)
    assert _names(r) == ["full"] * 8 + ["freeze"] * 24
    r = LayerPlan.parse("-4:-1:prefix(tokens=16,gated)").resolve(32)
    assert _names(r) == ["freeze"] * 28 + ["prefix"] * 4 and r.layers[31].options.tokens == 16
    r = LayerPlan.parse("0%-25%:lora(r=16,target=mlp,gated)").resolve(32)
    assert _names(r) == ["lora"] * 8 + ["freeze"] * 24
    assert r.layers[0].options.gated is True and r.layers[0].options.target == "mlp"
    r = LayerPlan.parse("2:full,default:lora(r=2)").resolve(4)
    assert _names(r) == ["lora", "lora", "full", "lora"]
    assert r.sources[2].startswith("plan[0]") and r.sources[0] == "default"
    assert r.embeddings.name == r.final_norm.name == r.lm_head.name == "freeze"
    assert "0-1" in r.table() and r.to_dict()["layers"][2] == {"index": 2, "policy": "full",
                                                               "options": {"lr_scale": 1.0, "weight_decay": None}}


def test_uncovered_layers_get_the_default_freeze():
    r = LayerPlan.parse({"rules": [{"layers": "1-2", "policy": "full"}]}).resolve(5)
    assert _names(r) == ["freeze", "full", "full", "freeze", "freeze"]


# ----------------------------------------------------------------------------- fraction rounding

@pytest.mark.parametrize("pct", ["1", "10", "12.5", "25", "33.3", "37.5", "50", "62.5", "75", "87.5", "99"])
def test_fraction_boundary_matches_documented_rule(pct):
    for n in range(1, 41):
        expected = _dec_boundary(pct, n)
        assert boundary(LayerRange.parse(f"0%-{pct}%").end, n) == expected
        low = LayerPlan.parse(f"0%-{pct}%:full").resolve(n)
        assert _names(low).count("full") == expected
        # Percent endpoints are boundaries: the two halves tile the model without overlap.
        tiled = LayerPlan.parse(f"0%-{pct}%:full,{pct}%-100%:lora(r=1)").resolve(n)
        assert _names(tiled) == ["full"] * expected + ["lora"] * (n - expected)


def test_rounding_is_exact_not_float():
    # 0.375 * 32 = 12 exactly; 2.5 rounds up to 3 (not banker's 2); 14.5% of 10 = 1.45 -> 1.
    assert _names(LayerPlan.parse("0%-37.5%:full").resolve(32)).count("full") == 12
    assert _names(LayerPlan.parse("0%-50%:full").resolve(5)).count("full") == 3
    assert _names(LayerPlan.parse("0%-14.5%:full").resolve(10)).count("full") == 1


def test_range_text_normalisation():
    assert str(LayerRange.parse("3")) == "3"
    assert str(LayerRange.parse(" 0 - 7 ")) == "0-7"
    assert str(LayerRange.parse("-4--1")) == "-4:-1"
    assert str(LayerRange.parse("12.50%-100%")) == "12.5%-100%"
    assert str(LayerRange.parse("*")) == "all"


# ----------------------------------------------------------------------------- presets

def _count(resolved, name):
    return _names(resolved).count(name)


@pytest.mark.parametrize("n", [1, 2, 4, 5, 6, 7, 12, 32, 80])
def test_preset_allocations(n):
    b = lambda f: _dec_boundary(str(f * 100), n)  # noqa: E731

    r = LayerPlan.from_preset("full").resolve(n)
    assert _names(r) == ["full"] * n and {r.embeddings.name, r.final_norm.name, r.lm_head.name} == {"full"}

    r = LayerPlan.from_preset("freeze_deep").resolve(n)
    assert _names(r) == ["full"] * b(0.5) + ["freeze"] * (n - b(0.5))
    assert (r.embeddings.name, r.final_norm.name, r.lm_head.name) == ("full", "freeze", "freeze")

    r = LayerPlan.from_preset("freeze_deep", fraction=0.25).resolve(n)
    assert _count(r, "full") == b(0.25) and _names(r)[: b(0.25)] == ["full"] * b(0.25)

    r = LayerPlan.from_preset("freeze_shallow").resolve(n)
    assert _names(r) == ["freeze"] * b(0.5) + ["full"] * (n - b(0.5))
    assert (r.embeddings.name, r.final_norm.name, r.lm_head.name) == ("freeze", "full", "full")

    r = LayerPlan.from_preset("hlpt").resolve(n)
    assert _names(r) == ["lora"] * b(0.75) + ["prefix"] * (n - b(0.75))
    if b(0.75):
        o = r.layers[0].options
        assert (o.target, o.gated, o.r) == ("mlp", True, 16)
    if n - b(0.75):
        assert r.layers[-1].options.gated and r.layers[-1].options.tokens == 16
    assert {r.embeddings.name, r.final_norm.name, r.lm_head.name} == {"freeze"}

    r = LayerPlan.from_preset("h2lpt").resolve(n)
    lo, hi = b(0.25), b(0.75)
    assert _names(r) == ["lora"] * lo + ["freeze"] * (hi - lo) + ["prefix"] * (n - hi)

    r = LayerPlan.from_preset("h2lpt_3to1").resolve(n)
    lo, hi = b(0.375), b(0.875)
    assert _names(r) == ["lora"] * lo + ["freeze"] * (hi - lo) + ["prefix"] * (n - hi)

    r = LayerPlan.from_preset("lora_all").resolve(n)
    assert _names(r) == ["lora"] * n and r.layers[0].options.target == "all" and not r.layers[0].options.gated


def test_h2lpt_is_half_of_hlpt_at_32_layers():
    hl = LayerPlan.from_preset("hlpt").resolve(32)
    h2 = LayerPlan.from_preset("h2lpt_3to1").resolve(32)
    assert (_count(hl, "lora"), _count(hl, "prefix")) == (24, 8)
    assert (_count(h2, "lora"), _count(h2, "prefix"), _count(h2, "freeze")) == (12, 4, 16)
    h2 = LayerPlan.from_preset("h2lpt").resolve(32)  # the paper's: bottom / top quarter
    assert (_count(h2, "lora"), _count(h2, "prefix"), _count(h2, "freeze")) == (8, 8, 16)


def test_preset_options_and_overrides():
    p = LayerPlan.from_preset("hlpt", lora_fraction=0.5, r=4, tokens=2, lora={"alpha": 8.0},
                              prefix={"reparam": 16}, embeddings="full")
    r = p.resolve(8)
    assert _names(r) == ["lora"] * 4 + ["prefix"] * 4
    assert r.layers[0].options.alpha == 8.0 and r.layers[7].options.reparam == 16
    assert r.embeddings.name == "full" and p.name == "hlpt"
    p = LayerPlan.parse({"preset": "freeze_deep", "preset_args": {"fraction": 0.75}, "lm_head": "full"})
    r = p.resolve(4)
    assert _names(r) == ["full"] * 3 + ["freeze"] and r.lm_head.name == "full" and r.embeddings.name == "full"
    r = LayerPlan.from_preset("freeze_deep", embeddings="freeze", final_norm="full").resolve(2)
    assert (r.embeddings.name, r.final_norm.name) == ("freeze", "full")
    r = LayerPlan.from_preset("h2lpt", lora_fraction=0.25, prefix_fraction=0.25).resolve(8)
    assert _names(r) == ["lora"] * 2 + ["freeze"] * 4 + ["prefix"] * 2


def test_every_preset_is_documented(repo_root):
    doc = (repo_root / "docs" / "plans.md").read_text(encoding="utf-8")
    for name in PRESETS:
        assert f"`{name}`" in doc


# ----------------------------------------------------------------------------- validation errors

def _problems(fn):
    with pytest.raises(ConfigError) as e:
        fn()
    return e.value.problems


def test_overlap_names_both_rules_and_layers():
    (p,) = _problems(lambda: LayerPlan.parse("0-7:full,5-9:lora(r=2)").resolve(10))
    assert "plan[0] ('0-7:full')" in p and "plan[1] ('5-9:lora(r=2)')" in p and "layers 5-7" in p
    p1, p2 = _problems(lambda: LayerPlan.parse(
        {"rules": [{"layers": "0%-50%", "policy": "full"}, {"layers": -1, "policy": "full"},
                   {"layers": "1-3", "policy": "freeze"}]}).resolve(4))
    assert "plan.rules[0] ('0%-50%')" in p1 and "plan.rules[2] ('1-3')" in p1 and "cover layer 1 " in p1
    assert "plan.rules[1] (-1)" in p2 and "plan.rules[2] ('1-3')" in p2 and "cover layer 3 " in p2


def test_out_of_range_says_valid_range():
    (p,) = _problems(lambda: LayerPlan.parse("0-40:full").resolve(32))
    assert "layer 40 is out of range for a 32-layer model (valid 0-31, or -32 to -1" in p
    (p,) = _problems(lambda: LayerPlan.parse("-9:-1:full").resolve(8))
    assert "layer -9 is out of range" in p
    (p,) = _problems(lambda: LayerPlan.parse("9:full").resolve(4))  # reported once, not per end
    assert "layer 9 is out of range for a 4-layer model (valid 0-3" in p


def test_unknown_policy_lists_registered():
    (p,) = _problems(lambda: LayerPlan.parse("0-3:lorra"))
    assert "unknown policy 'lorra'" in p and "Did you mean 'lora'?" in p and "freeze, full, lora, prefix" in p


def test_unknown_option_did_you_mean():
    (p,) = _problems(lambda: LayerPlan.parse("0-3:lora(rank=4)"))
    assert "plan[0].rank: unknown key" in p and "'0-3:lora(rank=4)'" in p
    (p,) = _problems(lambda: LayerPlan.parse({"rules": [{"layers": "0", "policy": "prefix", "token": 3}]}))
    assert p.startswith("plan.rules[0].token: unknown key. Did you mean 'tokens'?")


def test_bad_option_values():
    probs = _problems(lambda: LayerPlan.parse("0:lora(r=0),1:full(lr_scale=-1)"))
    assert any("r: must be an integer >= 1" in p for p in probs)
    assert any("lr_scale: must be > 0" in p for p in probs)


@pytest.mark.parametrize("bad,needle", [
    ("x:full", "malformed layer range 'x'"),
    ("5-3:full", "starts after it ends"),
    ("50%:full", "a single percent"),
    ("0-120%:full", "percent above 100%"),
    ("1.5:full", "must be an integer"),
    ("embeddings:lora", "must be one of freeze, full"),
    ("0-3", "expected '<layers>:<policy>'"),
    ("0-3:full(", "malformed policy"),
    ("", "empty plan"),
    ("hlpx", "Did you mean 'hlpt'?"),
])
def test_syntax_errors(bad, needle):
    probs = _problems(lambda: LayerPlan.parse(bad))
    assert any(needle in p for p in probs), probs


def test_dict_form_errors_collected_at_once():
    probs = _problems(lambda: LayerPlan.parse({
        "rulez": [],
        "embeddings": "lora",
        "rules": [{"policy": "full"}, {"layers": "0-1", "policy": "nope"}, "0-1:full"],
    }))
    assert len(probs) == 5
    joined = "\n".join(probs)
    for needle in ("plan.rulez: unknown key. Did you mean 'rules'?", "plan.embeddings: policy must be",
                   "plan.rules[0].layers: required key is missing", "plan.rules[1]: unknown policy 'nope'",
                   "plan.rules[2]: expected a mapping"):
        assert needle in joined


def test_preset_errors():
    (p,) = _problems(lambda: LayerPlan.from_preset("freeze_deep", fracton=0.2))
    assert "fracton: unknown key. Did you mean 'fraction'?" in p
    (p,) = _problems(lambda: LayerPlan.from_preset("freeze_deep", fraction=1.5))
    assert "fraction: must be a fraction in (0, 1], got 1.5" in p
    (p,) = _problems(lambda: LayerPlan.from_preset("h2lpt", lora_fraction=0.8, prefix_fraction=0.3))
    assert "must be at most 1" in p
    (p,) = _problems(lambda: LayerPlan.from_preset("hlptt"))
    assert "unknown preset 'hlptt'" in p and "Did you mean 'hlpt'?" in p
    (p,) = _problems(lambda: LayerPlan.parse({"preset": "full", "rules": []}))
    assert "'preset' and 'rules' are exclusive" in p
    (p,) = _problems(lambda: LayerPlan.parse({"preset_args": {"r": 1}}))
    assert "given without 'preset'" in p


def test_multiple_resolve_problems_in_one_error():
    probs = _problems(lambda: LayerPlan.parse("0-9:full,8-12:full,-20:-1:full").resolve(10))
    # Two out-of-range rules, and (clipped to the model) each overlaps the first rule.
    assert len(probs) == 4
    assert sum("out of range" in p for p in probs) == 2 and sum("both cover" in p for p in probs) == 2


def test_plan_module_imports_no_torch():
    code = "import sys, layerfreeze.plan, layerfreeze.schedule; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_docs_examples_parse(repo_root):
    import re

    from layerfreeze.schedule import PlanSchedule

    doc = (repo_root / "docs" / "plans.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```(\w*)\n(.*?)```", doc, flags=re.DOTALL)
    yaml_blocks = [yaml.safe_load(b) for lang, b in blocks if lang == "yaml"]
    plan = LayerPlan.parse(yaml_blocks[0])
    r = plan.resolve(32)
    assert _names(r) == ["full"] * 8 + ["freeze"] * 8 + ["lora"] * 8 + ["freeze"] * 6 + ["prefix"] * 2
    assert r.lm_head.options.lr_scale == 0.5
    schedule = PlanSchedule.parse(yaml_blocks[1]["plan"]["schedule"])
    assert schedule.phase_at(199) == 0 and schedule.phase_at(200) == 1
    compact = next(b for lang, b in blocks if lang == "" and "0-7:full" in b)
    for line in compact.split():
        LayerPlan.parse(line).resolve(32)
