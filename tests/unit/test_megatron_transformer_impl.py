"""Local spec <-> Transformer Engine spec state-dict names (``megatron.transformer_impl``), on CPU.

Transformer Engine cannot be installed on the CPU machines, so no TE model is built here: the
names a TE-spec model has are written out below from reading the sources (checked lines):

* megatron-core 0.16.1 ``megatron/core/models/gpt/gpt_layer_specs.py``:
  ``get_gpt_layer_with_transformer_engine_spec`` l.271-291 (``linear_qkv =
  backend.column_parallel_layer_norm_linear()``, ``core_attention``, ``linear_proj``; no
  ``input_layernorm`` given, so the ``TransformerLayerSubmodules`` default ``IdentityOp``;
  ``pre_mlp_layernorm = backend.layer_norm() if num_experts else IdentityOp``) and
  ``get_mlp_module_spec_for_backend`` l.489-503 (dense MLP: ``linear_fc1 =
  backend.column_parallel_layer_norm_linear()``, ``linear_fc2 = backend.row_parallel_linear()``);
* megatron-core 0.16.1 ``megatron/core/extensions/transformer_engine_spec_provider.py``
  l.44-46 (``TELayerNormColumnParallelLinear``) and ``extensions/transformer_engine.py`` l.711
  (``class TELayerNormColumnParallelLinear(te.pytorch.LayerNormLinear)``), l.433-467 (``TENorm``:
  a TE ``RMSNorm`` / ``LayerNorm``, the final norm through ``transformer_block.py`` l.61
  ``LayerNormImpl = TENorm``);
* TransformerEngine (commit d0067d0, 2.20.0.dev0)
  ``transformer_engine/pytorch/module/layernorm_linear.py`` l.1449-1465 (``layer_norm_weight``;
  ``layer_norm_bias`` only when ``normalization != "RMSNorm"``), l.1491-1492 (``weight`` /
  ``bias`` names), l.1568-1571 (``bias=False``: a plain attribute, not in the state dict);
  ``module/base.py`` l.1354-1393 (``get_extra_state``: an empty uint8 tensor without FP8);
  ``ops/basic/rmsnorm.py`` l.107 (the final norm's ``weight``).

The tests below fail on the old code (no such mapping: ``to_transformer_impl`` etc. do not
exist, and ``megatron_to_hf`` / the export reject TE names).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from layerfreeze.engines.megatron import hf_weights as W
from tests.helpers.tiny_models import build_tiny_model

LAYERS = 2


def _hf(family: str):
    return build_tiny_model(family, num_layers=LAYERS, num_heads=4, num_kv_heads=2, vocab_size=100)


def _te_names(qkv_bias: bool) -> set[str]:
    """Every parameter name of a TE-spec GPTModel (untied, one stage), from the sources above."""
    per_layer = [
        "self_attention.linear_qkv.layer_norm_weight",  # fused input_layernorm (RMSNorm: no bias)
        "self_attention.linear_qkv.weight",
        "self_attention.linear_proj.weight",
        "mlp.linear_fc1.layer_norm_weight",  # fused pre_mlp_layernorm
        "mlp.linear_fc1.weight",
        "mlp.linear_fc2.weight",
    ] + (["self_attention.linear_qkv.bias"] if qkv_bias else [])
    return {
        "embedding.word_embeddings.weight",
        *(f"decoder.layers.{j}.{n}" for j in range(LAYERS) for n in per_layer),
        "decoder.final_layernorm.weight",
        "output_layer.weight",
    }


def _te_extra_states() -> dict[str, torch.Tensor]:
    """The ``_extra_state`` entries the TE modules of that model add (TE base module per
    linear and attention, the final TE norm op), each as TE writes it without FP8."""
    owners = [
        f"decoder.layers.{j}.{m}"
        for j in range(LAYERS)
        for m in (
            "self_attention.linear_qkv",
            "self_attention.core_attention",
            "self_attention.linear_proj",
            "mlp.linear_fc1",
            "mlp.linear_fc2",
        )
    ] + ["decoder.final_layernorm"]
    return {f"{o}._extra_state": torch.empty(0, dtype=torch.uint8) for o in owners}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_local_to_te_names_and_back_is_the_identity(family):
    hf = _hf(family)
    local = W.hf_to_megatron(hf.state_dict(), hf.config)
    te = W.to_transformer_impl(local, "transformer_engine")
    assert set(te) == _te_names(qkv_bias=family == "qwen2")
    for j in range(LAYERS):  # the same tensors, renamed
        m = f"decoder.layers.{j}."
        assert te[m + "self_attention.linear_qkv.layer_norm_weight"] is local[m + "input_layernorm.weight"]
        assert te[m + "mlp.linear_fc1.layer_norm_weight"] is local[m + "pre_mlp_layernorm.weight"]
    back = W.to_local_spec(te)
    assert list(back) == list(local)
    assert all(back[k] is local[k] for k in local)
    assert W.to_transformer_impl(local, "local") == local
    assert W.to_local_spec(local) == local


def test_hf_to_megatron_names_the_te_spec_and_te_names_convert_back_to_hf():
    hf = _hf("qwen2")
    hf_sd = dict(hf.state_dict())
    te = W.hf_to_megatron(hf_sd, hf.config, transformer_impl="transformer_engine")
    assert set(te) == _te_names(qkv_bias=True)
    te.update(_te_extra_states())  # what a TE model's state_dict() also holds
    back = W.megatron_to_hf([te], hf.config)
    assert set(back) == set(hf_sd)
    for k, v in hf_sd.items():
        assert torch.equal(back[k], v), k


def test_te_spec_layernorm_models_keep_the_norm_bias():
    # no supported HF architecture uses LayerNorm today; the names follow TE's layer_norm_bias
    local = {
        "decoder.layers.0.input_layernorm.bias": torch.zeros(2),
        "decoder.layers.0.pre_mlp_layernorm.bias": torch.ones(2),
    }
    te = W.to_transformer_impl(local, "transformer_engine")
    assert set(te) == {
        "decoder.layers.0.self_attention.linear_qkv.layer_norm_bias",
        "decoder.layers.0.mlp.linear_fc1.layer_norm_bias",
    }
    assert W.to_local_spec(te) == local


def test_wrapped_names_keep_their_prefix():
    # DDP / Float16Module wrapping (module.module.decoder...) and virtual chunks ("0.decoder...")
    names = {
        "module.module.decoder.layers.3.input_layernorm.weight": 1,
        "0.decoder.layers.1.pre_mlp_layernorm.weight": 2,
        "module.decoder.final_layernorm.weight": 3,
    }
    te = W.to_transformer_impl(names, "transformer_engine")
    assert te == {
        "module.module.decoder.layers.3.self_attention.linear_qkv.layer_norm_weight": 1,
        "0.decoder.layers.1.mlp.linear_fc1.layer_norm_weight": 2,
        "module.decoder.final_layernorm.weight": 3,
    }
    assert W.to_local_spec(te) == names


def test_transformer_impl_of_reads_the_names():
    hf = _hf("llama")
    local = W.hf_to_megatron(hf.state_dict(), hf.config)
    assert W.transformer_impl_of(local) == "local"
    assert W.transformer_impl_of(W.to_transformer_impl(local, "transformer_engine")) == (
        "transformer_engine"
    )


def test_unknown_transformer_impl_is_refused():
    with pytest.raises(ValueError, match=r"transformer_impl: must be 'local' or 'transformer_engine', got 'te'"):
        W.to_transformer_impl({}, "te")


@pytest.fixture
def tp1():
    """megatron-core on the CPU with TP=1, PP=1 in this process (torn down afterwards)."""
    from tests.helpers.megatron import megatron_parallel

    with megatron_parallel(tp=1, pp=1):
        yield


def test_export_of_a_te_named_state_dict_gives_the_hf_weights(tp1):
    """gather_hf_state_dict (the export's gather) takes a TE model's state dict: fused-norm
    names and _extra_state entries, on a real local-spec GPTModel's stage layout."""
    from layerfreeze.engines.megatron import convert as C

    hf = _hf("llama")
    model = C.build_gpt_from_hf_config(hf.config, config_overrides={"use_cpu_initialization": True})
    C.load_hf_weights(model, hf.state_dict(), hf.config)
    te_sd = W.to_transformer_impl(model.state_dict(), "transformer_engine")
    te_sd.update(_te_extra_states())
    back = C.gather_hf_state_dict(model, hf.config, state_dict=te_sd)
    expected = dict(hf.state_dict())
    assert set(back) == set(expected)
    for k, v in expected.items():
        assert torch.equal(back[k], v), k


def _source(module: str) -> str:
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin, module
    return Path(spec.origin).read_text(encoding="utf-8")


def test_megatron_te_spec_fuses_the_norms_the_mapping_renames():
    """The installed megatron-core still builds the TE spec the mapping was written for (read
    from its source: the TE wrappers cannot be imported without Transformer Engine)."""
    specs = _source("megatron.core.models.gpt.gpt_layer_specs")
    assert "linear_qkv=backend.column_parallel_layer_norm_linear()," in specs
    assert "pre_mlp_layernorm=backend.layer_norm() if num_experts else IdentityOp," in specs
    assert "linear_fc1 = backend.column_parallel_layer_norm_linear()" in specs
    provider = _source("megatron.core.extensions.transformer_engine_spec_provider")
    assert "return TELayerNormColumnParallelLinear" in provider
    wrappers = _source("megatron.core.extensions.transformer_engine")
    assert "class TELayerNormColumnParallelLinear(te.pytorch.LayerNormLinear):" in wrappers
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.transformer_layer import TransformerLayerSubmodules

    assert TransformerLayerSubmodules().input_layernorm is IdentityOp


def _te_runs_here() -> bool:
    from megatron.core.extensions import transformer_engine as mte

    return torch.cuda.is_available() and bool(mte.HAVE_TE)


@pytest.mark.skipif(_te_runs_here(), reason="CUDA and Transformer Engine present: it would build")
def test_building_the_te_spec_without_cuda_or_te_is_refused_before_building(tp1):
    from layerfreeze.engines.megatron import convert as C

    hf = _hf("llama")
    with pytest.raises(ImportError) as info:
        C.build_gpt_from_hf_config(
            hf.config,
            config_overrides={"use_cpu_initialization": True},
            backend="layerfreeze",
            transformer_impl="transformer_engine",
        )
    line = str(info.value)
    assert "\n" not in line
    assert line.startswith("megatron.transformer_impl: transformer_engine needs CUDA")
    assert "Set megatron.transformer_impl: local" in line


def test_the_build_names_its_layer_spec_and_refuses_unknown_ones(tp1):
    from layerfreeze.engines.megatron import convert as C

    hf = _hf("llama")
    with pytest.raises(ValueError, match=r"transformer_impl: must be one of local, transformer_engine, got 'te'"):
        C.build_gpt_from_hf_config(hf.config, backend="layerfreeze", transformer_impl="te")
    model = C.build_gpt_from_hf_config(
        hf.config, config_overrides={"use_cpu_initialization": True}, backend="layerfreeze"
    )
    assert getattr(model, C.TRANSFORMER_IMPL_ATTR) == "local"
    assert W.transformer_impl_of(model.state_dict()) == "local"
