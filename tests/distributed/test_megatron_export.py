"""Megatron -> Hugging Face export with the sidecar of unmergeable adapters, real megatron-core.

``MegatronRunner.export_merged`` must write what ``layerfreeze.export.export_merged`` writes for
the same plan on the HF model: the merged checkpoint plus ``layerfreeze_sidecar.safetensors`` and
``plan.json`` in HF naming. The reference is the megatron model itself: the exported checkpoint
loaded with ``from_pretrained`` and ``load_trainable`` (the HF policies' own code) must give the
megatron model's logits. The plan file and the sidecar's names/shapes must equal those the HF
path writes for the same plan.

TP=1 runs in this process; TP=2 and PP=2 run on two gloo ranks and are marked slow.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from layerfreeze.apply import apply_plan
from layerfreeze.engines.megatron import convert as C
from layerfreeze.export import (
    PLAN_FILE,
    SIDECAR_FILE,
    export_base_config,
    export_merged,
    load_trainable,
)
from layerfreeze.plan import LayerPlan
from tests.helpers.dist import run_distributed
from tests.helpers.tiny_models import build_tiny_model, tiny_batch

VOCAB = 100
LAYERS = 4
ATOL = 1e-5
CPU = {"use_cpu_initialization": True}
_ADAPTER_PREFIXES = ("lora_", "prefix_")

#: (preset, options): gated LoRA on the FFN (layers 0-2) + gated prefix (layer 3); gated LoRA
#: on every linear (the fused QKV too); plain LoRA on every linear (merged, empty sidecar).
HLPT = ("hlpt_branch", {"r": 4, "tokens": 3})  # the branch form
HLPT_PAPER = ("hlpt", {"r": 4, "tokens": 3})  # the paper form (no per-head factor)
GATED_ALL = ("lora_all", {"r": 4, "lora": {"gated": True}})
LORA_ALL = ("lora_all", {"r": 4})


def _plan(spec: tuple[str, dict]) -> LayerPlan:
    return LayerPlan.from_preset(spec[0], **spec[1])


def _hf(seed: int = 0):
    return build_tiny_model(
        "llama", num_layers=LAYERS, num_heads=4, num_kv_heads=2, vocab_size=VOCAB, seed=seed
    )


def _load(path) -> torch.nn.Module:
    # The base architecture's weights (an export with a sidecar is marked so that a plain
    # from_pretrained refuses it: tests/faults/test_sidecar_loading.py).
    return (
        AutoModelForCausalLM.from_pretrained(
            str(path), config=export_base_config(path), attn_implementation="eager"
        ).float().eval()
    )


def _hf_logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _is_adapter(name: str) -> bool:
    return any(part.startswith(_ADAPTER_PREFIXES) for part in name.split("."))


def _randomise_adapters(model, tp_rank: int, tp_size: int, seed: int = 123) -> None:
    """Trained-looking adapters. The same draws on every rank: replicated parameters stay equal
    across TP; a split parameter's shard is this rank's block of a drawn full tensor, so the
    ranks' shards differ (a shard swapped on export would show)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not _is_adapter(name):
                continue
            scale = 0.5 if ("gate" in name or "gating" in name) else 0.1
            if getattr(p, "tensor_model_parallel", False) and tp_size > 1:
                dim = p.partition_dim
                shape = list(p.shape)
                shape[dim] *= tp_size
                full = torch.randn(shape, generator=g)
                p.add_(scale * full.chunk(tp_size, dim=dim)[tp_rank])
            else:
                p.add_(scale * torch.randn(p.shape, generator=g))


def _sidecar_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(directory / SIDECAR_FILE), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _hf_reference_export(spec, directory: Path) -> Path:
    """What the DeepSpeed/HF path writes for ``spec`` (adapters randomised the same way)."""
    hf = _hf()
    applied = apply_plan(hf, _plan(spec))
    _randomise_adapters(hf, 0, 1)
    return export_merged(applied, directory)


def _check_export(out_dir: Path, megatron_logits: torch.Tensor, spec, tmp_path: Path) -> None:
    hf = _hf()
    ids = tiny_batch(hf)
    base = _hf_logits(hf, ids)
    assert (megatron_logits - base).abs().max() > 1e-2  # the adapters change the output
    ref_dir = _hf_reference_export(spec, tmp_path / f"hf_ref_{spec[0]}")
    # the same files, plan and sidecar names/shapes as the HF path for this plan
    assert json.loads((out_dir / PLAN_FILE).read_text()) == json.loads(
        (ref_dir / PLAN_FILE).read_text()
    )
    assert _sidecar_shapes(out_dir) == _sidecar_shapes(ref_dir)
    marked = [json.loads((d / "config.json").read_text())["model_type"] for d in (out_dir, ref_dir)]
    assert marked[0] == marked[1]  # guarded alike (layerfreeze) or plain alike
    loaded = _load(out_dir)
    assert not any(_is_adapter(k) for k in loaded.state_dict())
    merged_only = _hf_logits(loaded, ids)
    load_trainable(loaded, out_dir)
    torch.testing.assert_close(_hf_logits(loaded, ids), megatron_logits, rtol=0, atol=ATOL)
    if _sidecar_shapes(out_dir):  # without the sidecar the export is not the trained model
        assert (merged_only - megatron_logits).abs().max() > 1e-3


def _export_body(tp: int, spec, hf_dir: str, out_dir: str, seed_shift: int = 0):
    """Build a megatron model from ``hf_dir`` (this rank's shard), apply ``spec``, randomise
    the adapters, export through ``MegatronRunner.export_merged``; return the gathered logits
    (last stage) and the export's return value."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from layerfreeze.engines.megatron.provider import apply_megatron_plan
    from layerfreeze.engines.megatron.runner import MegatronRunner
    from tests.helpers.megatron import gather_tp_logits, position_ids

    hf_config = AutoConfig.from_pretrained(hf_dir)
    ids = tiny_batch(VOCAB)
    pre, post = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
    model = C.build_gpt_from_hf_config(hf_config, pre, post, config_overrides=CPU).eval()
    C.load_hf_weights(model, hf_dir)
    applied = apply_megatron_plan(model, _plan(spec))
    _randomise_adapters(model, ps.get_tensor_model_parallel_rank(), tp)
    runner = MegatronRunner(model, applied=applied, lr=1e-3)
    runner.hf_config = hf_config
    try:
        logits = None
        with torch.no_grad():
            if pre and post:
                logits = gather_tp_logits(model(ids, position_ids(ids), None))
            elif pre:  # megatron's own stage hand-off: set_input_tensor
                hidden = model(ids, position_ids(ids), None)
                dist.send(hidden.contiguous(), dst=1)
            else:
                hidden = torch.empty(ids.shape[1], ids.shape[0], hf_config.hidden_size)
                dist.recv(hidden, src=0)
                model.set_input_tensor(hidden)
                logits = gather_tp_logits(model(ids, position_ids(ids), None))
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        out = runner.export_merged(out_dir)
        # the live model is left as it was (LoRA unmerged again)
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), before[n], rtol=0, atol=1e-6)
    finally:
        runner.close(destroy_model_parallel=False)
    return {"logits": None if logits is None else logits[..., :VOCAB], "out": out}


# ------------------------------------------------------------------ single process (TP=1)


@pytest.mark.parametrize(
    "spec", [HLPT, HLPT_PAPER, LORA_ALL], ids=["hlpt_branch", "hlpt_paper", "lora_all"]
)
def test_tp1_export_with_sidecar_gives_megatron_logits(tp1, tmp_path, spec):
    _hf().save_pretrained(str(tmp_path / "hf"), safe_serialization=True)
    r = _export_body(1, spec, str(tmp_path / "hf"), str(tmp_path / "exported"))
    assert r["out"] == tmp_path / "exported"
    _check_export(tmp_path / "exported", r["logits"], spec, tmp_path)
    if spec is LORA_ALL:  # plain LoRA is merged: nothing in the sidecar, plan all freeze
        assert _sidecar_shapes(tmp_path / "exported") == {}
        meta = json.loads((tmp_path / "exported" / PLAN_FILE).read_text())
        rules = meta["plan"]["rules"]
        assert rules and all(rule["policy"] == "freeze" for rule in rules), rules
        ids = tiny_batch(VOCAB)
        loaded = _load(tmp_path / "exported")
        torch.testing.assert_close(_hf_logits(loaded, ids), r["logits"], rtol=0, atol=ATOL)


def test_plan_without_hf_form_fails_and_writes_nothing(tp1, tmp_path):
    """LoRA named by a megatron module has no HF counterpart: one clear error, no directory."""
    from layerfreeze.engines.megatron.provider import apply_megatron_plan

    hf = _hf()
    model = C.build_gpt_from_hf_config(hf.config, config_overrides=CPU).eval()
    C.load_hf_weights(model, hf.state_dict(), hf.config)
    plan = {
        "rules": [
            {"layers": "all", "policy": "lora", "r": 4, "target": ["linear_fc1"], "gated": True}
        ]
    }
    applied = apply_megatron_plan(model, plan)
    with pytest.raises(ValueError, match="does not apply to the Hugging Face llama model") as e:
        C.export_hf_checkpoint(model, hf.config, tmp_path / "out", applied=applied)
    assert "linear_fc1" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_adapter_without_hf_counterpart_names_layer_and_parameter():
    cfg = _hf().config
    shards = [{"input_layernorm.lora_adapter.lora_a": torch.zeros(4, 64)}]
    with pytest.raises(ValueError, match=r"layer 2 \(decoder\.layers\.1\.input_layernorm"):
        C._adapter_layer_to_hf(shards, {"input_layernorm.lora_adapter.lora_a": None}, cfg, 1, 2)
    shards = [{"mlp.router.weight_lora": torch.zeros(4)}]
    with pytest.raises(ValueError, match="no Hugging Face counterpart"):
        C._adapter_layer_to_hf(shards, {}, cfg, 0, 0)


# ------------------------------------------------------------------ two ranks (slow)


def _tp2_body(rank, world_size, hf_dir, root):
    from tests.helpers.megatron import (
        destroy_model_parallel,
        init_model_parallel,
        megatron_cpu_shim,
    )

    out = {}
    with megatron_cpu_shim():
        init_model_parallel(tp=2, pp=1)
        try:
            for spec in (HLPT, HLPT_PAPER, GATED_ALL, LORA_ALL):
                name = f"{spec[0]}_{'gated' if spec is GATED_ALL else 'plain'}"
                out[name] = _export_body(2, spec, hf_dir, f"{root}/{name}")
        finally:
            destroy_model_parallel()
    return out


@pytest.mark.slow
def test_tp2_export_with_sidecar_gives_megatron_logits(tmp_path):
    _hf().save_pretrained(str(tmp_path / "hf"), safe_serialization=True)
    first, second = run_distributed(
        _tp2_body, world_size=2, args=(str(tmp_path / "hf"), str(tmp_path))
    )
    for name, spec in (
        ("hlpt_branch_plain", HLPT),
        ("hlpt_plain", HLPT_PAPER),
        ("lora_all_gated", GATED_ALL),
        ("lora_all_plain", LORA_ALL),
    ):
        assert first[name]["out"] == tmp_path / name and second[name]["out"] is None
        torch.testing.assert_close(first[name]["logits"], second[name]["logits"], rtol=0, atol=0)
        _check_export(tmp_path / name, first[name]["logits"], spec, tmp_path)
    assert _sidecar_shapes(tmp_path / "lora_all_plain") == {}
    # the fused QKV LoRA became q/k/v LoRAs with one shared A (a copy each)
    with safe_open(str(tmp_path / "lora_all_gated" / SIDECAR_FILE), framework="pt") as f:
        a = [f.get_tensor(f"model.layers.0.self_attn.{p}_proj.lora_adapter.lora_a") for p in "qkv"]
    assert torch.equal(a[0], a[1]) and torch.equal(a[0], a[2])


def _pp2_body(rank, world_size, hf_dir, out_dir):
    from tests.helpers.megatron import (
        destroy_model_parallel,
        init_model_parallel,
        megatron_cpu_shim,
    )

    with megatron_cpu_shim():
        init_model_parallel(tp=1, pp=2)
        try:
            return _export_body(1, HLPT, hf_dir, out_dir)
        finally:
            destroy_model_parallel()


@pytest.mark.slow
def test_pp2_export_with_sidecar_gives_megatron_logits(tmp_path):
    _hf().save_pretrained(str(tmp_path / "hf"), safe_serialization=True)
    first, last = run_distributed(
        _pp2_body, world_size=2, args=(str(tmp_path / "hf"), str(tmp_path / "exported"))
    )
    assert first["out"] == tmp_path / "exported" and last["out"] is None
    assert first["logits"] is None
    _check_export(tmp_path / "exported", last["logits"], HLPT, tmp_path)
