"""Hugging Face models for the recipe: read a model's config, count its layers, build or load it.

Engine-neutral (transformers only): the DeepSpeed adapter trains the module built here; the
Megatron adapter reads the same config to build and convert its own model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from layerfreeze.config import ModelConfig
from layerfreeze.errors import ConfigError

__all__ = [
    "DTYPES",
    "build_model",
    "check_weight_files",
    "hf_model_config",
    "load_causal_lm",
    "model_num_layers",
]

#: ``model.dtype`` -> torch dtype
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def hf_model_config(model_cfg: ModelConfig, vocab_size: int | None = None):
    """The transformers config of ``model.path`` or ``model.architecture`` (no weights loaded;
    the ``*.safetensors`` headers of ``model.path`` are checked, see :func:`check_weight_files`).

    Raises:
        ConfigError: no checkpoint at the path, a truncated or corrupt weight file, an unreadable
            config.json, or an unknown ``model_type``.
    """
    from transformers import AutoConfig

    if model_cfg.path is not None:
        path = Path(model_cfg.path)
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"model.path: no Hugging Face checkpoint (config.json) at {model_cfg.path!r}. "
                "Give a directory saved with save_pretrained, or use model.architecture."
            )
        from layerfreeze.export import SIDECAR_FILE, sidecar_info

        try:
            check_weight_files(path, "model.path")  # a truncated download fails before any work
            n_sidecar, _ = sidecar_info(path, "model.path")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if n_sidecar:
            raise ConfigError(
                f"model.path: {model_cfg.path!r} is a layerfreeze export whose {n_sidecar} adapter "
                f"tensors (gated LoRA / prefixes, {SIDECAR_FILE}) are not in the base weights; "
                "training from it would start from the base model without them. Resume the run "
                "from its checkpoint instead, or export a plan that merges fully."
            )
        try:
            return AutoConfig.from_pretrained(str(path))
        except (OSError, ValueError) as e:  # a config.json that is not JSON, or unknown type
            raise ConfigError(
                f"model.path: cannot read {path / 'config.json'} ({str(e).splitlines()[0]})."
            ) from None
    arch = dict(model_cfg.architecture or {})
    model_type = arch.pop("model_type")
    if vocab_size is not None:
        arch.setdefault("vocab_size", vocab_size)
    try:
        return AutoConfig.for_model(model_type, **arch)
    except ValueError as e:
        raise ConfigError(f"model.architecture.model_type: {e}") from None


def model_num_layers(model_cfg: ModelConfig) -> int:
    """Decoder-layer count read from the model's config alone (no weights are loaded)."""
    config = hf_model_config(model_cfg)
    n = getattr(config, "num_hidden_layers", None)
    if not isinstance(n, int) or n < 1:
        raise ConfigError(
            f"model: cannot tell the number of decoder layers from the {config.model_type} config "
            f"(num_hidden_layers={n!r}). Set num_hidden_layers in model.architecture."
        )
    return n


def build_model(model_cfg: ModelConfig, vocab_size: int, seed: int) -> torch.nn.Module:
    """Load ``model.path`` or build ``model.architecture`` with weights seeded by ``seed``.

    Raises:
        ConfigError: no checkpoint at the path, an unknown ``model_type``, or a tokenizer with
            more ids than the checkpoint's vocabulary.
    """
    from transformers import AutoModelForCausalLM

    dtype = DTYPES[model_cfg.dtype]
    config = hf_model_config(model_cfg, vocab_size=vocab_size)
    if config.vocab_size < vocab_size:
        raise ConfigError(
            f"model: the model's vocab_size ({config.vocab_size}) is smaller than the tokenizer's "
            f"({vocab_size}). Use the tokenizer that came with the checkpoint, or raise vocab_size."
        )
    if model_cfg.path is not None:
        try:
            model = load_causal_lm(
                model_cfg.path,
                key="model.path",
                dtype=dtype,
                attn_implementation=model_cfg.attn_implementation,
            )
        except ValueError as e:
            raise ConfigError(str(e)) from None
    else:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype, attn_implementation=model_cfg.attn_implementation
        )
    model.config.use_cache = False
    return model


def check_weight_files(path: str | Path, key: str = "--model") -> None:
    """Check that every ``*.safetensors`` file in checkpoint directory ``path`` is readable.

    Reads only each file's header (``safe_open`` also checks the file is as long as the header
    says), so a truncated or corrupt download is named before any weights are loaded.

    Args:
        path: a Hugging Face checkpoint directory.
        key: the option or config key that gave ``path`` (for the message).

    Raises:
        ValueError: a weight file that cannot be read, named with ``key``.
    """
    from safetensors import SafetensorError, safe_open

    for f in sorted(Path(path).glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except (SafetensorError, OSError) as e:
            raise ValueError(
                f"{key} {path}: {f.name} is not a readable safetensors file "
                f"({str(e).splitlines()[0]}); it is truncated or corrupt. Re-save or "
                "re-download the checkpoint."
            ) from None


def load_causal_lm(path: str | Path, key: str = "--model", **kwargs: Any) -> torch.nn.Module:
    """``AutoModelForCausalLM.from_pretrained(path, **kwargs)`` with user errors as ``ValueError``:
    the one loader of every command that loads a model (eval, trace, prune, compose, export).

    A layerfreeze export whose sidecar holds adapters that could not be merged (gated LoRA,
    prefixes) loads with them re-attached (:func:`layerfreeze.export.load_export`), never as
    the bare base model.

    Args:
        path: a Hugging Face checkpoint directory.
        key: the option or config key that gave ``path`` (for the message).
        **kwargs: passed to ``from_pretrained`` (``dtype``, ``attn_implementation``, ...).

    Raises:
        ValueError: no checkpoint there, a corrupt weight file or config, naming ``key``.
    """
    from safetensors import SafetensorError

    if not (Path(path) / "config.json").is_file():
        raise ValueError(
            f"{key} {path}: no Hugging Face checkpoint (config.json) there. Give a directory "
            "saved with save_pretrained."
        )
    check_weight_files(path, key)
    from layerfreeze.export import load_export, sidecar_info

    sidecar_info(path, key)  # a marked export without its sidecar: named before loading
    try:
        return load_export(path, key, **kwargs)
    except (OSError, ValueError, SafetensorError) as e:
        msg = str(e).splitlines()[0]
        if msg.startswith(f"{key} {path}:"):
            raise ValueError(msg) from None
        raise ValueError(f"{key} {path}: cannot load a causal LM ({msg}).") from None
