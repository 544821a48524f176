"""Under ZeRO-3 nothing in layerfreeze holds a whole model on one rank: training steps (with
per-layer grad norms), checkpoint save (DeepSpeed's partitions + the elastic part) and the merged
export (streamed one layer group at a time) never have more than one layer group's parameters
gathered at once. Counted on 2 gloo ranks from the parameters' ``ds_status`` at every module
forward and every ``deepspeed.zero.GatheredParameters`` entry; the exported checkpoint loads with
``from_pretrained`` and gives the trained model's logits."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.dist import run_distributed

pytestmark = pytest.mark.slow

PLAN = "0-1:lora(r=4,target=mlp),2-3:full"
CFG = {
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 1,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.0, "torch_adam": True}},
    "zero_optimization": {
        "stage": 3,
        # every parameter partitioned, nothing prefetched or kept live beyond the running module
        "stage3_param_persistence_threshold": 0,
        "stage3_prefetch_bucket_size": 0,
        "stage3_max_live_parameters": 0,
        "stage3_max_reuse_distance": 0,
    },
    "steps_per_print": 10**6,
}


def _body(rank: int, world: int, tmp: str) -> dict:
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    from layerfreeze.engines.deepspeed import DeepSpeedRunner
    from tests.helpers.tiny_models import build_tiny_model

    runner = DeepSpeedRunner(build_tiny_model("llama", num_layers=4), CFG, plan=PLAN)
    model = runner.model
    peak: dict[str, int] = {}
    stage = ["train"]

    def sample(*_args) -> None:
        live = sum(
            p.ds_numel for p in model.parameters() if p.ds_status == ZeroParamStatus.AVAILABLE
        )
        peak[stage[0]] = max(peak.get(stage[0], 0), live)

    real = deepspeed.zero.GatheredParameters

    class CountingGather(real):
        def __enter__(self):
            out = super().__enter__()
            sample()
            return out

    deepspeed.zero.GatheredParameters = CountingGather
    for m in model.modules():
        m.register_forward_pre_hook(sample)
        m.register_forward_hook(sample)

    g = torch.Generator().manual_seed(rank)
    for _ in range(2):
        ids = torch.randint(0, 128, (2, 8), generator=g)
        runner.train_step([{"input_ids": ids, "labels": ids}], grad_norms=True)
    stage[0] = "save"
    runner.save_checkpoint(f"{tmp}/ckpt")
    stage[0] = "export"
    runner.export_merged(f"{tmp}/export")
    stage[0] = "logits"
    probe = torch.arange(16).reshape(2, 8) % 128
    with torch.no_grad():
        logits = runner.engine(input_ids=probe).logits.float()
    # the instrument sees a whole-model gather when one happens
    stage[0] = "whole"
    with runner.gathered_parameters():
        pass
    groups = {}
    for layer in runner.applied.layout.layers:
        groups[f"layers.{layer.index}"] = sum(p.ds_numel for p in layer.module.parameters())
    total = sum(p.ds_numel for p in model.parameters())
    groups["rest"] = total - sum(groups.values())
    deepspeed.zero.GatheredParameters = real
    runner.close()
    return {"peak": peak, "groups": groups, "total": total, "logits": logits, "probe": probe}


def test_largest_gather_is_one_layer_group_and_the_streamed_export_loads(tmp_path):
    from transformers import AutoModelForCausalLM

    res = run_distributed(_body, world_size=2, args=(str(tmp_path),), timeout=600)
    r0 = res[0]
    largest_group = max(r0["groups"].values())
    assert largest_group < r0["total"] / 3  # a layer group is a small part of the model
    for r in res:
        peak = r["peak"]
        assert set(peak) >= {"train", "save", "export", "whole"}
        for stage in ("train", "save", "export"):
            assert 0 < peak[stage] <= largest_group, (stage, peak, r["groups"])
        assert peak["whole"] == r["total"]  # the counter is not blind to a whole-model gather
    out = tmp_path / "export"
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) == 5 and (out / "model.safetensors.index.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        got = merged(input_ids=r0["probe"]).logits.float()
    # LoRA folded into the base weights: the plain HF model reproduces the trained model
    assert torch.allclose(got, r0["logits"], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, r0["logits"] * 0)
