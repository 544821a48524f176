"""``layerfreeze export``: write what a plan trained as a PEFT adapter or a merged HF checkpoint.

Examples::

    layerfreeze export --model base/ --adapter-dir runs/x/adapter --format peft --out peft_adapter/
    layerfreeze export --model base/ --adapter-dir runs/x/adapter --format peft --vllm \\
        --max-lora-rank 16 --out vllm_adapter/
    layerfreeze export --model base/ --adapter-dir runs/x/adapter --format merged --out merged/

``--adapter-dir`` is a directory written by ``layerfreeze.export.save_trainable`` (``plan.json``
+ ``adapter.safetensors``); ``--model`` the base checkpoint it was trained from. ``peft`` writes
``adapter_config.json`` + ``adapter_model.safetensors`` (plain LoRA plans, with ``embeddings`` /
``lm_head`` ``new_rows`` carried as PEFT ``trainable_token_indices`` plus a ``README.md``: PEFT needs
the base resized to the new vocabulary first; anything else is refused with the reasons); ``merged`` folds mergeable LoRA into the weights and keeps the rest
in a sidecar. The output path goes to stdout; exit code 2 on any user error, and nothing is
left behind (the output directory is written atomically).
"""

from __future__ import annotations

import argparse
import sys

from layerfreeze.errors import ConfigError
from layerfreeze.utils.io import OVERWRITE_HELP, check_output_path
from layerfreeze.utils.logging import get_logger

logger = get_logger("layerfreeze.export")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register ``--model``, ``--adapter-dir``, ``--format``, ``--out`` and the vLLM options."""
    parser.add_argument("--model", required=True, help="base Hugging Face checkpoint directory")
    parser.add_argument(
        "--adapter-dir",
        required=True,
        help="directory written by save_trainable (plan.json + adapter.safetensors)",
    )
    parser.add_argument(
        "--format",
        required=True,
        choices=["peft", "merged"],
        help="peft: PEFT LoRA adapter (new_rows as trainable_token_indices; load it on the "
        "resized base); merged: HF checkpoint (+ sidecar)",
    )
    parser.add_argument("--out", required=True, help="output directory (must be new or empty)")
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    parser.add_argument(
        "--base-name", help="peft: base_model_name_or_path to record (default: --model)"
    )
    parser.add_argument(
        "--vllm",
        action="store_true",
        help="peft: refuse unless vLLM's LoRA loader accepts the adapter",
    )
    parser.add_argument(
        "--max-lora-rank", type=int, help="peft --vllm: the vLLM server's --max-lora-rank"
    )


def run(args: argparse.Namespace) -> int:
    """Load the base model and the trained state, then export; 2 on user errors."""
    from pathlib import Path

    if args.format == "merged" and (args.vllm or args.max_lora_rank is not None or args.base_name):
        logger.error("--vllm, --max-lora-rank and --base-name apply to --format peft only.")
        return 2
    if args.max_lora_rank is not None and not args.vllm:
        logger.error(
            "--max-lora-rank: only used with --vllm (the vLLM check), got %d without it. "
            "Add --vllm or drop --max-lora-rank.",
            args.max_lora_rank,
        )
        return 2
    try:
        check_output_path(args.out, overwrite=args.overwrite)
    except ValueError as e:
        logger.error("%s", e)
        return 2
    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        logger.error(
            "--model %s: no config.json there; pass a Hugging Face checkpoint directory.", model_dir
        )
        return 2
    if not Path(args.adapter_dir).is_dir():
        logger.error(
            "--adapter-dir %s: no such directory; pass one written by save_trainable "
            "(plan.json + adapter.safetensors).",
            args.adapter_dir,
        )
        return 2
    try:
        from layerfreeze.export import SIDECAR_FILE, export_merged, load_trainable, sidecar_info
        from layerfreeze.modeling import load_causal_lm

        if sidecar_info(model_dir, "--model")[0]:
            raise ValueError(
                f"--model {model_dir}: a layerfreeze export whose adapters are in {SIDECAR_FILE}, "
                "not a base checkpoint; pass the checkpoint the run started from (model.path)."
            )
        model = load_causal_lm(model_dir, "--model", dtype="auto")
        applied = load_trainable(model, args.adapter_dir)
        if args.format == "peft":
            from layerfreeze.interop.peft import export_peft

            out = export_peft(
                applied,
                args.out,
                base_model_name_or_path=args.base_name or str(model_dir),
                vllm=args.vllm,
                max_lora_rank=args.max_lora_rank,
            )
        else:
            out = export_merged(applied, args.out)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        logger.error("%s", e)
        return 2
    sys.stdout.write(f"{out}\n")
    return 0
