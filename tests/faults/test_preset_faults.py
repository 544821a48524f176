"""Hostile input to the HLPT / H²LPT presets and the prefix's paper form (issue #17): bad forms
and gate placements, the paper form where it cannot run (Megatron, inline attention, flash
attention, attention dropout), mixed options on one layer, and the ``plan`` command's new
``--count`` / ``--list``. Each is one clear line naming the key or layer and what is valid;
nothing is installed half-way."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import torch

from layerfreeze import apply_plan
from layerfreeze.cli import main
from layerfreeze.errors import ConfigError
from layerfreeze.plan import PRESETS, LayerPlan
from tests.helpers.megatron import megatron_cpu  # noqa: F401  (fixture)
from tests.helpers.tiny_models import build_matrix_model, build_tiny_model

torch.set_num_threads(1)


def _problems(fn) -> list[str]:
    with pytest.raises(ConfigError) as e:
        fn()
    return e.value.problems


def _no_adapters(model) -> bool:
    return not [n for n, _ in model.named_parameters() if "lora_" in n or "prefix_" in n]


# ------------------------------------------------------------------------------ preset options


@pytest.mark.parametrize(
    "preset,needle",
    [
        ("hlpt(form=softmax)", "form: must be paper (HLPT's gated virtual tokens) or branch"),
        ("h2lpt(form=Paper)", "got 'Paper'"),
        ("hlpt(gate_at=key)", "gate_at: must be logit or value, got 'key'"),
        ("hlpt(gate_at=value,form=branch)", "gate_at: value is read by the gated paper form only"),
        ("h2lpt(gate_at=value,gated=false)", "got form=paper, gated=false"),
        ("hlpt_branch(gate_at=value)", "got form=branch, gated=true"),
        ("h2lpt(lora_fraction=0.5,prefix_fraction=0.75)", "must be at most 1, got 0.5 + 0.75"),
        ("h2lpt_3to1(prefix_fraction=1.5)", "prefix_fraction: must be a fraction in [0, 1], got 1.5"),
        ("h2lpt_3to1(fraction=0.5)", "unknown key"),
        ("hlpt_branc", "Did you mean 'hlpt_branch'?"),
    ],
)
def test_bad_preset_options_are_one_clear_problem(preset, needle):
    problems = _problems(lambda: LayerPlan.parse(preset))
    assert len(problems) == 1 and needle in problems[0], problems


def test_prefix_gate_at_is_validated_on_the_policy_too():
    (p,) = _problems(lambda: LayerPlan.parse("0:prefix(form=paper,gate_at=values)"))
    assert "gate_at: must be logit or value, got 'values'" in p
    (p,) = _problems(lambda: LayerPlan.parse("0:prefix(gated,gate_at=value)"))  # branch form
    assert "value is read by the gated paper form only, got form=branch" in p


# ------------------------------------------------------------------------------ where paper can't run


def test_hlpt_on_inline_attention_names_the_branch_variant():
    model = build_matrix_model("bloom")  # BLOOM computes attention inline (the projection route)
    problems = _problems(lambda: apply_plan(model, "hlpt(r=2,tokens=2)"))
    assert problems and all("hlpt_branch" in p and "form=branch" in p for p in problems)
    assert all("layer 3 (transformer.h.3.self_attention" in p for p in problems)
    assert _no_adapters(model)
    apply_plan(model, "hlpt_branch(r=2,tokens=2)")  # the way out works


def test_hlpt_with_flash_attention_names_the_branch_variant():
    model = build_tiny_model("llama", num_layers=4)
    model.config._attn_implementation = "flash_attention_2"
    problems = _problems(lambda: apply_plan(model, "h2lpt(r=2,tokens=2)"))
    assert problems and all(
        "flash_attention_2" in p and "h2lpt_branch" in p for p in problems
    ), problems
    assert _no_adapters(model)


def test_value_gate_refuses_attention_dropout():
    model = build_tiny_model("llama", num_layers=4)
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    problems = _problems(lambda: apply_plan(model, "hlpt(r=2,tokens=2,gate_at=value)"))
    assert any("attention dropout (0.1)" in p and "gate_at=logit" in p for p in problems)
    assert _no_adapters(model)
    apply_plan(model, "hlpt(r=2,tokens=2)")  # gate_at=logit: dropout acts in the one softmax


def test_one_layer_holds_one_gate_placement_across_plans():
    model = build_tiny_model("llama", num_layers=4)
    apply_plan(model, "hlpt(r=2,tokens=2)")
    problems = _problems(lambda: apply_plan(model, "hlpt(r=2,tokens=2,gate_at=value)"))
    assert any(
        p.startswith("plan: prefix(") and "layer 3 (model.layers.3.self_attn" in p
        and "already carries a prefix adapter with gate_at=logit" in p for p in problems
    ), problems
    problems = _problems(lambda: apply_plan(model, "hlpt_branch(r=2,tokens=2)"))
    assert any("form=paper" in p and "form=branch" in p for p in problems), problems
    apply_plan(model, "hlpt(r=2,tokens=2)")  # the same options again are fine


def test_megatron_takes_the_paper_form_and_refuses_what_it_cannot_run(megatron_cpu):  # noqa: F811
    """hlpt / h2lpt (form=paper) now install on megatron (equivalence with the HF form:
    tests/distributed/test_megatron_prefix_paper.py); what the megatron paper form cannot run
    (attention dropout, another gate_at or form on an installed adapter) is refused per layer."""
    from layerfreeze.engines.megatron import megatron_layout
    from tests.helpers.megatron import build_tiny_gpt, destroy_model_parallel, init_model_parallel

    init_model_parallel(tp=1, pp=1)
    try:
        model = build_tiny_gpt(num_layers=4)
        layout = megatron_layout(model)
        apply_plan(model, "hlpt(r=2,tokens=2)", layout=layout)
        adapter = model.decoder.layers[3].self_attention.prefix_adapter
        assert (adapter.form, adapter.gate_at, adapter.gated) == ("paper", "logit", True)
        assert "prefix_gating_factor" not in dict(adapter.named_parameters())
        problems = _problems(
            lambda: apply_plan(model, "hlpt(r=2,tokens=2,gate_at=value)", layout=layout)
        )
        assert any(
            "layer 3 (decoder.layers.3." in p
            and "already carries a prefix adapter with gate_at=logit" in p for p in problems
        ), problems
        problems = _problems(lambda: apply_plan(model, "hlpt_branch(r=2,tokens=2)", layout=layout))
        assert any("form=paper" in p and "form=branch" in p for p in problems), problems
        apply_plan(model, "hlpt(r=2,tokens=2)", layout=layout)  # the same options again are fine

        dropout = build_tiny_gpt(num_layers=4, attention_dropout=0.1)
        dlayout = megatron_layout(dropout)
        problems = _problems(lambda: apply_plan(dropout, "hlpt(r=2,tokens=2)", layout=dlayout))
        assert problems and all(
            "layer 3 (decoder.layers.3." in p and "attention dropout (0.1)" in p
            and "attention_dropout=0" in p and "form=branch" in p for p in problems
        ), problems
        assert _no_adapters(dropout)
        apply_plan(dropout, "hlpt_branch(r=2,tokens=2)", layout=dlayout)
        assert not _no_adapters(dropout)
    finally:
        destroy_model_parallel()


# ------------------------------------------------------------------------------ plan --count / --list


def _errors(argv) -> list[str]:
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("layerfreeze.plan")
    logger.addHandler(handler)
    try:
        assert main(argv) == 2
    finally:
        logger.removeHandler(handler)
    return [r.getMessage() for r in records]


def test_count_refuses_json_and_memory(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 4,
                               "num_attention_heads": 4, "intermediate_size": 128,
                               "vocab_size": 128}))
    for extra in (["--json"], ["--memory"]):
        msgs = _errors(["plan", "--model", str(cfg), "--preset", "hlpt", "--count", *extra])
        assert any("--count: prints one line" in m for m in msgs), msgs


def test_plan_without_model_exits_2_with_one_line():
    proc = subprocess.run(
        [sys.executable, "-m", "layerfreeze", "plan", "--preset", "h2lpt"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "--model: required with --preset or --plan" in lines[0], lines


def test_list_needs_no_model_and_names_every_preset(capsys):
    assert main(["plan", "--list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in out] == list(PRESETS)
    assert any(ln.startswith("h2lpt ") and "middle half frozen" in ln for ln in out)
