"""``layerfreeze train --config FILE [key.sub=value ...]``: continued pre-training with a layer plan.

Single process, ``torchrun --nproc_per_node N -m layerfreeze train ...`` or the ``deepspeed``
launcher (its ``--local_rank`` is stripped by the CLI). Exit codes: 0 done, 2 bad input
(nothing written), 3 stopped after too many consecutive NaN/Inf losses, 75 stopped by SIGTERM /
SIGINT (checkpoint saved per ``checkpoint.on_signal``; resubmit the same job to continue).

Launchers do not pass 75 on (torchrun exits 1, the deepspeed launcher 1 when it got the signal
itself), so every rank that stops on a signal also appends ``rank N: 75 <message>`` to
``$LAYERFREEZE_EXIT_FILE`` when that is set; a job script can exit 75 when the file is not empty.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
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
    from layerfreeze.train import (
        EXIT_INTERRUPTED,
        TrainingInterrupted,
        TrainingStopped,
        run_training,
    )
    from layerfreeze.utils.dist import get_rank
    from layerfreeze.utils.logging import log_rank0

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
    except TrainingInterrupted as e:
        log_rank0(logger, "%s", e, level=logging.WARNING)  # not an error: nothing is lost
        if os.environ.get("LAYERFREEZE_EXIT_FILE"):
            with contextlib.suppress(OSError), open(
                os.environ["LAYERFREEZE_EXIT_FILE"], "a", encoding="utf-8"
            ) as f:
                f.write(f"rank {get_rank()}: {EXIT_INTERRUPTED} {e}\n")
        return EXIT_INTERRUPTED
    return 0
