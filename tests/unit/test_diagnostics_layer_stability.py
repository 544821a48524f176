"""Per-layer stability in isolation (``layer_stability``) against independent implementations.

The reference changes the layer *in place* on a deep copy and runs the whole model with the
layer-input recorder (the layer's output is the next point), so it shares neither the
truncated forward nor ``functional_call`` with the code under test.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from layerfreeze.diagnostics import measures as M
from layerfreeze.diagnostics.angular import LayerInputRecorder, angular_distance
from layerfreeze.diagnostics.isolated import layer_stability
from layerfreeze.diagnostics.trace import TraceSettings, run_trace
from layerfreeze.models import discover_layout
from tests.helpers.tiny_models import build_tiny_model
from tests.unit.test_diagnostics_measures import _probe, _zero_residual


def _outputs(model, layer: int, probe) -> list[torch.Tensor]:
    """Layer ``layer``'s output (point ``layer + 1``) per batch, float32."""
    out = []
    with torch.no_grad(), LayerInputRecorder(model, discover_layout(model)) as rec:
        for b in probe.batches:
            model(input_ids=b.input_ids, attention_mask=b.attention_mask)
            out.append(rec.take()[layer + 1].float())
    return out


def _compare(ref, changed, layer: int, probe) -> tuple[float, float]:
    """(relative output change, token-mean angle) of ``layer`` between two whole models."""
    num = den = ang = 0.0
    n = 0
    for y, y2, b in zip(
        _outputs(ref, layer, probe), _outputs(changed, layer, probe), probe.batches, strict=True
    ):
        keep = b.attention_mask != 0
        num += float((y2 - y)[keep].double().pow(2).sum())
        den += float(y[keep].double().pow(2).sum())
        ang += float(angular_distance(y2, y)[keep].double().sum())
        n += int(keep.sum())
    return math.sqrt(num / den), ang / n


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "gpt_neox"])
def test_perturb_mode_matches_an_in_place_perturbation_of_one_layer(family):
    model = build_tiny_model(family, num_layers=3, hidden=32).eval()
    layout = discover_layout(model)
    probe = _probe(model.config.vocab_size)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    got = layer_stability(model, layout, probe, mode="perturb", scale=0.1, seed=3)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert got["mode"] == "perturb" and "isolation" in got["measure"]
    for li, info in enumerate(layout.layers):
        ref = copy.deepcopy(model)
        block = discover_layout(ref).layers[li].module
        with torch.no_grad():
            mats = [p for p in block.parameters() if p.dim() >= 2]
            for pi, p in enumerate(mats):
                g = torch.Generator().manual_seed(M._noise_seed(3, info.index, pi))
                e = torch.randn(p.shape, generator=g)
                p.add_(0.1 * p.pow(2).mean().sqrt() * e)
        change, angle = _compare(model, ref, li, probe)
        assert got["output_change"][li] == pytest.approx(change, rel=1e-4)
        assert got["output_angle"][li] == pytest.approx(angle, rel=1e-3, abs=1e-7)
        w0 = [p.detach() for p in info.module.parameters()]
        w1 = [p.detach() for p in block.parameters()]
        num = math.sqrt(
            sum(float((a - b).double().pow(2).sum()) for a, b in zip(w1, w0, strict=True))
        )
        den = math.sqrt(sum(float(b.double().pow(2).sum()) for b in w0))
        assert got["weight_change"][li] == pytest.approx(num / den, rel=1e-5)


def test_steps_mode_matches_adamw_on_that_layer_alone():
    model = build_tiny_model("llama", num_layers=3, hidden=32).eval()
    layout = discover_layout(model)
    probe = _probe(model.config.vocab_size)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    got = layer_stability(model, layout, probe, mode="steps", steps=3, lr=1e-2)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    for li in range(3):
        ref = copy.deepcopy(model)
        for p in ref.parameters():
            p.requires_grad_(False)
        params = list(ref.model.layers[li].parameters())
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
        for k in range(3):
            b = probe.batches[k % len(probe.batches)]
            logits = ref(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
            # mean over sequences of each sequence's mean next-token NLL, written out here
            lp = torch.log_softmax(logits[:, :-1].float(), -1)
            nll = -lp.gather(-1, b.input_ids[:, 1:, None])[..., 0]
            valid = (b.attention_mask[:, 1:] != 0).float()
            ((nll * valid).sum(1) / valid.sum(1)).mean().backward()
            opt.step()
            opt.zero_grad()
        change, _ = _compare(model, ref, li, probe)
        assert got["output_change"][li] == pytest.approx(change, rel=1e-3)
        assert got["output_change"][li] > 0
        # the other layers did not move in the reference either: the change is this layer's
        for lj in range(3):
            if lj != li:
                assert all(
                    torch.equal(a, b)
                    for a, b in zip(
                        ref.model.layers[lj].parameters(),
                        model.model.layers[lj].parameters(),
                        strict=True,
                    )
                )


def make_fragile(model, layer: int, factor: float = 10.0) -> None:
    """Scale a Llama layer's two input norms: the attention logits grow by ``factor**2`` (a
    sharper softmax) and the SwiGLU works further from its linear range, so the same relative
    weight change moves the output more."""
    block = model.model.layers[layer]
    with torch.no_grad():
        block.input_layernorm.weight.mul_(factor)
        block.post_attention_layernorm.weight.mul_(factor)


def test_identity_layer_is_perfectly_stable_and_a_fragile_layer_is_not():
    model = build_tiny_model("llama", num_layers=4, hidden=32).eval()
    probe = _probe(model.config.vocab_size)
    plain = layer_stability(model, discover_layout(model), probe, scale=0.05)["output_change"]
    _zero_residual(model, "llama", 1)
    make_fragile(model, 3)
    got = layer_stability(model, discover_layout(model), probe, scale=0.05)
    change = got["output_change"]
    # the zeroed layer adds nothing, and the relative noise of zero matrices is zero
    assert change[1] == 0.0 and got["output_angle"][1] == 0.0
    # in isolation layer 0 sees the same inputs and weights as before: the same number; the
    # fragile layer moves most
    assert change[0] == plain[0]
    assert change[3] == max(change) and change[3] > 2 * max(change[0], change[2])
    assert change[3] > 2 * plain[3]


def test_run_trace_reports_both_stabilities_clearly_named():
    model = build_tiny_model("llama", num_layers=3, hidden=32)
    probe = _probe(model.config.vocab_size)
    ticks = []
    res = run_trace(
        model,
        probe,
        TraceSettings(measures=("stability", "layer_stability"), layer_stability_scale=0.1),
    )
    assert "whole-model" in res["stability"]["measure"]
    assert "isolation" in res["layer_stability"]["measure"]
    iso = layer_stability(model, discover_layout(model), probe, scale=0.1, tick=ticks.append)
    assert len(ticks) == 3 * len(probe.batches)  # progress: one tick per layer and batch
    for i, row in enumerate(res["layers"]):
        assert row["layer_stability"] == iso["output_change"][i]
        assert row["layer_stability_angle"] == iso["output_angle"][i]
        assert row["drift"] == res["stability"]["drift"][i]
    with pytest.raises(ValueError, match="--layer-stability: unknown mode 'grad'"):
        TraceSettings(layer_stability_mode="grad")
    with pytest.raises(ValueError, match="--layer-stability-scale"):
        TraceSettings(layer_stability_scale=float("nan"))


@pytest.mark.parametrize("mode", ["perturb", "steps"])
def test_bf16_model_both_modes_finite_and_untouched(mode):
    model = build_tiny_model("llama", num_layers=2, hidden=32).to(torch.bfloat16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    probe = _probe(model.config.vocab_size)
    got = layer_stability(model, discover_layout(model), probe, mode=mode, steps=2, lr=1e-2)
    for key in ("output_change", "output_angle", "weight_change"):
        assert all(math.isfinite(v) and v > 0 for v in got[key]), (key, got[key])
    for n, p in model.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.equal(p, before[n]), n


def test_memory_formula_counts_one_layers_reference_inputs():
    from layerfreeze.diagnostics.isolated import block_reference_inputs
    from layerfreeze.diagnostics.trace import trace_memory

    model = build_tiny_model("llama", num_layers=3, hidden=32).eval()
    layout = discover_layout(model)
    probe = _probe(model.config.vocab_size, lengths=(8, 8), batch_size=2)
    args, kwargs = block_reference_inputs(model, layout.layers[1].module, probe.batches[0])
    hidden = args[0] if args else kwargs["hidden_states"]
    assert hidden.numel() * hidden.element_size() == 2 * 8 * 32 * 4  # B*T*H*s
    per_layer = sum(p.numel() for p in layout.layers[0].module.parameters())
    kw = {"batch": 2, "seq": 8, "vocab": 128, "layer_params": 3 * per_layer}
    mem = trace_memory(3, 32, measures=("layer_stability",), **kw)
    assert mem["layer_stability"] == 2 * 8 * 32 * (4 + 8) + per_layer * 4
    steps = trace_memory(3, 32, measures=("layer_stability",), layer_stability_steps=True, **kw)
    assert steps["layer_stability"] == mem["layer_stability"] + 16 * per_layer
    # no term grows with the number of probe batches or of layers (one layer at a time)
    assert (
        trace_memory(
            30, 32, measures=("layer_stability",), **{**kw, "layer_params": 30 * per_layer}
        )["layer_stability"]
        == mem["layer_stability"]
    )
