"""``layerfreeze trace``: per-layer diagnostics of a model on a probe set (and a plan from them).

Examples::

    layerfreeze trace --model runs/x/export --probe corpus.txt --max-tokens 8192 --out trace/
    layerfreeze trace --model M --probe ceval --data-dir data --subjects law,physician --out t/
    layerfreeze trace --model M --probe en.txt zh.txt --measures angular,logit_lens --out t/ \\
        --recommend --budget 0.25 --family freeze --score-weights lens=0.5,sensitivity=0.5
    layerfreeze trace --model M --measures snr --out t/ --recommend --budget 0.25  # no probe
    torchrun --nproc_per_node 8 -m layerfreeze trace --model 70B/ --probe ceval --data-dir data \\
        --zero3 --out t/          # each rank holds 1/8 of the weights (DeepSpeed ZeRO-3)

Writes ``trace.json``, CSV files and PNG plots into ``--out`` (built in a staging directory
and renamed into place, so a failed run leaves nothing), prints the per-layer summary table on
stdout and a progress bar on stderr. ``--measures snr`` (weight-only signal-to-noise,
:mod:`layerfreeze.diagnostics.snr`) reads the safetensors files one matrix at a time, needs no
probe and writes ``snr.json`` / ``snr.png``; alone it loads neither the model nor a tokenizer. Exit code 2 on bad input (one clear line, nothing written).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from layerfreeze.errors import ConfigError
from layerfreeze.utils.io import OVERWRITE_HELP, check_output_path
from layerfreeze.utils.logging import get_logger

logger = get_logger("layerfreeze.trace")

_BENCHMARKS = ("ceval", "cmmlu")
#: measures that need whole weights and their gradients on one rank (refused with --zero3)
_WHOLE_WEIGHTS = ("gradient", "stability", "layer_stability")
#: measures computed from the checkpoint's weights alone (no probe, no model load)
_WEIGHT_ONLY = ("snr",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the trace options."""
    from layerfreeze.diagnostics.trace import MEASURES

    parser.add_argument("--model", required=True, help="Hugging Face model directory")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: --model)")
    parser.add_argument(
        "--probe",
        nargs="+",
        metavar="FILE|ceval|cmmlu",
        help="text files (.txt, or .jsonl with a 'text' field), or ceval / cmmlu (required "
        "unless --measures is snr alone)",
    )
    parser.add_argument("--data-dir", help="C-Eval/CMMLU released data folder (or its parent)")
    parser.add_argument("--subjects", help="comma-separated subject keys (default: all)")
    parser.add_argument("--split", help="benchmark split (default: ceval val, cmmlu test)")
    parser.add_argument("--shots", type=int, default=0, help="few-shot examples per prompt")
    parser.add_argument(
        "--prompt",
        choices=["lm-eval", "official"],
        default="lm-eval",
        help="prompt format of the benchmark probes",
    )
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=16384,
        help="token budget of the probe set (default 16384)",
    )
    parser.add_argument("--seq-len", type=int, default=256, help="text probe sequence length")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward")
    parser.add_argument(
        "--measures",
        help=f"comma-separated subset of: {', '.join(MEASURES + _WEIGHT_ONLY)} (default: all "
        "but snr; with --zero3 all but gradient, stability and layer_stability). snr: "
        "weight-only signal-to-noise per matrix, no probe needed",
    )
    parser.add_argument(
        "--snr-top-percent",
        type=float,
        default=50.0,
        help="snr: share of layers listed as the top layers by SNR (Spectrum's pick; default 50)",
    )
    parser.add_argument(
        "--noise-scales",
        default="0.01,0.05,0.1",
        help="relative weight-noise scales (comma-separated)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise draws")
    parser.add_argument(
        "--stability-steps",
        type=int,
        default=4,
        help="AdamW steps (stability; layer_stability with --layer-stability steps)",
    )
    parser.add_argument("--stability-lr", type=float, default=1e-4, help="their learning rate")
    parser.add_argument(
        "--layer-stability",
        choices=["perturb", "steps"],
        default="perturb",
        help="layer_stability: change each layer alone by a relative weight perturbation "
        "(default) or by --stability-steps AdamW steps on that layer only",
    )
    parser.add_argument(
        "--layer-stability-scale",
        type=float,
        default=0.05,
        help="relative weight perturbation of --layer-stability perturb (default 0.05)",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=0.05,
        help="decodable/converged tolerance (see docs/diagnostics.md)",
    )
    parser.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="model dtype (auto: as saved)",
    )
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    parser.add_argument(
        "--zero3",
        action="store_true",
        help="shard the weights over the ranks of a torchrun/deepspeed launch with DeepSpeed "
        "ZeRO-3 from the moment they load (models too large for one device); every rank runs "
        "the probe set, rank 0 writes. gradient, stability and layer_stability are not available",
    )
    parser.add_argument("--out", required=True, help="output directory (created)")
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    parser.add_argument(
        "--recommend",
        action="store_true",
        help="also write a plan for --budget and --family (plan.yaml)",
    )
    parser.add_argument("--budget", type=float, help="trainable-parameter fraction (0, 1]")
    parser.add_argument(
        "--family", choices=["freeze", "hlpt"], default="freeze", help="plan family for --recommend"
    )
    parser.add_argument(
        "--score-weights",
        metavar="lens=W,sensitivity=W,stability=W",
        help="weights of the per-layer score behind --recommend (components not named get 0; "
        "default lens=0.4,sensitivity=0.3,stability=0.3, see docs/diagnostics.md)",
    )


def _check(args: argparse.Namespace):
    """Every user-input check that needs no model weights; returns (settings, scales)."""
    from layerfreeze.diagnostics.trace import TraceSettings

    check_output_path(args.out, overwrite=args.overwrite)
    model = Path(args.model)
    if not model.is_dir() or not (model / "config.json").is_file():
        raise ValueError(
            f"--model: not a Hugging Face model directory (no config.json), got {args.model!r}."
        )
    try:
        scales = tuple(float(s) for s in args.noise_scales.split(",") if s.strip())
    except ValueError:
        raise ValueError(
            f"--noise-scales: expected comma-separated numbers, got {args.noise_scales!r}."
        ) from None
    from layerfreeze.diagnostics.trace import MEASURES

    if args.measures is None:
        measures = tuple(m for m in MEASURES if not (args.zero3 and m in _WHOLE_WEIGHTS))
    else:
        measures = tuple(m.strip() for m in args.measures.split(",") if m.strip())
    for name in measures:
        if name not in MEASURES + _WEIGHT_ONLY:
            from layerfreeze.utils.schema import suggest

            hint = suggest(name, MEASURES + _WEIGHT_ONLY)
            hint = hint if "Did you mean" in hint else ""
            raise ValueError(
                f"--measures: unknown measure {name!r}.{hint} Valid: "
                f"{', '.join(MEASURES + _WEIGHT_ONLY)}."
            )
    args.snr = "snr" in measures
    if args.snr:
        measures = tuple(m for m in measures if m != "snr")
        if not 0 < args.snr_top_percent <= 100:
            raise ValueError(
                f"--snr-top-percent: must be in (0, 100], got {args.snr_top_percent:g}."
            )
        if not list(model.glob("*.safetensors")):
            raise ValueError(
                f"--model {args.model}: no *.safetensors weight file; --measures snr reads "
                "safetensors only. Re-save with save_pretrained(safe_serialization=True)."
            )
        if not measures:  # weight-only: no probe, no model load
            if args.probe:
                raise ValueError(
                    "--probe: not used by --measures snr alone (a weight-only measure); drop "
                    "--probe or add a probe measure."
                )
            if args.zero3:
                raise ValueError("--zero3: not used by --measures snr alone; drop --zero3.")
    elif not measures:
        from layerfreeze.diagnostics.trace import check_measures

        check_measures(measures)  # the "empty list" message
    if measures and not args.probe:
        raise ValueError(
            f"--probe: required by the measures {', '.join(measures)}; give text files or "
            "ceval / cmmlu, or use --measures snr alone (no probe)."
        )
    if args.zero3:
        bad = [m for m in measures if m in _WHOLE_WEIGHTS]
        if bad:
            raise ValueError(
                f"--measures: {', '.join(bad)} need whole parameters and gradients, which --zero3 "
                f"never holds on one rank; choose from "
                f"{', '.join(m for m in MEASURES if m not in _WHOLE_WEIGHTS)}."
            )
        if args.device is not None:
            raise ValueError("--device: not used with --zero3 (each rank uses its local device).")
    if not measures:
        return _check_snr_only(args), False
    settings = TraceSettings(
        measures=measures,
        noise_scales=scales,
        seed=args.seed,
        stability_steps=args.stability_steps,
        stability_lr=args.stability_lr,
        layer_stability_mode=args.layer_stability,
        layer_stability_scale=args.layer_stability_scale,
        tolerance=args.tolerance,
    )
    _check_recommend_options(args)
    is_bench = len(args.probe) == 1 and args.probe[0] in _BENCHMARKS
    if not is_bench and any(p in _BENCHMARKS for p in args.probe):
        raise ValueError(
            f"--probe: {'/'.join(_BENCHMARKS)} cannot be mixed with files, got {args.probe}."
        )
    if not is_bench:  # checked before the model loads; the probe reader says "no such file"
        for probe in args.probe:
            if Path(probe).is_dir():
                raise ValueError(
                    f"--probe {probe}: is a directory; pass its .txt/.jsonl files "
                    f"(e.g. {probe.rstrip('/')}/*.txt)."
                )
            if not Path(probe).is_file():
                raise ValueError(
                    f"--probe {probe}: no such file. Pass text files, or ceval / cmmlu."
                )
    if args.shots < 0:
        raise ValueError(f"--shots: must be >= 0, got {args.shots}.")
    if args.device is not None:
        _check_device(args.device)
    from layerfreeze.modeling import check_weight_files

    check_weight_files(args.model, "--model")
    return settings, is_bench


def _check_recommend_options(args: argparse.Namespace) -> None:
    """``--recommend`` / ``--budget`` / ``--score-weights`` (parsed in place), for every path."""
    if args.score_weights is not None and not args.recommend:
        raise ValueError("--score-weights: only used with --recommend; add --recommend.")
    if args.recommend:
        from layerfreeze.diagnostics.recommend import parse_weights

        if args.score_weights is not None:  # None: the defaults of the trace's components
            args.score_weights = parse_weights(args.score_weights)
        if args.budget is None:
            raise ValueError("--budget: required with --recommend (a fraction such as 0.25).")
        if not 0 < args.budget <= 1:
            raise ValueError(f"--budget: must be a fraction in (0, 1], got {args.budget}.")
    elif args.budget is not None:
        raise ValueError("--budget: only used with --recommend; add --recommend.")


def _check_snr_only(args: argparse.Namespace) -> None:
    """The checks of ``--measures snr`` alone (no probe, no model load)."""
    _check_recommend_options(args)
    from layerfreeze.modeling import check_weight_files

    check_weight_files(args.model, "--model")
    return None


def _run_snr_only(args: argparse.Namespace) -> int:
    """``--measures snr`` alone: scan the checkpoint, recommend from it, write atomically."""
    from layerfreeze.diagnostics.recommend import recommend, write_recommendation
    from layerfreeze.diagnostics.snr import scan_checkpoint, snr_summary, write_snr
    from layerfreeze.export import export_base_config
    from layerfreeze.utils.io import atomic_directory, atomic_write_json

    try:
        config = export_base_config(args.model)
        n = config.get_text_config().num_hidden_layers
        if args.recommend:  # a budget too small for the family fails before the scan
            recommend({"layers": [{}] * n}, config, args.budget, args.family, args.score_weights)
        section = scan_checkpoint(args.model, n, top_percent=args.snr_top_percent, progress=True)
    except (OSError, ValueError, ConfigError) as e:
        logger.error("%s", " ".join(str(e).split()))
        return 2
    result = {
        "model": {"path": str(Path(args.model).resolve()), "num_layers": n},
        "settings": {"measures": ["snr"]},
        "layers": [{"layer": i, "snr": v} for i, v in enumerate(section["per_layer"])],
        "snr": section,
    }
    rec, failed = _recommend_into(result, config, args)
    if failed:
        return 2
    with atomic_directory(args.out, overwrite=True) as staging:
        atomic_write_json(Path(staging) / "trace.json", result)
        files = ["trace.json", *write_snr(section, staging)]
        if rec is not None:
            files += write_recommendation(rec, staging)
    _print_tail(snr_summary(section), rec, files, args.out)
    return 0


def _print_tail(table: str, rec, files: list[str], out_dir: str) -> None:
    out = sys.stdout
    out.write(table + "\n")
    if rec is not None:
        out.write(f"\nrecommended plan ({rec.family}, budget {rec.budget:g}): {rec.plan}\n")
        out.write("".join(f"  - {line}\n" for line in rec.rationale))
    out.write(f"\nwrote {', '.join(files)} to {out_dir}\n")


def _check_device(name: str) -> None:
    """``--device`` must parse as a torch device and be present on this machine."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(
            f"--device: not a torch device, got {name!r}. Use cpu, cuda or cuda:N."
        ) from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device: {name!r} but this machine has no CUDA device. Use cpu.")
        if device.index is not None and device.index >= count:
            raise ValueError(
                f"--device: {name!r} but this machine has {count} CUDA device(s) "
                f"(valid cuda:0-cuda:{count - 1})."
            )
    elif device.type != "cpu":  # mps, xpu, ...: present only when torch.<type> says so
        backend = getattr(torch, device.type, None)
        if not (backend is not None and getattr(backend, "is_available", lambda: False)()):
            raise ValueError(f"--device: {name!r} is not available on this machine. Use cpu.")


def _build_probe(args: argparse.Namespace, tokenizer, is_bench: bool, max_length: int | None):
    from layerfreeze.diagnostics.probe import build_choice_probe, build_text_probe

    if is_bench:
        subjects = (
            [s.strip() for s in args.subjects.split(",") if s.strip()] if args.subjects else None
        )
        return build_choice_probe(
            args.probe[0],
            tokenizer,
            args.data_dir,
            subjects,
            args.split,
            args.shots,
            args.prompt,
            args.max_tokens,
            args.batch_size,
            max_length,
        )
    if args.subjects or args.split or args.data_dir:
        raise ValueError("--subjects/--split/--data-dir: only used with --probe ceval or cmmlu.")
    return build_text_probe(args.probe, tokenizer, args.max_tokens, args.seq_len, args.batch_size)


def run(args: argparse.Namespace) -> int:
    """Check the input, load the model, trace, write the outputs atomically."""
    try:
        settings, is_bench = _check(args)
    except (ValueError, ConfigError) as e:
        logger.error("%s", e)
        return 2
    if settings is None:
        return _run_snr_only(args)

    import torch

    from layerfreeze.data.tokenizer import auto_tokenizer
    from layerfreeze.diagnostics.recommend import recommend, write_recommendation
    from layerfreeze.diagnostics.report import summary_table, write_trace
    from layerfreeze.diagnostics.trace import run_trace
    from layerfreeze.evaluation.scoring import default_max_length
    from layerfreeze.modeling import load_causal_lm
    from layerfreeze.utils.io import atomic_directory

    try:
        tokenizer = auto_tokenizer(args.tokenizer or args.model)
    except (OSError, ValueError) as e:
        logger.error(
            "--tokenizer: cannot load a tokenizer from %r (%s).",
            args.tokenizer or args.model,
            " ".join(str(e).split()),  # transformers' message spans lines
        )
        return 2
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    gather, writer, engine = None, True, None
    try:
        if args.zero3:
            model, gather, writer, engine = _load_zero3(args, dtype)
        else:
            model = load_causal_lm(args.model, "--model", dtype=dtype)
    except ValueError as e:
        logger.error("%s", e)
        return 2
    if not args.zero3:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model.to(device).eval()
    try:
        probe = _build_probe(args, tokenizer, is_bench, default_max_length(model))
        if args.recommend:  # a budget too small for the family fails before the long run
            n = model.config.get_text_config().num_hidden_layers
            recommend({"layers": [{}] * n}, model, args.budget, args.family, args.score_weights)
    except (ValueError, ConfigError) as e:
        logger.error("%s", e)
        return 2
    logger.info(
        "probe: %s, %d sequences, %d tokens", probe.kind, probe.num_sequences, probe.num_tokens
    )
    result = run_trace(model, probe, settings, progress=writer, gather=gather)
    result["model"]["path"] = str(Path(args.model).resolve())
    if args.snr:  # from the checkpoint files, one matrix at a time (any --zero3 rank alike)
        from layerfreeze.diagnostics.snr import scan_checkpoint

        n = len(result["layers"])
        result["snr"] = scan_checkpoint(
            args.model, n, top_percent=args.snr_top_percent, progress=writer
        )
        result["settings"]["measures"] = [*result["settings"]["measures"], "snr"]
        for row, v in zip(result["layers"], result["snr"]["per_layer"], strict=True):
            row["snr"] = v
    if args.zero3:
        from layerfreeze.utils.dist import get_world_size

        result["model"]["zero3_world_size"] = get_world_size()
    rec, failed = _recommend_into(result, model, args)
    if failed:
        return 2
    del engine  # --zero3: no forward after this point
    if not writer:  # --zero3: every rank computed the same numbers; rank 0 writes them
        return 0
    with atomic_directory(args.out, overwrite=True) as staging:
        files = write_trace(result, staging)
        table = summary_table(result)
        if args.snr:
            from layerfreeze.diagnostics.snr import snr_summary, write_snr

            files += write_snr(result["snr"], staging)
            table += "\n" + snr_summary(result["snr"])
        if rec is not None:
            files += write_recommendation(rec, staging)
    _print_tail(table, rec, files, args.out)
    return 0


def _load_zero3(args: argparse.Namespace, dtype):
    """The model partitioned over the launched ranks at load: ``(model, gather, is_writer,
    engine)`` (keep the engine referenced while the model is used)."""
    import functools

    import torch

    from layerfreeze.engines import get_engine
    from layerfreeze.engines.partition import local_numel, whole_numel
    from layerfreeze.export import SIDECAR_FILE, export_base_config, sidecar_info
    from layerfreeze.modeling import load_causal_lm
    from layerfreeze.utils.dist import get_rank, get_world_size

    if sidecar_info(args.model)[0]:
        raise ValueError(
            f"--zero3: {args.model} is a layerfreeze export with adapters in {SIDECAR_FILE} "
            "(gated LoRA / prefixes), which --zero3 does not re-attach. Trace it without --zero3."
        )
    if dtype == "auto":
        saved = getattr(export_base_config(args.model), "dtype", None)
        dtype = saved if isinstance(saved, torch.dtype) else torch.float32
    deepspeed = get_engine("deepspeed")  # --zero3 is DeepSpeed's inference partitioning
    model, engine = deepspeed.load_zero3_for_inference(
        lambda: load_causal_lm(args.model, "--model", dtype=dtype), dtype
    )
    held = sum(local_numel(p) for p in model.parameters())  # own partition
    whole = sum(whole_numel(p) for p in model.parameters())
    logger.info(
        "zero3: rank %d of %d holds %d of %d weight elements", get_rank(), get_world_size(),
        held, whole,
    )
    return model, functools.partial(deepspeed.gathered_parameters, model), get_rank() == 0, engine


def _recommend_into(result: dict, model_or_config: Any, args: argparse.Namespace) -> tuple[Any, bool]:
    """``--recommend``: the plan from ``result`` stored in it as ``recommendation``; returns
    ``(recommendation or None, failed)``, the error logged in one line when it failed."""
    if not args.recommend:
        return None, False
    from layerfreeze.diagnostics.recommend import recommend

    try:
        rec = recommend(result, model_or_config, args.budget, args.family, args.score_weights)
    except (ValueError, ConfigError) as e:
        logger.error("%s", e)
        return None, True
    result["recommendation"] = rec.to_dict()
    return rec, False
