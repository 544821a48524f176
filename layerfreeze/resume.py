"""Engine-neutral checkpoint checks shared by the recipe and both engine adapters.

Resume compatibility (:func:`engine_problems`, :func:`run_problems`): the engine that saved the
checkpoint, the plan schedule, the tokenizer (a fingerprint of its vocabulary, special token
ids and class) and the model architecture, each difference named by its field with the saved
and the current value (never two whole dicts).

Content checksums over all ranks: at save time every rank hashes a share of the staged files
(:func:`staged_checksums`), at load time every rank verifies a share (:func:`verify_content`), so
the cost of reading a checkpoint once more is split over the job instead of landing on rank 0.
Collective when a process group is initialized; plain function calls otherwise.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from layerfreeze import checkpoint as ckpt
from layerfreeze.checkpoint_meta import CheckpointMeta
from layerfreeze.config import CHANGEABLE_MODEL_FIELDS
from layerfreeze.utils import dist

__all__ = [
    "check_content",
    "engine_problems",
    "field_diff",
    "model_fingerprint",
    "run_problems",
    "staged_checksums",
    "tokenizer_fingerprint",
    "verify_content",
]

#: Hugging Face config fields that decide a model's parameters (what a checkpoint must match).
#: Fields that fix the parameters' shapes and layout: a checkpoint never loads across them.
SHAPE_KEYS = (
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
    "tie_word_embeddings", "n_embd", "n_layer", "n_head", "n_inner", "n_positions",
    "num_experts", "num_local_experts", "moe_intermediate_size",
)
#: Fields that change what the same weights compute: a resume refuses a change unless the run
#: names the field in ``checkpoint.allow_model_change`` (e.g. a RoPE base raised for longer
#: context on purpose).
CHANGEABLE_KEYS = CHANGEABLE_MODEL_FIELDS
_ARCH_KEYS = SHAPE_KEYS + CHANGEABLE_KEYS


def _share(names: list[str]) -> list[str]:
    return names[dist.get_rank() :: dist.get_world_size()]


def staged_checksums(staging: str | os.PathLike) -> dict[str, str]:
    """sha256 of every file in a staging directory, each rank hashing a share (collective).

    Call after the barrier that ends the writes. Global rank 0 lists the files; a file a rank
    cannot see (no shared filesystem) is left to :func:`~layerfreeze.checkpoint.commit_checkpoint`
    on rank 0. Returns the same mapping on every rank.
    """
    staging = Path(staging)
    names = None
    if dist.get_rank() == 0:
        names = sorted(
            Path(root, f).relative_to(staging).as_posix()
            for root, _dirs, files in os.walk(staging)
            for f in files
            if f != ckpt.MANIFEST_FILE
        )
    names = dist.broadcast_object(names)
    mine = {}
    for rel in _share(names):
        if (staging / rel).is_file():
            mine[rel] = ckpt.file_sha256(staging / rel)
    merged: dict[str, str] = {}
    for part in dist.all_gather_objects(mine):
        merged.update(part)
    return merged


def verify_content(info: ckpt.CheckpointInfo) -> list[str]:
    """Files of ``info`` whose content differs from the checksums in its manifest (collective).

    Each rank reads a share of the files; every rank gets the whole list (empty when intact or
    when the manifest predates checksums). Cost: see
    :func:`~layerfreeze.checkpoint.content_problems`, divided by the number of ranks.
    """
    problems = ckpt.content_problems(info, _share(sorted(info.sha256)))
    return sorted(p for part in dist.all_gather_objects(problems) for p in part)


def check_content(info: ckpt.CheckpointInfo) -> None:
    """Raise when :func:`verify_content` finds a changed file (collective).

    Raises:
        CheckpointError: naming the checkpoint and each changed file.
    """
    problems = verify_content(info)
    if problems:
        raise ckpt.CheckpointError(
            f"{info.path}: checkpoint is damaged: {'; '.join(problems[:5])}"
            f"{f'; and {len(problems) - 5} more' if len(problems) > 5 else ''}. Resume from an "
            "earlier checkpoint or delete this one."
        )


def field_diff(saved: Any, current: Any, path: str) -> list[str]:
    """``"<path>: <saved> in the checkpoint, <current> in this run"`` for each differing leaf
    (dict keys and list items recursed into), so a refusal names fields, not whole dicts."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in list(saved) + [k for k in current if k not in saved]:
            sub = f"{path}.{key}" if path else str(key)
            out += field_diff(saved.get(key, "<unset>"), current.get(key, "<unset>"), sub)
        return out
    if isinstance(saved, list) and isinstance(current, list) and len(saved) == len(current):
        pairs = enumerate(zip(saved, current, strict=True))
        return [d for i, (a, b) in pairs for d in field_diff(a, b, f"{path}[{i}]")]
    if saved != current:
        return [f"{path}: {saved!r} in the checkpoint, {current!r} in this run"]
    return []


def engine_problems(
    meta: CheckpointMeta | Mapping[str, Any], *, engine: str, schedule: Any
) -> list[str]:
    """What stops ``engine`` from resuming a checkpoint with layerfreeze metadata ``meta``:
    another engine saved it, or the plan schedule differs (each differing field named).

    Args:
        meta: the checkpoint's :class:`~layerfreeze.checkpoint_meta.CheckpointMeta`, or the
            stored ``"layerfreeze"`` object as read (what the recipe checks before an engine
            reads it; a missing field reads as unset).
        engine: this run's engine.
        schedule: this run's ``PlanSchedule.to_dict()``.
    """
    if isinstance(meta, CheckpointMeta):
        saved_engine, saved_schedule = meta.engine, meta.schedule
    else:
        saved_engine, saved_schedule = meta.get("engine"), meta.get("schedule")
    if saved_engine != engine:
        return [
            f"it was saved by engine {saved_engine!r}, this run uses engine: {engine} (resume "
            f"with engine: {saved_engine}, or convert the weights and start a new run)"
        ]
    if saved_schedule != schedule:
        diff = field_diff(saved_schedule, schedule, "plan.schedule")
        return [
            "the plan differs (" + "; ".join(diff[:6])
            + (f"; and {len(diff) - 6} more" if len(diff) > 6 else "")
            + "): resume with the checkpoint's plan, or start a new run from its export"
        ]
    return []


def tokenizer_fingerprint(tokenizer: Any) -> dict[str, Any]:
    """Class name, size and a sha256 over the vocabulary (pieces in id order) and the special
    token ids: two tokenizers of the same size but other pieces or ids differ here."""
    vocab = tokenizer.get_vocab()
    pieces = [p for p, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {
        name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad", "unk")
    }
    blob = json.dumps({"pieces": pieces, "special": special}, ensure_ascii=False)
    return {
        "class": type(tokenizer).__name__,
        "size": len(vocab),
        "special_ids": special,
        "sha256": hashlib.sha256(blob.encode("utf-8")).hexdigest(),
    }


def model_fingerprint(hf_config: Any) -> dict[str, Any]:
    """The architecture fields of a Hugging Face config (see ``_ARCH_KEYS``) that it sets."""
    d = hf_config.to_dict()
    return {k: d[k] for k in _ARCH_KEYS if k in d}


def run_problems(
    saved: dict[str, Any], current: dict[str, Any], allow_model_change: Iterable[str] = ()
) -> list[str]:
    """Tokenizer and model-architecture differences between the run metadata a checkpoint
    recorded (``saved``; empty for checkpoints written before it was recorded) and this run's.
    Fields named in ``allow_model_change`` (a subset of :data:`CHANGEABLE_KEYS`) may differ; the
    caller logs them (:func:`allowed_model_changes`)."""
    problems = []
    old_tok, new_tok = saved.get("tokenizer"), current.get("tokenizer")
    if old_tok and new_tok and old_tok != new_tok:
        diff = field_diff(
            {k: v for k, v in old_tok.items() if k != "sha256"},
            {k: v for k, v in new_tok.items() if k != "sha256"}, "tokenizer",
        )
        if not diff:
            diff = [
                f"tokenizer vocabulary: sha256 {old_tok['sha256'][:12]} in the checkpoint, "
                f"{new_tok['sha256'][:12]} in this run (same size, other pieces or ids)"
            ]
        problems.append(
            "another tokenizer (" + "; ".join(diff) + "): resume with the tokenizer the run "
            "was trained with (tokenizer.path), or start a new run"
        )
    old_model, new_model = saved.get("model"), current.get("model")
    if old_model and new_model and old_model != new_model:
        allowed = set(allow_model_change)
        keys = [k for k in list(old_model) + list(new_model) if k not in allowed]
        diff = field_diff(
            {k: old_model.get(k, "<unset>") for k in dict.fromkeys(keys)},
            {k: new_model.get(k, "<unset>") for k in dict.fromkeys(keys)},
            "model architecture",
        )
        if diff:
            problems.append(
                "another model architecture (" + "; ".join(diff) + "): resume with the "
                "checkpoint's model, start a new run, or, for a deliberate change of "
                f"{', '.join(CHANGEABLE_KEYS)}, name the field in checkpoint.allow_model_change"
            )
    return problems


def allowed_model_changes(
    saved: dict[str, Any], current: dict[str, Any], allow_model_change: Iterable[str]
) -> list[str]:
    """The ``checkpoint.allow_model_change`` fields that do differ, each as ``field_diff``
    words it, for the resume log line."""
    old_model, new_model = saved.get("model") or {}, current.get("model") or {}
    return [
        d for k in allow_model_change
        for d in field_diff(old_model.get(k, "<unset>"), new_model.get(k, "<unset>"), f"model.{k}")
    ]
