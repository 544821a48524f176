"""Model discovery: blocks, attention / MLP, non-layer parts and head geometry, found generically."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from layerfreeze.models import discover_layout, is_norm_module, param_numel
from tests.helpers.tiny_models import GQA_FAMILIES, TINY_FAMILIES, build_tiny_model

# Expected names written from each architecture's transformers source (not from a run).
EXPECTED = {
    "llama": ("model.layers", "self_attn", "mlp", ["model.embed_tokens"], "model.norm", False),
    "qwen2": ("model.layers", "self_attn", "mlp", ["model.embed_tokens"], "model.norm", False),
    "mistral": ("model.layers", "self_attn", "mlp", ["model.embed_tokens"], "model.norm", False),
    "gpt2": ("transformer.h", "attn", "mlp", ["transformer.wte", "transformer.wpe"], "transformer.ln_f", True),
    "gpt_neox": ("gpt_neox.layers", "attention", "mlp", ["gpt_neox.embed_in"], "gpt_neox.final_layer_norm", False),
}


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_discover_tiny_families(family):
    model = build_tiny_model(family, num_layers=3)
    layout = discover_layout(model)
    blocks, attn, mlp, emb, norm, tied = EXPECTED[family]
    cfg = model.config
    assert layout.num_layers == 3
    assert [x.index for x in layout.layers] == [0, 1, 2]
    assert [x.name for x in layout.layers] == [f"{blocks}.{i}" for i in range(3)]
    assert all(x.attn_name == attn and x.mlp_name == mlp for x in layout.layers)
    assert layout.layers[1].module is model.get_submodule(f"{blocks}.1")
    assert layout.layers[1].attn is model.get_submodule(f"{blocks}.1.{attn}")
    assert layout.embeddings == emb
    assert layout.final_norm == norm
    assert layout.lm_head == "lm_head"
    assert layout.tied_embeddings is tied
    assert layout.hidden_size == 64 and layout.num_heads == 4 and layout.head_dim == 16
    assert layout.num_kv_heads == (2 if family in GQA_FAMILIES else 4)
    assert layout.model_type == cfg.model_type


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_discover_on_meta_device(family):
    cfg = build_tiny_model(family, num_layers=2).config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    layout = discover_layout(model)
    assert layout.num_layers == 2 and layout.layers[0].attn_name


def _meta(model_type, **kw):
    base = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                vocab_size=128)
    cfg = AutoConfig.for_model(model_type, **{**base, **kw})
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


@pytest.mark.parametrize(
    "model_type,kw,expect",
    [
        # (attn, mlp, kv heads, final norm) from each family's modeling file.
        ("gemma", dict(num_key_value_heads=1, head_dim=16), ("self_attn", "mlp", 1, "model.norm")),
        ("falcon", dict(), ("self_attention", "mlp", 1, "transformer.ln_f")),  # multi_query default
        ("bloom", dict(n_layer=2, n_head=4), ("self_attention", "mlp", 4, "transformer.ln_f")),
        ("mixtral", dict(num_key_value_heads=2, num_local_experts=2), ("self_attn", "mlp", 2, "model.norm")),
        ("olmo", dict(num_key_value_heads=2), ("self_attn", "mlp", 2, None)),  # norm has no params
    ],
)
def test_discover_other_families_generically(model_type, kw, expect):
    layout = discover_layout(_meta(model_type, **kw))
    attn, mlp, kv, norm = expect
    assert layout.num_layers == 2
    assert (layout.layers[0].attn_name, layout.layers[0].mlp_name) == (attn, mlp)
    assert layout.num_kv_heads == kv and layout.final_norm == norm


def test_mlp_linears_directly_on_the_block():
    # OPT's decoder layer holds fc1 / fc2 itself (modeling_opt.OPTDecoderLayer), no MLP child.
    model = _meta("opt", ffn_dim=128, word_embed_proj_dim=64)
    layer = discover_layout(model).layers[1]
    assert (layer.attn_name, layer.mlp_name, layer.mlp_linears) == ("self_attn", "", ("fc1", "fc2"))
    assert not layer.has_mlp_module and layer.mlp is layer.module
    assert layer.mlp_modules() == [("fc1", layer.module.fc1), ("fc2", layer.module.fc2)]


class _AttnOnlyBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.self_attn = nn.MultiheadAttention(8, 2)
        self.extra = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8), nn.Linear(8, 8))
        self.other = nn.Sequential(nn.Linear(8, 8))


def test_unsupported_block_names_what_is_missing():
    with pytest.raises(ValueError) as e:
        discover_layout(nn.ModuleDict({"blocks": nn.ModuleList([_AttnOnlyBlock()])}))
    msg = str(e.value)
    assert "blocks.0 (_AttnOnlyBlock)" in msg and "the MLP (no MLP submodule" in msg
    assert "extra (Sequential)" in msg  # the block's children are listed


class _NoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)


def test_no_block_list_is_a_clear_error():
    with pytest.raises(ValueError, match="could not find the decoder blocks"):
        discover_layout(_NoBlocks())


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.mixer = nn.Linear(8, 8)
        self.proj = nn.Linear(8, 8)


class _Custom(nn.Module):
    """A hand-written decoder: no transformers classes, non-standard child names."""

    def __init__(self, n=3):
        super().__init__()
        self.tok = nn.Embedding(10, 8)
        self.blocks = nn.ModuleList(_Block() for _ in range(n))
        self.out_norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 10, bias=False)
        self.config = type("Cfg", (), {"hidden_size": 8, "num_attention_heads": 2, "num_hidden_layers": n})()

    def get_input_embeddings(self):
        return self.tok

    def get_output_embeddings(self):
        return self.head


def test_structural_fallback_on_a_custom_model():
    layout = discover_layout(_Custom())
    assert layout.num_layers == 3 and layout.layers[2].name == "blocks.2"
    # Attention runs before the MLP in every decoder block: first / second non-norm child.
    assert (layout.layers[0].attn_name, layout.layers[0].mlp_name) == ("mixer", "proj")
    assert layout.embeddings == ["tok"] and layout.final_norm == "out_norm" and layout.lm_head == "head"
    assert layout.num_kv_heads == 2 and layout.head_dim == 4 and not layout.tied_embeddings


def test_layer_count_mismatch_with_config_is_an_error():
    m = _Custom(3)
    m.config.num_hidden_layers = 5
    with pytest.raises(ValueError, match="num_hidden_layers is 5"):
        discover_layout(m)


def test_missing_geometry_is_named():
    m = _Custom()
    m.config = type("Cfg", (), {})()
    with pytest.raises(ValueError, match="hidden_size, num_attention_heads"):
        discover_layout(m)


def test_helpers():
    assert is_norm_module(nn.LayerNorm(4)) and not is_norm_module(nn.Linear(4, 4))
    p = nn.Parameter(torch.zeros(0))
    p.ds_numel = 12  # what ZeRO-3 leaves on a partitioned parameter
    assert param_numel(p) == 12 and param_numel(nn.Parameter(torch.zeros(3, 2))) == 6
