"""Hybrid models (LayerTracer's case study): decoder layers taken from two or more checkpoints.

A layer map assigns each layer of the new model to a layer of a named source checkpoint::

    0-15:A,16-31:B          # layers 0-15 from A, 16-31 from B (the same positions)
    0-23:A,24-31:B@16-23    # layers 24-31 are B's layers 16-23 (any source range of equal length)
    0-31:A,32-39:A@24-31    # depth up-scaling: 40 layers, A's 24-31 twice

Output layers must be covered exactly once, from 0 up. Embeddings, the final norm and the LM head
come from the base checkpoint. Sources must agree with the base on everything a layer's weights
and maths depend on (:data:`MUST_MATCH`); the result is checked against its own config before it
is saved (a standard Hugging Face checkpoint, atomically, with the base's tokenizer).

Run::

    layerfreeze compose --base A --model A=ckpt/base --model B=ckpt/chat --layers "0-15:A,16-31:B" \\
        --out hybrid/
    layerfreeze compose --map hybrid.yaml --out hybrid/

Memory: the base model plus one other source at a time (a source's unused layers are dropped
as soon as its layers are taken).
"""

from __future__ import annotations

import copy
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from layerfreeze.diagnostics.prune import (
    load_causal_lm,
    num_layers_of,
    relayer_config,
    restack_layers,
    save_checkpoint,
)
from layerfreeze.errors import ConfigError
from layerfreeze.models import discover_layout
from layerfreeze.utils.logging import get_logger, log_rank0

__all__ = ["MUST_MATCH", "ComposeReport", "LayerOrigin", "compose_checkpoints", "parse_layer_map"]

logger = get_logger("layerfreeze.compose")

#: Config keys that must be equal in every source and the base (shapes, head geometry, vocab,
#: activation). ``None`` on both sides counts as equal.
MUST_MATCH = (
    "model_type",
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "n_inner",
    "vocab_size",
    "hidden_act",
    "activation_function",
)
#: Keys that change a layer's maths without changing shapes: a difference is logged.
SHOULD_MATCH = (
    "rope_parameters",
    "rope_theta",
    "rope_scaling",
    "rms_norm_eps",
    "layer_norm_eps",
    "layer_norm_epsilon",
    "attention_bias",
    "mlp_bias",
    "sliding_window",
)

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_RANGE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+))?\s*$")


@dataclass(frozen=True)
class LayerOrigin:
    """Where one output layer comes from: layer ``index`` of source ``source``."""

    source: str
    index: int


def _range(text: str, where: str) -> tuple[int, int]:
    m = _RANGE.match(text)
    if not m:
        raise ConfigError(f"{where}: expected a layer range like '0-15' or '7', got {text!r}.")
    a = int(m.group(1))
    b = int(m.group(2)) if m.group(2) is not None else a
    if b < a:
        raise ConfigError(f"{where}: range end {b} is before its start {a}, got {text!r}.")
    return a, b


def _entries(spec: str | Sequence[Any], where: str) -> list[tuple[str, str, str | None]]:
    """(output range, source, source range or None) per entry of a string or list spec."""
    out: list[tuple[str, str, str | None]] = []
    if isinstance(spec, str):
        for k, part in enumerate(p for p in spec.split(",") if p.strip()):
            rng, sep, rest = part.partition(":")
            if not sep:
                raise ConfigError(
                    f"{where}[{k}]: expected RANGE:SOURCE (e.g. '0-15:A') or "
                    f"RANGE:SOURCE@RANGE, got {part.strip()!r}."
                )
            name, _, src = rest.partition("@")
            out.append((rng, name.strip(), src or None))
        return out
    for k, item in enumerate(spec):
        if not isinstance(item, Mapping) or "layers" not in item or "from" not in item:
            raise ConfigError(
                f"{where}[{k}]: expected a mapping with 'layers' and 'from' (and optionally "
                f"'source_layers'), got {item!r}."
            )
        extra = set(item) - {"layers", "from", "source_layers"}
        if extra:
            raise ConfigError(
                f"{where}[{k}]: unknown keys {sorted(extra)}; valid: layers, from, source_layers."
            )
        src = item.get("source_layers")
        out.append((str(item["layers"]), str(item["from"]), None if src is None else str(src)))
    return out


def parse_layer_map(
    spec: str | Sequence[Any], source_layers: Mapping[str, int], where: str = "--layers"
) -> list[LayerOrigin]:
    """Resolve a layer map into one :class:`LayerOrigin` per output layer.

    Args:
        spec: ``"0-15:A,16-31:B@0-15"`` or a list of ``{layers, from, source_layers}``.
        source_layers: number of layers of each named source.
        where: the option name used in error messages.

    Raises:
        ConfigError: every problem found (unknown source, overlap naming both entries, gap,
            length mismatch, a source layer out of range), reported together.
    """
    problems: list[str] = []
    owner: dict[int, int] = {}
    origins: dict[int, LayerOrigin] = {}
    entries = _entries(spec, where)
    if not entries:
        raise ConfigError(f"{where}: the layer map is empty. Give e.g. '0-15:A,16-31:B'.")
    for k, (rng_text, name, src_text) in enumerate(entries):
        here = f"{where}[{k}] {rng_text.strip()}:{name}" + (
            f"@{src_text.strip()}" if src_text else ""
        )
        try:
            a, b = _range(rng_text, here)
            sa, sb = _range(src_text, here) if src_text else (a, b)
        except ConfigError as e:
            problems.extend(e.problems)
            continue
        if name not in source_layers:
            problems.append(
                f"{here}: unknown source {name!r}. Named sources: {', '.join(sorted(source_layers))}."
            )
            continue
        if sb - sa != b - a:
            problems.append(
                f"{here}: {b - a + 1} output layers but {sb - sa + 1} source layers; the ranges must "
                "have the same length."
            )
            continue
        if sb >= source_layers[name]:
            problems.append(
                f"{here}: source {name} has {source_layers[name]} layers (valid 0-"
                f"{source_layers[name] - 1}), got layer {sb}."
            )
            continue
        for j in range(a, b + 1):
            if j in owner:
                other = entries[owner[j]]
                problems.append(
                    f"{here}: output layer {j} is also given by {where}[{owner[j]}] "
                    f"{other[0].strip()}:{other[1]}; each layer must come from one entry."
                )
                break
            owner[j] = k
            origins[j] = LayerOrigin(name, sa + (j - a))
    if not problems:
        gaps = [j for j in range(max(origins) + 1) if j not in origins]
        if gaps:
            problems.append(
                f"{where}: output layers {gaps} are not given; cover 0-{max(origins)} without gaps."
            )
    if problems:
        raise ConfigError(problems)
    return [origins[j] for j in range(len(origins))]


def check_compatible(base: str, configs: Mapping[str, Any], paths: Mapping[str, str]) -> None:
    """Raise ``ValueError`` (one line) when a source disagrees with the base on :data:`MUST_MATCH`."""
    ref = configs[base]
    for name, cfg in configs.items():
        if name == base:
            continue
        for key in MUST_MATCH:
            a, b = getattr(ref, key, None), getattr(cfg, key, None)
            if key == "head_dim":  # implicit head_dim = hidden / heads on both sides
                a = a or ref.hidden_size // ref.num_attention_heads
                b = b or cfg.hidden_size // cfg.num_attention_heads
            if key == "num_key_value_heads":
                a = a or ref.num_attention_heads
                b = b or cfg.num_attention_heads
            if a != b:
                raise ValueError(
                    f"compose: checkpoints {base} ({paths[base]}) and {name} ({paths[name]}) are "
                    f"incompatible: {key} is {a!r} vs {b!r}."
                )
        for key in SHOULD_MATCH:
            a, b = getattr(ref, key, None), getattr(cfg, key, None)
            if a != b:
                log_rank0(
                    logger,
                    f"compose: {base} and {name} differ in {key} ({a!r} vs {b!r}); layers from "
                    f"{name} will run with {base}'s value.",
                    level=30,
                )


@dataclass
class ComposeReport:
    """What ``layerfreeze compose`` built (``compose.json``)."""

    out: str
    base: str
    sources: dict[str, str]
    layers: list[dict[str, Any]]
    num_layers: int
    config_changed: list[str]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        """Console table: runs of consecutive output layers and where they come from."""
        lines = [
            f"hybrid: {self.out} ({self.num_layers} layers, non-layer weights from {self.base})"
        ]
        lines.append(f"{'layers':>9}  {'source':<8} {'source layers':>13}  path")
        runs: list[list[dict[str, Any]]] = []
        for row in self.layers:
            last = runs[-1][-1] if runs else None
            if (
                last
                and last["source"] == row["source"]
                and last["source_layer"] + 1 == row["source_layer"]
            ):
                runs[-1].append(row)
            else:
                runs.append([row])
        for run in runs:
            a, b = run[0], run[-1]
            out_range = f"{a['layer']}-{b['layer']}"
            src_range = f"{a['source_layer']}-{b['source_layer']}"
            lines.append(
                f"{out_range:>9}  {a['source']:<8} {src_range:>13}  {self.sources[a['source']]}"
            )
        return "\n".join(lines)


def compose_checkpoints(
    base: str,
    sources: Mapping[str, str | Path],
    layers: str | Sequence[Any],
    out: str | Path,
    overwrite: bool = False,
) -> ComposeReport:
    """Build and save a hybrid model.

    Args:
        base: name of the source giving embeddings, final norm, LM head, config and tokenizer.
        sources: ``{name: checkpoint directory}``.
        layers: the layer map (see :func:`parse_layer_map`).
        out: the new checkpoint directory.
        overwrite: replace an existing ``out``.

    Every input is checked from the configs before any weights are loaded; nothing is written
    unless the whole job succeeds.

    Raises:
        ConfigError, ValueError, FileNotFoundError, FileExistsError: bad input.
    """
    from layerfreeze.export import export_base_config, restack_sidecar_plan, sidecar_info

    t0 = time.perf_counter()
    out = Path(out)
    problems = []
    for name in sources:
        if not _NAME.match(name):
            problems.append(
                f"--model {name}=...: a source name is a letter followed by letters, digits or _, "
                f"got {name!r}."
            )
    if base not in sources:
        problems.append(
            f"--base: {base!r} is not a named source. Named: {', '.join(sorted(sources)) or 'none'} "
            "(name them with --model NAME=PATH)."
        )
    if problems:
        raise ConfigError(problems)
    if out.exists() and not overwrite:
        raise FileExistsError(
            f"--out {out}: already exists. Choose a new directory or pass --overwrite."
        )
    paths = {k: str(v) for k, v in sources.items()}
    configs = {}
    sidecars: dict[str, Any] = {}  # a source export's sidecar plan.json (None: no sidecar)
    for name, path in paths.items():
        if not (Path(path) / "config.json").is_file():
            raise FileNotFoundError(
                f"--model {name}={path}: not a Hugging Face checkpoint directory (no config.json)."
            )
        configs[name] = export_base_config(path, f"--model {name}=")
        sidecars[name] = sidecar_info(path, f"--model {name}=")[1]
    origins = parse_layer_map(layers, {k: num_layers_of(c) for k, c in configs.items()})
    used = {o.source for o in origins} | {base}
    check_compatible(base, {k: configs[k] for k in sorted(used)}, paths)

    model = load_causal_lm(paths[base], what=f"--model {base}=")
    before = model.config.to_dict()
    dtype = next(model.parameters()).dtype
    base_layout = discover_layout(model)
    blocks: list[Any] = [None] * len(origins)
    taken: set[tuple[str, int]] = set()

    def take(module: Any, key: tuple[str, int]) -> Any:
        # A source layer used twice (depth up-scaling) gets its own copy of the weights.
        mod = copy.deepcopy(module) if key in taken else module
        taken.add(key)
        return mod

    for j, o in enumerate(origins):
        if o.source == base:
            blocks[j] = take(base_layout.layers[o.index].module, (o.source, o.index))
    for name in sorted(used - {base}):
        other = load_causal_lm(paths[name], what=f"--model {name}=")
        other_layers = discover_layout(other).layers
        for j, o in enumerate(origins):
            if o.source == name:
                blocks[j] = take(other_layers[o.index].module, (o.source, o.index)).to(dtype)
        del other, other_layers
    restack_layers(model, blocks, base_layout)
    relayer_config(model.config, [(configs[o.source], o.index) for o in origins])
    after = model.config.to_dict()
    report = ComposeReport(
        out=str(out),
        base=base,
        sources=paths,
        layers=[
            {"layer": j, "source": o.source, "source_layer": o.index} for j, o in enumerate(origins)
        ],
        num_layers=len(origins),
        config_changed=sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k)),
        seconds=0.0,
    )
    report.seconds = round(time.perf_counter() - t0, 3)
    # Each layer brings its source's sidecar adapters (they moved with the blocks).
    sidecar_plan = restack_sidecar_plan(
        [(sidecars[o.source], o.index) for o in origins], sidecars[base], model.config.model_type
    )
    save_checkpoint(
        model,
        out,
        tokenizer_from=paths[base],
        reports={"compose.json": report.to_dict()},
        overwrite=overwrite,
        sidecar_plan=sidecar_plan,
    )
    return report
