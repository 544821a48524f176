"""Layer pruning (Gromov et al., "The Unreasonable Ineffectiveness of the Deeper Layers").

Choose the block of ``n`` consecutive layers ``[l, l + n)`` whose removal changes the residual
stream least, measured by the angular distance ``d(l, n)`` between the input of layer ``l`` and
the input of layer ``l + n`` on a probe set (``l + n = L`` is the input of the final norm), or
take the paper's baseline, the deepest ``n`` layers before the last one. Then remove it, fix the
config and save a standard Hugging Face checkpoint. Healing (``--heal``) is a short LoRA run on
the pruned model, over an optionally NF4-quantized frozen base, in this process
(:mod:`layerfreeze.diagnostics.heal`); the merged export is saved instead. A longer healing run
is a ``layerfreeze train`` run with a LoRA plan on the pruned checkpoint (docs/diagnostics-prune.md).

This module also holds the layer surgery that :mod:`layerfreeze.diagnostics.compose` reuses:
:func:`restack_layers` (a new list of blocks, renumbered) and :func:`relayer_config` (per-layer
config entries follow their layers).

Run::

    layerfreeze prune --model ckpt/ --num-layers 8 --probe ceval --data-dir data/ --out pruned/

    from layerfreeze.diagnostics.prune import choose_block, remove_layers
    choice = choose_block(num_layers=32, n=8, strategy="angular", distances=trace_angular(m, b))
    remove_layers(model, choice.start, choice.n)
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from layerfreeze.diagnostics.angular import AngularDistances, trace_angular
from layerfreeze.diagnostics.heal import HealConfig
from layerfreeze.models import ModelLayout, discover_layout
from layerfreeze.utils.logging import get_logger, log_rank0

__all__ = [
    "STRATEGIES",
    "BlockChoice",
    "PruneReport",
    "build_probe",
    "check_structure",
    "choose_block",
    "load_causal_lm",
    "prune_checkpoint",
    "relayer_config",
    "remove_layers",
    "restack_layers",
    "save_checkpoint",
]

logger = get_logger("layerfreeze.prune")

STRATEGIES = ("angular", "deepest")

#: Config entries holding one value per layer (they follow their layers).
PER_LAYER_KEYS = ("layer_types", "no_rope_layers")
#: Config entries holding a list of layer indices (remapped to the new indices).
LAYER_INDEX_KEYS = ("mlp_only_layers",)
#: Config entries describing a periodic per-layer pattern; moving layers can break the pattern.
#: ``layer_types`` supersedes the attention ones in current transformers; the shape check in
#: :func:`check_structure` catches an MLP pattern that no longer matches the weights.
PATTERN_KEYS = (
    "sliding_window_pattern",
    "first_k_dense_replace",
    "decoder_sparse_step",
    "moe_layer_freq",
    "interleave_moe_layer_step",
    "global_attn_every_n_layers",
)


def num_layers_of(config: Any) -> int:
    """Decoder layers of a transformers config (``num_hidden_layers`` / ``n_layer``)."""
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        v = getattr(config, key, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    raise ValueError(
        f"{type(config).__name__}: no num_hidden_layers / n_layer in the config; layerfreeze "
        "prunes and composes transformers decoder-only models."
    )


# ------------------------------------------------------------------------------ choosing


@dataclass
class BlockChoice:
    """The block to remove: layers ``start .. start + n - 1``.

    Attributes:
        start: first removed layer.
        n: number of removed layers.
        strategy: ``angular`` or ``deepest``.
        distance: ``d(start, n)`` on the probe set, or None without one.
        scores: ``d(l, n)`` for every ``l`` (index = ``l``), or empty without a probe.
    """

    start: int
    n: int
    strategy: str
    distance: float | None
    scores: list[float] = field(default_factory=list)

    @property
    def end(self) -> int:
        """One past the last removed layer: the layer whose input replaces ``start``'s."""
        return self.start + self.n


def check_num_layers(n: int, num_layers: int, strategy: str) -> None:
    """Raise ``ValueError`` unless ``n`` layers can be removed under ``strategy``."""
    if strategy not in STRATEGIES:
        raise ValueError(
            f"--strategy: unknown strategy {strategy!r}. Valid: {', '.join(STRATEGIES)}."
        )
    top = num_layers - 1
    if not 1 <= n <= top:
        raise ValueError(
            f"--num-layers: cannot remove {n} of the model's {num_layers} layers; at least one "
            f"layer must stay (valid 1-{top})."
        )


def choose_block(
    num_layers: int,
    n: int,
    strategy: str = "angular",
    distances: AngularDistances | None = None,
    last_token: bool = True,
) -> BlockChoice:
    """Pick the ``n``-layer block to remove.

    ``angular``: the ``l`` minimising ``d(l, n)`` over ``0 <= l <= L - n`` (ties: the shallowest).
    ``deepest``: Gromov et al.'s baseline, layers ``L - 1 - n .. L - 2`` (the deepest ``n``
    before the last layer, which stays).

    Args:
        num_layers: ``L``, the model's decoder layers.
        n: layers to remove (``1 .. L - 1``).
        strategy: ``angular`` or ``deepest``.
        distances: angular distances on the probe set; required for ``angular``, optional
            for ``deepest`` (then the chosen block's distance is reported too).
        last_token: score with the last token of each sequence, as Gromov et al. do (else the
            mean over all tokens).

    Raises:
        ValueError: bad ``n`` or strategy, or ``angular`` without distances.
    """
    check_num_layers(n, num_layers, strategy)
    scores: list[float] = []
    if distances is not None:
        if distances.num_points != num_layers + 1:
            raise ValueError(
                f"distances cover {distances.num_points} points, expected {num_layers + 1} "
                "(every layer input plus the final-norm input)."
            )
        scores = distances.block_scores(n, last_token=last_token)
    if strategy == "angular":
        if distances is None:
            raise ValueError("strategy 'angular' needs angular distances measured on a probe set.")
        start, dist = distances.best_block(n, last_token=last_token)
        return BlockChoice(start, n, strategy, dist, scores)
    start = num_layers - 1 - n
    return BlockChoice(start, n, strategy, scores[start] if scores else None, scores)


# ------------------------------------------------------------------------------ layer surgery


def relayer_config(config: Any, origins: Sequence[tuple[Any, int]]) -> list[str]:
    """Rewrite ``config`` in place for a new stack of layers; return the keys it changed.

    Layer ``j`` of the new stack is layer ``origins[j][1]`` of a model with config
    ``origins[j][0]``. ``num_hidden_layers`` becomes ``len(origins)``; per-layer lists
    (``layer_types`` ...) take each layer's own entry; layer-index lists (``mlp_only_layers``)
    are remapped; Qwen2's ``max_window_layers`` (the first layers use full attention) becomes
    the number of leading new layers that used full attention where they came from.
    """
    changed = ["num_hidden_layers"]
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if hasattr(config, key) and isinstance(getattr(config, key), int):
            setattr(config, key, len(origins))
            break
    for key in PER_LAYER_KEYS:
        if isinstance(getattr(config, key, None), (list, tuple)):
            setattr(config, key, [getattr(src, key)[i] for src, i in origins])
            changed.append(key)
    for key in LAYER_INDEX_KEYS:
        if isinstance(getattr(config, key, None), (list, tuple)):
            setattr(
                config, key, [j for j, (src, i) in enumerate(origins) if i in getattr(src, key)]
            )
            changed.append(key)
    if isinstance(getattr(config, "max_window_layers", None), int):
        full = 0
        for src, i in origins:
            if i >= src.max_window_layers:
                break
            full += 1
        config.max_window_layers = full
        changed.append("max_window_layers")
    for key in PATTERN_KEYS:
        if getattr(config, key, None) not in (None, 0, 1) and not isinstance(
            getattr(config, "layer_types", None), list
        ):
            log_rank0(
                logger,
                f"config.{key}={getattr(config, key)!r} describes a per-layer pattern that the new "
                "layer order may not follow; check the saved model.",
                level=30,
            )
    return changed


def restack_layers(
    model: nn.Module, blocks: Sequence[nn.Module], layout: ModelLayout | None = None
) -> None:
    """Make ``blocks`` the model's decoder layers, in order, and renumber them.

    Every submodule's integer ``layer_idx`` (what the KV cache indexes by on Llama, Qwen2,
    GPT-2 ...) becomes its block's new position, and submodules holding a transformers config
    point at the model's own. The config itself is :func:`relayer_config`'s job.
    """
    layout = layout or discover_layout(model)
    container = model.get_submodule(layout.blocks_name)
    new = nn.ModuleList(blocks)
    parent_name, _, attr = layout.blocks_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    assert getattr(parent, attr) is container
    setattr(parent, attr, new)
    config = getattr(model, "config", None)
    for j, block in enumerate(new):
        for mod in block.modules():
            if isinstance(getattr(mod, "layer_idx", None), int):
                mod.layer_idx = j
            if config is not None and hasattr(mod, "config") and type(mod.config) is type(config):
                mod.config = config


def remove_layers(model: nn.Module, start: int, n: int) -> list[int]:
    """Remove decoder layers ``start .. start + n - 1`` in place; return the kept old indices.

    Raises:
        ValueError: the block does not fit, or nothing would be left.
    """
    layout = discover_layout(model)
    total = layout.num_layers
    if n < 1 or start < 0 or start + n > total or n >= total:
        raise ValueError(
            f"remove_layers: cannot remove layers {start}-{start + n - 1} of a {total}-layer model "
            f"(need 0 <= start, start + n <= {total}, and n < {total})."
        )
    kept = [i for i in range(total) if not start <= i < start + n]
    config = model.config
    old = copy.deepcopy(config)
    restack_layers(model, [layout.layers[i].module for i in kept], layout)
    relayer_config(config, [(old, i) for i in kept])
    return kept


def check_structure(model: nn.Module) -> None:
    """Check that ``model.config`` builds a model with exactly the live model's parameter shapes.

    This is what ``from_pretrained`` will build from the saved config, so a mismatch here is a
    checkpoint that would not load.

    Raises:
        ValueError: names the first parameter whose name or shape differs.
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        ref = AutoModelForCausalLM.from_config(copy.deepcopy(model.config))
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in base_tensors(model).items()}
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    bad = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    if missing or extra or bad:
        what = (
            f"{bad[0]} has shape {have[bad[0]]} but the config gives {want[bad[0]]}"
            if bad
            else f"{missing[0]} is expected by the config but missing"
            if missing
            else f"{extra[0]} is not in a model built from the config"
        )
        raise ValueError(
            f"the rebuilt model does not match its config: {what}. The layer order breaks a "
            "per-layer pattern of this architecture."
        )


# ------------------------------------------------------------------------------ I/O


def load_causal_lm(path: str | Path, what: str = "--model") -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained(path)`` in its saved dtype, eval mode, on CPU, a
    layerfreeze export with its sidecar adapters re-attached (:func:`layerfreeze.modeling.load_causal_lm`).

    Raises:
        FileNotFoundError: no checkpoint directory with a config.json at ``path``.
        ValueError: transformers cannot load it (the message says why).
    """
    from layerfreeze import modeling

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{what} {path}: not a Hugging Face checkpoint directory (no config.json)."
        )
    try:  # the commands' one loader: a layerfreeze export comes with its sidecar adapters
        model = modeling.load_causal_lm(path, what, dtype="auto")
    except (ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if first.startswith(f"{what} {path}:"):
            raise ValueError(first) from None
        raise ValueError(f"{what} {path}: could not load the checkpoint ({first}).") from None
    return model.eval()


def base_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` without adapter tensors (those go to the sidecar)."""
    from layerfreeze.apply import adapter_param_names

    adapters = set(adapter_param_names(model))
    return {k: v for k, v in model.state_dict().items() if k not in adapters}


def has_tokenizer(path: str | Path) -> bool:
    """True when ``path`` holds tokenizer files."""
    path = Path(path)
    return any(
        (path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    )


def save_checkpoint(
    model: nn.Module,
    out: str | Path,
    tokenizer_from: str | Path | None = None,
    reports: dict[str, Any] | None = None,
    overwrite: bool = False,
    sidecar_plan: dict[str, Any] | None = None,
) -> Path:
    """Save ``model`` as a standard HF checkpoint, atomically (staging directory + rename).

    A model carrying layerfreeze adapters (loaded from an export with a sidecar) is saved as an
    export: base weights plus the adapters in the sidecar (:func:`layerfreeze.export.write_sidecar`).

    Args:
        model: the model to save (its config is checked against its weights first).
        out: the checkpoint directory.
        tokenizer_from: a checkpoint directory whose tokenizer is saved alongside, if it has one.
        reports: ``{file name: JSON-able object}`` written into the directory too.
        overwrite: replace an existing ``out``.
        sidecar_plan: the sidecar's ``plan.json`` content for the model's adapters
            (:func:`layerfreeze.export.restack_sidecar_plan`); required when it has any.

    Raises:
        FileExistsError: ``out`` exists and ``overwrite`` is False.
        ValueError: the config does not describe the weights (see :func:`check_structure`).
    """
    from layerfreeze.data.tokenizer import load_tokenizer, save_tokenizer
    from layerfreeze.utils.io import atomic_directory

    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(
            f"--out {out}: already exists. Choose a new directory or pass --overwrite."
        )
    from layerfreeze.apply import adapter_param_names
    from layerfreeze.export import write_sidecar

    check_structure(model)
    params = dict(model.named_parameters())
    adapters = {n: params[n].detach() for n in adapter_param_names(model)}
    assert not adapters or sidecar_plan is not None, "adapters to save need their sidecar plan"
    tokenizer = None
    if tokenizer_from is not None and has_tokenizer(tokenizer_from):
        tokenizer = load_tokenizer(str(tokenizer_from))
    with atomic_directory(out, overwrite=overwrite) as tmp:
        model.save_pretrained(str(tmp), state_dict=base_tensors(model))
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp)
        if sidecar_plan is not None:
            write_sidecar(tmp, adapters, sidecar_plan)
        for name, obj in (reports or {}).items():
            (tmp / name).write_text(
                json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
            )
    return out


# ------------------------------------------------------------------------------ probe


def build_probe(
    probe: Sequence[str],
    tokenizer: Any,
    data_dir: str | Path | None = None,
    subjects: list[str] | None = None,
    split: str | None = None,
    seq_len: int = 256,
    max_tokens: int = 16384,
    batch_size: int = 4,
) -> tuple[list[dict[str, torch.Tensor]], dict[str, Any]]:
    """Probe batches through :mod:`layerfreeze.diagnostics.probe` (the ``trace`` probe sets).

    ``probe`` is ``["ceval"]`` / ``["cmmlu"]`` (zero-shot prompts ending where the answer letter
    is predicted, so the last token is where the answer is decided; cut to ``seq_len`` from the
    left) or files and directories (``@bundled``: the bundled corpus), cut into ``seq_len``-token
    pieces.

    Returns:
        ``[{"input_ids", "attention_mask"}, ...]`` and the probe's identity for the report.

    Raises:
        ValueError: the probe yields no tokens, a benchmark without ``data_dir``, bad files.
        FileNotFoundError: a probe file or directory does not exist.
    """
    from layerfreeze.diagnostics.probe import build_choice_probe, build_text_probe

    probe = list(probe)
    if len(probe) == 1 and probe[0] in ("ceval", "cmmlu"):
        if data_dir is None:
            raise ValueError(
                f"--probe {probe[0]}: needs --data-dir (the released {probe[0]} folder)."
            )
        pset = build_choice_probe(
            probe[0],
            tokenizer,
            data_dir,
            subjects=subjects,
            split=split,
            max_tokens=max_tokens,
            batch_size=batch_size,
            max_length=seq_len,
        )
    else:
        from layerfreeze.data.corpus import resolve_files

        files = resolve_files(probe, key="--probe")
        pset = build_text_probe(files, tokenizer, max_tokens, seq_len, batch_size)
    batches = [{"input_ids": b.input_ids, "attention_mask": b.attention_mask} for b in pset.batches]
    info = {
        "source": probe,
        "sequences": pset.num_sequences,
        "tokens": pset.num_tokens,
        "seq_len": seq_len,
        "identity": pset.identity,
    }
    return batches, info


# ------------------------------------------------------------------------------ the job


@dataclass
class PruneReport:
    """What ``layerfreeze prune`` did (``prune.json``)."""

    model: str
    out: str
    strategy: str
    score: str
    num_layers_before: int
    num_layers_after: int
    removed: list[int]
    distance: float | None
    scores: list[float]
    kept: list[int]
    probe: dict[str, Any]
    config_changed: list[str]
    seconds: float
    heal: dict[str, Any] | None = None
    """The healing run (:class:`layerfreeze.diagnostics.heal.HealReport`), None without one."""

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if out["heal"] is None:
            del out["heal"]
        return out

    def table(self) -> str:
        """Console table: one row per candidate block, the chosen one marked."""
        n = len(self.removed)
        lines = [
            f"model: {self.model} ({self.num_layers_before} layers) -> {self.out} "
            f"({self.num_layers_after} layers)",
            f"strategy: {self.strategy}, score: d(l, {n}) by {self.score}",
        ]
        if self.scores:
            lines.append(f"{'block':>9}  {'d(l,n)':>8}")
            for l0, s in enumerate(self.scores):
                mark = "  <- removed" if l0 == self.removed[0] else ""
                lines.append(f"{f'{l0}-{l0 + n - 1}':>9}  {s:8.4f}{mark}")
        dist = "n/a (no probe)" if self.distance is None else f"{self.distance:.4f}"
        lines.append(f"removed layers {self.removed[0]}-{self.removed[-1]}, distance {dist}")
        if self.heal is not None:
            h = self.heal
            lines.append(
                f"healed: {h['config']['plan']}, base {h['config']['quantize']}, "
                f"{h['config']['steps']} steps; held-out loss {h['heldout_loss_before']:.4f} -> "
                f"{h['heldout_loss_after']:.4f}"
            )
        return "\n".join(lines)


def prune_checkpoint(
    model_path: str | Path,
    num_layers: int,
    out: str | Path,
    strategy: str = "angular",
    probe: Sequence[str] | None = None,
    data_dir: str | Path | None = None,
    subjects: list[str] | None = None,
    split: str | None = None,
    seq_len: int = 256,
    max_tokens: int = 16384,
    batch_size: int = 4,
    last_token: bool = True,
    overwrite: bool = False,
    heal: HealConfig | None = None,
) -> PruneReport:
    """Choose, remove and save: the whole ``layerfreeze prune`` job.

    The angular strategy needs a probe; without one it reads the bundled corpus. Every input is
    checked before weights are loaded, and nothing is written unless the job succeeds. With
    ``heal``, the pruned model is healed (:func:`layerfreeze.diagnostics.heal.heal_model`) and
    its merged export (a 4-bit base dequantized first) is saved, with the report in prune.json.

    Raises:
        ValueError, FileNotFoundError, FileExistsError: bad input (the message names it).
    """
    from layerfreeze.data.tokenizer import load_tokenizer
    from layerfreeze.export import export_base_config, restack_sidecar_plan, sidecar_info

    t0 = time.perf_counter()
    model_path = Path(model_path)
    if not (model_path / "config.json").is_file():
        raise FileNotFoundError(
            f"--model {model_path}: not a Hugging Face checkpoint directory (no config.json)."
        )
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(
            f"--out {out}: already exists. Choose a new directory or pass --overwrite."
        )
    config = export_base_config(model_path)
    _n, sidecar_meta = sidecar_info(model_path)
    total = num_layers_of(config)
    max_pos = getattr(config, "max_position_embeddings", None) or getattr(
        config, "n_positions", None
    )
    if isinstance(max_pos, int) and seq_len > max_pos:
        seq_len = max_pos  # a probe sequence must fit the model's positions
    check_num_layers(num_layers, total, strategy)
    if strategy == "angular" and not probe:
        probe = ["@bundled"]
        log_rank0(logger, "no --probe given: measuring on the bundled corpus")
    batches: list[dict[str, torch.Tensor]] | None = None
    probe_info: dict[str, Any] = {"source": None}
    if (probe or heal is not None) and not has_tokenizer(model_path):
        raise ValueError(
            f"--model {model_path}: {'a probe' if probe else '--heal'} needs the model's "
            "tokenizer; none in this directory."
        )
    if heal is not None and sidecar_meta is not None:
        raise ValueError(
            f"--model {model_path}: --heal needs a plain checkpoint, but this export carries "
            "layerfreeze adapters in its sidecar. Heal with `layerfreeze train` and a plan instead."
        )
    if probe:
        batches, probe_info = build_probe(
            probe,
            load_tokenizer(str(model_path)),
            data_dir,
            subjects,
            split,
            seq_len,
            max_tokens,
            batch_size,
        )
    heal_blocks = _check_heal(heal, config, model_path) if heal is not None else None
    model = load_causal_lm(model_path)
    before = model.config.to_dict()
    distances = None
    if batches is not None:
        log_rank0(logger, f"measuring angular distances on {probe_info['tokens']} probe tokens")
        distances = trace_angular(model, batches)
    choice = choose_block(total, num_layers, strategy, distances, last_token=last_token)
    kept = remove_layers(model, choice.start, choice.n)
    after = model.config.to_dict()
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    report = PruneReport(
        model=str(model_path),
        out=str(out),
        strategy=strategy,
        score="last_token" if last_token else "token_mean",
        num_layers_before=total,
        num_layers_after=len(kept),
        removed=list(range(choice.start, choice.end)),
        distance=choice.distance,
        scores=choice.scores,
        kept=kept,
        probe=probe_info,
        config_changed=changed,
        seconds=0.0,
    )
    if heal is not None:
        _heal_and_save(model, model_path, out, heal, heal_blocks, report, overwrite, t0)
        return report
    report.seconds = round(time.perf_counter() - t0, 3)
    # The removed layers' sidecar entries go with them; the kept ones are renumbered.
    sidecar_plan = restack_sidecar_plan(
        [(sidecar_meta, i) for i in kept], sidecar_meta, model.config.model_type
    )
    save_checkpoint(
        model,
        out,
        tokenizer_from=model_path,
        reports={"prune.json": report.to_dict()},
        overwrite=overwrite,
        sidecar_plan=sidecar_plan,
    )
    return report


def _check_heal(cfg: HealConfig, config: Any, model_path: Path) -> torch.Tensor:
    """Check a healing run before any weight is loaded; return its token blocks."""
    from transformers import AutoModelForCausalLM

    from layerfreeze.data.tokenizer import load_tokenizer
    from layerfreeze.diagnostics.heal import token_blocks

    if cfg.quantize == "nf4":
        from layerfreeze.quant import check_quantizable

        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(copy.deepcopy(config))
        check_quantizable(skeleton, "--heal-quantize")
    max_pos = getattr(config, "max_position_embeddings", None) or getattr(
        config, "n_positions", None
    )
    seq_len = min(cfg.seq_len, max_pos) if isinstance(max_pos, int) else cfg.seq_len
    return token_blocks(cfg.data, load_tokenizer(str(model_path)), seq_len, cfg.max_tokens)


def _heal_and_save(
    model: nn.Module,
    model_path: Path,
    out: Path,
    cfg: HealConfig,
    blocks: torch.Tensor,
    report: PruneReport,
    overwrite: bool,
    t0: float,
) -> None:
    """Heal the pruned ``model``, then write its merged export and prune.json to ``out``, atomically."""
    import os

    from layerfreeze.data.tokenizer import load_tokenizer
    from layerfreeze.diagnostics.heal import finish_healing, heal_model
    from layerfreeze.export import export_merged
    from layerfreeze.utils.io import atomic_directory

    tokenizer = load_tokenizer(str(model_path))
    log_rank0(logger, f"healing: {cfg.plan}, base {cfg.quantize}, {cfg.steps} steps")
    applied, heal = heal_model(model, blocks, cfg)
    finish_healing(model)
    check_structure(model)
    report.heal = heal.to_dict()
    report.seconds = round(time.perf_counter() - t0, 3)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        # export_merged writes its own directory atomically: build it inside ours, then lift it.
        export_merged(applied, tmp / "export", tokenizer)
        for f in (tmp / "export").iterdir():
            os.replace(f, tmp / f.name)
        (tmp / "export").rmdir()
        (tmp / "prune.json").write_text(
            json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
