"""Weights between Hugging Face and Megatron-core layouts for Llama-style models.

Covers Hugging Face ``llama``, ``mistral`` and ``qwen2`` causal LMs (RMSNorm, rotary positions,
grouped-query attention, SwiGLU MLP) and megatron-core's ``GPTModel`` built from
``get_gpt_layer_local_spec(normalization="RMSNorm")`` (the spec that runs without Transformer
Engine; its layer norms are the modules ``input_layernorm`` / ``pre_mlp_layernorm``).

* :func:`megatron_config_kwargs` / :func:`gpt_model_kwargs`: the ``TransformerConfig`` and
  ``GPTModel`` arguments of an HF config; :func:`build_gpt_from_hf_config` builds the model of one
  pipeline stage (or virtual chunk).
* :func:`hf_to_megatron`: the state dict of one tensor-parallel rank of one pipeline stage, from a
  full HF state dict (pure tensor code). :func:`load_hf_weights` loads an HF directory or state
  dict into a built model, each rank reading only the tensors it holds.
* :func:`megatron_to_hf`: the reverse, from the TP shards of one stage (pure).
  :func:`gather_hf_state_dict` collects a distributed model layer by layer on one rank;
  :func:`save_hf_checkpoint` writes ``config.json`` + safetensors atomically;
  :func:`export_hf_checkpoint` does both (a collective call).

Layouts (megatron-core 0.16.1, ``transformer/attention.py::SelfAttention``):

* ``linear_qkv.weight`` rows are grouped by query group ``g``: the ``heads / groups`` query heads
  of ``g``, then the key head of ``g``, then its value head. Tensor parallelism gives rank ``r``
  the ``r``-th contiguous row block (whole groups when ``groups % tp == 0``).
* ``linear_fc1.weight`` of the gated MLP: each rank's rows are ``[gate_r; up_r]`` (``MLP`` chunks
  its local output in two), so the full matrix is not ``[gate; up]`` once ``tp > 1``.
* Embeddings and output layer are split by vocabulary rows; the vocabulary is padded with zero
  rows to a multiple of ``make_vocab_size_divisible_by * tp`` (Megatron-LM's rule) and the padding
  is stripped on the way back. A padded row gives a logit of 0 (as in Megatron-LM).
* Layers are numbered globally in HF (``model.layers.{i}``) and per stage in megatron
  (``decoder.layers.{j}``, with ``layer_number = i + 1`` global).

When Megatron-Bridge (``megatron.bridge``) is importable and the HF directory is known
(``build_gpt_from_hf_config(..., hf_path=DIR)``), ``backend="auto"`` hands building, loading and
exporting to its ``AutoBridge`` (its own Transformer-Engine specs and mappings; the model
remembers which backend built it). Otherwise, or with ``backend="layerfreeze"``, the code here
does it. The Bridge path is not exercised on CPU machines (Bridge needs Transformer Engine and
CUDA), so it is kept to Bridge's documented calls: ``AutoBridge.from_hf_pretrained``,
``to_megatron_provider(load_weights=False)``, ``provide``, ``load_hf_weights`` and
``save_hf_pretrained``.

Vocabulary padding changes the training loss slightly (the zero rows add ``exp(0)`` terms to the
softmax, as in Megatron-LM); pass ``make_vocab_size_divisible_by=1`` (pads only to a multiple of
the TP size) when the loss must equal the HF model's exactly.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from layerfreeze.engines.common import unwrap_module
from layerfreeze.utils.io import atomic_directory, atomic_write_json
from layerfreeze.utils.logging import get_logger, log_rank0

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "bridge_available",
    "megatron_config_kwargs",
    "gpt_model_kwargs",
    "padded_vocab_size",
    "build_gpt_from_hf_config",
    "hf_keys_for",
    "hf_to_megatron",
    "megatron_to_hf",
    "load_hf_state_dict",
    "load_hf_weights",
    "gather_hf_state_dict",
    "save_hf_checkpoint",
    "export_hf_checkpoint",
    "export_runner_to_hf",
    "gather_hf_sidecar",
]

logger = get_logger(__name__)

#: HF ``model_type`` values this module maps (all Llama-style decoders).
SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("llama", "mistral", "qwen2")

Backend = Literal["auto", "bridge", "layerfreeze"]
_BACKEND_ATTR = "_layerfreeze_hf_backend"
_HF_PATH_ATTR = "_layerfreeze_hf_path"
#: HF model class written into ``config.json`` when the config does not name one.
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}


# ---------------------------------------------------------------------------------------------
# Config mapping


def bridge_available() -> bool:
    """Whether Megatron-Bridge (``megatron.bridge``) is importable."""
    try:
        return importlib.util.find_spec("megatron.bridge") is not None
    except (ImportError, ValueError):
        return False


def _resolve_backend(backend: Backend, hf_path: Any = None) -> str:
    """Resolve "auto": Megatron-Bridge when it is importable and an HF directory is known."""
    if backend not in ("auto", "bridge", "layerfreeze"):
        raise ValueError(f"backend: got {backend!r}; valid: 'auto', 'bridge', 'layerfreeze'.")
    if backend == "bridge" and not bridge_available():
        raise ImportError(
            "backend='bridge': megatron.bridge (Megatron-Bridge) is not installed; install it "
            "or use backend='layerfreeze'."
        )
    if backend == "bridge" and hf_path is None:
        raise ValueError("backend='bridge': pass hf_path (the Hugging Face checkpoint directory).")
    if backend == "auto":
        return "bridge" if bridge_available() and hf_path is not None else "layerfreeze"
    return backend


def _where(hf_config: Any) -> str:
    name = getattr(hf_config, "_name_or_path", "") or ""
    return f"{name}: " if name else ""


def _check_supported(hf_config: Any) -> str:
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        archs = getattr(hf_config, "architectures", None) or []
        arch = f" ({', '.join(archs)})" if archs else ""
        raise ValueError(
            f"{_where(hf_config)}Hugging Face model_type {model_type!r}{arch} has no Megatron "
            f"mapping; supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}."
        )
    return model_type


def _rope_theta(hf_config: Any) -> float:
    """``rope_theta`` of a plain-RoPE config; refuses any RoPE scaling (transformers 4 and 5)."""
    params = getattr(hf_config, "rope_parameters", None)
    scaling = getattr(hf_config, "rope_scaling", None)
    for p in (params, scaling):
        if isinstance(p, Mapping):
            rope_type = p.get("rope_type", p.get("type", "default"))
            if rope_type not in (None, "default"):
                raise ValueError(
                    f"{_where(hf_config)}rope scaling {rope_type!r} ({dict(p)}) is not supported "
                    "by the Megatron mapping (plain RoPE only); convert a model without rope "
                    "scaling."
                )
            if p.get("partial_rotary_factor", 1.0) != 1.0:
                raise ValueError(
                    f"{_where(hf_config)}partial_rotary_factor={p['partial_rotary_factor']} is not "
                    "supported by the Megatron mapping (full rotary embedding only)."
                )
    if isinstance(params, Mapping) and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(getattr(hf_config, "rope_theta", 10000.0))


def _sliding_window(hf_config: Any, model_type: str) -> int | None:
    """The active sliding-window size, or None when every layer attends to the full context."""
    window = getattr(hf_config, "sliding_window", None)
    if not window:
        return None
    if model_type == "qwen2":
        layer_types = getattr(hf_config, "layer_types", None)
        if layer_types is not None:
            return window if "sliding_attention" in layer_types else None
        return window if getattr(hf_config, "use_sliding_window", False) else None
    return window


def _head_dim(hf_config: Any) -> int:
    return getattr(hf_config, "head_dim", None) or (
        hf_config.hidden_size // hf_config.num_attention_heads
    )


def megatron_config_kwargs(hf_config: Any, *, seq_length: int | None = None) -> dict[str, Any]:
    """``TransformerConfig`` keyword arguments describing the architecture of ``hf_config``.

    Only architecture fields are returned (no parallel sizes, dtypes or fusions): add those
    yourself, e.g. ``TransformerConfig(**kw, tensor_model_parallel_size=2, bf16=True)``.

    Args:
        hf_config: a Hugging Face ``LlamaConfig`` / ``MistralConfig`` / ``Qwen2Config``.
        seq_length: the training sequence length, when known. A sliding window at least this
            long never masks anything, so such a model is accepted; without it the model's
            ``max_position_embeddings`` is the length checked.

    Returns:
        num_layers, hidden_size, ffn_hidden_size, num_attention_heads, num_query_groups,
        kv_channels, normalization, layernorm_epsilon, gated_linear_unit, activation_func,
        add_bias_linear, add_qkv_bias, qk_layernorm, hidden_dropout, attention_dropout,
        init_method_std.

    Raises:
        ValueError: the architecture has no mapping (names it and lists the supported ones), or
            uses a feature the mapping cannot express (rope scaling, an active sliding window,
            attention/MLP biases on Llama, an activation other than SiLU).
    """
    import torch.nn.functional as F

    model_type = _check_supported(hf_config)
    where = _where(hf_config)
    act = getattr(hf_config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(
            f"{where}hidden_act={act!r} is not supported by the Megatron mapping (SwiGLU with "
            "silu only)."
        )
    _rope_theta(hf_config)  # refuses rope scaling
    window = _sliding_window(hf_config, model_type)
    length = seq_length or hf_config.max_position_embeddings
    if window is not None and window < length:
        raise ValueError(
            f"{where}{model_type} sliding_window={window} is smaller than the sequence length "
            f"{length} ({'seq_length' if seq_length else 'max_position_embeddings'}); the "
            "Megatron mapping has no sliding-window attention. Train with seq_length <= "
            f"{window} (pass seq_length) or use a model without a sliding window."
        )
    if model_type == "llama" and (
        getattr(hf_config, "attention_bias", False) or getattr(hf_config, "mlp_bias", False)
    ):
        raise ValueError(
            f"{where}llama attention_bias={getattr(hf_config, 'attention_bias', False)}, "
            f"mlp_bias={getattr(hf_config, 'mlp_bias', False)}: biased projections are not "
            "supported by the Megatron mapping (bias-free Llama only)."
        )
    heads = hf_config.num_attention_heads
    groups = getattr(hf_config, "num_key_value_heads", None) or heads
    if heads % groups:
        raise ValueError(
            f"{where}num_attention_heads={heads} is not a multiple of num_key_value_heads={groups}."
        )
    return dict(
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        ffn_hidden_size=hf_config.intermediate_size,
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=_head_dim(hf_config),
        normalization="RMSNorm",
        layernorm_epsilon=float(hf_config.rms_norm_eps),
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=model_type == "qwen2",
        qk_layernorm=False,
        hidden_dropout=0.0,
        attention_dropout=float(getattr(hf_config, "attention_dropout", 0.0) or 0.0),
        init_method_std=float(getattr(hf_config, "initializer_range", 0.02)),
    )


def padded_vocab_size(
    vocab_size: int, tp_size: int = 1, make_vocab_size_divisible_by: int = 128
) -> int:
    """Megatron-LM's padded vocabulary: the next multiple of ``divisible_by * tp_size``."""
    multiple = make_vocab_size_divisible_by * tp_size
    return -(-vocab_size // multiple) * multiple


def gpt_model_kwargs(
    hf_config: Any, *, tp_size: int = 1, make_vocab_size_divisible_by: int = 128
) -> dict[str, Any]:
    """``GPTModel`` keyword arguments (besides config/spec/stage) for ``hf_config``.

    Returns:
        vocab_size (padded, see :func:`padded_vocab_size`), max_sequence_length,
        share_embeddings_and_output_weights, position_embedding_type ("rope"), rotary_percent,
        rotary_base.
    """
    _check_supported(hf_config)
    return dict(
        vocab_size=padded_vocab_size(hf_config.vocab_size, tp_size, make_vocab_size_divisible_by),
        max_sequence_length=hf_config.max_position_embeddings,
        share_embeddings_and_output_weights=bool(getattr(hf_config, "tie_word_embeddings", False)),
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=_rope_theta(hf_config),
    )


def _parallel_sizes() -> dict[str, int | None]:
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return {}
    return {
        "tensor_model_parallel_size": ps.get_tensor_model_parallel_world_size(),
        "pipeline_model_parallel_size": ps.get_pipeline_model_parallel_world_size(),
        "virtual_pipeline_model_parallel_size": ps.get_virtual_pipeline_model_parallel_world_size(),
    }


def build_gpt_from_hf_config(
    hf_config: Any,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
    *,
    config_overrides: Mapping[str, Any] | None = None,
    seq_length: int | None = None,
    make_vocab_size_divisible_by: int = 128,
    parallel_output: bool = True,
    pg_collection: Any = None,
    backend: Backend = "auto",
    hf_path: str | os.PathLike | None = None,
) -> torch.nn.Module:
    """A megatron-core ``GPTModel`` (this rank's stage / virtual chunk) shaped like ``hf_config``.

    Usable as the body of a Megatron-LM model provider::

        def model_provider(pre_process=True, post_process=True, vp_stage=None, **_):
            return build_gpt_from_hf_config(hf_config, pre_process, post_process, vp_stage,
                                            config_overrides={"bf16": True})

    Weights are megatron's random init; load the HF weights with :func:`load_hf_weights`.
    Tensor/pipeline/virtual-pipeline sizes default to ``parallel_state``'s (when initialised).

    Args:
        hf_config: a supported Hugging Face config (see :data:`SUPPORTED_MODEL_TYPES`).
        pre_process: this chunk holds the embeddings (first stage).
        post_process: this chunk holds the final norm and output layer (last stage).
        vp_stage: virtual-pipeline chunk index, or None.
        config_overrides: extra ``TransformerConfig`` fields (parallel sizes, ``bf16``,
            ``params_dtype``, ``use_cpu_initialization``, fusions, ``sequence_parallel``...).
        seq_length: training sequence length (see :func:`megatron_config_kwargs`).
        make_vocab_size_divisible_by: vocabulary padding unit (Megatron-LM's default 128).
        parallel_output: keep logits split by vocabulary across TP ranks (training); False
            gathers them.
        pg_collection: megatron process groups, passed through to ``GPTModel``.
        backend: "auto" (Megatron-Bridge when it is importable and ``hf_path`` is given, else
            this module), "bridge", or "layerfreeze".
        hf_path: the HF checkpoint directory (the Bridge backend builds from it and exports
            against it; optional for this module's backend).

    Returns:
        The ``GPTModel``; it remembers which backend built it, so :func:`load_hf_weights` and
        :func:`export_hf_checkpoint` use the matching converter.
    """
    resolved = _resolve_backend(backend, hf_path)
    overrides = dict(config_overrides or {})
    if resolved == "bridge":  # pragma: no cover - needs Megatron-Bridge (CUDA machines)
        model = _bridge_build(hf_path, pre_process, post_process, vp_stage, overrides)
        setattr(model, _BACKEND_ATTR, "bridge")
        setattr(model, _HF_PATH_ATTR, str(hf_path))
        return model

    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    kwargs = megatron_config_kwargs(hf_config, seq_length=seq_length)
    for key, value in _parallel_sizes().items():
        overrides.setdefault(key, value)
    if (overrides.get("pipeline_model_parallel_size") or 1) > 1:
        # the dtype of the activations stages exchange: the parameters' unless told otherwise
        dtype = (
            torch.bfloat16
            if overrides.get("bf16")
            else (torch.float16 if overrides.get("fp16") else torch.float32)
        )
        overrides.setdefault("pipeline_dtype", overrides.get("params_dtype", dtype))
    kwargs.update(overrides)
    tp = int(kwargs.get("tensor_model_parallel_size") or 1)
    _check_tp(hf_config, 0, tp, whole_groups=True)
    config = TransformerConfig(**kwargs)
    model_kwargs = gpt_model_kwargs(
        hf_config,
        tp_size=config.tensor_model_parallel_size,
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
    )
    extra: dict[str, Any] = {"vp_stage": vp_stage}
    if pg_collection is not None:
        extra["pg_collection"] = pg_collection
    model = GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=parallel_output,
        **model_kwargs,
        **extra,
    )
    setattr(model, _BACKEND_ATTR, "layerfreeze")
    return model


def _bridge_build(hf_path, pre_process, post_process, vp_stage, overrides):  # pragma: no cover
    """Megatron-Bridge's own model for ``hf_path`` (its provider holds the TransformerConfig)."""
    from megatron.bridge import AutoBridge

    provider = AutoBridge.from_hf_pretrained(str(hf_path)).to_megatron_provider(load_weights=False)
    for key, value in overrides.items():
        setattr(provider, key, value)
    if callable(getattr(provider, "finalize", None)):
        provider.finalize()
    return provider.provide(pre_process=pre_process, post_process=post_process, vp_stage=vp_stage)


# ---------------------------------------------------------------------------------------------
# Pure tensor mapping


def _geometry(hf_config: Any) -> tuple[int, int, int]:
    heads = hf_config.num_attention_heads
    groups = getattr(hf_config, "num_key_value_heads", None) or heads
    return heads, groups, _head_dim(hf_config)


def _check_tp(hf_config: Any, tp_rank: int, tp_size: int, whole_groups: bool = False) -> None:
    """TP must split heads and MLP evenly. The weight layout also allows more TP ranks than
    key/value heads (a group spread over ranks); megatron-core's local attention
    (``DotProductAttention``) does not, hence ``whole_groups`` when building its model."""
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank: got {tp_rank} for tp_size={tp_size} (valid 0-{tp_size - 1}).")
    heads, groups, _ = _geometry(hf_config)
    problems = []
    if heads % tp_size:
        problems.append(f"num_attention_heads={heads}")
    if groups % tp_size and (whole_groups or tp_size % groups):
        problems.append(f"num_key_value_heads={groups}")
    if hf_config.intermediate_size % tp_size:
        problems.append(f"intermediate_size={hf_config.intermediate_size}")
    if problems:
        raise ValueError(
            f"{_where(hf_config)}tensor-parallel size {tp_size} does not divide "
            f"{', '.join(problems)}; choose a TP size that divides them."
        )


def _qkv_full(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int, hd: int):
    """HF q/k/v rows (weight ``[out, in]`` or bias ``[out]``) -> megatron's grouped QKV rows."""
    per = heads // groups
    tail = q.shape[1:]
    q = q.reshape(groups, per * hd, *tail)
    k = k.reshape(groups, hd, *tail)
    v = v.reshape(groups, hd, *tail)
    return torch.cat([q, k, v], dim=1).reshape(groups * (per + 2) * hd, *tail)


def _qkv_split(qkv: torch.Tensor, heads: int, groups: int, hd: int):
    """Inverse of :func:`_qkv_full`: megatron's grouped QKV rows -> HF q, k, v rows."""
    per = heads // groups
    tail = qkv.shape[1:]
    qkv = qkv.reshape(groups, (per + 2) * hd, *tail)
    q, k, v = torch.split(qkv, [per * hd, hd, hd], dim=1)
    return (
        q.reshape(heads * hd, *tail),
        k.reshape(groups * hd, *tail),
        v.reshape(groups * hd, *tail),
    )


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] > rows:
        raise ValueError(f"vocabulary of {t.shape[0]} rows exceeds the padded size {rows}.")
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])], dim=0)


def _hf_layer_keys(hf_config: Any, i: int) -> list[str]:
    p = f"model.layers.{i}."
    keys = [
        p + "input_layernorm.weight",
        p + "post_attention_layernorm.weight",
        p + "self_attn.q_proj.weight",
        p + "self_attn.k_proj.weight",
        p + "self_attn.v_proj.weight",
        p + "self_attn.o_proj.weight",
        p + "mlp.gate_proj.weight",
        p + "mlp.up_proj.weight",
        p + "mlp.down_proj.weight",
    ]
    if hf_config.model_type == "qwen2":
        keys += [p + f"self_attn.{x}_proj.bias" for x in "qkv"]
    return keys


def hf_keys_for(
    hf_config: Any, layers: Iterable[int], pre_process: bool, post_process: bool
) -> list[str]:
    """The HF state-dict names a stage holding global ``layers`` needs."""
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    keys = []
    if pre_process or (post_process and tied):
        keys.append("model.embed_tokens.weight")
    for i in layers:
        keys += _hf_layer_keys(hf_config, i)
    if post_process:
        keys.append("model.norm.weight")
        if not tied:
            keys.append("lm_head.weight")
    return keys


def _get(sd: Mapping[str, torch.Tensor], key: str, hf_config: Any) -> torch.Tensor:
    try:
        return sd[key]
    except KeyError:
        raise KeyError(
            f"{_where(hf_config)}Hugging Face state dict has no {key!r} (a "
            f"{hf_config.model_type} checkpoint with {hf_config.num_hidden_layers} layers is "
            "expected)."
        ) from None


def hf_to_megatron(
    hf_state_dict: Mapping[str, torch.Tensor],
    hf_config: Any,
    *,
    tp_rank: int = 0,
    tp_size: int = 1,
    layers: Sequence[int] | None = None,
    pre_process: bool = True,
    post_process: bool = True,
    padded_vocab: int | None = None,
    make_vocab_size_divisible_by: int = 128,
) -> dict[str, torch.Tensor]:
    """One TP rank's megatron (local spec) state dict of one pipeline stage, from HF tensors.

    Args:
        hf_state_dict: HF names -> full tensors (at least those of this stage).
        hf_config: the model's HF config.
        tp_rank: this tensor-parallel rank.
        tp_size: tensor-parallel size.
        layers: the global (0-based) indices of the stage's layers, in local order; default all.
        pre_process: the stage holds the embeddings.
        post_process: the stage holds the final norm and output layer (with tied embeddings
            and no ``pre_process``, its ``output_layer.weight`` is a copy of the embeddings,
            as megatron keeps it on the last stage).
        padded_vocab: the model's (padded) vocabulary; default from
            :func:`padded_vocab_size` with ``make_vocab_size_divisible_by``.
        make_vocab_size_divisible_by: vocabulary padding unit.

    Returns:
        Megatron names (``decoder.layers.{local}...``) -> tensors (views or new tensors; clone
        before mutating).

    Raises:
        ValueError: unsupported architecture, or a TP size that does not divide the heads/MLP.
        KeyError: a needed HF tensor is missing (named).
    """
    megatron_config_kwargs(hf_config)  # refuses unsupported architectures and features
    _check_tp(hf_config, tp_rank, tp_size)
    heads, groups, hd = _geometry(hf_config)
    layers = list(range(hf_config.num_hidden_layers)) if layers is None else list(layers)
    vocab = padded_vocab or padded_vocab_size(
        hf_config.vocab_size, tp_size, make_vocab_size_divisible_by
    )
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))

    def g(key: str) -> torch.Tensor:
        return _get(hf_state_dict, key, hf_config)

    def rows(t: torch.Tensor) -> torch.Tensor:
        return t.chunk(tp_size, dim=0)[tp_rank]

    def cols(t: torch.Tensor) -> torch.Tensor:
        return t.chunk(tp_size, dim=1)[tp_rank]

    out: dict[str, torch.Tensor] = {}
    if pre_process:
        out["embedding.word_embeddings.weight"] = rows(
            _pad_rows(g("model.embed_tokens.weight"), vocab)
        )
    for local, i in enumerate(layers):
        if not 0 <= i < hf_config.num_hidden_layers:
            raise ValueError(
                f"layers: global layer {i} is out of range for a {hf_config.num_hidden_layers}-layer "
                f"model (valid 0-{hf_config.num_hidden_layers - 1})."
            )
        p, m = f"model.layers.{i}.", f"decoder.layers.{local}."
        out[m + "input_layernorm.weight"] = g(p + "input_layernorm.weight")
        out[m + "pre_mlp_layernorm.weight"] = g(p + "post_attention_layernorm.weight")
        qkv = [g(p + f"self_attn.{x}_proj.weight") for x in "qkv"]
        out[m + "self_attention.linear_qkv.weight"] = rows(_qkv_full(*qkv, heads, groups, hd))
        if hf_config.model_type == "qwen2":
            qkv_b = [g(p + f"self_attn.{x}_proj.bias") for x in "qkv"]
            out[m + "self_attention.linear_qkv.bias"] = rows(_qkv_full(*qkv_b, heads, groups, hd))
        out[m + "self_attention.linear_proj.weight"] = cols(g(p + "self_attn.o_proj.weight"))
        gate, up = g(p + "mlp.gate_proj.weight"), g(p + "mlp.up_proj.weight")
        out[m + "mlp.linear_fc1.weight"] = torch.cat([rows(gate), rows(up)], dim=0)
        out[m + "mlp.linear_fc2.weight"] = cols(g(p + "mlp.down_proj.weight"))
    if post_process:
        out["decoder.final_layernorm.weight"] = g("model.norm.weight")
        if not tied:
            out["output_layer.weight"] = rows(_pad_rows(g("lm_head.weight"), vocab))
        elif not pre_process:
            out["output_layer.weight"] = rows(_pad_rows(g("model.embed_tokens.weight"), vocab))
    return out


def _megatron_layer_names(hf_config: Any) -> list[str]:
    """Parameter names of one megatron (local spec) layer, relative to ``decoder.layers.{j}.``."""
    names = [
        "input_layernorm.weight",
        "pre_mlp_layernorm.weight",
        "self_attention.linear_qkv.weight",
        "self_attention.linear_proj.weight",
        "mlp.linear_fc1.weight",
        "mlp.linear_fc2.weight",
    ]
    if hf_config.model_type == "qwen2":
        names.append("self_attention.linear_qkv.bias")
    return names


def _megatron_layer_to_hf(
    shards: Sequence[Mapping[str, torch.Tensor]], hf_config: Any, local: int, i: int
) -> dict[str, torch.Tensor]:
    heads, groups, hd = _geometry(hf_config)
    m, p = f"decoder.layers.{local}.", f"model.layers.{i}."

    def get(sd, name):
        try:
            return sd[m + name]
        except KeyError:
            raise KeyError(f"megatron state dict has no {m + name!r} (global layer {i}).") from None

    def cat(name: str, dim: int) -> torch.Tensor:
        return torch.cat([get(sd, name) for sd in shards], dim=dim)

    out = {
        p + "input_layernorm.weight": get(shards[0], "input_layernorm.weight"),
        p + "post_attention_layernorm.weight": get(shards[0], "pre_mlp_layernorm.weight"),
        p + "self_attn.o_proj.weight": cat("self_attention.linear_proj.weight", 1),
        p + "mlp.down_proj.weight": cat("mlp.linear_fc2.weight", 1),
    }
    q, k, v = _qkv_split(cat("self_attention.linear_qkv.weight", 0), heads, groups, hd)
    out.update(
        {
            p + "self_attn.q_proj.weight": q,
            p + "self_attn.k_proj.weight": k,
            p + "self_attn.v_proj.weight": v,
        }
    )
    if hf_config.model_type == "qwen2":
        qb, kb, vb = _qkv_split(cat("self_attention.linear_qkv.bias", 0), heads, groups, hd)
        out.update(
            {
                p + "self_attn.q_proj.bias": qb,
                p + "self_attn.k_proj.bias": kb,
                p + "self_attn.v_proj.bias": vb,
            }
        )
    halves = [get(sd, "mlp.linear_fc1.weight").chunk(2, dim=0) for sd in shards]
    out[p + "mlp.gate_proj.weight"] = torch.cat([h[0] for h in halves], dim=0)
    out[p + "mlp.up_proj.weight"] = torch.cat([h[1] for h in halves], dim=0)
    return out


def _vocab_cat(shards: Sequence[Mapping[str, torch.Tensor]], name: str, vocab: int) -> torch.Tensor:
    try:
        full = torch.cat([sd[name] for sd in shards], dim=0)
    except KeyError:
        raise KeyError(f"megatron state dict has no {name!r}.") from None
    return full[:vocab]


def megatron_to_hf(
    tp_shards: Sequence[Mapping[str, torch.Tensor]],
    hf_config: Any,
    *,
    layers: Sequence[int] | None = None,
    pre_process: bool = True,
    post_process: bool = True,
) -> dict[str, torch.Tensor]:
    """HF tensors of one pipeline stage, from the megatron state dicts of all its TP ranks.

    The stages' results are disjoint; their union is the model's HF state dict (with tied
    embeddings, take ``model.embed_tokens.weight`` from the first stage).

    Args:
        tp_shards: the stage's megatron (local spec) state dicts, in TP-rank order.
        hf_config: the model's HF config.
        layers: global indices of the stage's local layers, in order; default ``0..n-1`` for the
            ``n`` layers found in the shards.
        pre_process: the stage holds the embeddings.
        post_process: the stage holds the final norm and the output layer.

    Returns:
        HF names -> full tensors (vocabulary padding stripped).
    """
    megatron_config_kwargs(hf_config)
    if not tp_shards:
        raise ValueError("tp_shards: empty; pass the state dict of every TP rank of the stage.")
    if layers is None:
        n = len({k.split(".")[2] for k in tp_shards[0] if k.startswith("decoder.layers.")})
        layers = list(range(n))
    vocab = hf_config.vocab_size
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    out: dict[str, torch.Tensor] = {}
    if pre_process:
        out["model.embed_tokens.weight"] = _vocab_cat(
            tp_shards, "embedding.word_embeddings.weight", vocab
        )
    for local, i in enumerate(layers):
        out.update(_megatron_layer_to_hf(tp_shards, hf_config, local, i))
    if post_process:
        out["model.norm.weight"] = tp_shards[0]["decoder.final_layernorm.weight"]
        if not tied:
            out["lm_head.weight"] = _vocab_cat(tp_shards, "output_layer.weight", vocab)
    return out


# ---------------------------------------------------------------------------------------------
# Reading HF checkpoints and loading them into a built model


def _safetensors_files(path: Path) -> dict[str, Path]:
    """HF tensor name -> file holding it, for a directory with safetensors (sharded or not)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {k: path / f for k, f in weight_map.items()}
    single = path / "model.safetensors"
    if single.is_file():
        with safe_open(str(single), framework="pt") as f:
            return {k: single for k in f.keys()}
    raise FileNotFoundError(
        f"{path}: no model.safetensors or model.safetensors.index.json; save the HF model with "
        "save_pretrained(..., safe_serialization=True)."
    )


def load_hf_state_dict(
    path: str | os.PathLike, keys: Iterable[str] | None = None
) -> dict[str, torch.Tensor]:
    """Read ``keys`` (default all) from an HF safetensors checkpoint directory, on the CPU.

    Raises:
        FileNotFoundError: no safetensors files in ``path``.
        KeyError: a requested tensor is not in the checkpoint (named).
    """
    path = Path(path)
    where = _safetensors_files(path)
    wanted = list(where) if keys is None else list(keys)
    by_file: dict[Path, list[str]] = {}
    for k in wanted:
        if k not in where:
            raise KeyError(f"{path}: the checkpoint has no tensor {k!r}.")
        by_file.setdefault(where[k], []).append(k)
    out: dict[str, torch.Tensor] = {}
    for file, names in by_file.items():
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for k in names:
                out[k] = f.get_tensor(k)
    return out


def _chunks(model: Any) -> list[torch.nn.Module]:
    return [unwrap_module(m, stop_at="decoder") for m in (model if isinstance(model, (list, tuple)) else [model])]


def _stage_info(chunk: torch.nn.Module) -> tuple[list[int], bool, bool]:
    """(global layer indices, pre_process, post_process) of one model chunk."""
    layers = [layer.layer_number - 1 for layer in chunk.decoder.layers]
    return layers, bool(chunk.pre_process), bool(chunk.post_process)


def _tp() -> tuple[int, int]:
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return 0, 1
    return ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()


def _backend_of(chunks: Sequence[torch.nn.Module], backend: Backend, hf_path: Any = None) -> str:
    if backend != "auto":
        return _resolve_backend(backend, hf_path or getattr(chunks[0], _HF_PATH_ATTR, None))
    return getattr(chunks[0], _BACKEND_ATTR, "layerfreeze")


def load_hf_weights(
    model: torch.nn.Module | Sequence[torch.nn.Module],
    source: str | os.PathLike | Mapping[str, torch.Tensor],
    hf_config: Any = None,
    *,
    backend: Backend = "auto",
) -> None:
    """Copy HF weights into a built megatron model (this rank's chunks), in place.

    Each rank reads only the tensors its layers and TP slice need. Every parameter of the model
    must be covered (adapters installed later are not; load before applying a plan).

    Args:
        model: a ``GPTModel`` (possibly wrapped) or the list of virtual-pipeline chunks.
        source: an HF checkpoint directory (safetensors) or an HF state dict.
        hf_config: the HF config; default read from ``source`` when it is a directory.
        backend: "auto" uses the converter that built the model (see
            :func:`build_gpt_from_hf_config`); "layerfreeze" or "bridge" force one.

    Raises:
        ValueError: the model's parameters and the converted tensors differ (names listed).
    """
    chunks = _chunks(model)
    if hf_config is None:
        if isinstance(source, Mapping):
            raise ValueError("hf_config: required when source is a state dict.")
        from transformers import AutoConfig

        hf_config = AutoConfig.from_pretrained(str(source))
    hf_dir = None if isinstance(source, Mapping) else source
    if _backend_of(chunks, backend, hf_dir) == "bridge":  # pragma: no cover - needs Bridge
        if isinstance(source, Mapping):
            raise ValueError("backend='bridge' loads from an HF directory, got a state dict.")
        from megatron.bridge import AutoBridge

        AutoBridge.from_hf_pretrained(str(source)).load_hf_weights(chunks, hf_path=str(source))
        return
    tp_rank, tp_size = _tp()
    for chunk in chunks:
        layers, pre, post = _stage_info(chunk)
        keys = hf_keys_for(hf_config, layers, pre, post)
        if isinstance(source, Mapping):
            hf_sd = source
        else:
            hf_sd = load_hf_state_dict(source, keys)
        sd = hf_to_megatron(
            hf_sd,
            hf_config,
            tp_rank=tp_rank,
            tp_size=tp_size,
            layers=layers,
            pre_process=pre,
            post_process=post,
            padded_vocab=chunk.vocab_size,
        )
        _copy_into(chunk, sd)
    log_rank0(logger, "loaded Hugging Face weights into %d megatron chunk(s)", len(chunks))


def _copy_into(chunk: torch.nn.Module, sd: Mapping[str, torch.Tensor]) -> None:
    params = {
        k: v
        for k, v in chunk.state_dict(keep_vars=True).items()
        if not k.endswith("_extra_state") and isinstance(v, torch.Tensor)
    }
    missing = sorted(set(params) - set(sd))
    unexpected = sorted(set(sd) - set(params))
    if missing or unexpected:
        raise ValueError(
            "megatron model and converted HF weights differ: "
            f"not converted {missing[:6]}{'...' if len(missing) > 6 else ''}, "
            f"not in the model {unexpected[:6]}{'...' if len(unexpected) > 6 else ''}. Load HF "
            "weights into a model built by build_gpt_from_hf_config before applying a plan."
        )
    with torch.no_grad():
        for k, p in params.items():
            src = sd[k]
            if tuple(src.shape) != tuple(p.shape):
                raise ValueError(
                    f"{k}: converted HF tensor has shape {tuple(src.shape)}, the model's is "
                    f"{tuple(p.shape)}; was the model built for this HF config and TP size?"
                )
            p.copy_(src)


# ---------------------------------------------------------------------------------------------
# Megatron -> HF: gather and save


def _tensors_for_file(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}


def gather_hf_state_dict(
    model: torch.nn.Module | Sequence[torch.nn.Module],
    hf_config: Any,
    *,
    state_dict: Mapping[str, torch.Tensor] | Sequence[Mapping[str, torch.Tensor]] | None = None,
) -> dict[str, torch.Tensor] | None:
    """Collect the full HF state dict of a TP/PP-distributed model on global rank 0.

    A collective: every rank of the job calls it. Only data-parallel (and context-parallel)
    rank 0 replicas take part; the TP ranks of a stage gather one layer's shards on their TP
    rank 0, which converts them and sends the HF tensors to rank 0, layer by layer, so no rank
    holds more than one layer of another stage at a time (rank 0 accumulates the result, on
    the CPU).

    Args:
        model: this rank's ``GPTModel`` (possibly wrapped) or its virtual-pipeline chunks.
        hf_config: the model's HF config.
        state_dict: this rank's megatron state dicts, one per chunk, to use instead of the
            model's (e.g. with LoRA merged into the base weights); default the model's own.

    Returns:
        The HF state dict (CPU tensors) on global rank 0, None elsewhere.
    """
    import torch.distributed as dist

    chunks = _chunks(model)
    if state_dict is None:
        sds = [c.state_dict() for c in chunks]
    elif isinstance(state_dict, Mapping):
        sds = [state_dict]
    else:
        sds = list(state_dict)
    if len(sds) != len(chunks):
        raise ValueError(f"state_dict: {len(sds)} state dicts for {len(chunks)} model chunks.")
    infos = [_stage_info(c) for c in chunks]

    if not dist.is_initialized() or dist.get_world_size() == 1:
        out: dict[str, torch.Tensor] = {}
        for sd, (layers, pre, post) in zip(sds, infos, strict=True):
            out.update(
                megatron_to_hf([sd], hf_config, layers=layers, pre_process=pre, post_process=post)
            )
        return _tensors_for_file(out)

    from megatron.core import parallel_state as ps

    if ps.get_data_parallel_rank() != 0 or ps.get_context_parallel_rank() != 0:
        return None
    tp_group = ps.get_tensor_model_parallel_group()
    tp_rank, tp_size = _tp()
    pp_group = ps.get_pipeline_model_parallel_group()
    pp_ranks = dist.get_process_group_ranks(pp_group)
    my_stage = ps.get_pipeline_model_parallel_rank()
    # TP rank 0 of each stage sends; TP rank 0 of the first stage (global rank 0) receives.
    is_sender = tp_rank == 0
    dst = pp_ranks[0]
    is_dst = is_sender and my_stage == 0
    tp_root = dist.get_global_rank(tp_group, 0)

    # Which stage holds each global layer / the embeddings / the head: every rank of the
    # pipeline group learns it once (the TP ranks of a stage hold the same layers).
    mine = {
        "layers": [i for layers, _, _ in infos for i in layers],
        "pre": any(pre for _, pre, _ in infos),
        "post": any(post for _, _, post in infos),
    }
    stages: list[Any] = [None] * len(pp_ranks)
    dist.all_gather_object(stages, mine, group=pp_group)
    owner = {i: s for s, info in enumerate(stages) for i in info["layers"]}
    missing = sorted(set(range(hf_config.num_hidden_layers)) - set(owner))
    if missing:
        raise ValueError(f"gather_hf_state_dict: no pipeline stage holds layers {missing}.")
    pre_stage = next(s for s, info in enumerate(stages) if info["pre"])
    post_stage = next(s for s, info in enumerate(stages) if info["post"])

    def tp_gather(
        sd: Mapping[str, torch.Tensor], names: Sequence[str]
    ) -> list[dict[str, torch.Tensor]]:
        """Every TP rank's tensors ``names``, gathered on TP rank 0 (empty list elsewhere)."""
        if tp_size == 1:
            return [{n: sd[n] for n in names}]
        shards: list[dict[str, torch.Tensor]] = [{} for _ in range(tp_size)]
        for n in names:
            t = sd[n].detach().contiguous()
            bufs = [torch.empty_like(t) for _ in range(tp_size)] if is_sender else None
            dist.gather(t, bufs, dst=tp_root, group=tp_group)
            for r in range(tp_size if is_sender else 0):
                shards[r][n] = bufs[r]
        return shards if is_sender else []

    result: dict[str, torch.Tensor] = {}

    def deliver(stage: int, produce) -> None:
        """Run ``produce()`` on ``stage``; its TP rank 0 sends the result to ``dst``."""
        if my_stage == stage:
            piece = produce()
            if is_dst:
                result.update(_tensors_for_file(piece))
            elif is_sender:
                dist.send_object_list([_tensors_for_file(piece)], dst=dst)
        elif is_dst:
            box: list[Any] = [None]
            dist.recv_object_list(box, src=pp_ranks[stage])
            result.update(box[0])

    def find(pred) -> tuple[Mapping[str, torch.Tensor], list[int]]:
        for sd, (layers, pre, post) in zip(sds, infos, strict=True):
            if pred(layers, pre, post):
                return sd, layers
        raise AssertionError("this stage holds no such chunk")

    def embed() -> dict[str, torch.Tensor]:
        sd, _ = find(lambda _l, pre, _p: pre)
        shards = tp_gather(sd, ["embedding.word_embeddings.weight"])
        if not is_sender:
            return {}
        return {
            "model.embed_tokens.weight": _vocab_cat(
                shards, "embedding.word_embeddings.weight", hf_config.vocab_size
            )
        }

    deliver(pre_stage, embed)
    for i in range(hf_config.num_hidden_layers):

        def layer(i: int = i) -> dict[str, torch.Tensor]:
            sd, layers = find(lambda ls, _pre, _post: i in ls)
            local = layers.index(i)
            prefix = f"decoder.layers.{local}."
            names = [prefix + n for n in _megatron_layer_names(hf_config)]
            absent = [n for n in names if n not in sd]
            if absent:
                raise KeyError(f"megatron state dict has no {absent} (global layer {i}).")
            shards = tp_gather(sd, names)
            return _megatron_layer_to_hf(shards, hf_config, local, i) if is_sender else {}

        deliver(owner[i], layer)

    def head() -> dict[str, torch.Tensor]:
        sd, _ = find(lambda _l, _pre, post: post)
        piece = {"model.norm.weight": sd["decoder.final_layernorm.weight"]}
        if not getattr(hf_config, "tie_word_embeddings", False):
            shards = tp_gather(sd, ["output_layer.weight"])
            if not is_sender:
                return {}
            piece["lm_head.weight"] = _vocab_cat(
                shards, "output_layer.weight", hf_config.vocab_size
            )
        return piece

    deliver(post_stage, head)
    return result if is_dst else None


def save_hf_checkpoint(
    hf_state_dict: Mapping[str, torch.Tensor],
    hf_config: Any,
    directory: str | os.PathLike,
    *,
    tokenizer: Any = None,
    max_shard_bytes: int = 5 * 1024**3,
    sidecar: tuple[Mapping[str, torch.Tensor], Mapping[str, Any]] | None = None,
) -> Path:
    """Write a standard HF checkpoint (``config.json`` + safetensors) atomically.

    ``AutoModelForCausalLM.from_pretrained(directory)`` loads it. Files larger than
    ``max_shard_bytes`` are split into ``model-0000k-of-0000n.safetensors`` with the usual
    ``model.safetensors.index.json``. With tied embeddings no ``lm_head.weight`` is written.

    Args:
        hf_state_dict: HF names -> full tensors (e.g. from :func:`gather_hf_state_dict`).
        hf_config: the HF config to write (``architectures`` filled in when missing).
        directory: output directory (replaced if it exists; never left half-written).
        tokenizer: optional tokenizer, saved alongside.
        max_shard_bytes: largest safetensors file.
        sidecar: ``(tensors, plan.json content)`` of the adapters that are not merged (see
            :func:`gather_hf_sidecar`), written as ``layerfreeze.export`` writes them.

    Returns:
        The directory.
    """
    _check_supported(hf_config)
    directory = Path(directory)
    sd = _tensors_for_file(hf_state_dict)
    if getattr(hf_config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k in sorted(sd):
        nbytes = sd[k].numel() * sd[k].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = sd[k]
        size += nbytes
    hf_config = copy.deepcopy(hf_config)
    if not getattr(hf_config, "architectures", None):
        hf_config.architectures = [_ARCHITECTURES[hf_config.model_type]]
    with atomic_directory(directory) as tmp:
        hf_config.save_pretrained(str(tmp))
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for n, shard in enumerate(shards, 1):
                name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / name), metadata={"format": "pt"})
                weight_map.update({k: name for k in shard})
            total = sum(t.numel() * t.element_size() for t in sd.values())
            atomic_write_json(
                tmp / "model.safetensors.index.json",
                {"metadata": {"total_size": total}, "weight_map": weight_map},
            )
        if tokenizer is not None:
            from layerfreeze.data.tokenizer import save_tokenizer

            save_tokenizer(tokenizer, tmp)  # loads as itself through AutoTokenizer
        if sidecar is not None:
            _write_sidecar(tmp, *sidecar)
    log_rank0(logger, "saved Hugging Face checkpoint (%d tensors) to %s", len(sd), directory)
    return directory


def export_hf_checkpoint(
    model: torch.nn.Module | Sequence[torch.nn.Module],
    hf_config: Any,
    directory: str | os.PathLike,
    *,
    tokenizer: Any = None,
    state_dict: Mapping[str, torch.Tensor] | Sequence[Mapping[str, torch.Tensor]] | None = None,
    backend: Backend = "auto",
    applied: Any = None,
) -> Path:
    """Gather a distributed megatron model and write it as an HF checkpoint (collective).

    Every rank calls it; rank 0 writes (atomically), then all ranks meet at a barrier.

    Args:
        model: this rank's ``GPTModel`` (possibly wrapped) or its virtual-pipeline chunks.
        hf_config: the model's HF config.
        directory: output directory.
        tokenizer: optional tokenizer saved alongside.
        state_dict: per-chunk megatron state dicts to export instead of the model's.
        backend: as in :func:`load_hf_weights`. A model built by Megatron-Bridge is exported by
            its ``save_hf_pretrained`` against the HF directory it was built from (Bridge writes
            in place, not through a staging directory).
        applied: the model's ``AppliedPlan``: also write the sidecar of the adapters that are
            not merged (:func:`gather_hf_sidecar`), as ``layerfreeze.export.export_merged``
            does, so ``load_trainable(AutoModelForCausalLM.from_pretrained(dir), dir)`` restores
            the adapted model.

    Returns:
        The directory.
    """
    import torch.distributed as dist

    chunks = _chunks(model)
    side = gather_hf_sidecar(chunks, hf_config, applied) if applied is not None else None
    if _backend_of(chunks, backend) == "bridge":  # pragma: no cover - needs Megatron-Bridge
        from megatron.bridge import AutoBridge

        hf_path = getattr(chunks[0], _HF_PATH_ATTR, None)
        if hf_path is None:
            raise ValueError("backend='bridge': the model was not built by Megatron-Bridge.")
        AutoBridge.from_hf_pretrained(hf_path).save_hf_pretrained(chunks, str(directory))
        if side is not None:
            _write_sidecar(Path(directory), *side)
        return Path(directory)
    sd = gather_hf_state_dict(chunks, hf_config, state_dict=state_dict)
    if sd is not None:
        save_hf_checkpoint(sd, hf_config, directory, tokenizer=tokenizer, sidecar=side)
    if dist.is_initialized():
        dist.barrier()
    return Path(directory)


def export_runner_to_hf(
    runner: Any,
    directory: str | os.PathLike,
    *,
    tokenizer: Any = None,
    hf_config: Any = None,
) -> Path | None:
    """Write a ``MegatronRunner``'s model as an HF checkpoint (collective; every rank calls it).

    Mergeable LoRA is folded into the base weights for the export (and taken out again after,
    unless the caller had merged it already, as ``MegatronRunner.export_merged`` does). The
    adapters that cannot be merged (gated LoRA, prefixes, their gates) go to the sidecar in
    Hugging Face naming (:func:`gather_hf_sidecar`), as on the DeepSpeed / HF path.

    Args:
        runner: the runner (its ``chunks``; ``hf_config`` as set by the training recipe).
        directory: output directory (written atomically on rank 0).
        tokenizer: optional tokenizer saved alongside.
        hf_config: the HF config; default ``runner.hf_config``.

    Returns:
        The directory on global rank 0, None on the other ranks.
    """
    import torch.distributed as dist

    hf_config = hf_config if hf_config is not None else getattr(runner, "hf_config", None)
    if hf_config is None:
        raise ValueError(
            "export_runner_to_hf: the runner has no hf_config; pass hf_config= (the Hugging Face "
            "config the model was built from)."
        )
    applied = getattr(runner, "applied", None)
    merged = applied.merge() if applied is not None else []
    try:
        out = export_hf_checkpoint(
            runner.chunks, hf_config, directory, tokenizer=tokenizer, applied=applied
        )
    finally:
        if merged:
            applied.unmerge()
    return out if not dist.is_initialized() or dist.get_rank() == 0 else None


# ---------------------------------------------------------------------------------------------
# Megatron -> HF: the sidecar of adapters that cannot be merged


#: LoRA base linears of a megatron (local spec) layer -> (parallel style, the HF linears it
#: stands for). A fused linear's one ``A`` becomes a copy per HF linear; its ``B`` rows split.
_LORA_LINEARS: dict[str, tuple[str, tuple[str, ...]]] = {
    "self_attention.linear_qkv": (
        "column",
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ),
    "self_attention.linear_proj": ("row", ("self_attn.o_proj",)),
    "mlp.linear_fc1": ("column", ("mlp.gate_proj", "mlp.up_proj")),
    "mlp.linear_fc2": ("row", ("mlp.down_proj",)),
}
#: Sub-blocks that own a LoRA gate (``<sub>.lora_gate``): megatron name -> HF name.
_GATE_OWNERS = {"self_attention": "self_attn", "mlp": "mlp"}
_MEGATRON_PREFIX = "self_attention.prefix_adapter."
_HF_PREFIX = "self_attn.prefix_adapter."

#: ``(tensor-parallel split dim, stride)`` of a split parameter, None for a replicated one.
_Split = tuple[int, int] | None


def _adapter_layer_to_hf(
    shards: Sequence[Mapping[str, torch.Tensor]],
    splits: Mapping[str, _Split],
    hf_config: Any,
    local: int,
    i: int,
) -> dict[str, tuple[str, torch.Tensor]]:
    """HF adapter tensors of one layer from the adapter tensors of all its TP ranks.

    Args:
        shards: per TP rank (in order), adapter names relative to ``decoder.layers.{local}.``
            -> tensors.
        splits: the same names -> how megatron splits them across TP (``_Split``).
        hf_config: the model's HF config.
        local: the layer's index in its pipeline stage (for messages).
        i: the layer's global index.

    Returns:
        HF name -> (the megatron name it came from, full tensor).

    Raises:
        ValueError: a parameter with no HF counterpart (named, with its layer).
    """
    heads, groups, hd = _geometry(hf_config)
    m, p = f"decoder.layers.{local}.", f"model.layers.{i}."
    out: dict[str, tuple[str, torch.Tensor]] = {}
    for rel in shards[0]:
        parts = [sd[rel] for sd in shards]
        where = f"layer {i} ({m}{rel})"
        split = splits.get(rel)
        if split is None and any(t.shape != parts[0].shape for t in parts):
            raise ValueError(f"{where}: replicated adapter parameter differs in shape across TP.")
        base, sep, leaf = rel.rpartition(".lora_adapter.")
        if sep:
            if base not in _LORA_LINEARS or leaf not in ("lora_a", "lora_b"):
                raise ValueError(
                    f"{where}: LoRA on megatron {base!r} has no Hugging Face counterpart (mapped: "
                    f"{', '.join(_LORA_LINEARS)}), so the export cannot represent it. Target the "
                    "attention or MLP linears (lora target=mlp/attn/all/down)."
                )
            style, targets = _LORA_LINEARS[base]
            if (style, leaf) == ("row", "lora_a"):  # split by input columns
                pieces: tuple[torch.Tensor, ...] = (torch.cat(parts, dim=1),) * len(targets)
            elif (style, leaf) == ("column", "lora_b") and base == "mlp.linear_fc1":
                halves = [t.chunk(2, dim=0) for t in parts]  # each rank: [gate_r; up_r]
                pieces = tuple(torch.cat([h[k] for h in halves], dim=0) for k in (0, 1))
            elif (style, leaf) == ("column", "lora_b"):  # QKV rows grouped by query group
                pieces = _qkv_split(torch.cat(parts, dim=0), heads, groups, hd)
            else:  # replicated: column A, row B
                pieces = (parts[0],) * len(targets)
            for target, piece in zip(targets, pieces, strict=True):
                out[f"{p}{target}.lora_adapter.{leaf}"] = (rel, piece.clone())
            continue
        sub, sep, leaf = rel.partition(".lora_gate.")
        if sep and sub in _GATE_OWNERS:
            out[f"{p}{_GATE_OWNERS[sub]}.lora_gate.{leaf}"] = (rel, parts[0].clone())
        elif rel.startswith(_MEGATRON_PREFIX):
            if split is None:
                full = parts[0]
            elif split[1] != 1:
                raise ValueError(f"{where}: prefix parameter split with stride {split[1]}.")
            else:  # keys/values by query group, factors by head: contiguous per rank
                full = torch.cat(parts, dim=split[0])
            out[p + _HF_PREFIX + rel[len(_MEGATRON_PREFIX) :]] = (rel, full.clone())
        else:
            raise ValueError(
                f"{where}: adapter parameter with no Hugging Face counterpart; the export "
                "cannot represent it (mapped: LoRA on linear_qkv/linear_proj/linear_fc1/"
                "linear_fc2, lora_gate of self_attention/mlp, self_attention.prefix_adapter)."
            )
    return out


def _local_adapters(chunks: Sequence[torch.nn.Module]) -> tuple[list[tuple], list[str]]:
    """This rank's adapter tensors: ``(global layer, local index, name in the layer, tensor,
    split, merged)`` entries, and problems (adapters outside the decoder layers)."""
    from layerfreeze.apply import adapter_param_names

    entries, problems = [], []
    for chunk in chunks:
        merged = set()  # the rule of AppliedPlan.merged_adapter_param_names
        for name, mod in chunk.named_modules():
            if getattr(mod, "merged", False) is True and callable(getattr(mod, "unmerge", None)):
                merged.update(f"{name}.{n}" for n, _ in mod.named_parameters())
        params = dict(chunk.named_parameters())
        numbers = [layer.layer_number - 1 for layer in chunk.decoder.layers]
        for name in adapter_param_names(chunk):
            parts = name.split(".", 3)
            if len(parts) < 4 or parts[:2] != ["decoder", "layers"]:
                problems.append(
                    f"{name}: adapter parameter outside the decoder layers has no Hugging Face "
                    "counterpart; the export cannot represent it."
                )
                continue
            t = params[name]
            split = None
            if getattr(t, "tensor_model_parallel", False):
                split = (int(t.partition_dim), int(getattr(t, "partition_stride", 1)))
            j = int(parts[2])
            entries.append(
                (numbers[j], j, parts[3], t.detach().cpu().clone(), split, name in merged)
            )
    return entries, problems


def _assemble_adapters(
    payloads: Sequence[tuple[int, list[tuple], list[str]]], hf_config: Any
) -> tuple[dict[str, torch.Tensor], set[str]]:
    """HF adapter tensors (every adapter, merged or not) and the HF names of merged ones, from
    every (TP rank, entries, problems) payload of the model-parallel ranks."""
    problems = [msg for _, _, probs in payloads for msg in probs]
    if problems:
        raise ValueError("; ".join(problems))
    tp_size = max(tp for tp, _, _ in payloads) + 1
    by_layer: dict[int, list[dict[str, torch.Tensor]]] = {}
    splits: dict[int, dict[str, _Split]] = {}
    local_of: dict[int, int] = {}
    merged_rel: set[tuple[int, str]] = set()
    for tp, entries, _ in payloads:
        for i, j, rel, t, split, merged in entries:
            by_layer.setdefault(i, [{} for _ in range(tp_size)])[tp][rel] = t
            splits.setdefault(i, {})[rel] = split
            local_of[i] = j
            if merged:
                merged_rel.add((i, rel))
    tensors: dict[str, torch.Tensor] = {}
    merged_hf: set[str] = set()
    for i in sorted(by_layer):
        shards = by_layer[i]
        names = [sorted(sd) for sd in shards]
        if any(n != names[0] for n in names):
            raise ValueError(
                f"layer {i}: the tensor-parallel ranks hold different adapter parameters "
                f"({names}); export from a model whose ranks applied the same plan."
            )
        for hf_name, (rel, t) in _adapter_layer_to_hf(
            shards, splits[i], hf_config, local_of[i], i
        ).items():
            tensors[hf_name] = t
            if (i, rel) in merged_rel:
                merged_hf.add(hf_name)
    return tensors, merged_hf


def _sidecar_for_hf(
    tensors: Mapping[str, torch.Tensor], merged: set[str], hf_config: Any, applied: Any
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The sidecar ``layerfreeze.export.export_merged`` writes for the same plan on the HF model:
    its tensors (adapters not merged) and its ``plan.json`` content.

    The plan is applied to the HF model built on the meta device (no memory), so the adapter
    names, shapes and the sidecar plan come from the HF policies themselves; the megatron
    tensors must match them exactly.
    """
    from transformers import AutoModelForCausalLM

    from layerfreeze.apply import adapter_param_names, apply_plan
    from layerfreeze.export import fully_merged_policies, sidecar_plan_json

    install = [p for p, _ in applied.installed if p != applied.plan]
    config = copy.deepcopy(hf_config)  # the prefix policy repoints the attention implementation
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    try:
        hf_applied = apply_plan(model, applied.plan, install=install)
    except ValueError as e:
        raise ValueError(
            f"plan {applied.plan}: does not apply to the Hugging Face {config.model_type} model, "
            f"so the trained adapters have no Hugging Face form for the export's sidecar: {e}"
        ) from None
    params = dict(model.named_parameters())
    expected = set(adapter_param_names(model))
    missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    wrong = [
        f"{n} {tuple(t.shape)} vs {tuple(params[n].shape)}"
        for n, t in tensors.items()
        if n in params and tuple(t.shape) != tuple(params[n].shape)
    ]
    if missing or extra or wrong:
        raise ValueError(
            "the megatron adapters do not match those the plan creates on the Hugging Face "
            f"model: not exported {missing[:6]}, no Hugging Face parameter {extra[:6]}, "
            f"shapes (megatron vs HF) {wrong[:6]}; the export cannot represent them."
        )
    # (layer, policy) pairs whose every adapter parameter is merged: as in export_merged.
    merged_layers = fully_merged_policies(
        hf_applied, hf_applied.layout.layers, sorted(expected), merged
    )
    meta = sidecar_plan_json(hf_applied, merged_layers)
    sidecar = {n: t for n, t in tensors.items() if n not in merged}
    return sidecar, meta


def gather_hf_sidecar(
    model: torch.nn.Module | Sequence[torch.nn.Module], hf_config: Any, applied: Any
) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The export sidecar of a TP/PP-distributed model in HF naming, on global rank 0.

    A collective: every rank of the job calls it. The adapters that are not merged into the
    base weights (gated LoRA, prefixes, their gates) are gathered on rank 0 (TP shards joined,
    layers by global index) and renamed to the parameters the same plan creates on the HF
    model: the fused ``linear_qkv`` / ``linear_fc1`` LoRA becomes one LoRA per HF projection
    (``A`` copied, ``B`` split into the projections' rows), the sub-blocks' gates and the
    prefix adapters keep their names under ``self_attn`` / ``mlp``. Loading the exported
    checkpoint with ``from_pretrained`` and then ``layerfreeze.export.load_trainable(model,
    dir)`` restores the adapted model.

    Args:
        model: this rank's ``GPTModel`` (possibly wrapped) or its virtual-pipeline chunks.
        hf_config: the model's HF config.
        applied: the ``AppliedPlan`` of the megatron model (its plan and installed plans).

    Returns:
        ``(sidecar tensors, plan.json content)`` on global rank 0, None elsewhere.

    Raises:
        ValueError: on every rank, when an adapter has no HF counterpart (the layer and the
            parameter are named): nothing is dropped silently.
    """
    import torch.distributed as dist

    chunks = _chunks(model)
    entries, problems = _local_adapters(chunks)
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    if not distributed:
        payloads: list[Any] = [(0, entries, problems)]
    else:
        from megatron.core import parallel_state as ps

        replica0 = ps.get_data_parallel_rank() == 0 and ps.get_context_parallel_rank() == 0
        mine = (_tp()[0], entries, problems) if replica0 else None
        payloads = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(mine, payloads, dst=0)
    result, error, failure = None, None, None
    if not distributed or dist.get_rank() == 0:
        try:
            tensors, merged = _assemble_adapters([p for p in payloads if p is not None], hf_config)
            result = _sidecar_for_hf(tensors, merged, hf_config, applied)
        except Exception as e:  # reported on every rank below, then raised
            error, failure = f"export sidecar: {e}", e
    if distributed:  # every rank fails together, none waits at a later collective
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if failure is not None and not isinstance(failure, ValueError):
        raise failure
    if error is not None:
        raise ValueError(error) from None
    return result


def _write_sidecar(directory: Path, tensors: Mapping[str, torch.Tensor], meta: Mapping) -> None:
    """``layerfreeze_sidecar.safetensors`` + ``plan.json`` into ``directory`` (config.json
    already there), as ``layerfreeze.export.export_merged`` writes them (one writer)."""
    from layerfreeze.export import write_sidecar

    write_sidecar(directory, dict(tensors), dict(meta))
