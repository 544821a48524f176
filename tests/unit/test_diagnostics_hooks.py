"""SensitivityHooks: equal to the standalone trace functions on the same batch; hooks removed."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from layerfreeze.diagnostics import measures as M
from layerfreeze.diagnostics.angular import trace_angular
from layerfreeze.diagnostics.hooks import HOOK_MEASURES, SensitivityHooks
from layerfreeze.diagnostics.probe import ProbeBatch, ProbeSet, collate
from layerfreeze.models import discover_layout
from tests.helpers.tiny_models import build_tiny_model


def _batch(vocab: int, lengths=(8, 6, 8, 5), seed=3) -> ProbeBatch:
    g = torch.Generator().manual_seed(seed)
    ids, mask = collate([torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths])
    return ProbeBatch(ids, mask)


def _hook_counts(model) -> list[int]:
    return [len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()]


def _train_step(model, batch, lr=0.05):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels
    ).loss.backward()
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_hooks_equal_the_standalone_computation(family):
    model = build_tiny_model(family, num_layers=3, hidden=32)
    model.train()
    layout = discover_layout(model)
    batch = _batch(model.config.vocab_size)
    hooks = SensitivityHooks(layout, batch)
    counts = _hook_counts(model)
    s0 = hooks.compute(model, 0)
    assert model.training  # mode restored
    assert _hook_counts(model) == counts
    step0 = copy.deepcopy(model)
    w_prev = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train_step(model, batch)
    s1 = hooks.compute(model, 1)
    assert set(s1) == {"diag/probe_loss"} | {
        f"diag/{m}/layers.{i}" for m in HOOK_MEASURES for i in range(3)
    }
    assert all(s0[f"diag/drift/layers.{i}"] == 0.0 for i in range(3))
    assert not any(k.startswith("diag/update_ratio") for k in s0)  # no previous call yet

    # standalone on the same batch (eval mode, as the hooks run: no dropout)
    model.eval()
    step0.eval()
    probe = ProbeSet("text", [batch])
    ang = trace_angular(
        model, [{"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}]
    )
    grads = M.gradient_scores(model, layout, probe)  # one backward per sequence, averaged
    drift = M.output_drift(model, step0, layout, discover_layout(step0), [batch])
    with torch.no_grad():
        loss = M.batch_loss(M.model_logits(model, batch), batch, "text")
    for i, info in enumerate(layout.layers):
        assert s1[f"diag/angular/layers.{i}"] == pytest.approx(ang.d(i, 1), abs=1e-12)
        assert s1[f"diag/grad_norm/layers.{i}"] == pytest.approx(grads["grad_norm"][i], rel=1e-4)
        assert s1[f"diag/drift/layers.{i}"] == pytest.approx(drift["drift"][i], abs=1e-12)
        num = sum(
            float((p.detach() - w_prev[f"{info.name}.{n}"]).double().pow(2).sum())
            for n, p in info.module.named_parameters()
        )
        den = sum(
            float(w_prev[f"{info.name}.{n}"].double().pow(2).sum())
            for n, _ in info.module.named_parameters()
        )
        assert s1[f"diag/update_ratio/layers.{i}"] == pytest.approx(math.sqrt(num / den), rel=1e-5)
        assert s1[f"diag/update_ratio/layers.{i}"] > 0
    assert s1["diag/probe_loss"] == pytest.approx(float(loss), rel=1e-6)


def test_hooks_leave_grads_and_flags_alone_and_frozen_layers_have_zero_update():
    model = build_tiny_model("qwen2", num_layers=3, hidden=32)
    for p in model.model.layers[2].parameters():
        p.requires_grad_(False)
    layout = discover_layout(model)
    batch = _batch(model.config.vocab_size)
    hooks = SensitivityHooks(layout, batch, measures=("grad_norm", "update_ratio"))
    w = model.model.layers[0].mlp.up_proj.weight
    w.grad = torch.full_like(w, 0.5)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    hooks.compute(model, 0)
    _train_step(model, batch)
    w.grad = torch.full_like(w, 0.5)
    stats = hooks.compute(model, 1)
    assert torch.equal(w.grad, torch.full_like(w, 0.5))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert stats["diag/update_ratio/layers.2"] == 0.0
    assert stats["diag/update_ratio/layers.0"] > 0
    assert stats["diag/grad_norm/layers.2"] > 0  # frozen layers are still scored
    assert not any("drift" in k or "angular" in k for k in stats)


def test_hooks_are_removed_after_an_exception():
    model = build_tiny_model("llama", num_layers=3, hidden=32)
    layout = discover_layout(model)
    hooks = SensitivityHooks(layout, _batch(model.config.vocab_size))

    def boom(*_a, **_k):
        raise RuntimeError("boom in layer 1")

    handle = model.model.layers[1].mlp.register_forward_hook(boom)
    counts = _hook_counts(model)
    model.train()
    with pytest.raises(RuntimeError, match="boom in layer 1"):
        hooks.compute(model, 0)
    assert _hook_counts(model) == counts  # only the test's own hook is left
    assert model.training
    handle.remove()
    hooks.compute(model, 0)  # works afterwards


def test_bad_arguments():
    model = build_tiny_model("llama", num_layers=2, hidden=32)
    layout = discover_layout(model)
    with pytest.raises(ValueError, match="diagnostics.measures"):
        SensitivityHooks(layout, torch.zeros(1, 4, dtype=torch.long), measures=("grad",))
    with pytest.raises(TypeError, match="probe_batch"):
        SensitivityHooks(layout, [1, 2, 3])


def test_hooks_on_a_model_with_adapters_installed():
    """Under an hlpt plan (gated LoRA + gated prefix) the adapters are part of the layers."""
    from layerfreeze.apply import apply_plan

    model = build_tiny_model("llama", num_layers=4, hidden=32)
    applied = apply_plan(model, "hlpt")
    batch = _batch(model.config.vocab_size)
    hooks = SensitivityHooks(applied.layout, batch)
    hooks.compute(model, 0)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(applied.param_groups(lr=1e-2, weight_decay=0.0))
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    for _ in range(2):
        model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels
        ).loss.backward()
        opt.step()
        opt.zero_grad()
    stats = hooks.compute(model, 2)
    grads = M.gradient_scores(model, applied.layout, ProbeSet("text", [batch]))
    for info in applied.layout.layers:
        i = info.index
        assert stats[f"diag/grad_norm/layers.{i}"] == pytest.approx(grads["grad_norm"][i], rel=1e-4)
        names = [n for n in trainable if n.startswith(f"{info.name}.")]
        assert names  # every hlpt layer has adapters
        num = sum(
            float((dict(model.named_parameters())[n].detach() - trainable[n]).double().pow(2).sum())
            for n in names
        )
        den = sum(float(trainable[n].double().pow(2).sum()) for n in names)
        assert stats[f"diag/update_ratio/layers.{i}"] == pytest.approx(
            math.sqrt(num / den), rel=1e-5
        )
