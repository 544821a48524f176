"""Padded vocabulary masking on CUDA (skipped without a GPU or megatron-core; NOT run so far).

One process, NCCL, TP=1: the masked output layer gives the Hugging Face per-token losses through
megatron-core's unfused and its native fused vocab-parallel cross entropy
(``cross_entropy_loss_fusion=True``, ``cross_entropy_fusion_impl="native"``), in float32 and in
bf16 (the mask uses bf16's lowest value; its padded columns get probability 0). The CPU tests
(tests/distributed/test_megatron_vocab.py) cover TP=1 and TP=2 with the unfused loss.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

VOCAB = 503


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_padded_vocab_gives_hf_losses_on_cuda(megatron_cuda, fused, dtype):
    from layerfreeze.engines.megatron import convert as C
    from layerfreeze.engines.megatron.vocab import mask_padded_vocab
    from tests.helpers.megatron import position_ids
    from tests.helpers.tiny_models import build_tiny_model, tiny_batch

    hf = build_tiny_model("llama", num_layers=2, num_heads=4, num_kv_heads=2, vocab_size=VOCAB)
    ids = tiny_batch(VOCAB)
    with torch.no_grad():
        exact = F.cross_entropy(hf(ids).logits.transpose(1, 2), ids.roll(-1, 1), reduction="none")
    overrides = {
        "params_dtype": dtype,
        "bf16": dtype == torch.bfloat16,
        "cross_entropy_loss_fusion": fused,
        "cross_entropy_fusion_impl": "native",
    }
    model = C.build_gpt_from_hf_config(
        hf.config, config_overrides=overrides, make_vocab_size_divisible_by=128
    )
    C.load_hf_weights(model, hf.state_dict(), hf.config)
    model = model.cuda().eval()
    mask_padded_vocab(model, VOCAB)
    ids_c = ids.cuda()
    with torch.no_grad():
        losses = model(ids_c, position_ids(ids_c), None, labels=ids_c.roll(-1, 1)).float().cpu()
        logits = model(ids_c, position_ids(ids_c), None).float()
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(losses, exact, rtol=0, atol=tol)
    assert logits.softmax(-1)[..., VOCAB:].max().item() == 0.0
