"""``layerfreeze plan``: resolve a layer plan against a model and print what trains.

Run::

    layerfreeze plan --model path/to/checkpoint_or_config.json --preset hlpt --preset-arg r=8
    layerfreeze plan --model config.json --plan "0-7:full,8-31:freeze" --json
    layerfreeze plan --model config.json --plan plan.yaml        # a plan, or a list of phases

The model is built on the ``meta`` device from its config alone (no weights, no memory), so a
70B config plans in a second; counts come from parameter shapes. Exit code 2 on a bad plan.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from layerfreeze.errors import ConfigError
from layerfreeze.utils.logging import get_logger

logger = get_logger("layerfreeze.plan")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register ``--model``, ``--preset`` / ``--preset-arg`` or ``--plan``, and ``--json``."""
    parser.add_argument("--model", required=True,
                        help="Hugging Face checkpoint directory or its config.json")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="preset name: full, freeze_deep, freeze_shallow, hlpt, h2lpt, lora_all")
    src.add_argument("--plan", help="plan file (YAML/JSON: a plan or a list of schedule phases) or "
                                    "a compact plan string such as '0-7:full,8-31:freeze'")
    parser.add_argument("--preset-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="preset option, repeatable (e.g. --preset-arg fraction=0.25)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def build_meta_model(path: str | Path):
    """A model with the architecture of ``path`` (checkpoint dir or config.json) on ``meta``.

    Raises:
        FileNotFoundError: no config at ``path``.
        ValueError: the config cannot be read or names an unknown model type.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"--model {path}: no config.json in this directory.")
        config = AutoConfig.from_pretrained(str(path))
    elif path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"--model {path}: not valid JSON ({e}).") from None
        model_type = data.pop("model_type", None)
        if not model_type:
            raise ValueError(f"--model {path}: the config has no 'model_type'. Pass a transformers config.json.")
        try:
            config = AutoConfig.for_model(model_type, **data)
        except ValueError as e:
            raise ValueError(f"--model {path}: {e}") from None
    else:
        raise FileNotFoundError(f"--model {path}: no such file or directory.")
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _load_plan_arg(text: str) -> Any:
    p = Path(text)
    if p.suffix.lower() in (".yaml", ".yml", ".json") or p.is_file():
        if not p.is_file():
            raise FileNotFoundError(f"--plan {text}: no such file.")
        import yaml

        return yaml.safe_load(p.read_text(encoding="utf-8"))
    return text


def _plan_report(model, plan, install=()) -> tuple[dict, str]:
    from layerfreeze.apply import apply_plan

    applied = apply_plan(model, plan, install=install)
    summary = applied.summary()
    data = {"model_type": applied.layout.model_type, "plan": str(applied.plan), **summary.to_dict()}
    for row in data["layers"]:
        row.pop("name", None)
    text = f"plan: {applied.plan}\n{summary.table()}"
    return data, text


def run(args: argparse.Namespace) -> int:
    """Resolve the plan on the meta model and print the table (or JSON)."""
    from layerfreeze.plan import LayerPlan
    from layerfreeze.schedule import PlanSchedule
    from layerfreeze.utils.schema import apply_overrides

    out = sys.stdout
    try:
        model = build_meta_model(args.model)
        if args.preset:
            options = apply_overrides({}, args.preset_arg)
            spec: Any = LayerPlan.from_preset(args.preset, **options)
        else:
            if args.preset_arg:
                raise ConfigError("--preset-arg: only valid with --preset, got --plan. Put options in the plan.")
            spec = _load_plan_arg(args.plan)
        if isinstance(spec, list):
            schedule = PlanSchedule.parse(spec, path="--plan")
            phases = []
            for phase in schedule.phases:
                data, text = _plan_report(build_meta_model(args.model), phase.plan, install=schedule.plans)
                phases.append((phase.until_step, data, text))
            if args.json:
                out.write(json.dumps({"phases": [dict(until_step=u, **d) for u, d, _ in phases]}, indent=2) + "\n")
            else:
                start = 0
                for until, _d, text in phases:
                    out.write(f"phase steps {start}-{'end' if until is None else until - 1}\n{text}\n\n")
                    start = until or start
            return 0
        data, text = _plan_report(model, LayerPlan.parse(spec, path="--plan"))
    except (ConfigError, ValueError, FileNotFoundError) as e:
        logger.error("%s", e)
        return 2
    out.write((json.dumps(data, indent=2) if args.json else text) + "\n")
    return 0
