"""CUDA checks of prefix(form=paper) and the PEFT export (skipped without a GPU; the CPU tests in
tests/unit/test_prefix_paper.py and test_interop_peft.py test the same features fully)."""

from __future__ import annotations

import pytest
import torch

from layerfreeze import apply_plan
from layerfreeze.interop.peft import export_peft
from tests.helpers.tiny_models import build_tiny_model, tiny_batch


def randomize(model, seed=5, gate_scale=1.0):
    """Trained-looking prefix: random keys/values and gate (as in test_prefix_paper.py)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".prefix_" in n:
                noise = torch.randn(p.shape, generator=g).to(p.dtype)
                p.copy_(gate_scale * noise if ".prefix_gate." in n else noise)


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_paper_form_on_cuda_equals_cpu(impl):
    """CUDA's SDPA kernels take the extended float mask (GQA) and agree with the CPU maths."""
    model = build_tiny_model("llama", num_layers=3, attn_implementation=impl)
    apply_plan(model, "1-2:prefix(tokens=4,form=paper,gated)")
    randomize(model, gate_scale=1.0)
    ids = tiny_batch(model)
    with torch.no_grad():
        cpu = model(ids).logits
        gpu = model.cuda()(ids.cuda()).logits.cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-3, atol=1e-3)


def test_paper_form_cuda_generation_with_and_without_cache():
    model = build_tiny_model("llama", num_layers=3, attn_implementation="sdpa").cuda()
    apply_plan(model, "1-2:prefix(tokens=4,form=paper,gated)")
    randomize(model, gate_scale=1.0)
    prompt = tiny_batch(model, batch=2, seq=5).cuda()
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        cached = model.generate(
            prompt, use_cache=True, output_scores=True, return_dict_in_generate=True, **kw
        )
        one_pass = model(cached.sequences).logits[:, prompt.shape[1] - 1 : -1]
    torch.testing.assert_close(torch.stack(cached.scores, 1), one_pass, rtol=1e-3, atol=1e-3)


def test_closed_gate_bf16_cuda_is_the_base_model_to_bf16_rounding():
    model = build_tiny_model("llama", num_layers=3, attn_implementation="sdpa")
    model = model.to(device="cuda", dtype=torch.bfloat16)
    ids = tiny_batch(model).cuda()
    with torch.no_grad():
        base = model(ids).logits.float()
        apply_plan(model, "1-2:prefix(tokens=4,form=paper,gated,gate_bias=-30)")
        assert model.model.layers[1].self_attn.prefix_adapter.prefix_key.dtype == torch.bfloat16
        closed = model(ids).logits.float()
    torch.testing.assert_close(closed, base, rtol=2e-2, atol=2e-2)


def test_peft_export_of_a_bf16_cuda_model_loads_in_peft(tmp_path):
    from peft import PeftModel

    model = build_tiny_model("qwen2", num_layers=4).to(device="cuda", dtype=torch.bfloat16)
    applied = apply_plan(model, "1-2:lora(r=8,alpha=16,target=all)")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_b"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    ids = tiny_batch(model).cuda()
    with torch.no_grad():
        ours = model(ids).logits.float()
    export_peft(applied, tmp_path / "a")
    base = build_tiny_model("qwen2", num_layers=4).to(device="cuda", dtype=torch.bfloat16)
    pm = PeftModel.from_pretrained(base, str(tmp_path / "a"))
    with torch.no_grad():
        theirs = pm(ids).logits.float()
    torch.testing.assert_close(theirs, ours, rtol=3e-2, atol=3e-2)
