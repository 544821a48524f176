"""PEFT's LoRA adapter format: export a plain-LoRA plan, and load a PEFT LoRA adapter into a plan.

* :func:`export_peft` writes ``adapter_config.json`` + ``adapter_model.safetensors`` exactly as
  ``peft`` (0.21) saves a LoRA adapter, so ``PeftModel.from_pretrained(base, dir)`` rebuilds the
  same model (equal logits). Tensor keys are ``base_model.model.<module path>.lora_A.weight``
  (``(r, in)``) and ``...lora_B.weight`` (``(out, r)``): the same layout as layerfreeze's
  ``lora_a`` / ``lora_b`` (also for GPT-2's ``Conv1D``, with ``fan_in_fan_out: true``). PEFT
  scales every update by ``lora_alpha / r``, as layerfreeze does.
* :func:`vllm_compatibility` lists why vLLM's LoRA loader would refuse or misread the export
  (``export_peft(..., vllm=True)`` refuses with those reasons).
* ``embeddings`` / ``lm_head`` ``new_rows`` travel with the LoRA weights in PEFT's own
  ``trainable_token_indices`` format (:mod:`layerfreeze.interop.peft_tokens`); the base model
  must then be resized to the new vocabulary first (PEFT does not resize).
* :func:`peft_plan` builds the layer plan that matches a PEFT adapter, and
  :func:`load_peft_adapter` copies the adapter's tensors into an applied plan, so training
  continues under the plan from the PEFT weights (equal logits at load time).

Only plain (ungated) LoRA on frozen base weights has a PEFT equivalent: the HLPT gate makes the
update depend on the input, a prefix adds attention over learned keys/values, and ``full``
layers change the base weights, none of which a PEFT LoRA adapter can carry (nor ``full`` on
the embeddings / head; ``new_rows`` there is carried as trainable tokens). Such plans are
refused with the reasons; :func:`layerfreeze.export.export_merged` exports them instead.
No ``peft`` import: the format is written and read directly.

(~740 lines, over the ~700 guideline: export and import share this format's private helpers;
the new-rows half of the format lives in :mod:`layerfreeze.interop.peft_tokens`.)
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from layerfreeze.apply import AppliedPlan
from layerfreeze.engines.partition import full_shape
from layerfreeze.interop import peft_tokens as tokens_fmt
from layerfreeze.models import discover_layout
from layerfreeze.plan import NON_LAYER_PARTS, LayerPlan
from layerfreeze.policies.lora import iter_lora_adapters
from layerfreeze.policies.new_rows import PARAM as NEW_ROWS_PARAM
from layerfreeze.utils.io import atomic_directory, atomic_write_json
from layerfreeze.utils.logging import get_logger, log_rank0

__all__ = [
    "ADAPTER_CONFIG_FILE",
    "ADAPTER_WEIGHTS_FILE",
    "VLLM_MAX_LORA_RANKS",
    "VLLM_LORA_MODULES",
    "peft_export_problems",
    "vllm_compatibility",
    "export_peft",
    "peft_plan",
    "load_peft_adapter",
]

logger = get_logger(__name__)

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
_ADAPTER_WEIGHTS_BIN = "adapter_model.bin"
_KEY_PREFIX = "base_model.model."
_KEY = re.compile(
    r"^base_model\.model\.(?P<module>.+)\.(?P<kind>lora_A|lora_B)(?:\.[^.]+)?\.weight$"
)

#: Values vLLM accepts for ``max_lora_rank`` (``LoRAConfig.max_lora_rank`` of vLLM 0.33, checked
#: against it by tests/unit/test_vllm_lora_load.py; older releases accepted 8-64, later 8-256).
#: An adapter's largest rank must not exceed the server's setting.
VLLM_MAX_LORA_RANKS: tuple[int, ...] = (1, 8, 16, 32, 64, 128, 256, 320, 512)

_LLAMA_LIKE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: Module names vLLM's model implementations accept LoRA on, per ``model_type`` (from their
#: ``packed_modules_mapping``: ``qkv_proj`` <- q/k/v, ``gate_up_proj`` <- gate/up). Model types
#: not listed are not checked by layerfreeze and are reported as such.
VLLM_LORA_MODULES: dict[str, tuple[str, ...]] = {
    t: _LLAMA_LIKE for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")
}


@dataclass(frozen=True)
class _Entry:
    """One installed LoRA adapter."""

    name: str  # qualified module name in the model (``model.layers.0.mlp.up_proj``)
    layer: int  # global layer index
    local: int  # index inside the block list (what PEFT's layers_to_transform counts)
    path: str  # path inside the block (``mlp.up_proj``)
    adapter: nn.Module

    @property
    def short(self) -> str:
        return self.name.rsplit(".", 1)[-1]


def _entries(applied: AppliedPlan) -> list[_Entry]:
    out = []
    for local, layer in enumerate(applied.layout.layers):
        for path, _base, adapter in iter_lora_adapters(layer.module):
            out.append(_Entry(f"{layer.name}.{path}", layer.index, local, path, adapter))
    return out


def _num(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def _ranges(indices: Iterable[int]) -> str:
    idx = sorted(set(indices))
    parts, start = [], None
    for i, v in enumerate(idx):
        if start is None:
            start = v
        if i + 1 == len(idx) or idx[i + 1] != v + 1:
            parts.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ",".join(parts)


# ---------------------------------------------------------------------------------------------
# What can be exported


def peft_export_problems(applied: AppliedPlan) -> list[str]:
    """Why ``applied`` cannot be written as a PEFT LoRA adapter (empty when it can).

    A plan qualifies when every installed plan (every schedule phase) uses only ``freeze`` and
    ungated ``lora`` on its layers and ``freeze`` on the embeddings, final norm and LM head,
    at least one LoRA adapter exists, none is merged into its base weight, and the adapted
    linears are all ``nn.Linear`` or all GPT-2 ``Conv1D`` (PEFT has one ``fan_in_fan_out``).
    """
    by_reason: dict[str, list[int]] = {}
    parts: list[str] = []
    for _plan, resolved in applied.installed:
        for layer in applied.layout.layers:
            spec = resolved.layers[layer.index]
            if spec.name == "freeze":
                continue
            if spec.name == "lora":
                if getattr(spec.options, "gated", False):
                    reason = (
                        f"{spec.describe()} is HLPT-gated: its update g(h) * B A x depends on the "
                        "input, which PEFT's LoRA cannot represent"
                    )
                else:
                    continue
            elif spec.name == "prefix":
                reason = (
                    f"{spec.describe()} adds attention over learned prefix keys/values, which "
                    "PEFT's LoRA format cannot represent"
                )
            elif spec.name == "full":
                reason = "full trains the base weights, which a PEFT adapter does not carry"
            else:
                reason = f"policy {spec.describe()} has no PEFT LoRA equivalent"
            by_reason.setdefault(reason, []).append(layer.index)
        for part in NON_LAYER_PARTS:
            if resolved.non_layer(part).name not in ("freeze", "new_rows"):
                msg = (
                    f"{part}: {resolved.non_layer(part).describe()} trains base weights, which a "
                    "PEFT adapter does not carry"
                )
                if msg not in parts:
                    parts.append(msg)
    problems = [f"layers {_ranges(ix)}: {r}" for r, ix in by_reason.items()] + parts
    problems += tokens_fmt.token_export_problems(applied)
    entries = _entries(applied)
    if not entries and not problems:
        rows = tokens_fmt.token_parts(applied)
        problems.append(
            f"{rows[0].part}: new_rows(from_id={rows[0].from_id}) without any LoRA adapter: "
            "PEFT's LoRA format needs target modules, and rows alone are a PEFT TRAINABLE_TOKENS "
            "adapter, which export_peft does not write; add a lora rule to the plan"
            if rows
            else "the plan installs no LoRA adapter, so there is nothing to export"
        )
    merged = [e.name for e in entries if getattr(e.adapter, "merged", False)]
    if merged:
        problems.append(
            f"{len(merged)} LoRA updates are merged into their base weights (e.g. {merged[0]}); "
            "call applied.unmerge() before exporting"
        )
    experts = [e.name for e in entries if getattr(e.adapter, "runs_inside_base", False)]
    if experts:
        problems.append(
            f"{len(experts)} LoRA adapters sit on fused MoE expert weights (e.g. {experts[0]}), "
            "which this exporter does not write in PEFT's format"
        )
    kinds = {bool(getattr(e.adapter, "transposed", False)) for e in entries}
    if len(kinds) > 1:
        problems.append(
            "the adapted linears mix nn.Linear and transformers Conv1D, but PEFT's config has "
            "one fan_in_fan_out flag for all of them"
        )
    return problems


def _refusal(problems: list[str], what: str) -> str:
    return (
        f"{what}:\n"
        + "\n".join(f"  - {p}" for p in problems)
        + "\nExport merged weights instead: layerfreeze.export.export_merged(applied, dir) "
        "(CLI: layerfreeze export --format merged)."
    )


def vllm_compatibility(applied: AppliedPlan, max_lora_rank: int | None = None) -> list[str]:
    """Reasons vLLM's LoRA loading would refuse or misread :func:`export_peft`'s output.

    Checked (vLLM's documented constraints and its ``PEFTHelper`` / ``LoRAModel`` loaders):
    the plan exports to PEFT at all (:func:`peft_export_problems`); the largest rank fits
    ``max_lora_rank`` (one of :data:`VLLM_MAX_LORA_RANKS`; without it, the largest of them);
    every module has the same ``alpha / r`` (older vLLM releases scale every module by the
    config's one ``lora_alpha / r`` and ignore ``rank_pattern`` / ``alpha_pattern``; 0.33 applies
    them, so this check is stricter than 0.33 needs); every adapted module's
    name is one vLLM's implementation of this ``model_type`` accepts LoRA on
    (:data:`VLLM_LORA_MODULES`; other model types are reported as unchecked). The export
    never has ``modules_to_save``, a LoRA bias or DoRA, which vLLM refuses; new rows
    (``trainable_token_indices``) it does have, and vLLM refuses those.

    Args:
        applied: the applied plan.
        max_lora_rank: the vLLM server's ``--max-lora-rank``.

    Returns:
        One line per problem; empty when the export loads in vLLM.

    Raises:
        ValueError: ``max_lora_rank`` is not a value vLLM accepts.
    """
    if max_lora_rank is not None and max_lora_rank not in VLLM_MAX_LORA_RANKS:
        raise ValueError(
            f"max_lora_rank: vLLM accepts one of {list(VLLM_MAX_LORA_RANKS)}, got "
            f"{max_lora_rank!r}."
        )
    problems = list(peft_export_problems(applied))
    problems += tokens_fmt.vllm_problem(tokens_fmt.token_parts(applied))
    entries = _entries(applied)
    if not entries:
        return problems
    limit = max_lora_rank or VLLM_MAX_LORA_RANKS[-1]
    too_big = sorted({e.adapter.r for e in entries if e.adapter.r > limit})
    if too_big:
        problems.append(
            f"rank {too_big[-1]} exceeds vLLM's max_lora_rank {limit}"
            + ("" if max_lora_rank else " (the largest vLLM accepts)")
            + f"; use r <= {limit}"
        )
    elif max_lora_rank is None:
        need = next(v for v in VLLM_MAX_LORA_RANKS if v >= max(e.adapter.r for e in entries))
        log_rank0(logger, "vLLM: serve this adapter with --max-lora-rank >= %d", need)
    ratios = Counter(e.adapter.scaling for e in entries)
    if len(ratios) > 1:
        shown = ", ".join(f"{_num(s):g} on {n} modules" for s, n in ratios.most_common())
        problems.append(
            f"alpha / r differs between modules ({shown}), but older vLLM releases scale every "
            "module by the config's one lora_alpha / r (they ignore rank_pattern / "
            "alpha_pattern; vLLM 0.33 applies them); give every lora rule the same alpha / r "
            "ratio"
        )
    model_type = applied.layout.model_type
    allowed = VLLM_LORA_MODULES.get(model_type)
    if allowed is None:
        problems.append(
            f"model_type {model_type!r}: layerfreeze does not know which modules vLLM accepts "
            f"LoRA on for this architecture (checked: {', '.join(sorted(VLLM_LORA_MODULES))}); "
            "check vLLM's supported_lora_modules for it and export without the vLLM check"
        )
    else:
        bad = sorted({e.short for e in entries if e.short not in allowed})
        if bad:
            problems.append(
                f"vLLM does not take LoRA on {', '.join(bad)} for {model_type}; "
                f"supported: {', '.join(allowed)}"
            )
    return problems


# ---------------------------------------------------------------------------------------------
# Export


def _check_whole(entries: list[_Entry], what: str) -> None:
    """Refuse ZeRO-3 partitioned LoRA weights (their local tensor is an empty shard)."""
    for e in entries:
        for p in (e.adapter.lora_a, e.adapter.lora_b):
            if tuple(p.shape) != tuple(full_shape(p)):
                raise ValueError(
                    f"{what}: {e.name} is partitioned by ZeRO-3 (local shape {tuple(p.shape)}, "
                    f"full {tuple(full_shape(p))}); call it inside "
                    "deepspeed.zero.GatheredParameters over the LoRA parameters."
                )


def _peft_matches(name: str, targets: list[str], layers: set[int] | None, pattern: str) -> bool:
    """PEFT 0.21's ``check_target_module_exists`` for a list of target names."""
    if name in targets:
        return True
    if not any(name.endswith("." + t) for t in targets):
        return False
    if layers is None:
        return True
    m = re.match(rf"(?:^|.*?\.){re.escape(pattern)}\.(?P<idx>\d+)\.", name)
    return m is not None and int(m.group("idx")) in layers


def _targets(applied: AppliedPlan, entries: list[_Entry]) -> dict[str, Any]:
    """``target_modules`` (+ ``layers_to_transform`` / ``layers_pattern``) selecting exactly
    the adapted modules: short names when they do, else the full module names."""
    wanted = {e.name for e in entries}
    layout = applied.layout
    from layerfreeze.registry import POLICIES  # filled: layerfreeze.apply loads the built-ins

    prefixes = tuple(p.param_prefix for p in POLICIES.values() if p.param_prefix)
    names = [
        n
        for n, _ in applied.model.named_modules()
        if n and not any(part.startswith(prefixes) for part in n.split("."))
    ]
    short = sorted({e.short for e in entries})
    local = {e.local for e in entries}
    layers = None if len(local) == layout.num_local_layers else local
    pattern = layout.blocks_name.rsplit(".", 1)[-1]
    if {n for n in names if _peft_matches(n, short, layers, pattern)} == wanted:
        return {
            "target_modules": short,
            "layers_to_transform": sorted(layers) if layers is not None else None,
            "layers_pattern": pattern if layers is not None else None,
        }
    return {"target_modules": sorted(wanted), "layers_to_transform": None, "layers_pattern": None}


def _peft_config(
    applied: AppliedPlan, entries: list[_Entry], base_name: str | None, rows: list
) -> dict:
    pairs = Counter((e.adapter.r, e.adapter.alpha) for e in entries)
    r, alpha = pairs.most_common(1)[0][0]
    rank_pattern = {e.name: e.adapter.r for e in entries if e.adapter.r != r}
    alpha_pattern = {e.name: _num(e.adapter.alpha) for e in entries if e.adapter.alpha != alpha}
    dropouts = Counter(float(getattr(e.adapter.lora_dropout, "p", 0.0)) for e in entries)
    dropout = dropouts.most_common(1)[0][0]
    if len(dropouts) > 1:
        log_rank0(
            logger,
            "export_peft: LoRA dropout differs between layers %s; PEFT has one "
            "lora_dropout, writing %g (dropout does not change inference)",
            dict(dropouts),
            dropout,
        )
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": _num(alpha),
        "lora_dropout": dropout,
        **_targets(applied, entries),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "fan_in_fan_out": bool(getattr(entries[0].adapter, "transposed", False)),
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layer_replication": None,
        "exclude_modules": None,
        **({tokens_fmt.TOKENS_CONFIG_KEY: tokens_fmt.token_config(rows)} if rows else {}),
    }


def export_peft(
    applied: AppliedPlan,
    directory: str | os.PathLike,
    *,
    base_model_name_or_path: str | None = None,
    vllm: bool = False,
    max_lora_rank: int | None = None,
) -> Path:
    """Write the plan's LoRA adapters as a PEFT LoRA adapter directory (atomically).

    ``embeddings`` / ``lm_head`` ``new_rows`` are written with them as PEFT's
    ``trainable_token_indices`` (rows ``from_id`` to the last), plus a ``README.md`` saying that
    the base must be resized to the new vocabulary first (PEFT does not resize). Under ZeRO-3 call it inside the engine's gathered-parameters context (it reads whole
    tensors).

    Args:
        applied: the applied plan (plain LoRA only; see :func:`peft_export_problems`).
        directory: output directory (replaced if it exists).
        base_model_name_or_path: written to the config (what ``PeftModel.from_pretrained``
            users load the base from); default the model's ``config._name_or_path``. A path
            that exists locally is written absolute; anything else (a hub id) as given.
        vllm: also require :func:`vllm_compatibility` to pass.
        max_lora_rank: the vLLM server's ``--max-lora-rank`` for that check.

    Returns:
        The directory path.

    Raises:
        ValueError: the plan has no PEFT equivalent (gated LoRA, prefix, full layers, ...) or,
            with ``vllm``, vLLM would refuse it; the message lists every reason.
    """
    problems = vllm_compatibility(applied, max_lora_rank) if vllm else peft_export_problems(applied)
    if problems:
        what = "vLLM" if vllm else "PEFT"
        raise ValueError(
            _refusal(problems, f"export_peft: this plan cannot be exported for {what}")
        )
    entries = _entries(applied)
    _check_whole(entries, "export_peft")
    rows = tokens_fmt.token_parts(applied)
    tokens_fmt.check_whole(rows, "export_peft")
    if base_model_name_or_path is None:
        config = getattr(applied.model, "config", None)
        base_model_name_or_path = getattr(config, "_name_or_path", None) or None
    if base_model_name_or_path is not None and Path(base_model_name_or_path).expanduser().exists():
        # a local checkpoint: absolute, so the adapter loads from any working directory (a hub
        # id such as "org/model" is not a local path and is kept as given)
        base_model_name_or_path = os.path.abspath(Path(base_model_name_or_path).expanduser())
    config = _peft_config(applied, entries, base_model_name_or_path, rows)
    tensors: dict[str, torch.Tensor] = {}
    for e in entries:
        for kind, p in (("lora_A", e.adapter.lora_a), ("lora_B", e.adapter.lora_b)):
            tensors[f"{_KEY_PREFIX}{e.name}.{kind}.weight"] = (
                p.detach().to("cpu").contiguous().clone()
            )
    tensors.update(tokens_fmt.token_tensors(rows))
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
        atomic_write_json(tmp / ADAPTER_CONFIG_FILE, config)
        if rows:
            text = tokens_fmt.token_readme(rows, base_model_name_or_path)
            (tmp / "README.md").write_text(text, encoding="utf-8")
    log_rank0(
        logger,
        "exported %d LoRA modules%s in PEFT format to %s",
        len(entries),
        f" + new rows of {', '.join(p.module for p in rows)}" if rows else "",
        directory,
    )
    return directory


# ---------------------------------------------------------------------------------------------
# Import


def _pattern_key(patterns: Iterable[str], name: str) -> str | None:
    """PEFT's ``get_pattern_key``: the first pattern matching the end of ``name``."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


@dataclass(frozen=True)
class _PeftModule:
    name: str
    a: torch.Tensor
    b: torch.Tensor
    scaling: float

    @property
    def r(self) -> int:
        return int(self.a.shape[0])


def _read_peft(
    directory: str | os.PathLike,
) -> tuple[dict, dict[str, _PeftModule], list[tokens_fmt.TokenEntry]]:
    """Read and check a PEFT LoRA adapter directory; return its config, modules by name and
    trainable tokens."""
    directory = Path(directory)
    cfg_path = directory / ADAPTER_CONFIG_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(
            f"{cfg_path}: not found. Point at a directory written by PEFT's save_pretrained."
        )
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e}).") from None
    problems = []
    if cfg.get("peft_type") != "LORA":
        problems.append(
            f"peft_type is {cfg.get('peft_type')!r}; only LORA adapters load into a layerfreeze "
            "plan"
        )
    unsupported = {
        "use_dora": "DoRA (use_dora) adds a magnitude vector layerfreeze's LoRA does not have",
        "lora_bias": "lora_bias trains a bias on lora_B, which layerfreeze's LoRA does not have",
        "modules_to_save": "modules_to_save carries full copies of modules; load those weights "
        "into the base model and use full on them",
        "target_parameters": "target_parameters (LoRA on raw parameters) is not supported",
        "layer_replication": "layer_replication changes the model's layers",
        "use_qalora": "QA-LoRA is not supported",
        "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is input-dependent",
    }
    for key, why in unsupported.items():
        if cfg.get(key):
            problems.append(f"{key}={cfg[key]!r}: {why}")
    if cfg.get("bias", "none") != "none":
        problems.append(f"bias={cfg['bias']!r}: trained biases are not part of a LoRA plan")
    if problems:
        raise ValueError(
            f"{cfg_path}: this PEFT adapter cannot load into a layerfreeze LoRA plan:\n"
            + "\n".join(f"  - {p}" for p in problems)
        )
    st, bin_path = directory / ADAPTER_WEIGHTS_FILE, directory / _ADAPTER_WEIGHTS_BIN
    if st.is_file():
        tensors = load_file(str(st))
    elif bin_path.is_file():
        tensors = torch.load(str(bin_path), map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(
            f"{directory}: neither {ADAPTER_WEIGHTS_FILE} nor {_ADAPTER_WEIGHTS_BIN}."
        )
    tensors, token_rows = tokens_fmt.split_token_tensors(tensors)
    token_entries = tokens_fmt.read_token_entries(cfg, token_rows, str(cfg_path))
    parts: dict[str, dict[str, torch.Tensor]] = {}
    bad = []
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            why = (
                "DoRA magnitude"
                if "lora_magnitude_vector" in key
                else "LoRA on an embedding"
                if "lora_embedding" in key
                else "a LoRA bias"
                if key.endswith(".bias")
                else "not a LoRA A/B weight"
            )
            bad.append(f"{key} ({why})")
            continue
        parts.setdefault(m["module"], {})[m["kind"]] = t
    if bad:
        raise ValueError(
            f"{directory}: tensors layerfreeze's LoRA cannot hold: {', '.join(bad[:5])}"
            f"{' ...' if len(bad) > 5 else ''}."
        )
    r0, alpha0 = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    modules = {}
    for name, ab in parts.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise ValueError(
                f"{directory}: module {name} has {sorted(ab)} but needs lora_A and lora_B."
            )
        a, b = ab["lora_A"], ab["lora_B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"{directory}: module {name}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} "
                "are not (r, in) and (out, r)."
            )
        rk = _pattern_key(rank_pattern, name)
        ak = _pattern_key(alpha_pattern, name)
        r = rank_pattern[rk] if rk is not None else r0
        alpha = alpha_pattern[ak] if ak is not None else alpha0
        if int(r) != a.shape[0]:
            raise ValueError(
                f"{directory}: module {name}: the config gives rank {r} but lora_A has "
                f"{a.shape[0]} rows."
            )
        scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        modules[name] = _PeftModule(name, a, b, float(scaling))
    if not modules:
        raise ValueError(f"{directory}: the adapter holds no LoRA weights.")
    return cfg, modules, token_entries


def peft_plan(model: nn.Module, directory: str | os.PathLike) -> LayerPlan:
    """The layer plan whose ``lora`` rules match a PEFT LoRA adapter on ``model``.

    One ``lora(r, alpha, dropout, target=[paths in the block])`` rule per run of layers with
    the same adapter (``alpha`` is chosen so that ``alpha / r`` equals PEFT's scale, also
    under rsLoRA); every other layer is frozen. ``trainable_token_indices`` (one run of ids up to
    the last row) become ``embeddings`` / ``lm_head`` ``new_rows(from_id=first id)``. Apply it
    with ``apply_plan`` (or merge it into a bigger plan), then :func:`load_peft_adapter`.

    Raises:
        ValueError: a module outside the decoder blocks, ranks / scales that differ inside
            one layer (a layerfreeze layer holds one LoRA spec), or trainable tokens that are
            not a tail of rows of a model of that vocabulary size (resize the base first).
    """
    cfg, modules, token_entries = _read_peft(directory)
    layout = discover_layout(model)
    where = str(Path(directory) / ADAPTER_CONFIG_FILE)
    parts = tokens_fmt.plan_parts(model, token_entries, layout.tied_embeddings, where)
    per_layer: dict[int, dict[str, _PeftModule]] = {}
    outside = []
    for name, mod in modules.items():
        layer = next((x for x in layout.layers if name.startswith(x.name + ".")), None)
        if layer is None:
            outside.append(name)
            continue
        per_layer.setdefault(layer.index, {})[name[len(layer.name) + 1 :]] = mod
    if outside:
        raise ValueError(
            f"{directory}: LoRA on {', '.join(sorted(outside)[:5])} lies outside the decoder "
            f"blocks ({layout.blocks_name}.N); a layerfreeze plan puts LoRA inside blocks only."
        )
    rules: list[dict[str, Any]] = []
    for index in sorted(per_layer):
        mods = per_layer[index]
        kinds = {(m.r, m.scaling) for m in mods.values()}
        if len(kinds) != 1:
            shown = ", ".join(f"{p} r={m.r} scale={m.scaling:g}" for p, m in sorted(mods.items()))
            raise ValueError(
                f"{directory}: layer {index}: ranks or scales differ inside the layer ({shown}); "
                "a layerfreeze layer holds one lora spec."
            )
        r, scaling = kinds.pop()
        opts = {
            "policy": "lora",
            "r": r,
            "alpha": _num(scaling * r),
            "dropout": float(cfg.get("lora_dropout") or 0.0),
            "target": sorted(mods),
        }
        prev = rules[-1] if rules else None
        if prev is not None and prev["_last"] == index - 1 and prev["_opts"] == opts:
            prev["_last"] = index
        else:
            rules.append({"_first": index, "_last": index, "_opts": opts})
    plan = {
        "default": "freeze",
        **parts,
        "rules": [{"layers": f"{x['_first']}-{x['_last']}", **x["_opts"]} for x in rules],
    }
    return LayerPlan.parse(plan, path=f"peft_plan({directory})")


def load_peft_adapter(
    applied: AppliedPlan, directory: str | os.PathLike, *, strict: bool = True
) -> list[str]:
    """Copy a PEFT LoRA adapter's weights into the plan's LoRA adapters.

    Every PEFT module must have an installed, ungated layerfreeze LoRA adapter of the same
    rank and the same scale (``alpha / r``, or ``alpha / sqrt(r)`` under rsLoRA), so the
    model's logits equal the PEFT model's right after loading. :func:`peft_plan` builds such a
    plan. Trainable tokens (``trainable_token_indices``) load into the plan's ``new_rows`` of the
    same module with ``from_id`` equal to their first id. Under ZeRO-3 call it inside the
    engine's gathered-parameters context.

    Args:
        applied: the applied plan to load into.
        directory: a directory written by PEFT's ``save_pretrained`` (or :func:`export_peft`).
        strict: also require every installed LoRA adapter to be in the PEFT adapter (with
            False, adapters it lacks keep their initial zero update; likewise new rows the
            adapter lacks keep their values).

    Returns:
        The qualified names of the modules loaded.

    Raises:
        FileNotFoundError: no ``adapter_config.json`` or weights file.
        ValueError: not a plain LoRA adapter (DoRA, another PEFT type, biases, ...), or it does
            not match the plan (a module the plan has no LoRA on, another rank or scale, a gated
            adapter, or with ``strict`` a plan adapter the file lacks); every mismatch is listed.
    """
    _cfg, modules, token_entries = _read_peft(directory)
    entries = _entries(applied)
    _check_whole(entries, "load_peft_adapter")
    ours = {e.name: e for e in entries}
    rows = {p.module: p for p in tokens_fmt.token_parts(applied)}
    tokens_fmt.check_whole(list(rows.values()), "load_peft_adapter")
    problems = tokens_fmt.load_problems(applied, token_entries, rows, strict, str(directory))
    for name, mod in sorted(modules.items()):
        e = ours.get(name)
        if e is None:
            problems.append(
                f"{name}: the plan has no LoRA adapter on this module (plan LoRA modules: "
                f"{', '.join(sorted(ours)[:4]) or 'none'}{' ...' if len(ours) > 4 else ''}); "
                "add it to the plan's lora target (peft_plan(model, dir) builds a matching plan)"
            )
            continue
        ad = e.adapter
        if getattr(ad, "gate", None) is not None:
            problems.append(
                f"{name}: the plan's adapter is HLPT-gated, a PEFT update is not; use lora "
                "without gated for this layer"
            )
        use = f"use lora(r={mod.r}, alpha={_num(mod.scaling * mod.r):g})"
        if ad.r != mod.r:  # (the A/B shapes then differ too: the rank says why)
            problems.append(
                f"{name}: rank {mod.r} in the PEFT adapter, r={ad.r} in the plan; {use}"
            )
        elif not math.isclose(ad.scaling, mod.scaling, rel_tol=1e-6):
            problems.append(
                f"{name}: PEFT scales the update by {mod.scaling:g}, the plan by "
                f"alpha/r = {ad.scaling:g}; {use}"
            )
        elif tuple(mod.a.shape) != tuple(ad.lora_a.shape) or tuple(mod.b.shape) != tuple(
            ad.lora_b.shape
        ):
            problems.append(
                f"{name}: lora_A {tuple(mod.a.shape)} / lora_B {tuple(mod.b.shape)} do not fit "
                f"the plan's {tuple(ad.lora_a.shape)} / {tuple(ad.lora_b.shape)}"
            )
        if getattr(ad, "merged", False):
            problems.append(f"{name}: the plan's update is merged; call applied.unmerge() first")
    if strict:
        missing = sorted(set(ours) - set(modules))
        if missing:
            problems.append(
                f"the PEFT adapter has no weights for plan LoRA modules {', '.join(missing[:4])}"
                f"{' ...' if len(missing) > 4 else ''}; pass strict=False to start those from zero"
            )
    if problems:
        raise ValueError(
            f"load_peft_adapter({directory}): the adapter does not match the plan:\n"
            + "\n".join(f"  - {p}" for p in problems)
        )
    with torch.no_grad():
        for name, mod in modules.items():
            ad = ours[name].adapter
            ad.lora_a.copy_(mod.a.to(device=ad.lora_a.device, dtype=ad.lora_a.dtype))
            ad.lora_b.copy_(mod.b.to(device=ad.lora_b.device, dtype=ad.lora_b.dtype))
        for t in token_entries:
            w = rows[t.module].weight
            w.copy_(t.rows.to(device=w.device, dtype=w.dtype))
    log_rank0(
        logger,
        "loaded %d PEFT LoRA modules (+ new rows of %d) from %s",
        len(modules),
        len(token_entries),
        directory,
    )
    return sorted(modules) + sorted(f"{t.module}.{NEW_ROWS_PARAM}" for t in token_entries)
