"""Overhead of the training sensitivity hooks (``diagnostics`` section) on the step time.

Side by side in one process, on the same seeded Llama, plan and batches: a DeepSpeed runner
(ZeRO-0, one gloo rank, the engine ``layerfreeze train`` uses) trains ``--steps`` optimizer steps
without hooks and with ``SensitivityHooks.compute`` every ``--every`` steps (the default
interval of ``diagnostics.every_steps``), interleaved over ``--rounds`` rounds. Reported: the
median step time of each, the overhead ratio, the cost of one hooks call in step times, and the
overhead that cost implies at other intervals (cost / interval). Process CPU time of a 1-thread
run is the clock on CPU (it barely moves when other processes share the cores); wall time is
reported alongside.

Run::

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 python bench/diagnostics_overhead.py
    # -> bench/results/diagnostics_overhead.json and .md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _clock() -> tuple[float, float]:
    return time.process_time(), time.perf_counter()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=200, help="optimizer steps per measured run")
    ap.add_argument("--every", type=int, default=100, help="hooks interval (diagnostics.every_steps)")
    ap.add_argument("--probe-sequences", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--plan", default="freeze_deep")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "diagnostics_overhead"))
    ap.add_argument("--report-only", action="store_true",
                    help="re-render the markdown from the saved JSON (no measuring)")
    args = ap.parse_args()
    out = Path(args.out)
    if args.report_only:
        from layerfreeze.utils.io import atomic_write_json, atomic_write_text

        result = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))
        result["settings"] = _settings(result["settings"])  # older files kept the output path
        atomic_write_json(out.with_suffix(".json"), result)
        atomic_write_text(out.with_suffix(".md"), render(result))
        return 0

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from layerfreeze.diagnostics.hooks import HOOK_MEASURES, SensitivityHooks
    from layerfreeze.engines.deepspeed import DeepSpeedRunner, init_distributed
    from layerfreeze.utils.io import atomic_write_json, atomic_write_text

    torch.set_num_threads(1)
    os.environ.setdefault("MASTER_PORT", "29517")
    init_distributed()
    cfg = LlamaConfig(
        hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64), num_key_value_heads=max(1, args.hidden // 128),
        vocab_size=4096, max_position_embeddings=args.seq_len,
    )
    g = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(0, cfg.vocab_size, (args.micro_batch, args.seq_len), generator=g)
        for _ in range(8)
    ]
    probe = torch.randint(0, cfg.vocab_size, (args.probe_sequences, args.seq_len), generator=g)
    ds_config = {
        "train_micro_batch_size_per_gpu": args.micro_batch, "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
        "zero_optimization": {"stage": 0}, "steps_per_print": 10**9,
    }

    def run(with_hooks: bool) -> dict[str, float]:
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
        runner = DeepSpeedRunner(model, ds_config, plan=args.plan)
        hooks = SensitivityHooks(runner.applied.layout, probe, HOOK_MEASURES) if with_hooks else None
        if hooks is not None:
            hooks.compute(runner.model, 0)  # the reference, before step 1 (as train.py does)
        step_cpu, step_wall, hook_cpu, hook_wall = [], [], [], []
        for step in range(1, args.steps + 1):
            ids = batches[step % len(batches)]
            c0, w0 = _clock()
            runner.train_step([{"input_ids": ids, "labels": ids}])
            c1, w1 = _clock()
            if hooks is not None and step % args.every == 0:
                hooks.compute(runner.model, step)
                c2, w2 = _clock()
                hook_cpu.append(c2 - c1)
                hook_wall.append(w2 - w1)
                c1, w1 = c2, w2
            step_cpu.append(c1 - c0)
            step_wall.append(w1 - w0)
        runner.close()
        return {
            "total_cpu": sum(step_cpu), "total_wall": sum(step_wall),
            "step_cpu_median": statistics.median(step_cpu),
            "hook_cpu": statistics.median(hook_cpu) if hook_cpu else 0.0,
            "hook_wall": statistics.median(hook_wall) if hook_wall else 0.0,
        }

    rounds = []
    for r in range(args.rounds):
        order = (False, True) if r % 2 == 0 else (True, False)
        res = {("hooks" if h else "base"): run(h) for h in order}
        rounds.append(res)
        print(f"round {r}: base {res['base']['total_cpu']:.2f}s, hooks "
              f"{res['hooks']['total_cpu']:.2f}s CPU", file=sys.stderr)

    def med(kind: str, key: str) -> float:
        return statistics.median(x[kind][key] for x in rounds)

    base_cpu, hooks_cpu = med("base", "total_cpu"), med("hooks", "total_cpu")
    step = med("base", "step_cpu_median")
    call = med("hooks", "hook_cpu")
    calls = args.steps // args.every
    result = {
        "settings": _settings(vars(args)),
        "machine": {"platform": platform.platform(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "rounds": rounds,
        "base_cpu_s": base_cpu,
        "hooks_cpu_s": hooks_cpu,
        "overhead_ratio": hooks_cpu / base_cpu,
        "step_cpu_s": step,
        "hook_call_cpu_s": call,
        "hook_call_in_steps": call / step,
        "calls_per_run": calls,
        "implied_overhead": {str(n): call / (n * step) for n in (10, 25, 50, 100, 200)},
        "base_wall_s": med("base", "total_wall"),
        "hooks_wall_s": med("hooks", "total_wall"),
    }
    result["base_spread"] = (
        max(x["base"]["total_cpu"] for x in rounds) / min(x["base"]["total_cpu"] for x in rounds)
        - 1.0
    )
    result["measures"] = list(HOOK_MEASURES)
    atomic_write_json(out.with_suffix(".json"), result)
    text = render(result)
    atomic_write_text(out.with_suffix(".md"), text)
    print(text)
    return 0


def _settings(args: dict) -> dict:
    """The measuring settings (no output path: results carry no machine-specific paths)."""
    return {k: v for k, v in args.items() if k not in ("out", "report_only")}


def render(result: dict) -> str:
    """The markdown report of a result dict (what --report-only re-renders)."""
    a = result["settings"]
    m = result["machine"]
    rounds = result["rounds"]
    spread = result.get("base_spread")
    if spread is None:
        totals = [x["base"]["total_cpu"] for x in rounds]
        spread = max(totals) / min(totals) - 1.0
    measures = ", ".join(result.get("measures", ["grad_norm", "update_ratio", "drift", "angular"]))
    every = a["every"]
    lines = [
        "# Training sensitivity hooks: overhead on step time",
        "",
        f"Written by `bench/diagnostics_overhead.py` on {m['platform']}, torch {m['torch']}, "
        f"1 thread, CPU clock = process CPU time. Llama hidden {a['hidden']}, {a['layers']} "
        f"layers, seq {a['seq_len']}, micro-batch {a['micro_batch']}, plan `{a['plan']}`, "
        f"DeepSpeed ZeRO-0; {a['steps']} steps per run, hooks ({measures}) on "
        f"{a['probe_sequences']} probe sequences every {every} steps; {len(rounds)} interleaved "
        "rounds.",
        "",
        "| round | without hooks, CPU s | with hooks, CPU s | one hooks call, CPU s |",
        "|---:|---:|---:|---:|",
        *[
            f"| {i} | {x['base']['total_cpu']:.2f} | {x['hooks']['total_cpu']:.2f} | "
            f"{x['hooks']['hook_cpu']:.3f} |"
            for i, x in enumerate(rounds)
        ],
        "",
        f"Median step: {result['step_cpu_s']:.3f} CPU s; median hooks call: "
        f"{result['hook_call_cpu_s']:.3f} CPU s = **{result['hook_call_in_steps']:.2f} training "
        f"steps**. Over whole runs the medians differ by "
        f"{100 * (result['overhead_ratio'] - 1):+.2f}%, inside the round-to-round spread of the "
        f"runs without hooks ({100 * spread:.1f}%), so the overhead is read from the per-call "
        "cost: about cost / interval.",
        "",
        "| every_steps | overhead (call cost / interval) |",
        "|---:|---:|",
        *[
            f"| {n}{' (default)' if int(n) == every else ''} | {100 * v:.2f}% |"
            for n, v in result["implied_overhead"].items()
        ],
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
