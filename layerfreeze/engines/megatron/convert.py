"""Hugging Face configs as megatron-core ``TransformerConfig`` / ``GPTModel`` arguments, and
building the ``GPTModel`` of one pipeline stage, for Llama-style models.

Covers Hugging Face ``llama``, ``mistral`` and ``qwen2`` causal LMs (RMSNorm, rotary positions,
grouped-query attention, SwiGLU MLP) and megatron-core's ``GPTModel`` built from
``get_gpt_layer_local_spec(normalization="RMSNorm")`` (the spec that runs without Transformer
Engine; its layer norms are the modules ``input_layernorm`` / ``pre_mlp_layernorm``).

* :func:`megatron_config_kwargs` / :func:`gpt_model_kwargs`: the ``TransformerConfig`` and
  ``GPTModel`` arguments of an HF config; :func:`padded_vocab_size` (Megatron-LM's rule: a
  multiple of ``make_vocab_size_divisible_by * tp``); :func:`build_gpt_from_hf_config` builds
  the model of one pipeline stage (or virtual chunk).

The weights live in two sibling modules, re-exported here so ``convert.<name>`` keeps working:

* :mod:`~layerfreeze.engines.megatron.hf_weights`: the tensor mapping HF <-> megatron per
  architecture (:func:`hf_to_megatron`, :func:`megatron_to_hf`) and loading an HF checkpoint
  into a built model (:func:`load_hf_weights`);
* :mod:`~layerfreeze.engines.megatron.hf_export`: the merged export of a TP/PP-distributed
  model (:func:`gather_hf_state_dict`, :func:`save_hf_checkpoint`, :func:`export_hf_checkpoint`,
  :func:`export_runner_to_hf`) and its sidecar of adapters that cannot be merged
  (:func:`gather_hf_sidecar`).

When Megatron-Bridge (``megatron.bridge``) is importable and the HF directory is known
(``build_gpt_from_hf_config(..., hf_path=DIR)``), ``backend="auto"`` hands building, loading and
exporting to its ``AutoBridge`` (its own Transformer-Engine specs and mappings; the model
remembers which backend built it). Otherwise, or with ``backend="layerfreeze"``, the code here
does it. The Bridge path is not exercised on CPU machines (Bridge needs Transformer Engine and
CUDA), so it is kept to Bridge's documented calls: ``AutoBridge.from_hf_pretrained``,
``to_megatron_provider(load_weights=False)``, ``provide``, ``load_hf_weights`` and
``save_hf_pretrained``.

``transformer_impl="transformer_engine"`` (``megatron.transformer_impl``, Megatron-LM's
``--transformer-impl``) builds megatron-core's Transformer Engine spec instead
(``get_gpt_layer_with_transformer_engine_spec``: the norms fused into ``linear_qkv`` /
``linear_fc1``, TE attention, a ``TENorm`` final norm that handles sequence parallelism itself).
It needs CUDA and Transformer Engine (:func:`transformer_engine_problem`); it was written against
megatron-core 0.16.1 and Transformer Engine's source and has never run on this project's CPU
machines (tests/gpu/test_cuda_megatron_te_engine.py is its check on a GPU).

Vocabulary padding changes the training loss slightly (the zero rows add ``exp(0)`` terms to the
softmax, as in Megatron-LM); pass ``make_vocab_size_divisible_by=1`` (pads only to a multiple of
the TP size) when the loss must equal the HF model's exactly.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Mapping
from typing import Any, Literal

import torch

from layerfreeze.utils.logging import get_logger

#: Names that lived here before the split -> the module that owns them now (resolved lazily:
#: those modules import this one).
_MOVED = {
    **dict.fromkeys(
        (
            "hf_keys_for",
            "hf_to_megatron",
            "megatron_to_hf",
            "load_hf_state_dict",
            "load_hf_weights",
        ),
        "layerfreeze.engines.megatron.hf_weights",
    ),
    **dict.fromkeys(
        (
            "gather_hf_state_dict",
            "save_hf_checkpoint",
            "export_hf_checkpoint",
            "export_runner_to_hf",
            "gather_hf_sidecar",
            "_adapter_layer_to_hf",
        ),
        "layerfreeze.engines.megatron.hf_export",
    ),
}


__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "TRANSFORMER_IMPLS",
    "bridge_available",
    "transformer_engine_problem",
    "megatron_config_kwargs",
    "gpt_model_kwargs",
    "padded_vocab_size",
    "build_gpt_from_hf_config",
    *(name for name in _MOVED if not name.startswith("_")),
]


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


logger = get_logger(__name__)

#: HF ``model_type`` values this module maps (all Llama-style decoders).
SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("llama", "mistral", "qwen2")

Backend = Literal["auto", "bridge", "layerfreeze"]
_BACKEND_ATTR = "_layerfreeze_hf_backend"
_HF_PATH_ATTR = "_layerfreeze_hf_path"
#: attribute of a built model naming its layer spec (``local`` / ``transformer_engine``)
TRANSFORMER_IMPL_ATTR = "_layerfreeze_transformer_impl"
#: ``megatron.transformer_impl`` values (Megatron-LM's ``--transformer-impl`` choices we build).
TRANSFORMER_IMPLS: tuple[str, ...] = ("local", "transformer_engine")


def transformer_engine_problem() -> str | None:
    """Why the Transformer Engine spec (``megatron.transformer_impl: transformer_engine``) cannot
    be built here, or None.

    It needs a CUDA device and megatron-core's own Transformer Engine import to have succeeded
    (megatron-core 0.16.1 ``megatron/core/extensions/transformer_engine.py`` l.61-77 sets
    ``HAVE_TE`` after importing ``transformer_engine`` and ``transformer_engine.pytorch.fp8``;
    without it every TE wrapper raises ``ImportError`` in ``__init__``, and the final norm falls
    back to another class, ``transformer/transformer_block.py`` l.53-69). Unlike the generic
    megatron CUDA check, nothing can stand in for TE's kernels, so the test suite's CPU shim does
    not answer this one.
    """
    from megatron.core.extensions import transformer_engine as mte

    missing = []
    if not torch.cuda.is_available():
        missing.append(f"no CUDA device (torch {torch.__version__})")
    if not mte.HAVE_TE:
        try:
            import transformer_engine.pytorch  # noqa: F401  (only for the reason it fails)

            reason = "megatron-core could not import transformer_engine.pytorch.fp8"
        except Exception as e:  # ImportError, or OSError / RuntimeError of a broken build
            first = str(e).splitlines()[0] if str(e) else ""
            reason = f"{type(e).__name__}: {first}" if first else type(e).__name__
        missing.append(f"transformer_engine not importable ({reason})")
    if not missing:
        return None
    return (
        "megatron.transformer_impl: transformer_engine needs CUDA and an importable "
        f"transformer_engine, got {' and '.join(missing)}. Set megatron.transformer_impl: local "
        "(megatron-core's own modules, no Transformer Engine), or run on a CUDA machine with "
        "Transformer Engine installed."
    )


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
    transformer_impl: str = "local",
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
        transformer_impl: this module's layer spec: ``local`` (``get_gpt_layer_local_spec``;
            under sequence parallelism with :class:`SequenceParallelTorchNorm` norms) or
            ``transformer_engine`` (``get_gpt_layer_with_transformer_engine_spec``; its TE norms
            handle sequence parallelism; needs CUDA and Transformer Engine; never executed on
            this project's CPU machines). Megatron-Bridge builds its own (TE) spec.

    Returns:
        The ``GPTModel``; it remembers which backend built it, so :func:`load_hf_weights` and
        :func:`export_hf_checkpoint` use the matching converter.

    Raises:
        ValueError: an unknown ``transformer_impl``.
        ImportError: ``transformer_engine`` without CUDA or Transformer Engine (the
            :func:`transformer_engine_problem` line).
    """
    if transformer_impl not in TRANSFORMER_IMPLS:
        raise ValueError(
            f"transformer_impl: must be one of {', '.join(TRANSFORMER_IMPLS)}, got "
            f"{transformer_impl!r}."
        )
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
    if transformer_impl == "transformer_engine":
        problem = transformer_engine_problem()
        if problem:
            raise ImportError(problem)
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        # gpt_layer_specs.py l.171-184: a dense model (num_experts None) with the config's
        # qk_layernorm (False for every supported architecture); no MLA, no TE op fuser, so
        # MLP.linear_fc1 is TELayerNormColumnParallelLinear (l.495-497). The norms are TE's and
        # mark their parameters sequence_parallel themselves: no SP substitute here.
        spec: Any = get_gpt_layer_with_transformer_engine_spec(
            num_experts=None, moe_grouped_gemm=False, qk_layernorm=bool(config.qk_layernorm)
        )
    else:
        spec = get_gpt_layer_local_spec(normalization="RMSNorm")
        if config.sequence_parallel:
            spec = _sequence_parallel_spec(spec, config, vp_stage)
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=parallel_output,
        **model_kwargs,
        **extra,
    )
    setattr(model, _BACKEND_ATTR, "layerfreeze")
    setattr(model, TRANSFORMER_IMPL_ATTR, transformer_impl)
    return model


class SequenceParallelTorchNorm:
    """megatron-core's ``WrappedTorchNorm`` (a plain ``torch.nn.RMSNorm`` / ``LayerNorm``) for
    sequence parallelism, which ``WrappedTorchNorm`` refuses: its parameters carry
    ``sequence_parallel = True``, as megatron-core's ``FusedLayerNorm`` and ``TENorm`` mark
    theirs, so ``finalize_model_grads`` sums their gradients (each rank normalises its sequence
    shard) over the tensor-parallel ranks."""

    def __new__(cls, config: Any, hidden_size: int, eps: float = 1e-5, **kwargs: Any):
        if config.normalization == "RMSNorm":
            norm: torch.nn.Module = torch.nn.RMSNorm(hidden_size, eps=eps)
        else:
            norm = torch.nn.LayerNorm(hidden_size, eps=eps)
        for p in norm.parameters():
            p.sequence_parallel = bool(config.sequence_parallel)
        return norm


def _sequence_parallel_spec(spec: Any, config: Any, vp_stage: int | None) -> Any:
    """The local layer spec with :class:`SequenceParallelTorchNorm` in place of its torch norms
    (the decoder layers' two norms and the final norm)."""
    import dataclasses

    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    sub = dataclasses.replace(
        spec.submodules,
        input_layernorm=SequenceParallelTorchNorm,
        pre_mlp_layernorm=SequenceParallelTorchNorm,
    )
    layer = dataclasses.replace(spec, submodules=sub)
    return TransformerBlockSubmodules(
        layer_specs=[layer] * get_num_layers_to_build(config, vp_stage=vp_stage),
        layer_norm=SequenceParallelTorchNorm,
    )


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
# Geometry checks shared by the weight mappings


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
