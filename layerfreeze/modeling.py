"""Hugging Face models for the recipe: read a model's config, count its layers, build or load it.

Engine-neutral (transformers only): the DeepSpeed adapter trains the module built here; the
Megatron adapter reads the same config to build and convert its own model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from layerfreeze.config import ModelConfig
from layerfreeze.errors import ConfigError

__all__ = ["DTYPES", "build_model", "hf_model_config", "model_num_layers"]

#: ``model.dtype`` -> torch dtype
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def hf_model_config(model_cfg: ModelConfig, vocab_size: int | None = None):
    """The transformers config of ``model.path`` or ``model.architecture`` (no weights loaded).

    Raises:
        ConfigError: no checkpoint at the path, or an unknown ``model_type``.
    """
    from transformers import AutoConfig

    if model_cfg.path is not None:
        path = Path(model_cfg.path)
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"model.path: no Hugging Face checkpoint (config.json) at {model_cfg.path!r}. "
                "Give a directory saved with save_pretrained, or use model.architecture."
            )
        return AutoConfig.from_pretrained(str(path))
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
        model = AutoModelForCausalLM.from_pretrained(
            model_cfg.path, dtype=dtype, attn_implementation=model_cfg.attn_implementation
        )
    else:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype, attn_implementation=model_cfg.attn_implementation
        )
    model.config.use_cache = False
    return model
