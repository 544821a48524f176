"""Seeded tiny random-weight decoder-only models for tests (no model hub needed).

Usage::

    from tests.helpers.tiny_models import TINY_FAMILIES, build_tiny_model, tiny_batch
    model = build_tiny_model("llama", num_layers=4)           # eval mode, float32, seeded
    ids = tiny_batch(model)                                    # (2, 8) token ids, seeded
"""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    Qwen2Config,
)

#: Every family the core is tested on. Llama / Qwen2 / Mistral use grouped-query attention.
TINY_FAMILIES: list[str] = ["llama", "qwen2", "mistral", "gpt2", "gpt_neox"]

#: Families whose tiny configs use GQA (num_key_value_heads < num_attention_heads).
GQA_FAMILIES: list[str] = ["llama", "qwen2", "mistral"]


def tiny_config(
    family: str,
    num_layers: int = 4,
    hidden: int = 64,
    num_heads: int = 4,
    num_kv_heads: int | None = 2,
    intermediate: int | None = None,
    vocab_size: int = 128,
    max_positions: int = 128,
    attn_implementation: str = "eager",
    tie_word_embeddings: bool | None = None,
    initializer_range: float = 0.1,
    **extra,
) -> PretrainedConfig:
    """Config of a tiny model of ``family`` (one of :data:`TINY_FAMILIES`).

    Args:
        family: model family key.
        num_layers: number of decoder blocks.
        hidden: hidden size.
        num_heads: attention heads.
        num_kv_heads: key/value heads for GQA families (ignored by GPT-2 / GPT-NeoX).
        intermediate: MLP width (default ``2 * hidden``; GPT-2 uses ``4 * hidden``).
        vocab_size: vocabulary size.
        max_positions: maximum sequence length.
        attn_implementation: ``"eager"`` or ``"sdpa"``.
        tie_word_embeddings: override the family's default tying (GPT-2 ties, the others not).
        initializer_range: std of the random init (larger than HF's 0.02 so signals are not tiny).
        **extra: further config fields (e.g. ``reorder_and_upcast_attn=True`` for GPT-2).
    """
    inter = intermediate or 2 * hidden
    kv = num_kv_heads or num_heads
    common = dict(vocab_size=vocab_size, initializer_range=initializer_range, **extra)
    if family == "llama":
        cfg = LlamaConfig(
            hidden_size=hidden, num_hidden_layers=num_layers, num_attention_heads=num_heads,
            num_key_value_heads=kv, intermediate_size=inter, max_position_embeddings=max_positions,
            **common,
        )
    elif family == "qwen2":
        cfg = Qwen2Config(
            hidden_size=hidden, num_hidden_layers=num_layers, num_attention_heads=num_heads,
            num_key_value_heads=kv, intermediate_size=inter, max_position_embeddings=max_positions,
            use_sliding_window=False, **common,
        )
    elif family == "mistral":
        cfg = MistralConfig(
            hidden_size=hidden, num_hidden_layers=num_layers, num_attention_heads=num_heads,
            num_key_value_heads=kv, intermediate_size=inter, max_position_embeddings=max_positions,
            sliding_window=None, **common,
        )
    elif family == "gpt2":
        cfg = GPT2Config(
            n_embd=hidden, n_layer=num_layers, n_head=num_heads, n_inner=intermediate,
            n_positions=max_positions, bos_token_id=0, eos_token_id=0, **common,
        )
    elif family == "gpt_neox":
        cfg = GPTNeoXConfig(
            hidden_size=hidden, num_hidden_layers=num_layers, num_attention_heads=num_heads,
            intermediate_size=inter, max_position_embeddings=max_positions,
            bos_token_id=0, eos_token_id=0, **common,
        )
    else:
        raise ValueError(f"family: unknown tiny family {family!r}. Valid: {', '.join(TINY_FAMILIES)}.")
    if tie_word_embeddings is not None:
        cfg.tie_word_embeddings = tie_word_embeddings
    cfg._attn_implementation = attn_implementation
    return cfg


def build_tiny_model(
    family: str,
    num_layers: int = 4,
    hidden: int = 64,
    num_heads: int = 4,
    num_kv_heads: int | None = 2,
    vocab_size: int = 128,
    attn_implementation: str = "eager",
    seed: int = 0,
    tie_word_embeddings: bool | None = None,
    **config_kwargs,
) -> torch.nn.Module:
    """A seeded tiny random-weight causal LM of ``family`` in eval mode (float32, CPU).

    The same arguments and seed always give bit-identical weights.
    """
    cfg = tiny_config(
        family, num_layers=num_layers, hidden=hidden, num_heads=num_heads,
        num_kv_heads=num_kv_heads, vocab_size=vocab_size,
        attn_implementation=attn_implementation, tie_word_embeddings=tie_word_embeddings,
        **config_kwargs,
    )
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn_implementation)
    finally:
        torch.random.set_rng_state(state)
    return model.float().eval()


def tiny_batch(model_or_vocab: torch.nn.Module | int, batch: int = 2, seq: int = 8, seed: int = 1) -> torch.Tensor:
    """Seeded random token ids of shape ``(batch, seq)`` for a model (or a vocabulary size)."""
    vocab = model_or_vocab if isinstance(model_or_vocab, int) else model_or_vocab.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


# ------------------------------------------------------------------ hand-computed parameter counts
# Independent of the library: written from each architecture's definition.


def _geometry(cfg: PretrainedConfig) -> tuple[int, int, int, int, int]:
    h = cfg.hidden_size
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    hd = h // heads
    inter = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * h
    return h, heads, kv, hd, inter


def hand_param_counts(family: str, cfg: PretrainedConfig) -> dict[str, int]:
    """Parameters of one decoder layer, the embeddings, the final norm and the (untied) head."""
    h, _heads, kv, hd, inter = _geometry(cfg)
    v = cfg.vocab_size
    if family in ("llama", "mistral", "qwen2"):
        attn = 2 * h * h + 2 * h * kv * hd + (h + 2 * kv * hd if family == "qwen2" else 0)
        layer = attn + 3 * h * inter + 2 * h
        emb, norm = v * h, h
    elif family == "gpt2":
        layer = 2 * h + (h * 3 * h + 3 * h) + (h * h + h) + 2 * h + (h * inter + inter) + (inter * h + h)
        emb, norm = v * h + cfg.n_positions * h, 2 * h
    elif family == "gpt_neox":
        layer = 4 * h + (h * 3 * h + 3 * h) + (h * h + h) + (h * inter + inter) + (inter * h + h)
        emb, norm = v * h, 2 * h
    else:
        raise ValueError(family)
    head = 0 if cfg.tie_word_embeddings else v * h
    return {"layer": layer, "embeddings": emb, "final_norm": norm, "lm_head": head}


def hand_lora_params(family: str, cfg: PretrainedConfig, r: int, target: str, gated: bool) -> int:
    """LoRA parameters of one layer: r * (in + out) per adapted linear, + (h + 1) per gated sub-block."""
    h, _heads, kv, hd, inter = _geometry(cfg)
    if family in ("llama", "mistral", "qwen2"):
        attn = [(h, h), (h, kv * hd), (h, kv * hd), (h, h)]
        mlp = [(h, inter), (h, inter), (inter, h)]
    else:  # gpt2 / gpt_neox: fused qkv + output projection; two MLP linears
        attn = [(h, 3 * h), (h, h)]
        mlp = [(h, inter), (inter, h)]
    parts = {"attn": [attn], "mlp": [mlp], "all": [attn, mlp]}[target]
    return sum(r * (i + o) for sub in parts for i, o in sub) + (h + 1) * len(parts) * int(gated)


def hand_prefix_params(cfg: PretrainedConfig, tokens: int, gated: bool, form: str = "branch") -> int:
    """Prefix parameters of one layer: keys + values per kv head, a factor per head (the branch
    form only), the gate."""
    h, heads, kv, hd, _ = _geometry(cfg)
    return 2 * kv * tokens * hd + (heads if form == "branch" else 0) + (h + 1) * int(gated)


# ------------------------------------------------------------------ the family matrix
# Every decoder-only family of transformers 5.23 with a small config that builds on CPU:
# key -> (config.model_type, config fields). Tiny: 4 layers (so hlpt has LoRA and prefix
# layers), hidden 32, 4 heads (2 key/value heads where the family has GQA), vocabulary 128.

_M = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64)
_GQA = dict(_M, num_key_value_heads=2)
_GPT = dict(n_embd=32, n_layer=4, n_head=4)
MATRIX_FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("llama", _GQA),
    "mistral": ("mistral", dict(_GQA, sliding_window=None)),
    "mixtral": ("mixtral", dict(_GQA, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2": ("qwen2", dict(_GQA, use_sliding_window=False)),
    "qwen2_moe": ("qwen2_moe", dict(
        _GQA, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
    )),
    "qwen3": ("qwen3", dict(_GQA, head_dim=8)),
    "gemma": ("gemma", dict(_GQA, head_dim=8)),
    "gemma2": ("gemma2", dict(_GQA, head_dim=8, query_pre_attn_scalar=8)),
    "gemma3_text": ("gemma3_text", dict(_GQA, head_dim=8, query_pre_attn_scalar=8)),
    "phi": ("phi", dict(_M, partial_rotary_factor=0.5)),
    "phi3": ("phi3", _GQA),
    "gpt2": ("gpt2", _GPT),
    "gptj": ("gptj", dict(_GPT, rotary_dim=4)),
    "gpt_neox": ("gpt_neox", _M),
    "codegen": ("codegen", dict(_GPT, rotary_dim=4)),
    "falcon": ("falcon", dict(_M)),  # Falcon-7B style: multi-query, parallel attention, rotary
    "bloom": ("bloom", dict(hidden_size=32, n_layer=4, n_head=4)),
    "opt": ("opt", dict(_M, ffn_dim=64, word_embed_proj_dim=32)),
    "stablelm": ("stablelm", _GQA),
    "starcoder2": ("starcoder2", dict(_GQA, sliding_window=None)),
    "gpt_bigcode": ("gpt_bigcode", _GPT),
    "olmo2": ("olmo2", _GQA),
    "cohere": ("cohere", _GQA),
    "glm": ("glm", dict(_GQA, head_dim=8)),
    # Multi-head latent attention; layers 0-2 dense, layer 3 MoE.
    "deepseek_v3": ("deepseek_v3", dict(
        _M, num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4,
        qk_nope_head_dim=8, v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=16, n_shared_experts=1, first_k_dense_replace=3, n_group=1,
        topk_group=1,
    )),
}


def matrix_config(family: str) -> PretrainedConfig:
    """The tiny config of a :data:`MATRIX_FAMILIES` family (eager attention, seeded-init std)."""
    from transformers import AutoConfig

    model_type, fields = MATRIX_FAMILIES[family]
    cfg = AutoConfig.for_model(
        model_type, vocab_size=128, max_position_embeddings=64, pad_token_id=0, bos_token_id=0,
        eos_token_id=0, initializer_range=0.1, **fields,
    )
    cfg._attn_implementation = "eager"
    return cfg


def build_matrix_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A seeded tiny random-weight model of a :data:`MATRIX_FAMILIES` family (eval, float32)."""
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(matrix_config(family), attn_implementation="eager")
    finally:
        torch.random.set_rng_state(state)
    return model.float().eval()
