"""Trace measures: CKA, logit lens, skip/noise sensitivity, gradients, stability, memory.

Expected values come from independent formulas (Gram-matrix CKA, plain autograd on a copy,
a hand-written AdamW loop) or from constructions with a known answer (a layer whose residual
contribution is zero).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from layerfreeze.diagnostics import measures as M
from layerfreeze.diagnostics.angular import LayerInputRecorder, trace_angular
from layerfreeze.diagnostics.probe import ProbeBatch, ProbeSet, collate
from layerfreeze.diagnostics.trace import (
    TraceSettings,
    check_measures,
    first_stable_layer,
    run_trace,
    trace_memory,
)
from layerfreeze.models import discover_layout
from tests.helpers.tiny_models import build_tiny_model

FAMILIES = ["llama", "qwen2", "gpt2"]


def _probe(vocab: int, lengths=(8, 5, 7, 6), batch_size=2, seed=0) -> ProbeSet:
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]
    batches = []
    for i in range(0, len(rows), batch_size):
        ids, mask = collate(rows[i : i + batch_size])
        batches.append(ProbeBatch(ids, mask))
    return ProbeSet("text", batches, {"kind": "text"})


def _choice_probe(vocab: int, seed=0) -> ProbeSet:
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (6, 9, 7)]
    ids, mask = collate(rows)
    return ProbeSet(
        "choice",
        [
            ProbeBatch(
                ids,
                mask,
                answer_pos=torch.tensor([5, 8, 6]),
                choice_ids=torch.tensor([[3, 4, 5, 6]] * 3),
                gold=torch.tensor([0, 2, 3]),
            )
        ],
        {"kind": "choice"},
    )


def _zero_residual(model, family: str, layer: int) -> None:
    """Set the layer's output projections to zero: its residual contribution vanishes."""
    with torch.no_grad():
        if family == "gpt2":
            block = model.transformer.h[layer]
            for lin in (block.attn.c_proj, block.mlp.c_proj):
                lin.weight.zero_()
                lin.bias.zero_()
        else:
            block = model.model.layers[layer]
            block.self_attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()


# ------------------------------------------------------------------------------ CKA


def _gram_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Kornblith et al. eq. (independent form): centred Gram matrices K, L; HSIC ratio."""
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    k = h @ (x.double() @ x.double().T) @ h
    l_ = h @ (y.double() @ y.double().T) @ h
    return float((k * l_).sum() / (k.norm() * l_.norm()))


def test_cka_of_a_representation_with_itself_is_one():
    x = torch.randn(50, 16, generator=torch.Generator().manual_seed(0))
    assert M.linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    acc = M.CKAAccumulator(2, 16)
    acc.update([x.unsqueeze(0), x.unsqueeze(0)], torch.ones(1, 50))
    assert acc.result()[0] == pytest.approx(1.0, abs=1e-12)


def test_cka_matches_gram_form_and_streaming_matches_one_shot():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 10, 12, generator=g) + 3.0  # a mean offset: centring matters
    y = x @ torch.randn(12, 12, generator=g) + torch.randn(2, 10, 12, generator=g)
    mask = torch.ones(2, 10)
    mask[1, 7:] = 0
    keep = mask != 0
    expected = _gram_cka(x[keep], y[keep])
    assert M.linear_cka(x[keep], y[keep]) == pytest.approx(expected, rel=1e-10)
    acc = M.CKAAccumulator(2, 12)
    acc.update([x[:1], y[:1]], mask[:1])  # two batches streamed
    acc.update([x[1:], y[1:]], mask[1:])
    assert acc.count == int(keep.sum())
    assert acc.result()[0] == pytest.approx(expected, rel=1e-9)


# ------------------------------------------------------------------------------ logit lens


@pytest.mark.parametrize("family", FAMILIES)
def test_logit_lens_at_the_last_point_reproduces_the_logits(family):
    model = build_tiny_model(family, num_layers=3, hidden=32)
    layout = discover_layout(model)
    probe = _probe(model.config.vocab_size)
    b = probe.batches[0]
    with torch.no_grad(), LayerInputRecorder(model, layout) as rec:
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        states = rec.take()
        lens = M.lens_logits(model, layout, states[-1])
    assert len(states) == 4
    torch.testing.assert_close(lens, logits, rtol=0, atol=0)
    # and the accumulated last-point lens loss is the model's own probe loss
    result = run_trace(model, probe, TraceSettings(measures=("logit_lens", "skip")))
    assert result["logit_lens"]["loss"][-1] == pytest.approx(
        result["sensitivity"]["base_loss"], rel=1e-6
    )


def test_logit_lens_choice_probe_by_hand():
    model = build_tiny_model("llama", num_layers=2, hidden=32)
    layout = discover_layout(model)
    probe = _choice_probe(model.config.vocab_size)
    res = run_trace(model, probe, TraceSettings(measures=("logit_lens",), tolerance=0.05))
    b = probe.batches[0]
    with torch.no_grad():
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    lp = torch.log_softmax(logits[torch.arange(3), b.answer_pos].double(), -1)
    letters = lp[:, 3:7]
    gold_lp = letters[torch.arange(3), b.gold]
    lens = res["logit_lens"]
    assert lens["loss"][-1] == pytest.approx(float(-gold_lp.mean()), rel=1e-5)
    assert lens["accuracy"][-1] == pytest.approx(
        float((letters.argmax(-1) == b.gold).double().mean())
    )
    choice = torch.softmax(letters, -1)[torch.arange(3), b.gold]
    assert lens["gold_choice_prob"][-1] == pytest.approx(float(choice.mean()), rel=1e-5)
    assert "decodable_layer" in lens and len(lens["accuracy"]) == layout.num_layers


def test_first_stable_layer_definition():
    acc = [0.2, 0.6, 0.5, 0.9, 0.88, 0.9]
    assert first_stable_layer(acc, 0.9, 0.05, higher_is_better=True) == 3
    assert first_stable_layer(acc, 0.9, 0.5, higher_is_better=True) == 1
    assert first_stable_layer([1.0, 2.0], 2.0, 0.0, higher_is_better=True) == 1
    loss = [5.0, 3.0, 3.4, 3.05, 3.0]
    assert first_stable_layer(loss, 3.0, 0.1, higher_is_better=False) == 3
    assert first_stable_layer([float("nan"), 1.0], 1.0, 0.1, higher_is_better=False) == 1


# ------------------------------------------------------------------------------ zeroed layer


@pytest.mark.parametrize("family", FAMILIES)
def test_zeroed_layer_has_zero_angular_distance_and_zero_skip_sensitivity(family):
    model = build_tiny_model(family, num_layers=4, hidden=32)
    _zero_residual(model, family, 2)
    layout = discover_layout(model)
    probe = _probe(model.config.vocab_size)
    res = run_trace(model, probe, TraceSettings(measures=("angular", "cka", "skip")))
    rows = res["layers"]
    assert rows[2]["angular_next"] == 0.0
    assert rows[2]["angular_next_last_token"] == 0.0
    assert rows[2]["cka_next"] == pytest.approx(1.0, abs=1e-9)
    assert rows[2]["skip"] == 0.0
    assert all(rows[i]["angular_next"] > 1e-3 for i in (0, 1, 3))
    assert all(rows[i]["skip"] != 0.0 for i in (0, 1, 3))
    # the streamed distances agree with the angular module's own trace
    ref = trace_angular(
        model,
        [{"input_ids": b.input_ids, "attention_mask": b.attention_mask} for b in probe.batches],
        layout,
    )
    for i in range(4):
        assert rows[i]["angular_next"] == pytest.approx(ref.d(i, 1), abs=1e-12)


# ------------------------------------------------------------------------------ noise


def test_noise_at_scale_zero_gives_zero_and_weights_are_restored_exactly():
    model = build_tiny_model("llama", num_layers=3, hidden=32)
    layout = discover_layout(model)
    probe = _probe(model.config.vocab_size)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = M.noise_sensitivity(model, layout, probe, scales=(0.0, 0.3), seed=7)
    assert out["0"] == [0.0, 0.0, 0.0]
    assert all(v != 0.0 for v in out["0.3"])
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    again = M.noise_sensitivity(model, layout, probe, scales=(0.3,), seed=7)
    assert again["0.3"] == out["0.3"]  # seeded
    other = M.noise_sensitivity(model, layout, probe, scales=(0.3,), seed=8)
    assert other["0.3"] != out["0.3"]


def test_noise_is_relative_to_the_weights():
    # ||noise||_F ~= s * ||W||_F: check the draw by applying it once by hand.
    model = build_tiny_model("llama", num_layers=2, hidden=32)
    w = model.model.layers[0].mlp.up_proj.weight
    names = [n for n, p in model.model.layers[0].named_parameters() if p.dim() >= 2]
    pi = names.index("mlp.up_proj.weight")
    g = torch.Generator().manual_seed(M._noise_seed(3, 0, pi))
    e = torch.randn(w.shape, generator=g)
    noise = 0.2 * w.detach().pow(2).mean().sqrt() * e
    assert float(noise.norm() / w.detach().norm()) == pytest.approx(0.2, rel=0.05)


# ------------------------------------------------------------------------------ gradients


def test_gradient_scores_match_plain_autograd_and_leave_the_model_alone():
    model = build_tiny_model("qwen2", num_layers=3, hidden=32)
    for p in model.model.layers[1].parameters():
        p.requires_grad_(False)  # a frozen layer still gets its score
    model.model.layers[0].mlp.up_proj.weight.grad = torch.ones_like(
        model.model.layers[0].mlp.up_proj.weight
    )
    layout = discover_layout(model)
    probe = _probe(model.config.vocab_size)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    got = M.gradient_scores(model, layout, probe)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert torch.equal(
        model.model.layers[0].mlp.up_proj.weight.grad,
        torch.ones_like(model.model.layers[0].mlp.up_proj.weight),
    )
    # independent: a copy with every parameter trainable, one backward per sequence
    ref = copy.deepcopy(model)
    for p in ref.parameters():
        p.requires_grad_(True)
        p.grad = None
    per_seq = []
    for b in probe.batches:
        for i in range(b.input_ids.shape[0]):
            n = int(b.attention_mask[i].sum())
            ids = b.input_ids[i : i + 1, :n]
            loss = ref(input_ids=ids, labels=ids).loss  # HF mean next-token loss
            params = [p for layer in ref.model.layers for p in layer.parameters()]
            grads = torch.autograd.grad(loss, params)
            per_seq.append(grads)
    sizes = [len(list(layer.parameters())) for layer in ref.model.layers]
    for li in range(3):
        start = sum(sizes[:li])
        mean = [
            sum(g[start + k].double() for g in per_seq) / len(per_seq) for k in range(sizes[li])
        ]
        norm = math.sqrt(sum(float(t.pow(2).sum()) for t in mean))
        fisher = sum(
            sum(float(g[start + k].double().pow(2).sum()) for k in range(sizes[li]))
            for g in per_seq
        ) / len(per_seq)
        assert got["grad_norm"][li] == pytest.approx(norm, rel=1e-4)
        assert got["fisher"][li] == pytest.approx(fisher, rel=1e-4)
        numel = sum(p.numel() for p in ref.model.layers[li].parameters())
        assert got["fisher_mean"][li] == pytest.approx(fisher / numel, rel=1e-4)


# ------------------------------------------------------------------------------ stability


def test_stability_matches_a_hand_written_adamw_loop_and_leaves_the_model_alone():
    model = build_tiny_model("llama", num_layers=2, hidden=32)
    layout = discover_layout(model)
    probe = _probe(model.config.vocab_size)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    got = M.stability(model, layout, probe, steps=3, lr=1e-3)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    # independent: plain AdamW over every parameter (no weight decay: groups are equivalent)
    ref = copy.deepcopy(model)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.0)
    for k in range(3):
        b = probe.batches[k % len(probe.batches)]
        labels = b.input_ids.masked_fill(b.attention_mask == 0, -100)
        ref(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    for li in range(2):
        a = {n: p.detach() for n, p in ref.model.layers[li].named_parameters()}
        w0 = dict(model.model.layers[li].named_parameters())
        num = math.sqrt(sum(float((a[n] - w0[n]).double().pow(2).sum()) for n in a))
        den = math.sqrt(sum(float(w0[n].double().pow(2).sum()) for n in a))
        assert got["weight_change"][li] == pytest.approx(num / den, rel=1e-4)
    drift = M.output_drift(ref, model, discover_layout(ref), layout, probe.batches)
    assert got["drift"] == pytest.approx(drift["drift"], rel=1e-4, abs=1e-7)
    assert all(0 < d < 1 for d in got["drift"])


# ------------------------------------------------------------------------------ bf16, memory


def test_bf16_model_traces():
    model = build_tiny_model("llama", num_layers=2, hidden=32).to(torch.bfloat16)
    probe = _probe(model.config.vocab_size)
    res = run_trace(
        model,
        probe,
        TraceSettings(
            measures=("angular", "cka", "logit_lens", "skip", "gradient", "stability"),
            stability_lr=1e-3,
        ),
    )
    for row in res["layers"]:
        for k, v in row.items():
            assert math.isfinite(v), (k, v)
    assert res["model"]["dtype"] == "bfloat16"
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(w > 0 for w in res["stability"]["weight_change"])
    assert res["logit_lens"]["loss"][-1] == pytest.approx(res["sensitivity"]["base_loss"], rel=1e-3)


def test_memory_formula_matches_the_accumulators_and_does_not_grow_with_tokens():
    model = build_tiny_model("llama", num_layers=3, hidden=32)
    layout = discover_layout(model)
    sizes = []
    for n_seq in (2, 6):
        probe = _probe(model.config.vocab_size, lengths=(8,) * n_seq)
        stats = M.StreamStats(model, layout, "text", ("angular", "cka", "logit_lens"))
        stats.run(probe.batches)
        sizes.append(stats.accumulator_bytes())
    assert sizes[0] == sizes[1]
    mem = trace_memory(3, 32, batch=2, seq=8, vocab=128)
    assert mem["persistent"] == sizes[0]
    p = 4
    assert mem["persistent"] == 2 * p * p * 8 + ((2 * p - 1) * 32 * 32 + p * 32) * 8 + 3 * p * 8
    # the recorder holds one batch's inputs of every point: P * B * T * H elements
    b = probe.batches[0]
    with torch.no_grad(), LayerInputRecorder(model, layout) as rec:
        model(input_ids=b.input_ids, attention_mask=b.attention_mask)
        held = sum(s.numel() * s.element_size() for s in rec.take())
    assert held == mem["recorder"]
    # the trace reports the measured accumulator bytes next to the formula
    res = run_trace(
        model,
        _probe(model.config.vocab_size, lengths=(8, 8)),
        TraceSettings(measures=("angular", "cka", "logit_lens")),
    )
    assert res["memory"]["measured_accumulator_bytes"] == res["memory"]["bytes"]["persistent"]


def test_unknown_measure_and_bad_settings_are_clear():
    with pytest.raises(ValueError, match=r"unknown measure 'angualr'. Did you mean 'angular'"):
        check_measures(["angualr"])
    with pytest.raises(ValueError, match="--noise-scales"):
        TraceSettings(noise_scales=(-1.0,))
    with pytest.raises(ValueError, match="empty probe set"):
        run_trace(build_tiny_model("llama", num_layers=2, hidden=32), ProbeSet("text", []))
