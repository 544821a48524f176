"""``layerfreeze plan``: resolve a layer plan against a model and print what trains.

Run::

    layerfreeze plan --model path/to/checkpoint_or_config.json --preset hlpt --preset-arg r=8
    layerfreeze plan --model config.json --plan "0-7:full,8-31:freeze" --json
    layerfreeze plan --model config.json --plan plan.yaml        # a plan, or a list of phases
    layerfreeze plan --model config.json --preset freeze_deep --memory --world-size 64 \
        --zero-stage 3 --micro-batch 1 --seq-len 4096 --dtype bf16 --gradient-checkpointing
    layerfreeze plan --model config.json --plan lisa.yaml --memory --steps 400   # {rotate: lisa, ...}
    layerfreeze plan --model llama7b_config.json --preset h2lpt --count   # one line of counts
    layerfreeze plan --list                                              # the presets

The model is built on the ``meta`` device from its config alone (no weights, no memory), so a
70B config plans in seconds; counts come from parameter shapes. ``--memory`` adds the per-rank
memory of each phase (:mod:`layerfreeze.memory`). Exit code 2 on a bad plan or option.
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
    from layerfreeze.plan import PRESETS

    parser.add_argument("--model",
                        help="Hugging Face checkpoint directory or its config.json (required "
                             "except with --list)")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help=f"preset name: {', '.join(PRESETS)} (--list describes them)")
    src.add_argument("--list", action="store_true", help="list the presets with a line each and exit")
    src.add_argument("--plan", help="plan file (YAML/JSON: a plan or a list of schedule phases) or "
                                    "a compact plan string such as '0-7:full,8-31:freeze'")
    parser.add_argument("--preset-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="preset option, repeatable (e.g. --preset-arg fraction=0.25)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--steps", type=int,
                        help="optimizer steps of a rotation schedule (--plan file holding "
                             "{rotate: lisa|badam, ...}): one phase per interval (default: "
                             "ceil(layers / k) intervals, k = layers or block)")
    parser.add_argument("--count", action="store_true",
                        help="print one line instead of the table: trainable parameters, total "
                             "parameters and the trainable percentage (per phase for a schedule)")
    mem = parser.add_argument_group("memory (with --memory)")
    mem.add_argument("--memory", action="store_true",
                     help="also estimate per-rank memory of each phase (see docs/memory.md)")
    mem.add_argument("--world-size", type=int, help="data-parallel ranks (default 1)")
    mem.add_argument("--zero-stage", type=int, help="DeepSpeed ZeRO stage 0-3 (default 0)")
    mem.add_argument("--micro-batch", type=int, help="sequences per rank per forward (default 1)")
    mem.add_argument("--seq-len", type=int, help="tokens per sequence (default 2048)")
    mem.add_argument("--dtype", help="bf16 | fp16 (fp32 master weights) | fp32 (default bf16)")
    mem.add_argument("--gradient-checkpointing", action="store_true", default=None,
                     help="recompute block activations in the backward pass")
    mem.add_argument("--offload", action="store_true", default=None,
                     help="optimizer state in host memory (ZeRO-3: parameters too)")


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
        try:
            from layerfreeze.export import export_base_config

            config = export_base_config(path)  # a layerfreeze export: its base architecture
        except (OSError, ValueError) as e:  # not JSON, or a model type transformers lacks
            raise ValueError(
                f"--model {path / 'config.json'}: cannot read it ({str(e).splitlines()[0]})."
            ) from None
    elif path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(
                f"--model {path}: not a JSON config ({e}). Pass a checkpoint directory or its "
                "config.json."
            ) from None
        if not isinstance(data, dict):
            raise ValueError(
                f"--model {path}: expected a JSON object (a transformers config), got "
                f"{type(data).__name__}."
            )
        model_type = data.pop("model_type", None)
        if not model_type:
            raise ValueError(f"--model {path}: the config has no 'model_type'. Pass a transformers config.json.")
        from transformers import CONFIG_MAPPING

        if model_type not in CONFIG_MAPPING:  # transformers' own message lists ~900 types
            import difflib

            import transformers

            close = difflib.get_close_matches(str(model_type), list(CONFIG_MAPPING.keys()), n=1)
            hint = (f" Did you mean {close[0]!r}?" if close
                    else " Use a decoder-only type such as llama, qwen2, mistral or gpt2.")
            raise ValueError(
                f"--model {path}: unknown model_type {model_type!r} (transformers "
                f"{transformers.__version__} has no config class for it).{hint}"
            )
        try:
            config = AutoConfig.for_model(model_type, **data)
        except ValueError as e:
            raise ValueError(f"--model {path}: {str(e).splitlines()[0]}") from None
    else:
        raise FileNotFoundError(f"--model {path}: no such file or directory.")
    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(config)
        except ValueError as e:  # e.g. an encoder-only config (bert) has no causal LM class
            raise ValueError(
                f"--model {path}: not a causal LM config ({str(e).splitlines()[0]})."
            ) from None


def _load_plan_arg(text: str) -> Any:
    p = Path(text)
    if p.is_dir():
        raise FileNotFoundError(
            f"--plan {text}: is a directory. Pass a plan file (YAML/JSON) or a plan string."
        )
    if p.suffix.lower() in (".yaml", ".yml", ".json") or p.is_file():
        if not p.is_file():
            raise FileNotFoundError(f"--plan {text}: no such file.")
        import yaml

        try:
            return yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:  # JSON is YAML: a JSON syntax error lands here too
            where = getattr(e, "problem_mark", None)
            at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
            what = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(
                f"--plan {text}: not valid YAML/JSON{at}: {what}. Fix the file's syntax."
            ) from None
        except UnicodeDecodeError:
            raise ConfigError(f"--plan {text}: not a UTF-8 text file.") from None
    return text


_MEMORY_OPTIONS = ("world_size", "zero_stage", "micro_batch", "seq_len", "dtype",
                   "gradient_checkpointing", "offload")


def _memory_setup(args: argparse.Namespace):
    """The :class:`~layerfreeze.memory.TrainSetup` of ``--memory`` (None without it)."""
    given = {k: getattr(args, k) for k in _MEMORY_OPTIONS if getattr(args, k, None) is not None}
    if not args.memory:
        if given:
            flags = ", ".join("--" + k.replace("_", "-") for k in given)
            raise ConfigError(f"{flags}: only valid with --memory. Add --memory.")
        return None
    from layerfreeze.memory import TrainSetup

    return TrainSetup(**given)


def _plan_report(model, plan, install=(), setup=None, previous=None) -> tuple[dict, str, list[str]]:
    """Summary (and, with ``setup``, memory) of ``plan`` on ``model``; also its trainable names.

    ``previous``: names the previous schedule phase trained (carried at the switch).
    """
    from layerfreeze.apply import apply_plan

    applied = apply_plan(model, plan, install=install)
    summary = applied.summary()
    data = {"model_type": applied.layout.model_type, "plan": str(applied.plan), **summary.to_dict()}
    for row in data["layers"]:
        row.pop("name", None)
    text = f"plan: {applied.plan}\n{summary.table()}"
    if setup is not None:
        from layerfreeze.memory import estimate_memory

        memory = estimate_memory(applied, setup, previous_trainable=previous)
        data["memory"] = memory.to_dict()
        text += f"\n{memory.table()}"
    return data, text, applied.trainable_names()


def run(args: argparse.Namespace) -> int:
    """Resolve the plan on the meta model and print the table (or JSON)."""
    from layerfreeze.plan import LayerPlan
    from layerfreeze.schedule import PlanSchedule
    from layerfreeze.utils.schema import apply_overrides

    out = sys.stdout
    if getattr(args, "list", False):
        from layerfreeze.plan import PRESETS

        width = max(map(len, PRESETS))
        out.write("".join(f"{name:<{width}}  {doc}\n" for name, (_, _, doc) in PRESETS.items()))
        return 0
    try:
        if not args.model:
            raise ConfigError("--model: required with --preset or --plan, got none. Pass a "
                              "checkpoint directory or its config.json.")
        if args.count and (args.json or args.memory):
            raise ConfigError("--count: prints one line; drop --json / --memory, or drop --count.")
        setup = _memory_setup(args)
        model = build_meta_model(args.model)
        if args.preset:
            options = apply_overrides({}, args.preset_arg)
            spec: Any = LayerPlan.from_preset(args.preset, **options)
        else:
            if args.preset_arg:
                raise ConfigError("--preset-arg: only valid with --preset, got --plan. Put options in the plan.")
            spec = _load_plan_arg(args.plan)
        if args.steps is not None and not (isinstance(spec, dict) and "rotate" in spec):
            raise ConfigError(f"--steps: only valid with a rotation schedule (--plan file with "
                              f"{{rotate: lisa|badam, ...}}), got {args.steps}. Drop --steps.")
        rotation = isinstance(spec, dict) and "rotate" in spec
        if rotation:
            spec = _rotation_schedule(spec, model, args.steps)
        if isinstance(spec, (list, PlanSchedule)):
            schedule = PlanSchedule.parse(spec, path="--plan")
            phases, previous = [], None
            for phase in schedule.phases:
                data, text, previous = _plan_report(
                    build_meta_model(args.model), phase.plan, install=schedule.plans, setup=setup,
                    previous=previous,
                )
                previous = previous if schedule.carry_state else None  # reset carries nothing
                phases.append((phase.until_step, data, text))
            worst = None
            if setup is not None and rotation:  # the run's peak: the largest phase peak
                # per memory kind
                worst = {k: max(d["memory"]["peak"][k] for _u, d, _t in phases)
                         for k in ("device", "cpu")}
            if args.count:
                out.write("".join(_count_line(d) for _u, d, _t in phases))
            elif args.json:
                report = {"phases": [dict(until_step=u, **d) for u, d, _ in phases]}
                if worst is not None:
                    report["peak"] = worst
                out.write(json.dumps(report, indent=2) + "\n")
            else:
                start = 0
                for until, _d, text in phases:
                    out.write(f"phase steps {start}-{'end' if until is None else until - 1}\n{text}\n\n")
                    start = until or start
                if worst is not None:
                    from layerfreeze.memory import format_bytes

                    out.write(f"peak over {len(phases)} phase(s) per rank: device "
                              f"{format_bytes(worst['device'])}, cpu {format_bytes(worst['cpu'])}\n")
            return 0
        data, text, _ = _plan_report(model, LayerPlan.parse(spec, path="--plan"), setup=setup)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        logger.error("%s", e)
        return 2
    if args.count:
        out.write(_count_line(data))
        return 0
    out.write((json.dumps(data, indent=2) if args.json else text) + "\n")
    return 0


def _rotation_schedule(spec: dict, model: Any, steps: int | None):
    """The :class:`~layerfreeze.schedule.PlanSchedule` of a ``{rotate: ...}`` plan file."""
    import math

    from layerfreeze.memory import ModelDims
    from layerfreeze.rotation import RotationConfig, build_rotation_schedule

    cfg = RotationConfig.parse(spec, path="--plan")
    num_layers = ModelDims.from_config(model.config).num_layers
    if steps is None:
        steps = cfg.interval * math.ceil(num_layers / (cfg.layers or cfg.block))
    elif isinstance(steps, bool) or steps < 1:
        raise ConfigError(f"--steps: must be an integer >= 1, got {steps}.")
    cfg.check_layers(num_layers, path="--plan")
    return build_rotation_schedule(cfg, num_layers, steps)


def _count_line(data: dict) -> str:
    """``<trainable> trainable of <total> parameters (<pct>%): <plan>`` for ``--count``."""
    trainable, total = data["trainable_params"], data["total_params"]
    pct = 100.0 * trainable / total if total else 0.0
    return f"{trainable:,} trainable of {total:,} parameters ({pct:.4f}%): {data['plan']}\n"
