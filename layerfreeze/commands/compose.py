"""``layerfreeze compose``: a hybrid model whose decoder layers come from several checkpoints.

Examples::

    layerfreeze compose --base A --model A=ckpt/base --model B=ckpt/chat \\
        --layers "0-15:A,16-31:B" --out hybrid/
    layerfreeze compose --base A --model A=ckpt/base --layers "0-31:A,32-39:A@24-31" --out up/
    layerfreeze compose --map hybrid.yaml --out hybrid/

A map file (YAML or JSON) holds the same three things; command-line options override it::

    base: A
    models: {A: ckpt/base, B: ckpt/chat}
    layers: "0-15:A,16-31:B"            # or a list: [{layers: 0-15, from: A}, {layers: 16-31,
                                        #   from: B, source_layers: 16-31}]

Embeddings, final norm and LM head (and config, tokenizer) come from ``--base``. Exit code 2 on
bad input (incompatible checkpoints name both and the mismatching key), with nothing written.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from layerfreeze.errors import ConfigError
from layerfreeze.utils.io import OVERWRITE_HELP, check_output_path
from layerfreeze.utils.logging import get_logger

logger = get_logger("layerfreeze.compose")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the compose options."""
    parser.add_argument("--base", help="source giving embeddings, final norm, LM head, config")
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a named source checkpoint, repeatable (e.g. --model A=ckpt/base)",
    )
    parser.add_argument(
        "--layers", help="layer map, e.g. '0-15:A,16-31:B' or '0-23:A,24-31:B@16-23'"
    )
    parser.add_argument("--map", help="YAML/JSON file with base, models and layers")
    parser.add_argument("--out", required=True, help="directory for the composed checkpoint")
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    parser.add_argument("--json", action="store_true", help="print compose.json instead of a table")


def _read_map(path: str) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if p.is_dir():
        raise FileNotFoundError(f"--map {path}: is a directory; pass a YAML/JSON map file.")
    if not p.is_file():
        raise FileNotFoundError(f"--map {path}: no such file.")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:  # where, and what the parser expected (JSON is YAML)
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"--map {path}: not valid YAML/JSON{at}: {what}.") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"--map {path}: expected a mapping with base, models, layers; got {data!r}."
        )
    unknown = set(data) - {"base", "models", "layers"}
    if unknown:
        raise ConfigError(
            f"--map {path}: unknown keys {sorted(unknown)}; valid: base, models, layers."
        )
    models = data.get("models") or {}
    if not isinstance(models, dict):
        raise ConfigError(
            f"--map {path}: models must map names to checkpoint paths, got {models!r}."
        )
    base = p.parent
    # relative model paths are relative to the map file
    data["models"] = {
        str(k): str(v if Path(str(v)).is_absolute() else (base / str(v))) for k, v in models.items()
    }
    return data


def _resolve(args: argparse.Namespace) -> tuple[str, dict[str, str], Any]:
    spec: dict[str, Any] = _read_map(args.map) if args.map else {"models": {}}
    sources = dict(spec["models"])
    for item in args.model:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--model: expected NAME=PATH (e.g. A=ckpt/base), got {item!r}.")
        sources[name] = path
    base = args.base or spec.get("base")
    layers = args.layers or spec.get("layers")
    problems = []
    if not base:
        problems.append("--base: required (or 'base' in --map): the source of embeddings and head.")
    if not layers:
        problems.append("--layers: required (or 'layers' in --map), e.g. '0-15:A,16-31:B'.")
    if not sources:
        problems.append("--model: name at least one source, e.g. --model A=ckpt/base.")
    if problems:
        raise ConfigError(problems)
    return str(base), sources, layers


def run(args: argparse.Namespace) -> int:
    """Compose, save, print the report; 2 on bad input."""
    from layerfreeze.diagnostics.compose import compose_checkpoints
    from layerfreeze.modeling import check_weight_files

    try:
        check_output_path(args.out, overwrite=args.overwrite)
        base, sources, layers = _resolve(args)
        for name, path in sources.items():  # a corrupt download, named before any loading
            if (Path(path) / "config.json").is_file():
                check_weight_files(path, f"--model {name}")
        report = compose_checkpoints(base, sources, layers, args.out, overwrite=True)
    except (ConfigError, ValueError, FileNotFoundError, FileExistsError) as e:
        logger.error("%s", e)
        return 2
    sys.stdout.write(
        (json.dumps(report.to_dict(), indent=2) if args.json else report.table()) + "\n"
    )
    return 0
