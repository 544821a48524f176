"""bench/cpt_study.py's study mechanics: plan strings, held-out split, replayed data order,
the verdict rule, and the report's refusal of a missing JSON.

Expected values come from the definitions (layer sets written out by hand for N = 8, 9, 12;
the half boundary by docs/plans.md's round-half-up rule; the verdict rule from its stated
criterion), never from a run of the study.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

_ROOT = Path(__file__).resolve().parents[2]
_PATH = _ROOT / "bench" / "cpt_study.py"
_spec = importlib.util.spec_from_file_location("layerfreeze_bench_cpt_study", _PATH)
cpt = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = cpt
_spec.loader.exec_module(cpt)


def _tiny(layers: int):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    mc = LlamaConfig(
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=50,
        max_position_embeddings=16,
        tie_word_embeddings=False,
    )
    return AutoModelForCausalLM.from_config(mc, attn_implementation="sdpa")


# bottom half (trained by freeze_deep) for N layers: b(N/2) = floor(N/2 + 1/2) layers
BOTTOM = {8: set(range(4)), 9: set(range(5)), 12: set(range(6))}


@pytest.mark.parametrize("layers", [8, 9, 12])
def test_allocations_differ_only_in_which_half_trains(layers):
    from layerfreeze import apply_plan

    trained = {}
    for name in cpt.PLANS[:5]:
        model = _tiny(layers)
        applied = apply_plan(model, cpt._plan(cpt.plan_spec(name, layers)))
        rows = applied.summary().rows
        trained[name] = (
            {r["index"] for r in rows if r["index"] is not None and r["trainable_params"]},
            {r["name"] for r in rows if r["index"] is None and r["trainable_params"]},
        )
    every = set(range(layers))
    parts = {"embeddings", "final_norm", "lm_head"}
    assert trained["full"] == (every, parts)
    assert trained["freeze_deep"] == (BOTTOM[layers], set())
    assert trained["freeze_shallow"] == (every - BOTTOM[layers], set())
    assert trained["freeze_deep+emb/head"] == (BOTTOM[layers], parts)
    assert trained["freeze_shallow+emb/head"] == (every - BOTTOM[layers], parts)


def test_even_depth_allocations_train_equal_parameter_counts():
    from layerfreeze import apply_plan

    counts = {}
    for name in ("freeze_deep", "freeze_shallow", "freeze_deep+emb/head", "freeze_shallow+emb/head"):
        counts[name] = apply_plan(_tiny(8), cpt._plan(cpt.plan_spec(name, 8))).summary()
    # hidden 32, MLP 64, 4 heads of 8, 2 KV heads: q 32·32, k/v 32·16 each, o 32·32,
    # MLP 3·32·64, two norms of 32 -> per layer; four layers trained either way
    per_layer = 32 * 32 * 2 + 32 * 16 * 2 + 3 * 32 * 64 + 2 * 32
    assert counts["freeze_deep"].trainable_params == 4 * per_layer
    assert counts["freeze_shallow"].trainable_params == 4 * per_layer
    extra = 50 * 32 + 32 + 50 * 32  # embeddings, final norm, LM head
    assert counts["freeze_deep+emb/head"].trainable_params == 4 * per_layer + extra
    assert counts["freeze_shallow+emb/head"].trainable_params == 4 * per_layer + extra


def test_presets_are_used_at_their_defaults():
    assert cpt.plan_spec("hlpt", 8) == "hlpt"
    assert cpt.plan_spec("h2lpt", 8) == "h2lpt"
    with pytest.raises(ValueError, match="unknown plan 'nope'"):
        cpt.plan_spec("nope", 8)


def test_validation_and_test_are_disjoint_halves_of_the_heldout_blocks():
    old = torch.arange(11 * 4).view(11, 4)
    new = torch.arange(100, 100 + 6 * 4).view(6, 4)
    data = {"old": {"val": old}, "new": {"val": new}}
    s = cpt.split_heldout(data, cap=100)
    assert torch.equal(s["old"]["val"], old[:5]) and torch.equal(s["old"]["test"], old[5:])
    assert torch.equal(s["new"]["val"], new[:3]) and torch.equal(s["new"]["test"], new[3:])
    capped = cpt.split_heldout(data, cap=2)
    assert torch.equal(capped["old"]["test"], old[5:7])
    assert data["old"]["val"] is old  # build_data's dict is not changed


def test_seen_blocks_replays_the_order_train_draws():
    model = _tiny(2)
    blocks = torch.randint(50, (20, 8), generator=torch.Generator().manual_seed(1))
    drawn: list[torch.Tensor] = []
    hook = model.model.embed_tokens.register_forward_hook(
        lambda mod, args, out: drawn.append(args[0].clone())
    )
    cfg = cpt.StudyConfig(batch=3, warmup_frac=0.5)
    groups = [{"params": list(model.parameters()), "lr": 1e-3, "weight_decay": 0.0}]
    cpt.train(model, groups, blocks, 4, cfg, seed=123)
    hook.remove()
    seen = {i for x in drawn for i in range(len(blocks)) for row in x if torch.equal(row, blocks[i])}
    assert cpt.seen_blocks(len(blocks), 4, 3, 123) == sorted(seen)


def test_subset_is_seeded_and_sized():
    blocks = torch.arange(100).view(100, 1)
    a = cpt.subset(blocks, 0.0625, seed=3)
    assert len(a) == 7  # ceil(6.25)
    assert torch.equal(a, cpt.subset(blocks, 0.0625, seed=3))
    assert not torch.equal(a, cpt.subset(blocks, 0.0625, seed=4))
    assert cpt.subset(blocks, 1.0, seed=3) is blocks


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ([1.0, 1.1, 1.2], [2.0, 2.1, 2.2], "better"),  # 1.0 apart, std 0.1, every seed lower
        ([2.0, 2.1, 2.2], [1.0, 1.1, 1.2], "worse"),
        ([1.0, 1.5, 2.0], [1.6, 1.7, 1.8], "not established"),  # diff 0.2 < std 0.5
        ([1.0, 1.0, 2.05], [1.9, 1.9, 2.0], "not established"),  # mean gap > std, one seed not
    ],
)
def test_compare_follows_the_stated_criterion(a, b, expected):
    assert cpt.compare(a, b) == expected


def test_stats_mean_and_sample_std():
    s = cpt.stats([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0 and s["std"] == 1.0 and s["min"] == 1.0 and s["max"] == 3.0
    assert cpt.stats([5.0])["std"] == 0.0


def test_report_only_without_json_exits_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(_PATH), "--report-only", "--out-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 2
    assert f"no {tmp_path / 'cpt_study.json'}" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_adapter_plans_get_their_own_learning_rate_grid():
    cfg = cpt.StudyConfig(lrs=[1e-4, 3e-4], adapter_lrs=[1e-3, 3e-3])
    assert cpt.lr_grid(cfg, "full") == [1e-4, 3e-4]
    assert cpt.lr_grid(cfg, "freeze_deep+emb/head") == [1e-4, 3e-4]
    assert cpt.lr_grid(cfg, "hlpt") == [1e-3, 3e-3]
    assert cpt.lr_grid(cfg, "h2lpt") == [1e-3, 3e-3]
    # a JSON config (report re-rendering) without adapter_lrs falls back to lrs
    assert cpt.lr_grid({"lrs": [1e-4]}, "hlpt") == [1e-4]
