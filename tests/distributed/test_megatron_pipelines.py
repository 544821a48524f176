"""An existing Megatron-LM pipeline's base weights under a plan that adds adapters (2 gloo ranks, TP=2).

The two paths ``docs/megatron.md`` documents, on a Llama with a vocabulary of 503 (padded to 504
at TP=2, masked via ``plan_model_provider(..., vocab_size=)``):

(a) Hugging Face weights loaded inside the provider, before the plan: the planned model's
    per-token losses equal the Hugging Face model's (``F.cross_entropy`` on its logits, an
    independent implementation; LoRA ``B`` and the gates start at zero);
(b) a megatron-core distributed checkpoint of the model *without* adapters (the base) loaded
    into a planned model whose adapters already hold values: ``load_base_checkpoint`` fills
    every base tensor and leaves the adapters as they were (losses equal a reference built from
    the same base weights and the same adapter values); then Megatron-LM's own save / load
    (``dist_checkpointing`` of ``model.sharded_state_dict()``) carries the adapters.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.helpers.dist import run_distributed
from tests.helpers.tiny_models import build_tiny_model, tiny_batch

pytestmark = pytest.mark.slow

VOCAB = 503
PLAN = "0:lora(r=4,target=all,gated),1:prefix(tokens=2,gated)"
CPU = {"use_cpu_initialization": True}


def _body(rank, world_size, hf_dir, tmp):
    import os

    from megatron.core import dist_checkpointing
    from transformers import AutoConfig

    from layerfreeze.engines.megatron import convert as C
    from layerfreeze.megatron import load_base_checkpoint, plan_model_provider
    from tests.distributed.test_megatron_distckpt import _randomise_adapters
    from tests.helpers.megatron import (
        destroy_model_parallel,
        init_model_parallel,
        megatron_cpu_shim,
        position_ids,
    )

    hf_config = AutoConfig.from_pretrained(hf_dir)
    ids = tiny_batch(VOCAB)
    out: dict = {}

    def losses(model):
        with torch.no_grad():
            return model(ids, position_ids(ids), None, labels=ids.roll(-1, 1)).clone()

    def provider(pre_process=True, post_process=True, vp_stage=None, load_hf=True):
        model = C.build_gpt_from_hf_config(
            hf_config,
            pre_process,
            post_process,
            vp_stage,
            config_overrides=CPU,
            make_vocab_size_divisible_by=1,
        ).eval()
        if load_hf:  # path (a): the base weights come in before the plan is applied
            C.load_hf_weights(model, hf_dir)
        return model

    with megatron_cpu_shim():
        init_model_parallel(tp=2)
        try:
            planned = plan_model_provider(provider, PLAN, vocab_size=VOCAB)
            model = planned(pre_process=True, post_process=True)
            out["a"] = losses(model)
            # (b) the base checkpoint: the script's provider without a plan
            base_dir, full_dir = os.path.join(tmp, "base"), os.path.join(tmp, "full")
            os.makedirs(base_dir, exist_ok=True)
            os.makedirs(full_dir, exist_ok=True)
            dist_checkpointing.save(provider().sharded_state_dict(), base_dir)
            _randomise_adapters(model)  # the reference: base weights + these adapter values
            out["ref"] = losses(model)
            fresh = planned(pre_process=True, post_process=True, load_hf=False)
            _randomise_adapters(fresh)
            out["before"] = losses(fresh)
            out["loaded_keys"] = sorted(load_base_checkpoint(fresh, base_dir))
            out["after"] = losses(fresh)
            # Megatron-LM's own save and resume: the planned model's sharded state dict
            dist_checkpointing.save(fresh.sharded_state_dict(), full_dir)
            again = planned(pre_process=True, post_process=True, load_hf=False)
            again.load_state_dict(dist_checkpointing.load(again.sharded_state_dict(), full_dir))
            out["resumed"] = losses(again)
            third = planned(pre_process=True, post_process=True, load_hf=False)
            load_base_checkpoint(third, full_dir)  # a checkpoint with adapters: loads them too
            out["full_via_base_loader"] = losses(third)
        finally:
            destroy_model_parallel()
    return out


def test_base_weights_under_a_plan_hf_in_provider_and_dist_checkpoint(tmp_path):
    hf = build_tiny_model("llama", num_layers=2, num_heads=4, num_kv_heads=2, vocab_size=VOCAB)
    hf.save_pretrained(str(tmp_path / "hf"), safe_serialization=True)
    ids = tiny_batch(VOCAB)
    with torch.no_grad():
        exact = F.cross_entropy(hf(ids).logits.transpose(1, 2), ids.roll(-1, 1), reduction="none")
    results = run_distributed(
        _body, world_size=2, args=(str(tmp_path / "hf"), str(tmp_path)), timeout=600
    )
    for r in results:
        torch.testing.assert_close(r["a"], exact, rtol=0, atol=1e-5)  # (a)
        assert (r["ref"] - exact).abs().max() > 1e-2  # the adapters matter
        assert (r["before"] - r["ref"]).abs().max() > 1e-2  # the fresh base really differs
        torch.testing.assert_close(r["after"], r["ref"], rtol=0, atol=1e-6)  # (b)
        assert not any("adapter" in k or "gate" in k or "prefix" in k for k in r["loaded_keys"])
        assert "decoder.final_layernorm.weight" in r["loaded_keys"]
        torch.testing.assert_close(r["resumed"], r["ref"], rtol=0, atol=1e-6)
        torch.testing.assert_close(r["full_via_base_loader"], r["ref"], rtol=0, atol=1e-6)
