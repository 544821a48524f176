"""New vocabulary rows (``embeddings`` / ``lm_head`` ``new_rows``) in PEFT's ``trainable_token_indices``
format, written with and read from a PEFT LoRA adapter by :mod:`layerfreeze.interop.peft`.

PEFT 0.21 (``LoraConfig.trainable_token_indices`` -> ``tuners/trainable_tokens``) stores, per
wrapped module, the trained rows themselves (not a delta to add) as
``base_model.model.<module>.token_adapter.trainable_tokens_delta`` (``(len(indices), hidden)``)
and the indices in ``adapter_config.json``: a list (the input embedding; a head tied by
``config.tie_word_embeddings`` follows it and is not saved) or a dict ``{module name: indices}``
(an untied ``lm_head`` is its own entry). On load PEFT copies those rows over the base model's
rows at the indices; it never resizes: a base whose embedding has fewer rows fails with an
``IndexError``, so the base must be resized to the new vocabulary first. The rows the adapter
carries replace the base's, so their initialisation in the resized base does not matter; rows it
does not carry (an untied head that stayed frozen) are the base's, so the base must be the
resized checkpoint the run trained from.

layerfreeze's ``new_rows(from_id=N)`` is the indices ``N .. rows-1`` of its module, so it maps
both ways; other index sets (gaps, a run short of the last row) are refused on read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from layerfreeze.apply import AppliedPlan
from layerfreeze.engines.partition import full_shape
from layerfreeze.policies.new_rows import PARAM, new_rows_from_id

__all__ = [
    "TOKENS_CONFIG_KEY",
    "TokenPart",
    "token_parts",
    "token_export_problems",
    "token_config",
    "token_tensors",
    "token_readme",
    "TokenEntry",
    "check_whole",
    "split_token_tensors",
    "read_token_entries",
    "entry_part",
    "plan_parts",
    "load_problems",
    "vllm_problem",
]

TOKENS_CONFIG_KEY = "trainable_token_indices"
_KEY_PREFIX = "base_model.model."
_SUFFIX = ".token_adapter.trainable_tokens_delta"


@dataclass(frozen=True)
class TokenPart:
    """One module whose new rows the export carries."""

    part: str  # "embeddings" / "lm_head"
    module: str  # qualified module name
    from_id: int
    rows: int  # the module's row count: the resized vocabulary
    weight: nn.Parameter  # its new_rows_weight


def _io_modules(model: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    emb = (
        model.get_input_embeddings()
        if callable(getattr(model, "get_input_embeddings", None))
        else None
    )
    get_head = getattr(model, "get_output_embeddings", None)
    return emb, (get_head() if callable(get_head) else None)


def token_parts(applied: AppliedPlan) -> list[TokenPart]:
    """The modules carrying a ``new_rows_weight`` (any installed plan), embedding first; a tied
    head shares the embedding's rows and is not listed."""
    model = applied.model
    names = {id(m): n for n, m in model.named_modules()}
    emb, head = _io_modules(model)
    out = []
    for part, module in (("embeddings", emb), ("lm_head", head)):
        if module is None or (part == "lm_head" and applied.layout.tied_embeddings):
            continue
        start = new_rows_from_id(module)
        if start is not None:
            rows = int(full_shape(module.weight)[0])
            out.append(TokenPart(part, names[id(module)], start, rows, getattr(module, PARAM)))
    return out


def token_export_problems(applied: AppliedPlan) -> list[str]:
    """Why the new rows cannot travel as PEFT trainable tokens (empty when they can)."""
    parts = token_parts(applied)
    if not parts:
        return []
    problems = []
    model = applied.model
    _emb, head = _io_modules(model)
    for p in parts:
        module = model.get_submodule(p.module)
        kind = nn.Embedding if p.part == "embeddings" else nn.Linear
        if not isinstance(module, kind):
            problems.append(
                f"{p.part}: new_rows on a {type(module).__name__} ({p.module}), but PEFT's trainable "
                f"tokens compute only a plain {kind.__name__} there"
            )
    uses_head = applied.layout.tied_embeddings or any(p.part == "lm_head" for p in parts)
    if uses_head and head is not None and getattr(head, "bias", None) is not None:
        problems.append(
            "lm_head: the output head has a bias, which PEFT's trainable tokens drop when they "
            "compute the head's logits (F.linear without bias)"
        )
    tie_cfg = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    if applied.layout.tied_embeddings and not tie_cfg:
        problems.append(
            "embeddings: the head shares the embedding's weight but config.tie_word_embeddings "
            "is false, so PEFT would not give the head the trained rows"
        )
    return problems


def check_whole(parts: list[TokenPart], what: str) -> None:
    """Refuse ZeRO-3 partitioned ``new_rows_weight`` (its local tensor is an empty shard)."""
    for p in parts:
        if tuple(p.weight.shape) != tuple(full_shape(p.weight)):
            raise ValueError(
                f"{what}: {p.module}.{PARAM} is partitioned by ZeRO-3 (local shape "
                f"{tuple(p.weight.shape)}, full {tuple(full_shape(p.weight))}); call it inside "
                "deepspeed.zero.GatheredParameters over it."
            )


def token_config(parts: list[TokenPart]) -> list[int] | dict[str, list[int]]:
    """``trainable_token_indices``: a list for the input embedding alone (PEFT's default target,
    tied heads follow it), else ``{module name: indices}``."""
    if [p.part for p in parts] == ["embeddings"]:
        return list(range(parts[0].from_id, parts[0].rows))
    return {p.module: list(range(p.from_id, p.rows)) for p in parts}


def token_tensors(parts: list[TokenPart]) -> dict[str, torch.Tensor]:
    """The trained rows under PEFT's key names."""
    return {
        f"{_KEY_PREFIX}{p.module}{_SUFFIX}": p.weight.detach().to("cpu").contiguous().clone()
        for p in parts
    }


def token_readme(parts: list[TokenPart], base_name: str | None) -> str:
    """README.md of an export carrying new rows: what the base model must be."""
    vocab = parts[0].rows
    lines = [
        "# LoRA adapter + new vocabulary rows (PEFT trainable_token_indices)",
        "",
        "Written by layerfreeze `export_peft`. Besides the LoRA weights, `adapter_model.safetensors`",
        "holds the trained new token rows (`*.token_adapter.trainable_tokens_delta`), listed in",
        "`adapter_config.json` under `trainable_token_indices`:",
        "",
    ]
    for p in parts:
        lines.append(
            f"- `{p.module}` ({p.part}): rows {p.from_id}-{p.rows - 1} "
            f"({p.rows - p.from_id} rows, new_rows(from_id={p.from_id}))"
        )
    lines += [
        "",
        f"**The base model must be resized first: vocab_size={vocab}** (embedding and output "
        f"head with exactly {vocab} rows, the extended tokenizer's length plus any padding).",
        "PEFT does not resize: `PeftModel.from_pretrained` on the original, smaller base fails",
        "with an IndexError. Load the resized checkpoint the run trained from"
        + (f" (`{base_name}`)" if base_name else "")
        + ", or resize the original base the same way",
        "(`layerfreeze.vocab_resize.resize_for_new_tokens`, or `model.resize_token_embeddings`).",
        "The rows listed above replace the base's rows, so their initialisation does not matter;",
        "every other row (including the new rows of a head not listed above) is the base's.",
        "",
        "vLLM's LoRA loader refuses `trainable_tokens_delta` tensors; serve a merged export",
        "(`layerfreeze export --format merged`) there.",
        "",
    ]
    return "\n".join(lines)


def split_token_tensors(
    tensors: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the other tensors, ``{module name: rows}`` of the trainable-token tensors)."""
    rest, tokens = {}, {}
    for key, t in tensors.items():
        if key.endswith(_SUFFIX):
            name = key[: -len(_SUFFIX)]
            tokens[name[len(_KEY_PREFIX) :] if name.startswith(_KEY_PREFIX) else name] = t
        else:
            rest[key] = t
    return rest, tokens


@dataclass(frozen=True)
class TokenEntry:
    """One module's trainable tokens read from a PEFT adapter."""

    module: str  # qualified module name (from the tensor key)
    from_id: int
    stop: int  # one past the last index: the vocabulary the base must have
    rows: torch.Tensor


def _matching(tokens: dict[str, torch.Tensor], key: str) -> list[str]:
    """Token tensors a ``trainable_token_indices`` key selects (PEFT matches name suffixes)."""
    return [n for n in tokens if n == key or n.endswith("." + key)]


def read_token_entries(cfg: dict, tokens: dict[str, torch.Tensor], where: str) -> list[TokenEntry]:
    """Check ``trainable_token_indices`` against the token tensors.

    Raises:
        ValueError: malformed indices, indices that are not one contiguous run (what
            ``new_rows`` trains), a tensor without indices or the reverse, a wrong row count.
    """
    spec = cfg.get(TOKENS_CONFIG_KEY)
    if not spec and not tokens:
        return []
    if spec is None:
        raise ValueError(
            f"{where}: trainable-token tensors for {sorted(tokens)} have no "
            f"{TOKENS_CONFIG_KEY} in the config; the adapter is incomplete."
        )
    labels = {}
    if isinstance(spec, list):
        if len(tokens) != 1:
            raise ValueError(
                f"{where}: {TOKENS_CONFIG_KEY} is a list (the input embedding), but the weights "
                f"hold trainable tokens for {sorted(tokens) or 'no module'}."
            )
        spec = {next(iter(tokens)): spec}
        labels[next(iter(tokens))] = f"{TOKENS_CONFIG_KEY} (a list: {next(iter(tokens))})"
    if not isinstance(spec, dict):
        raise ValueError(
            f"{where}: {TOKENS_CONFIG_KEY} must be a list of token ids or a dict of module name -> "
            f"token ids, got {spec!r}."
        )
    entries, used = [], set()
    for key, idx in spec.items():
        label = labels.get(key, f"{TOKENS_CONFIG_KEY}[{key!r}]")
        if not (
            isinstance(idx, list)
            and idx
            and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in idx)
        ):
            raise ValueError(
                f"{where}: {label} must be a non-empty list of token ids (ints >= 0), got {idx!r}."
            )
        start = idx[0]
        if idx != list(range(start, start + len(idx))):
            raise ValueError(
                f"{where}: {label} is not one ascending run of ids (got "
                f"{idx[:6]}{' ...' if len(idx) > 6 else ''}); layerfreeze's new_rows(from_id=N) "
                "trains the contiguous rows from N to the last row only."
            )
        match = _matching(tokens, key)
        if not match and any(
            v == idx and _matching(tokens, k) for k, v in spec.items() if k != key
        ):
            # PEFT saves a head tied to the embedding through the embedding's rows only
            # (same indices); it follows them
            continue
        if len(match) != 1:
            raise ValueError(
                f"{where}: {label} matches {len(match)} trainable-token "
                f"tensors ({sorted(tokens)}); expected one."
            )
        rows = tokens[match[0]]
        if rows.dim() != 2 or rows.shape[0] != len(idx):
            raise ValueError(
                f"{where}: {match[0]}{_SUFFIX} has shape {tuple(rows.shape)}, but "
                f"{label} lists {len(idx)} ids; expected ({len(idx)}, hidden)."
            )
        used.add(match[0])
        entries.append(TokenEntry(match[0], start, start + len(idx), rows))
    extra = sorted(set(tokens) - used)
    if extra:
        raise ValueError(
            f"{where}: trainable-token tensors for {extra} have no {TOKENS_CONFIG_KEY} entry."
        )
    return entries


def entry_part(model: nn.Module, entry: TokenEntry, tied: bool, where: str) -> str:
    """The plan part (``embeddings`` / ``lm_head``) of ``entry`` on ``model``.

    Raises:
        ValueError: the module is not the model's embedding or untied head, or its row count
            is not the adapter's vocabulary (resize first).
    """
    emb, head = _io_modules(model)
    try:
        module = model.get_submodule(entry.module)
    except AttributeError:
        module = None
    if module is not None and module is emb:
        part = "embeddings"
    elif module is not None and module is head and not tied:
        part = "lm_head"
    else:
        why = (
            "is tied to the embedding" if module is head else "is not the model's embedding or head"
        )
        raise ValueError(
            f"{where}: trainable tokens on {entry.module}, which {why}; layerfreeze's new_rows "
            "covers the input embedding and an untied output head."
        )
    rows = int(full_shape(module.weight)[0])
    if rows != entry.stop:
        raise ValueError(
            f"{where}: the adapter's trainable tokens on {entry.module} end at id {entry.stop - 1} "
            f"(vocab_size={entry.stop}) but the model has {rows} rows there; load the base "
            f"resized to {entry.stop} rows (the checkpoint the adapter was trained on, or "
            "resize_for_new_tokens / resize_token_embeddings) first."
        )
    return part


def plan_parts(
    model: nn.Module, entries: list[TokenEntry], tied: bool, where: str
) -> dict[str, Any]:
    """``{part: new_rows options}`` for :func:`layerfreeze.interop.peft.peft_plan`."""
    return {
        entry_part(model, e, tied, where): {"policy": "new_rows", "from_id": e.from_id}
        for e in entries
    }


def load_problems(
    applied: AppliedPlan,
    entries: list[TokenEntry],
    rows: dict[str, TokenPart],
    strict: bool,
    where: str,
) -> list[str]:
    """Mismatches between an adapter's trainable tokens and the plan's ``new_rows`` (by module)."""
    emb, _head = _io_modules(applied.model)
    names = {id(m): n for n, m in applied.model.named_modules()}
    emb_name = names.get(id(emb))
    problems = []
    for e in entries:
        p = rows.get(e.module)
        part = "embeddings" if e.module == emb_name else "lm_head"
        use = f"use {part}: new_rows(from_id={e.from_id})"
        if p is None:
            problems.append(
                f"{e.module}: the adapter carries new rows {e.from_id}-{e.stop - 1} but the plan "
                f"has no new_rows there; {use} (peft_plan(model, dir) builds the plan)"
            )
        elif p.rows != e.stop:
            problems.append(
                f"{e.module}: the adapter's rows end at id {e.stop - 1} (vocab_size={e.stop}) but "
                f"the model has {p.rows} rows; load the base resized to {e.stop} rows first"
            )
        elif p.from_id != e.from_id:
            problems.append(
                f"{e.module}: the adapter's new rows start at id {e.from_id}, the plan's "
                f"new_rows(from_id={p.from_id}); {use}"
            )
        elif e.rows.shape[1] != p.weight.shape[1]:
            problems.append(
                f"{e.module}: the adapter's rows have width {e.rows.shape[1]}, the model's "
                f"{p.weight.shape[1]}; the adapter belongs to another model"
            )
    missing = sorted(set(rows) - {e.module for e in entries})
    if strict and missing:
        problems.append(
            f"the PEFT adapter has no trainable tokens for the plan's new_rows on "
            f"{', '.join(missing)}; pass strict=False to keep their current values"
        )
    return problems


def vllm_problem(parts: list[TokenPart]) -> list[str]:
    """vLLM's LoRA loader refuses trainable-token tensors (``parse_fine_tuned_lora_name``:
    "... is unsupported LoRA weight"; vllm-project/vllm#36501)."""
    if not parts:
        return []
    return [
        f"{' and '.join(p.part for p in parts)}: new_rows travel as PEFT trainable_token_indices "
        "(token_adapter.trainable_tokens_delta tensors), which vLLM's LoRA loader refuses as an "
        "unsupported LoRA weight (vllm-project/vllm#36501); serve a merged export "
        "(export_merged) instead"
    ]
