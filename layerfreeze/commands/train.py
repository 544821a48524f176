"""``layerfreeze train --config FILE [key.sub=value ...]``: continued pre-training with a layer plan.

Single process, ``torchrun --nproc_per_node N -m layerfreeze train ...`` or the ``deepspeed``
launcher (its ``--local_rank`` is stripped by the CLI). Exit codes: 0 done, 2 bad input
(nothing written), 3 stopped after too many consecutive NaN/Inf losses.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

from layerfreeze.errors import ConfigError
from layerfreeze.utils.logging import get_logger

logger = get_logger("layerfreeze.train")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register ``--config`` and the positional dotted overrides."""
    parser.add_argument("--config", required=True, help="YAML run config (see configs/)")
    parser.add_argument(
        "overrides", nargs="*", metavar="key.sub=value",
        help="dotted overrides applied on top of the file, e.g. train.steps=10 optim.lr=1e-4",
    )


def run(args: argparse.Namespace) -> int:
    """Load and validate the config, then run the recipe."""
    from layerfreeze.config import load_config
    from layerfreeze.train import TrainingStopped, run_training

    try:
        cfg = load_config(args.config, args.overrides)
        # train has no result on stdout (the summary is logged and written to summary.json);
        # what libraries print there (DeepSpeed's "... built successfully") is progress.
        with contextlib.redirect_stdout(sys.stderr):
            run_training(cfg)
    except ConfigError as e:
        logger.error("%s", e)
        return 2
    except TrainingStopped as e:
        logger.error("%s", e)
        return 3
    return 0
