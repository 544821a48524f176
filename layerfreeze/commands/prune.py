"""``layerfreeze prune``: remove the block of layers that changes the residual stream least.

Examples::

    layerfreeze prune --model ckpt/ --num-layers 8 --out pruned/                 # bundled corpus probe
    layerfreeze prune --model ckpt/ --num-layers 8 --probe ceval --data-dir data/ --out pruned/
    layerfreeze prune --model ckpt/ --num-layers 8 --probe notes.txt more/ --out pruned/
    layerfreeze prune --model ckpt/ --num-layers 8 --strategy deepest --out pruned/
    layerfreeze prune --model ckpt/ --num-layers 8 --out healed/ --heal --heal-quantize nf4 \
        --heal-data corpus/ --heal-steps 200            # QLoRA healing, merged export saved

The chosen block and its angular distance go to stdout (a table) and ``prune.json`` in the
saved checkpoint. ``--heal`` heals the pruned model with a short LoRA run over an optionally
NF4-quantized base and saves its merged export instead (docs/diagnostics-prune.md).
Exit code 2 on bad input, with nothing written.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from layerfreeze.utils.io import OVERWRITE_HELP, check_output_path
from layerfreeze.utils.logging import get_logger

logger = get_logger("layerfreeze.prune")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the prune options."""
    parser.add_argument("--model", required=True, help="Hugging Face checkpoint directory")
    parser.add_argument("--num-layers", type=int, required=True, help="layers to remove (N)")
    parser.add_argument("--out", required=True, help="directory for the pruned checkpoint")
    parser.add_argument(
        "--strategy",
        choices=["angular", "deepest"],
        default="angular",
        help="angular: the N-layer block with the smallest angular distance "
        "across it (default); deepest: the N layers before the last one",
    )
    parser.add_argument(
        "--probe",
        nargs="+",
        metavar="FILES|ceval|cmmlu",
        help=".txt/.jsonl files or directories (@bundled: the bundled corpus), or "
        "ceval / cmmlu with --data-dir (default for angular: @bundled)",
    )
    parser.add_argument("--data-dir", help="C-Eval / CMMLU data folder for --probe ceval|cmmlu")
    parser.add_argument("--subjects", help="comma-separated benchmark subjects (default: all)")
    parser.add_argument("--split", help="benchmark split (default: ceval val, cmmlu test)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per probe sequence")
    parser.add_argument("--max-tokens", type=int, default=16384, help="probe tokens in all")
    parser.add_argument("--batch-size", type=int, default=4, help="probe sequences per forward")
    parser.add_argument(
        "--score",
        choices=["last", "mean"],
        default="last",
        help="last: distance at each sequence's last token, as Gromov et al. "
        "(default); mean: mean over all tokens",
    )
    heal = parser.add_argument_group(
        "healing", "--heal: a short LoRA run on the pruned model (Gromov et al.); --out gets "
        "its merged export"
    )
    heal.add_argument("--heal", action="store_true", help="heal the pruned model before saving")
    heal.add_argument("--heal-data", nargs="+", metavar="FILES", help="text to heal on "
                      "(.txt/.jsonl files or directories; default @bundled)")
    heal.add_argument("--heal-plan", help="LoRA plan (default lora_all: every linear, r=16)")
    heal.add_argument("--heal-quantize", help="frozen base: none (default) or nf4 (QLoRA, "
                      "needs bitsandbytes)")
    heal.add_argument("--heal-steps", type=int, help="optimizer steps (default 100)")
    heal.add_argument("--heal-lr", type=float, help="AdamW learning rate (default 2e-4)")
    heal.add_argument("--heal-batch-size", type=int, help="sequences per step (default 4)")
    heal.add_argument("--heal-seq-len", type=int, help="tokens per sequence (default 256)")
    heal.add_argument("--heal-max-tokens", type=int, help="tokens read in all (default 262144)")
    heal.add_argument("--heal-heldout-fraction", type=float,
                      help="share of sequences held out for the loss (default 0.1)")
    heal.add_argument("--heal-seed", type=int, help="seed (default 0)")
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    parser.add_argument("--json", action="store_true", help="print prune.json instead of a table")


def run(args: argparse.Namespace) -> int:
    """Prune, save, print the report; 2 on bad input."""
    from layerfreeze.diagnostics.prune import prune_checkpoint
    from layerfreeze.errors import ConfigError
    from layerfreeze.modeling import check_weight_files

    for name in ("seq_len", "max_tokens", "batch_size"):
        if getattr(args, name) < 1:
            logger.error(
                "--%s: must be at least 1, got %d.", name.replace("_", "-"), getattr(args, name)
            )
            return 2
    try:
        heal = _heal_config(args)
        check_output_path(args.out, overwrite=args.overwrite)
        if (Path(args.model) / "config.json").is_file():  # else prune_checkpoint says so
            check_weight_files(args.model, "--model")
        report = prune_checkpoint(
            args.model,
            args.num_layers,
            args.out,
            strategy=args.strategy,
            probe=args.probe,
            data_dir=args.data_dir,
            subjects=[s for s in args.subjects.split(",") if s] if args.subjects else None,
            split=args.split,
            seq_len=args.seq_len,
            max_tokens=args.max_tokens,
            batch_size=args.batch_size,
            last_token=args.score == "last",
            overwrite=True,  # check_output_path above applied --overwrite
            heal=heal,
        )
    except (ConfigError, ValueError, FileNotFoundError, FileExistsError) as e:
        logger.error("%s", e)
        return 2
    sys.stdout.write(
        (json.dumps(report.to_dict(), indent=2) if args.json else report.table()) + "\n"
    )
    return 0


def _heal_config(args: argparse.Namespace):
    """The :class:`HealConfig` of ``--heal`` (None without it); ``--heal-*`` alone is an error."""
    from layerfreeze.diagnostics.heal import HealConfig

    given = {
        name: getattr(args, f"heal_{name}")
        for name in HealConfig.field_names()
        if getattr(args, f"heal_{name}", None) is not None
    }
    if not args.heal:
        if given:
            flag = "--heal-" + next(iter(given)).replace("_", "-")
            raise ValueError(f"{flag}: given without --heal. Add --heal, or drop {flag}.")
        return None
    return HealConfig(**given)
