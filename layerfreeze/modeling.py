"""Hugging Face models for the recipe: read a model's config, count its layers, build or load it.

Engine-neutral (transformers only): the DeepSpeed adapter trains the module built here; the
Megatron adapter reads the same config to build and convert its own model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from layerfreeze.config import ModelConfig
from layerfreeze.errors import ConfigError

__all__ = [
    "DTYPES",
    "SPECIAL_TOKEN_FIELDS",
    "VocabResize",
    "build_model",
    "check_weight_files",
    "hf_model_config",
    "load_causal_lm",
    "model_num_layers",
    "special_token_ids",
]

#: ``model.dtype`` -> torch dtype
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

#: The special-token ids of a transformers config that must lie inside the vocabulary (the pad
#: id becomes the input embedding's ``padding_idx``).
SPECIAL_TOKEN_FIELDS = ("pad_token_id", "bos_token_id", "eos_token_id")


@dataclass(frozen=True)
class VocabResize:
    """Grow a loaded model to an extended tokenizer (``tokenizer.extend_from`` of a run).

    Attributes:
        base: the base tokenizer directory (the one ``model.path`` was trained with).
        tokenizer: the extended tokenizer directory (new ids appended after the base's).
        init: ``subtoken_mean`` or ``mean`` (see :mod:`layerfreeze.vocab_resize`).
    """

    base: str
    tokenizer: str
    init: str = "subtoken_mean"

    @classmethod
    def from_run_config(cls, cfg: Any) -> VocabResize | None:
        """The resize of a ``RunConfig`` with ``tokenizer.extend_from`` (the extended tokenizer
        is ``<out_dir>/tokenizer``); None without one."""
        tok = cfg.tokenizer
        if not tok.extend_from:
            return None
        return cls(str(tok.extend_from), str(Path(cfg.logging.out_dir) / "tokenizer"),
                   tok.resize_init)


def special_token_ids(tokenizer: Any) -> dict[str, int]:
    """The tokenizer's pad / bos / eos ids as config fields (the ones it has)."""
    ids = {f: getattr(tokenizer, f, None) for f in SPECIAL_TOKEN_FIELDS}
    return {f: i for f, i in ids.items() if isinstance(i, int)}


def _check_special_ids(
    config: Any, key: str, given: set[str], fields: tuple[str, ...] = SPECIAL_TOKEN_FIELDS
) -> None:
    """Each of ``fields`` (pad / bos / eos ids) of ``config`` inside ``[0, vocab_size)``, else a
    one-line error naming the field under ``key`` (``model.architecture`` or ``model.path``)."""
    vocab = config.vocab_size
    for name in fields:
        value = getattr(config, name, None)
        ids = value if isinstance(value, (list, tuple)) else [value]
        bad = [i for i in ids if isinstance(i, int) and not 0 <= i < vocab]
        if not bad:
            continue
        if key == "model.path":
            raise ConfigError(
                f"model.path: {name} {value} in {key}'s config.json is outside its "
                f"{vocab}-token vocabulary (valid 0-{vocab - 1}). Fix the checkpoint's config.json."
            )
        origin = "" if name in given else f" ({config.model_type}'s default; the tokenizer has none)"
        raise ConfigError(
            f"{key}.{name}: {value} is outside the {vocab}-token vocabulary (valid "
            f"0-{vocab - 1}), got {name}={value}{origin}. Set {key}.{name} to an id below "
            f"{vocab} (the tokenizer's), or null."
        )


def hf_model_config(
    model_cfg: ModelConfig,
    vocab_size: int | None = None,
    special_ids: dict[str, int] | None = None,
):
    """The transformers config of ``model.path`` or ``model.architecture`` (no weights loaded;
    the ``*.safetensors`` headers of ``model.path`` are checked, see :func:`check_weight_files`).

    Args:
        model_cfg: the ``model`` section.
        vocab_size: the tokenizer's size; a built architecture gets it unless it sets its own.
        special_ids: the tokenizer's pad / bos / eos ids (:func:`special_token_ids`); a built
            architecture takes them instead of its family's defaults (Phi-3's pad id 32000 does
            not exist in a 1000-token vocabulary), unless ``model.architecture`` sets them.

    Raises:
        ConfigError: no checkpoint at the path, a truncated or corrupt weight file, an unreadable
            config.json, an unknown ``model_type``, or a pad / bos / eos id outside the
            vocabulary (naming the field).
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
            config = AutoConfig.from_pretrained(str(path))
        except (OSError, ValueError) as e:  # a config.json that is not JSON, or unknown type
            raise ConfigError(
                f"model.path: cannot read {path / 'config.json'} ({str(e).splitlines()[0]})."
            ) from None
        _check_special_ids(config, "model.path", set())
        return config
    arch = dict(model_cfg.architecture or {})
    model_type = arch.pop("model_type")
    given = set(arch)
    if vocab_size is not None:
        arch.setdefault("vocab_size", vocab_size)
    for name, value in (special_ids or {}).items():
        arch.setdefault(name, value)
    try:
        config = AutoConfig.for_model(model_type, **arch)
    except ValueError as e:
        raise ConfigError(f"model.architecture.model_type: {e}") from None
    # Without the tokenizer's ids (validate, layer counting) only the ids the user wrote are
    # checked: a family default (Phi-3's pad id 32000) is replaced by the tokenizer's at build.
    fields = SPECIAL_TOKEN_FIELDS if special_ids is not None else tuple(
        f for f in SPECIAL_TOKEN_FIELDS if f in given
    )
    _check_special_ids(config, "model.architecture", given, fields)
    return config


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


def build_model(
    model_cfg: ModelConfig,
    vocab_size: int,
    seed: int,
    special_ids: dict[str, int] | None = None,
    resize: VocabResize | None = None,
) -> torch.nn.Module:
    """Load ``model.path`` or build ``model.architecture`` with weights seeded by ``seed``.

    Args:
        model_cfg: the ``model`` section.
        vocab_size: the tokenizer's size.
        seed: the seed of a built model's initialisation.
        special_ids: the tokenizer's pad / bos / eos ids for a built model (see
            :func:`hf_model_config`).
        resize: grow the loaded ``model.path`` to an extended tokenizer
            (:class:`VocabResize.from_run_config`); deterministic, so a resumed run rebuilds
            the same rows before its checkpoint is loaded.

    Raises:
        ConfigError: no checkpoint at the path, an unknown ``model_type``, a tokenizer with
            more ids than the checkpoint's vocabulary (without ``resize``), a special-token id
            outside it, or a base tokenizer that does not fit the checkpoint.
    """
    from transformers import AutoModelForCausalLM

    dtype = DTYPES[model_cfg.dtype]
    config = hf_model_config(model_cfg, vocab_size=vocab_size, special_ids=special_ids)
    if resize is not None and model_cfg.path is None:
        raise ConfigError(
            "tokenizer.extend_from: resizes the pretrained model of model.path, got "
            "model.architecture. Set model.path."
        )
    if resize is None and config.vocab_size < vocab_size:
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
    if resize is not None:
        _resize(model, resize)
    model.config.use_cache = False
    return model


def _resize(model: torch.nn.Module, resize: VocabResize) -> None:
    from layerfreeze.data.tokenizer import auto_tokenizer
    from layerfreeze.utils.logging import get_logger, log_rank0
    from layerfreeze.vocab_resize import resize_for_new_tokens

    old, new = auto_tokenizer(resize.base), auto_tokenizer(resize.tokenizer)
    try:
        report = resize_for_new_tokens(model, old, new, init=resize.init)
    except ValueError as e:
        raise ConfigError(
            f"tokenizer.extend_from: cannot resize model.path to {resize.tokenizer} "
            f"({' '.join(str(e).split())})"
        ) from None
    log_rank0(
        get_logger(__name__),
        "resized the embedding%s from %d to %d rows: ids %d-%d initialised (%s; %d by the "
        "plain mean)",
        "" if report.tied else " and the output head", report.old_rows, report.new_rows,
        report.first_new_id, report.first_new_id + report.initialised - 1, report.init,
        len(report.fallback_to_mean),
    )


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
