"""megatron-core policies on CUDA without the CPU shim (skipped without a GPU or megatron-core).

One process, NCCL, TP=1 (one GPU): gated LoRA and gated prefix on a real megatron-core GPTModel
give on CUDA the logits and adapter gradients they give on the CPU, and in bf16 the model with
freshly installed adapters equals the base model bit for bit. The TP=2 / PP=2 maths are tested
on CPU in tests/distributed/test_megatron_policies.py.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

PLAN = "0:lora(r=4,target=all,gated),1:prefix(tokens=3,gated),2:lora(r=4,target=mlp)"


def _randomise(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.5)


def _run(model, tokens):
    from tests.helpers.megatron import position_ids

    model.zero_grad(set_to_none=True)
    logits = model(tokens, position_ids(tokens), None)
    (
        logits.float() * torch.linspace(-1, 1, logits.shape[-1], device=logits.device)
    ).sum().backward()
    grads = {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach().float().cpu(), grads


def test_adapters_on_cuda_equal_cpu(megatron_cuda):
    from layerfreeze import apply_plan
    from layerfreeze.engines.megatron import megatron_layout
    from tests.helpers.megatron import build_tiny_gpt, megatron_cpu_shim, tiny_tokens

    torch.backends.cuda.matmul.allow_tf32 = False

    def build():
        model = build_tiny_gpt(num_layers=3)
        apply_plan(model, PLAN, layout=megatron_layout(model))
        _randomise(model)
        return model

    tokens = tiny_tokens()
    with megatron_cpu_shim():  # the CPU reference: megatron puts e.g. rotary tables on the GPU
        cpu_logits, cpu_grads = _run(build(), tokens)
    # a second model: the rotary embedding caches its (CPU) tables per instance
    cuda_logits, cuda_grads = _run(build().cuda(), tokens.cuda())
    torch.testing.assert_close(cuda_logits, cpu_logits, rtol=1e-4, atol=1e-4)
    assert set(cuda_grads) == set(cpu_grads)
    # relative to each gradient's largest entry (reduction order differs between the devices)
    errors = {
        n: ((cuda_grads[n] - g).abs().max() / g.abs().max()).item() for n, g in cpu_grads.items()
    }
    print("relative gradient errors:", errors)
    assert max(errors.values()) < 1e-3, errors  # H200, fp32 no TF32: at most 1.8e-4 seen


def test_identity_at_init_in_bf16(megatron_cuda):
    from layerfreeze import apply_plan
    from layerfreeze.engines.megatron import megatron_layout
    from tests.helpers.megatron import build_tiny_gpt, position_ids, tiny_tokens

    model = build_tiny_gpt(num_layers=3).cuda().to(torch.bfloat16)
    tokens = tiny_tokens().cuda()
    with torch.no_grad():
        base = model(tokens, position_ids(tokens), None)
    applied = apply_plan(model, PLAN, layout=megatron_layout(model))
    with torch.no_grad():
        same = model(tokens, position_ids(tokens), None)
    assert torch.equal(same, base)
    logits = model(tokens, position_ids(tokens), None)
    logits.float().square().mean().backward()
    params = dict(model.named_parameters())
    for n in applied.trainable_names():
        assert params[n].grad is None or torch.isfinite(params[n].grad).all(), n
    # B (zero) and the prefix factor get gradient at the first step
    assert params["decoder.layers.0.mlp.linear_fc1.lora_adapter.lora_b"].grad.abs().max() > 0
    assert (
        params["decoder.layers.1.self_attention.prefix_adapter.prefix_gating_factor"]
        .grad.abs()
        .max()
        > 0
    )
