"""``layerfreeze validate [--config FILE] [key.sub=value ...] [--schema]``: check a run config.

Prints the resolved config as YAML (every default filled in), resolves the plan against the
model's layer count (read from its config only, no weights), prints the DeepSpeed config the run
would use (for ``WORLD_SIZE`` ranks, default 1), and with ``--schema`` prints every field with its
type, default and docstring. Exit code 2 on any problem.
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
    import json

    import yaml

    from layerfreeze.config import RunConfig, load_config
    from layerfreeze.train import (
        build_deepspeed_config,
        check_eval_subjects,
        describe_schema,
        resolve_run_plans,
    )
    from layerfreeze.utils.dist import get_world_size
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
        ds, replaced = build_deepspeed_config(cfg, get_world_size())
        out.write(f"DeepSpeed config for {get_world_size()} rank(s):\n{json.dumps(ds, indent=2)}\n")
        for line in replaced:
            out.write(f"note: {line}\n")
    except ConfigError as e:
        logger.error("%s", e)
        return 2
    out.write(f"OK: {args.config} is valid.\n")
    sys.stdout.write(out.getvalue())
    return 0
