"""Gated prefix (form=branch and form=paper) on megatron-core's Transformer Engine spec against
the local spec on the same weights (skipped without CUDA or Transformer Engine).

A tiny GPT (2 layers, hidden 64, 4 heads, 2 query groups, RMSNorm, SwiGLU, rope, fp32) is built
with ``get_gpt_layer_local_spec`` and with ``get_gpt_layer_with_transformer_engine_spec``; the
local weights are copied into the TE model (``input_layernorm.weight`` ->
``self_attention.linear_qkv.layer_norm_weight``, ``pre_mlp_layernorm.weight`` ->
``mlp.linear_fc1.layer_norm_weight``, TE's ``_extra_state`` left alone) with the same prefix
(random keys/values/gate, non-zero branch factor). Checked: logits and prefix/gate gradients,
a ``dist_checkpointing`` round trip of the TE model, and a TP=2 + sequence-parallel TE run against
the local TP=1 result (skipped with fewer than 2 GPUs).

Tolerances: the models run in fp32 with TF32 off in torch; TE's own GEMMs and fused RMSNorm are
other kernels than torch's (and TE may use TF32 in its fp32 GEMMs), so the TE and local base
models differ by kernel noise ``base_err``. The prefix must add nothing beyond it: the logits of
the prefixed models may differ by at most ``4 * base_err + 1e-4`` (the prefix maths runs on
queries/keys that already carry that noise) while the prefix changes the logits by more than 100
times that (about 0.6 on the local spec, CPU); gradients agree to 1e-2 of each gradient's largest entry (TF32
rounds to ~5e-4 relative per product).

The gated cases need ``layerfreeze.engines.megatron.te`` (``use_norm_output_for_gate``, written
in the TE-LoRA branch; skipped where it is absent).
"""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

PLANS = {
    "ungated": "0:prefix(tokens=3),1:prefix(tokens=3,form=paper)",
    "gated": "0:prefix(tokens=3,gated),1:prefix(tokens=3,gated,form=paper)",
    "gated_value": "0-1:prefix(tokens=3,gated,form=paper,gate_at=value)",
}
NORMS = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}


def _needs(plan: str) -> None:
    pytest.importorskip("transformer_engine")
    if "gated" in plan:
        pytest.importorskip(
            "layerfreeze.engines.megatron.te",
            reason="gated prefix on the TE spec reads the fused norm through te.py (TE-LoRA work)",
        )


def _build(te: bool, plan: str | None, seed: int = 0, **overrides):
    """The tiny GPT on the GPU with ``plan`` applied (local spec: CPU-initialised from ``seed``,
    so TP=2 holds the TP=1 weights split; TE: initialised on the GPU, then overwritten)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    from layerfreeze import apply_plan
    from layerfreeze.engines.megatron import megatron_layout
    from tests.helpers.megatron import tiny_config

    overrides.setdefault("use_cpu_initialization", not te)
    config = tiny_config(2, 64, 4, 2, 128, **overrides)
    spec = (
        get_gpt_layer_with_transformer_engine_spec()
        if te
        else get_gpt_layer_local_spec(normalization="RMSNorm")
    )
    torch.manual_seed(seed)
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=128,
        max_sequence_length=64,
        position_embedding_type="rope",
    ).cuda()
    if plan is not None:
        apply_plan(model, plan, layout=megatron_layout(model))
    return model.eval()


def _randomise_prefix(model, seed: int = 7) -> dict:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".prefix_" not in n:
                continue
            noise = torch.randn(p.shape, generator=g)
            if n.endswith("prefix_gating_factor"):
                noise = 0.5 + noise.abs()
            elif ".prefix_gate." in n:
                noise = 0.3 * noise
            p.copy_(noise.to(p.device, p.dtype))
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if ".prefix_" in n}


def _copy_local_to_te(local, te) -> None:
    src = local.state_dict()
    mapped, used = {}, set()
    for k in te.state_dict():
        if k.endswith("_extra_state"):
            continue
        s = k
        for te_name, local_name in NORMS.items():
            s = s.replace(te_name, local_name)
        assert s in src, f"TE key {k} has no local counterpart {s}"
        mapped[k] = src[s]
        used.add(s)
    assert {k for k in src if not k.endswith("_extra_state")} == used
    missing, unexpected = te.load_state_dict(mapped, strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), missing


def _run(model, tokens):
    from tests.helpers.megatron import position_ids

    model.zero_grad(set_to_none=True)
    logits = model(tokens, position_ids(tokens), None)
    w = torch.linspace(-1, 1, logits.shape[-1], device=logits.device)
    (logits.float() * w).sum().backward()
    grads = {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach().float().cpu(), grads


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("kind", list(PLANS))
def test_te_spec_prefix_equals_local_spec(megatron_cuda, kind):
    plan = PLANS[kind]
    _needs(plan)
    from tests.helpers.megatron import tiny_tokens

    torch.backends.cuda.matmul.allow_tf32 = False
    tokens = tiny_tokens(batch=2, seq=16).cuda()
    base_local, base_te = _build(False, None), _build(True, None, seed=1)
    _copy_local_to_te(base_local, base_te)
    with torch.no_grad():
        base_err = (base_te(tokens, *_pos(tokens)) - base_local(tokens, *_pos(tokens))).abs().max()
        base_logits = base_local(tokens, *_pos(tokens)).float().cpu()

    local, te = _build(False, plan), _build(True, plan, seed=1)
    _randomise_prefix(local)
    _copy_local_to_te(local, te)
    local_logits, local_grads = _run(local, tokens)
    te_logits, te_grads = _run(te, tokens)
    err = (te_logits - local_logits).abs().max().item()
    effect = (local_logits - base_logits).abs().max().item()
    print(f"{kind}: base_err={base_err.item():.3g} err={err:.3g} prefix effect={effect:.3g}")
    assert base_err < 5e-3  # the weight copy is right (kernel noise only)
    assert err <= 4 * base_err.item() + 1e-4
    assert effect > 100 * max(err, 1e-6)  # the prefix is really in the comparison
    prefix = {n for n in local_grads if ".prefix_" in n}
    assert prefix and prefix == {n for n in te_grads if ".prefix_" in n}
    errors = {n: _rel(te_grads[n], local_grads[n]) for n in prefix}
    print("relative gradient errors:", errors)
    assert max(errors.values()) < 1e-2, errors
    if "gated" in plan:
        assert any(".prefix_gate." in n for n in prefix)


def _pos(tokens):
    from tests.helpers.megatron import position_ids

    return position_ids(tokens), None


def test_te_spec_prefix_dist_checkpoint_round_trip(megatron_cuda, tmp_path):
    plan = PLANS["gated"]
    _needs(plan)
    from megatron.core import dist_checkpointing

    from tests.helpers.megatron import tiny_tokens

    tokens = tiny_tokens(batch=2, seq=16).cuda()
    model = _build(True, plan, seed=1)
    _randomise_prefix(model, seed=11)
    with torch.no_grad():
        saved = model(tokens, *_pos(tokens))
    keys = set(model.sharded_state_dict())
    assert any("prefix_adapter.prefix_key" in k for k in keys), sorted(keys)
    assert any("prefix_adapter.prefix_gate.weight" in k for k in keys), sorted(keys)
    dist_checkpointing.save(model.sharded_state_dict(), str(tmp_path))
    fresh = _build(True, plan, seed=2)
    _randomise_prefix(fresh, seed=12)
    with torch.no_grad():
        before = fresh(tokens, *_pos(tokens))
    assert not torch.equal(before, saved)
    fresh.load_state_dict(dist_checkpointing.load(fresh.sharded_state_dict(), str(tmp_path)))
    with torch.no_grad():
        torch.testing.assert_close(fresh(tokens, *_pos(tokens)), saved, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# TP=2 + sequence parallelism (two GPUs)


def _tp2_worker(rank: int, port: int, plan: str, out_dir: str) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from tests.helpers.megatron import gather_tp_logits, tiny_tokens

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=2)
    parallel_state.initialize_model_parallel(2, 1)
    model_parallel_cuda_manual_seed(0)
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        # The weight donor: the local spec at TP=2, CPU-initialised, so it holds the TP=1 weights
        # split (without SP: megatron's local torch norm refuses it; the weights are the same).
        local = _build(False, plan, tp=2)
        te = _build(True, plan, seed=1, tp=2, sequence_parallel=True)
        ref = torch.load(os.path.join(out_dir, "tp1.pt"))
        with torch.no_grad():  # this rank's share of the TP=1 prefix
            for n, p in local.named_parameters():
                if ".prefix_" in n:
                    full = ref["prefix"][n]
                    part = full if ".prefix_gate." in n else full.chunk(2, dim=0)[rank]
                    p.copy_(part.to(p.device, p.dtype))
        _copy_local_to_te(local, te)
        tokens = tiny_tokens(batch=2, seq=16).cuda()
        logits, grads = _run(te, tokens)
        logits = gather_tp_logits(logits.cuda()).cpu()
        params = dict(te.named_parameters())
        out = {"logits": logits, "grads": {}}
        for n, g in grads.items():
            if ".prefix_" not in n:
                continue
            g = g.cuda()
            if getattr(params[n], "sequence_parallel", False):  # what finalize_model_grads does
                dist.all_reduce(g, group=parallel_state.get_tensor_model_parallel_group())
                out["grads"][n] = g.cpu()
            elif ".prefix_gate." in n:
                out["grads"][n] = g.cpu()
            else:
                parts = [torch.empty_like(g) for _ in range(2)]
                dist.all_gather(parts, g, group=parallel_state.get_tensor_model_parallel_group())
                out["grads"][n] = torch.cat(parts, 0).cpu()
        if rank == 0:
            torch.save(out, os.path.join(out_dir, "tp2.pt"))
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="TP=2 needs 2 GPUs")
def test_te_spec_prefix_tp2_sequence_parallel_equals_local_tp1(megatron_cuda, tmp_path):
    import torch.multiprocessing as mp

    from tests.helpers.dist import find_free_port
    from tests.helpers.megatron import tiny_tokens

    plan = PLANS["gated"]
    _needs(plan)
    torch.backends.cuda.matmul.allow_tf32 = False
    local = _build(False, plan)
    prefix = _randomise_prefix(local)
    tokens = tiny_tokens(batch=2, seq=16).cuda()
    ref_logits, ref_grads = _run(local, tokens)
    torch.save({"prefix": prefix}, tmp_path / "tp1.pt")
    mp.spawn(_tp2_worker, args=(find_free_port(), plan, str(tmp_path)), nprocs=2, join=True)
    got = torch.load(tmp_path / "tp2.pt")
    torch.testing.assert_close(got["logits"], ref_logits, rtol=1e-2, atol=1e-2)
    errors = {n: _rel(got["grads"][n], g) for n, g in ref_grads.items() if ".prefix_" in n}
    assert set(errors) == set(got["grads"]), (sorted(errors), sorted(got["grads"]))
    assert max(errors.values()) < 1e-2, errors
