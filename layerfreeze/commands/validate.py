"""``layerfreeze validate [--config FILE] [key.sub=value ...] [--schema]``: check a run config.

Prints the resolved config as YAML (every default filled in), resolves the plan against the
model's layer count (read from its config only, no weights), prints the DeepSpeed config the run
would use (for ``WORLD_SIZE`` ranks, default 1) or, with ``engine: megatron``, runs Megatron's own
config checks and prints its parallel layout (for ``WORLD_SIZE`` ranks, default TP x PP; CUDA is
not required here) -- both through the engine module's ``describe_run_config``
(:class:`layerfreeze.engines.base.EngineModule`), and with ``--schema`` prints every field with its type, default and
docstring. Exit code 2 on any problem.
"""

from __future__ import annotations

import argparse
import sys

from layerfreeze.errors import ConfigError
from layerfreeze.utils.logging import get_logger

logger = get_logger("layerfreeze.validate")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register ``--config``, overrides and ``--schema``."""
    parser.add_argument("--config", help="YAML run config to check")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted overrides")
    parser.add_argument(
        "--schema", action="store_true", help="print every config field with its type, default and doc"
    )


def run(args: argparse.Namespace) -> int:
    """Validate and print; the command's output goes to stdout (it is the product here).

    The report is built in memory and written only when the config is valid, so an invalid
    one leaves stdout empty and its one error line on stderr.
    """
    import io

    import yaml

    from layerfreeze.config import RunConfig, load_config
    from layerfreeze.train import (
        check_eval_subjects,
        describe_schema,
        load_engine,
        resolve_run_plans,
    )
    from layerfreeze.utils.schema import to_dict

    out = io.StringIO()
    if args.schema:
        out.write(describe_schema(RunConfig) + "\n")
        if not args.config:
            sys.stdout.write(out.getvalue())
            return 0
    if not args.config:
        logger.error("validate: pass --config FILE (and/or --schema).")
        return 2
    try:
        cfg = load_config(args.config, args.overrides)
        out.write(yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True))
        for line in resolve_run_plans(cfg):
            out.write(line + "\n")
        check_eval_subjects(cfg)
        for line in load_engine(cfg.engine).describe_run_config(cfg):
            out.write(line + "\n")
    except ConfigError as e:
        logger.error("%s", e)
        return 2
    out.write(f"OK: {args.config} is valid.\n")
    sys.stdout.write(out.getvalue())
    return 0
