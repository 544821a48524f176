"""``layerfreeze eval``: score a Hugging Face checkpoint on C-Eval or CMMLU.

Examples::

    layerfreeze eval --model runs/x/export --benchmark ceval --data-dir data/ceval --shots 5 \\
        --out ceval_val.json --predictions ceval_val.jsonl
    layerfreeze eval --model runs/x/export --benchmark ceval --data-dir data --split test \\
        --submission ceval_submission.json
    torchrun --nproc_per_node 2 -m layerfreeze eval --model M --benchmark cmmlu --data-dir data
    layerfreeze eval --benchmark cmmlu --data-dir data --list-subjects

Without ``--data-dir`` the questions come from the Hugging Face hub (needs network access).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from layerfreeze.utils.io import OVERWRITE_HELP, check_output_path
from layerfreeze.utils.logging import get_logger

logger = get_logger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="Hugging Face model directory (from_pretrained)")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: --model)")
    parser.add_argument("--benchmark", required=True, choices=["ceval", "cmmlu"])
    parser.add_argument("--data-dir", help="released data folder (or its parent); default: hub")
    parser.add_argument("--split", help="ceval: val (default) | test | dev; cmmlu: test | dev")
    parser.add_argument("--shots", type=int, default=5, help="few-shot examples from dev (0-5)")
    parser.add_argument("--subjects", help="comma-separated subject keys (default: all)")
    parser.add_argument("--prompt", choices=["lm-eval", "official"], default="lm-eval",
                        help="lm-eval: lm-evaluation-harness 0.4.x format (default); "
                             "official: the benchmark's answer-only format")
    parser.add_argument("--batch-size", type=int, default=16, help="forward rows per batch")
    parser.add_argument("--limit", type=int, help="only the first N questions of each subject")
    parser.add_argument("--max-length", type=int,
                        help="context length; longer prompts are cut from the left "
                             "(default: the model's)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                        default="auto", help="model dtype (auto: as saved)")
    parser.add_argument("--no-cache", action="store_true",
                        help="do not reuse the few-shot prefix KV cache (slower, for checks)")
    parser.add_argument("--predictions", help="write one JSON line per question here")
    parser.add_argument("--out", help="write the result JSON here")
    parser.add_argument("--submission",
                        help="C-Eval test: write the official submission JSON here "
                             "(default with --split test: ceval_submission.json)")
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP.replace(
        "--out", "--out / --predictions / --submission file"))
    parser.add_argument("--per-subject", action="store_true", help="print every subject's score")
    parser.add_argument("--list-subjects", action="store_true",
                        help="print the subject keys with their names and categories, then exit")


def _init_distributed() -> None:
    import os

    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def _load(args: argparse.Namespace):
    """Check the arguments and load the questions (user errors raise ValueError)."""
    from layerfreeze.evaluation.data import load_benchmark

    if not args.model:
        raise ValueError("--model: required (a Hugging Face model directory), got none.")
    if not Path(args.model).is_dir():
        raise ValueError(f"--model: not a directory, got {args.model!r}. Pass a saved HF model.")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size: must be >= 1, got {args.batch_size}.")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit: must be >= 1, got {args.limit}.")
    if args.max_length is not None and args.max_length < 1:
        raise ValueError(f"--max-length: must be >= 1 (tokens), got {args.max_length}.")
    if args.tokenizer and not Path(args.tokenizer).is_dir():
        raise ValueError(
            f"--tokenizer: not a directory, got {args.tokenizer!r}. Pass a saved tokenizer "
            "(or omit it to use --model's)."
        )
    for flag, path in (
        ("--out", args.out),
        ("--predictions", args.predictions),
        ("--submission", args.submission),
    ):
        if path:  # checked now, not after the whole evaluation
            check_output_path(path, overwrite=args.overwrite, flag=flag, kind="file")
    from layerfreeze.modeling import check_weight_files

    check_weight_files(args.model, "--model")
    subjects = [s.strip() for s in args.subjects.split(",") if s.strip()] if args.subjects else None
    bench = load_benchmark(args.benchmark, args.data_dir, args.split, subjects)
    if bench.name == "ceval" and bench.split == "test" and not args.submission:
        check_output_path(
            "ceval_submission.json", overwrite=args.overwrite, flag="--submission", kind="file"
        )
    if args.submission and not (bench.name == "ceval" and bench.split == "test"):
        raise ValueError(
            "--submission: the official submission file is for --benchmark ceval --split test "
            f"only, got {bench.name} {bench.split}. Drop --submission (use --out for scores)."
        )
    fewest = min(len(s.dev) for s in bench.subjects)
    if not 0 <= args.shots <= fewest:
        raise ValueError(f"--shots: must be 0-{fewest} (dev examples per subject), got {args.shots}.")
    return bench


def run(args: argparse.Namespace) -> int:
    from layerfreeze.evaluation.data import list_subjects

    try:
        if args.list_subjects:
            rows = sorted(list_subjects(args.benchmark, args.data_dir).items())
            sys.stdout.write(
                "".join(f"{name:<45} {zh:<20} {', '.join(cats)}\n" for name, (zh, cats) in rows)
            )
            return 0
        bench = _load(args)
    except ValueError as e:
        logger.error("%s", e)
        return 2

    import torch

    from layerfreeze.data.tokenizer import auto_tokenizer
    from layerfreeze.evaluation.report import (
        format_summary,
        submission_json,
        write_predictions,
        write_result,
    )
    from layerfreeze.evaluation.runner import evaluate
    from layerfreeze.modeling import load_causal_lm
    from layerfreeze.utils.dist import default_device, is_main_process
    from layerfreeze.utils.io import atomic_write_json

    _init_distributed()
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    try:
        tokenizer = auto_tokenizer(args.tokenizer or args.model)
    except (OSError, ValueError) as e:
        logger.error("--tokenizer %s: cannot load a tokenizer: %s", args.tokenizer or args.model,
                     " ".join(str(e).split()))  # transformers' message spans lines
        return 2
    try:
        model = load_causal_lm(args.model, "--model", dtype=dtype)
    except ValueError as e:
        logger.error("%s", e)
        return 2
    model.to(default_device()).eval()
    result, records = evaluate(
        model, tokenizer, bench, shots=args.shots, prompt=args.prompt,
        batch_size=args.batch_size, max_questions=args.limit, max_length=args.max_length,
        use_cache=False if args.no_cache else None, progress=True,
    )
    result["model"] = str(args.model)
    if not is_main_process():
        return 0
    if args.predictions:
        write_predictions(args.predictions, records)
        logger.info("predictions: %s (%d lines)", args.predictions, len(records))
    if args.out:
        write_result(args.out, result)
        logger.info("result: %s", args.out)
    if bench.name == "ceval" and bench.split == "test":
        path = args.submission or "ceval_submission.json"
        atomic_write_json(path, submission_json(records))
        logger.info("C-Eval test submission: %s (%d subjects)", path, len(bench.subjects))
    sys.stdout.write(format_summary(result, per_subject=args.per_subject).rstrip("\n") + "\n")
    return 0
