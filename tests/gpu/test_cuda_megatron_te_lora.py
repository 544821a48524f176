"""Gated / ungated LoRA on megatron-core's Transformer Engine layer spec equals the local spec.

CUDA and Transformer Engine only (skipped otherwise; import-safe on CPU). One tiny GPT (2
layers, hidden 64, 4 heads, 2 query groups, SwiGLU, RMSNorm, fp32 with TF32 off) is built with
``get_gpt_layer_local_spec`` and with ``get_gpt_layer_with_transformer_engine_spec``, the
local weights copied into the TE one (``input_layernorm.weight`` ->
``self_attention.linear_qkv.layer_norm_weight``, ``pre_mlp_layernorm.weight`` ->
``mlp.linear_fc1.layer_norm_weight``, everything else by name, TE's ``_extra_state`` skipped),
the same plan applied to both and the same adapter weights (non-zero ``B``) loaded. Then:

* logits and every adapter / gate gradient agree (rtol/atol 1e-4 on logits, 1e-3 of each
  gradient's largest entry: fp32, but TE's fused RMSNorm / attention reduce in another order);
* layer 1's gated LoRA sits on ``linear_proj`` / ``linear_fc2`` only, so its gates come from the
  norm-linears' layer-norm output without an adapter there (the gate-only hook);
* an ungated TE model merges into TE's ``weight`` and unmerges back (logits unchanged, weights
  restored);
* a ``dist_checkpointing`` save / load of the TE model gives the same per-token losses;
* TP=2 with sequence parallelism (skipped with fewer than 2 GPUs): the TE spec equals the local
  spec on the same sharded weights (the local spec's TP/SP maths are tested on CPU).
"""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

GATED = (
    "0:lora(r=4,alpha=8,target=all,gated),"
    "1:lora(r=4,alpha=8,target=[linear_proj,linear_fc2],gated)"
)
UNGATED = "0-1:lora(r=4,alpha=8,target=all)"
_NORMS = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}


def _te():
    return pytest.importorskip("transformer_engine")


def _build(spec: str, tp: int = 1, sequence_parallel: bool = False, seed: int = 0):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    from tests.helpers.megatron import tiny_config

    config = tiny_config(num_layers=2, hidden=64, heads=4, query_groups=2, ffn=128, tp=tp,
                         sequence_parallel=sequence_parallel)
    layer_spec = (
        get_gpt_layer_local_spec(normalization="RMSNorm")
        if spec == "local"
        else get_gpt_layer_with_transformer_engine_spec()
    )
    torch.manual_seed(seed)
    model = GPTModel(config=config, transformer_layer_spec=layer_spec, vocab_size=128,
                     max_sequence_length=64, pre_process=True, post_process=True,
                     position_embedding_type="rope")
    return model.cuda().eval()


def _te_name(name: str) -> str:
    for local, te in _NORMS.items():
        if name.endswith(local):
            return name[: -len(local)] + te
    return name


@torch.no_grad()
def _copy_local_to_te(local, te_model) -> None:
    te_params = dict(te_model.named_parameters())
    local_params = dict(local.named_parameters())
    for name, p in local_params.items():
        te_params[_te_name(name)].copy_(p)
    assert {_te_name(n) for n in local_params} == set(te_params), (
        sorted(set(te_params) - {_te_name(n) for n in local_params})
    )


@torch.no_grad()
def _randomise_adapters(model, scale: float = 0.3) -> None:
    """Every adapter / gate tensor from a generator seeded by its (spec-independent) name, so the
    local and TE models get the same values whatever their parameter order."""
    for name, p in model.named_parameters():
        if "lora_" in name:
            g = torch.Generator().manual_seed(sum(map(ord, name)))
            p.copy_((torch.randn(p.shape, generator=g) * scale).to(p.dtype))


def _run(model, tokens):
    from tests.helpers.megatron import position_ids

    model.zero_grad(set_to_none=True)
    logits = model(tokens, position_ids(tokens), None)
    weights = torch.linspace(-1, 1, logits.shape[-1], device=logits.device)
    (logits.float() * weights).sum().backward()
    grads = {
        _te_name(n): p.grad.float().cpu() for n, p in model.named_parameters() if p.requires_grad
    }
    return logits.detach().float().cpu(), grads


def _pair(plan: str):
    from layerfreeze import apply_plan
    from layerfreeze.engines.megatron import megatron_layout

    local = _build("local")
    te_model = _build("te")
    _copy_local_to_te(local, te_model)
    applied = []
    for model in (local, te_model):
        applied.append(apply_plan(model, plan, layout=megatron_layout(model)))
        _randomise_adapters(model)
    return local, te_model, applied


def test_gated_lora_te_spec_equals_local_spec(megatron_cuda):
    _te()
    from layerfreeze.engines.megatron.te import TENormLoRAAdapter, reads_norm_output
    from tests.helpers.megatron import tiny_tokens

    torch.backends.cuda.matmul.allow_tf32 = False
    local, te_model, _ = _pair(GATED)
    te0, te1 = te_model.decoder.layers
    assert isinstance(te0.self_attention.linear_qkv.lora_adapter, TENormLoRAAdapter)
    assert isinstance(te0.mlp.linear_fc1.lora_adapter, TENormLoRAAdapter)
    assert "lora_adapter" not in te1.self_attention.linear_qkv._modules  # gate-only hook
    for sub in (te0.self_attention, te0.mlp, te1.self_attention, te1.mlp):
        assert reads_norm_output(sub.lora_gate)
    tokens = tiny_tokens().cuda()
    local_logits, local_grads = _run(local, tokens)
    te_logits, te_grads = _run(te_model, tokens)
    torch.testing.assert_close(te_logits, local_logits, rtol=1e-4, atol=1e-4)
    assert set(te_grads) == set(local_grads)
    adapter_names = [n for n in local_grads if "lora_" in n]
    assert len(adapter_names) == 2 * 4 + 2 * 2 + 4 * 2  # A/B x 4 + A/B x 2 + gate w/b x 4
    errors = {
        n: ((te_grads[n] - g).abs().max() / g.abs().max().clamp_min(1e-12)).item()
        for n, g in local_grads.items()
    }
    print("relative gradient errors:", errors)
    assert max(errors[n] for n in adapter_names) < 1e-3, errors
    # the gates were cleared after each sub-block's forward
    assert all(sub.lora_gate.value is None for sub in (te0.self_attention, te0.mlp))


def test_ungated_merge_unmerge_on_te_weights(megatron_cuda):
    _te()
    from tests.helpers.megatron import forward_logits, tiny_tokens

    torch.backends.cuda.matmul.allow_tf32 = False
    local, te_model, (_, applied) = _pair(UNGATED)
    tokens = tiny_tokens().cuda()
    with torch.no_grad():
        before = forward_logits(te_model, tokens).float()
        local_logits = forward_logits(local, tokens).float()
    torch.testing.assert_close(before, local_logits, rtol=1e-4, atol=1e-4)
    weights = {n: p.detach().clone() for n, p in te_model.named_parameters() if "lora_" not in n}
    from layerfreeze.policies.lora import merge_lora, unmerge_lora

    merged = merge_lora(te_model)
    assert len(merged) == 8
    qkv = te_model.decoder.layers[0].self_attention.linear_qkv
    assert not torch.equal(qkv.weight, weights["decoder.layers.0.self_attention.linear_qkv.weight"])
    with torch.no_grad():
        after = forward_logits(te_model, tokens).float()
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    unmerge_lora(te_model)
    for n, p in te_model.named_parameters():
        if n in weights:
            torch.testing.assert_close(p.detach(), weights[n], rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(forward_logits(te_model, tokens).float(), before,
                                   rtol=1e-5, atol=1e-5)


def _token_losses(model, tokens):
    from tests.helpers.megatron import position_ids

    labels = torch.roll(tokens, -1, dims=1)
    with torch.no_grad():
        return model(tokens, position_ids(tokens), None, labels=labels).float().cpu()


def test_te_dist_checkpoint_round_trip(megatron_cuda, tmp_path):
    _te()
    from megatron.core import dist_checkpointing

    from layerfreeze import apply_plan
    from layerfreeze.engines.megatron import megatron_layout
    from layerfreeze.engines.megatron.sharded import load_trained, save_trained
    from tests.helpers.megatron import tiny_tokens

    torch.backends.cuda.matmul.allow_tf32 = False
    _, te_model, _ = _pair(GATED)
    tokens = tiny_tokens().cuda()
    expected = _token_losses(te_model, tokens)
    sd = te_model.sharded_state_dict()
    flat = {k: v for k, v in sd.items() if "lora_adapter" in k}
    a_key = "decoder.layers.0.self_attention.linear_qkv.lora_adapter.lora_a"
    assert a_key in flat and tuple(flat[a_key].global_shape) == (4, 64), flat.get(a_key)
    assert any(k.endswith("linear_qkv._extra_state") for k in sd)  # TE's, as megatron writes it
    full_dir, trained_dir = tmp_path / "full", tmp_path / "trained"
    full_dir.mkdir()
    trained_dir.mkdir()
    dist_checkpointing.save(sd, str(full_dir))
    save_trained(te_model, str(trained_dir))

    fresh = _build("te", seed=7)
    apply_plan(fresh, GATED, layout=megatron_layout(fresh))
    _randomise_adapters(fresh, scale=0.05)
    assert not torch.allclose(_token_losses(fresh, tokens), expected)
    fresh.load_state_dict(dist_checkpointing.load(fresh.sharded_state_dict(), str(full_dir)))
    torch.testing.assert_close(_token_losses(fresh, tokens), expected, rtol=0, atol=0)

    # adapter-only checkpoint into a model with the same base weights, other adapter values
    other = _build("te")
    other.load_state_dict(
        {k: v for k, v in te_model.state_dict().items() if "lora_" not in k}, strict=False
    )
    apply_plan(other, GATED, layout=megatron_layout(other))
    _randomise_adapters(other, scale=0.05)
    load_trained(other, str(trained_dir))
    torch.testing.assert_close(_token_losses(other, tokens), expected, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# TP=2 + sequence parallelism (NCCL, two GPUs)


def _tp2_body(rank: int, world_size: int, port: int, plan: str) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from layerfreeze import apply_plan
    from layerfreeze.engines.megatron import megatron_layout
    from tests.helpers.megatron import gather_tp_logits, tiny_tokens

    dist.destroy_process_group()  # run_distributed's gloo world: megatron + TE need NCCL here
    os.environ["MASTER_PORT"] = str(port)
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world_size)
    torch.backends.cuda.matmul.allow_tf32 = False
    parallel_state.initialize_model_parallel(2, 1)
    model_parallel_cuda_manual_seed(0)
    try:
        local = _build("local", tp=2, sequence_parallel=True)
        te_model = _build("te", tp=2, sequence_parallel=True)
        _copy_local_to_te(local, te_model)  # same shards: same split axes and strides
        for model in (local, te_model):
            apply_plan(model, plan, layout=megatron_layout(model))
        _randomise_adapters(local)
        with torch.no_grad():  # this rank's adapter shards, copied by name
            te_params = dict(te_model.named_parameters())
            for n, p in local.named_parameters():
                if "lora_" in n:
                    te_params[n].copy_(p)
        tokens = tiny_tokens().cuda()
        out = {}
        for tag, model in (("local", local), ("te", te_model)):
            logits, grads = _run(model, tokens)
            out[tag] = (gather_tp_logits(logits.cuda()).cpu(), grads)
        torch.testing.assert_close(out["te"][0], out["local"][0], rtol=1e-4, atol=1e-4)
        errors = {
            n: ((out["te"][1][n] - g).abs().max() / g.abs().max().clamp_min(1e-12)).item()
            for n, g in out["local"][1].items()
            if "lora_" in n
        }
        assert errors and max(errors.values()) < 1e-3, errors
        return errors
    finally:
        parallel_state.destroy_model_parallel()


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="TP=2 needs 2 GPUs")
def test_tp2_sequence_parallel_te_equals_local():
    _te()
    from tests.helpers.dist import find_free_port, run_distributed

    results = run_distributed(_tp2_body, world_size=2, args=(find_free_port(), GATED),
                              timeout=900)
    assert all(results)
