"""Benchmark: each layer plan against ``full`` on megatron-core with tensor parallelism 2.

Two gloo ranks (one TP=2 model replica) train the same tiny GPT (megatron-core ``GPTModel``,
local spec) under each plan through :class:`layerfreeze.engines.megatron.runner.MegatronRunner`
(Megatron DDP, ``get_megatron_optimizer``, ``get_forward_backward_func``). Plans are
interleaved over rounds (the order rotates each round) and medians are reported. Per plan:

* step time: wall clock (slowest rank) and process CPU time (both ranks summed);
* optimizer state: the Adam moments the Megatron optimizer actually holds, summed over the TP
  ranks, next to the *expected* 8 B per trainable element held on a rank (TP shards once,
  replicated norms on both ranks), and the DDP gradient-buffer bytes;
* ratios to ``full``;
* checkpoint size on disk and save time (slowest rank) of megatron-core distributed checkpoints
  (``dist_checkpointing.save``, ``torch_dist``) after training, model weights only: the
  adapter-only one (``layerfreeze.engines.megatron.sharded.save_trained``: what the plan
  trains) against the full ``model.sharded_state_dict()``.

CPU runs use the megatron-core CUDA shim of ``tests/helpers/megatron.py`` (a source checkout;
the library never patches megatron-core). Writes ``bench/results/megatron_tp.{json,md}``.

Run (defaults: 8 layers, hidden 256, seq 128, micro-batch 2 x 2, 1 warm-up + 4 measured steps,
2 rounds)::

    python bench/megatron_tp.py
    python bench/megatron_tp.py --rounds 3 --steps 6 --hidden 512
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
if str(_HERE.parent) not in sys.path:  # run from a checkout without installing layerfreeze
    sys.path.insert(0, str(_HERE.parent))

# hlpt / h2lpt: the paper form (prefix inside the layer's own attention); *_branch: the branch form
PLANS = ["full", "freeze_deep", "freeze_shallow", "hlpt", "h2lpt", "hlpt_branch"]


def _window(step: int, gas: int, batch: int, seq: int, vocab: int) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(1000 + step)
    out = []
    for _ in range(gas):
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def _checkpoint_sizes(model: Any, rank: int) -> dict[str, float]:
    """Save the adapter-only and the full distributed checkpoint of ``model`` (every rank);
    bytes on disk and the slowest rank's save time of each."""
    import shutil
    import tempfile

    import torch
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from layerfreeze.engines.megatron.sharded import save_trained

    root = [tempfile.mkdtemp(prefix="lf_bench_ckpt_") if rank == 0 else None]
    dist.broadcast_object_list(root, src=0)
    out: dict[str, float] = {}
    savers = {
        "adapter_only": lambda d: save_trained(model, d),
        # per-layer keys: a plan training some layers' weights would otherwise be refused by
        # the trained-only save, and the full one is kept comparable
        "full": lambda d: dist_checkpointing.save(
            model.sharded_state_dict(metadata={"non_homogeneous_layers": True}), d
        ),
    }
    for kind, save in savers.items():
        times = []
        for rep in range(2):  # the faster of two saves: the first pays one-time start-up costs
            d = os.path.join(root[0], f"{kind}_{rep}")
            if rank == 0:
                os.makedirs(d)
            dist.barrier()
            t0 = time.perf_counter()
            save(d)
            t = torch.tensor([time.perf_counter() - t0])
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            dist.barrier()
            times.append(float(t[0]))
        out[f"{kind}_save_s"] = min(times)
        out[f"{kind}_bytes"] = float(_dir_bytes(d)) if rank == 0 else 0.0
    dist.barrier()
    if rank == 0:
        shutil.rmtree(root[0], ignore_errors=True)
    return out


def _body(rank: int, world_size: int, a: dict[str, Any]) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    from layerfreeze.engines.megatron.runner import MegatronRunner
    from tests.helpers.megatron import build_tiny_gpt, init_model_parallel, megatron_cpu_shim

    torch.set_num_threads(1)
    out: dict[str, Any] = {p: {"wall": [], "cpu": []} for p in a["plans"]}
    with megatron_cpu_shim():
        for rnd in range(a["rounds"]):
            k = rnd % len(a["plans"])
            for plan in a["plans"][k:] + a["plans"][:k]:
                init_model_parallel(tp=2, pp=1)
                model = build_tiny_gpt(
                    num_layers=a["layers"],
                    hidden=a["hidden"],
                    heads=a["heads"],
                    query_groups=a["query_groups"],
                    ffn=a["ffn"],
                    vocab=a["vocab"],
                    tp=2,
                    seed=0,
                    max_seq=a["seq"],
                )
                runner = MegatronRunner(
                    model,
                    plan=plan,
                    lr=1e-4,
                    weight_decay=0.1,
                    gradient_accumulation_steps=a["gas"],
                )
                rec = out[plan]
                for s in range(a["warmup"] + a["steps"]):
                    window = _window(s, a["gas"], a["batch"], a["seq"], a["vocab"])
                    dist.barrier()
                    t0, c0 = time.perf_counter(), time.process_time()
                    res = runner.train_step(window)
                    t = torch.tensor([time.perf_counter() - t0, time.process_time() - c0])
                    dist.all_reduce(t[:1], op=dist.ReduceOp.MAX)
                    dist.all_reduce(t[1:])
                    if s == 0:
                        rec["loss0"] = res.loss
                    if s >= a["warmup"]:
                        rec["wall"].append(float(t[0]))
                        rec["cpu"].append(float(t[1]))
                if rnd == 0:
                    numel = runner.optimizer_state_numel()
                    local = torch.tensor(
                        [
                            float(sum(p.numel() for p in model.parameters() if p.requires_grad)),
                            float(runner.grad_buffer_numel()),
                            float(sum(p.numel() for p in model.parameters())),
                        ],
                        dtype=torch.float64,
                    )
                    dist.all_reduce(local)
                    rec["moments_elements"] = numel["exp_avg"] + numel["exp_avg_sq"]
                    rec["trainable_elements"] = int(local[0])
                    rec["grad_buffer_elements"] = int(local[1])
                    rec["total_elements"] = int(local[2])
                    rec["checkpoint"] = _checkpoint_sizes(model, rank)
                runner.close()
    return out


def _fmt_bytes(n: float) -> str:
    return f"{n / 2**20:.2f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--plans", default=",".join(PLANS))
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--query-groups", type=int, default=4)
    p.add_argument("--ffn", type=int, default=688)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--gas", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default=str(_HERE / "results" / "megatron_tp"))
    args = p.parse_args(argv)
    plans = [x.strip() for x in args.plans.split(",") if x.strip()]
    if "full" not in plans:
        print("--plans: must include 'full' (the baseline of every ratio)", file=sys.stderr)
        return 2
    plans = ["full"] + [x for x in plans if x != "full"]

    import torch
    import transformers  # noqa: F401  (version in the header)
    from megatron.core import package_info

    from layerfreeze.utils.io import atomic_write_json, atomic_write_text
    from tests.helpers.dist import run_distributed

    cfg = {
        "plans": plans,
        "layers": args.layers,
        "hidden": args.hidden,
        "heads": args.heads,
        "query_groups": args.query_groups,
        "ffn": args.ffn,
        "vocab": args.vocab,
        "seq": args.seq,
        "batch": args.batch,
        "gas": args.gas,
        "warmup": args.warmup,
        "steps": args.steps,
        "rounds": args.rounds,
    }
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    print(
        f"megatron_tp: {len(plans)} plans x {args.rounds} rounds on 2 gloo ranks (TP=2) ...",
        file=sys.stderr,
    )
    raw = run_distributed(_body, world_size=2, args=(cfg,), timeout=3600)[0]
    wall_total = time.perf_counter() - t0
    load1 = os.getloadavg()[0]

    base = raw["full"]
    base_wall, base_cpu = statistics.median(base["wall"]), statistics.median(base["cpu"])
    rows = []
    for plan in plans:
        r = raw[plan]
        wall, cpu = statistics.median(r["wall"]), statistics.median(r["cpu"])
        state_b = 4 * r["moments_elements"]
        expected_b = 8 * r["trainable_elements"]
        rows.append(
            {
                "plan": plan,
                "trainable_elements": r["trainable_elements"],
                "total_elements": r["total_elements"],
                "step_wall_s": wall,
                "step_cpu_s": cpu,
                "wall_ratio": wall / base_wall,
                "cpu_ratio": cpu / base_cpu,
                "optimizer_state_bytes": state_b,
                "optimizer_state_ratio": state_b / (4 * base["moments_elements"]),
                "expected_state_bytes": expected_b,
                "grad_buffer_bytes": 4 * r["grad_buffer_elements"],
                "grad_buffer_ratio": r["grad_buffer_elements"] / base["grad_buffer_elements"],
                "loss_at_step0": r["loss0"],
                **{f"ckpt_{k}": v for k, v in r["checkpoint"].items()},
                "ckpt_size_ratio": r["checkpoint"]["adapter_only_bytes"]
                / r["checkpoint"]["full_bytes"],
                "wall_samples": r["wall"],
                "cpu_samples": r["cpu"],
            }
        )
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    meta = {
        "generated": now,
        "command": "python bench/megatron_tp.py " + " ".join(argv or sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "megatron_core": package_info.__version__,
        "load_average_start_end": [load0, load1],
        "wall_time_s": wall_total,
        "config": cfg,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out.with_suffix(".json"), {"meta": meta, "rows": rows})

    lines = [
        "# Megatron-core TP=2 benchmark: layer plans vs `full`",
        "",
        f"Generated by `{meta['command'].strip()}` on {now} ({meta['machine']}, torch "
        f"{torch.__version__}, megatron-core {meta['megatron_core']}), CPU, 2 gloo ranks = one "
        "tensor-parallel-2 replica, megatron-core CUDA spots redirected by the test shim.",
        f"Model: megatron-core GPTModel (local spec, RMSNorm, SwiGLU, RoPE), {args.layers} layers, "
        f"hidden {args.hidden}, {args.heads} heads ({args.query_groups} query groups), FFN "
        f"{args.ffn}, vocab {args.vocab}; {args.gas} micro-batches x {args.batch} x seq "
        f"{args.seq} per step; float32, AdamW (Megatron optimizer), `MegatronRunner`.",
        f"{args.warmup} warm-up + {args.steps} measured steps per plan per round, "
        f"{args.rounds} interleaved rounds (rotated order); medians. Total wall time "
        f"{wall_total:.0f} s. Load average (1 min) at start / end: {load0:.2f} / {load1:.2f} "
        f"on {os.cpu_count()} CPUs — the machine is shared, so wall times are noisy; CPU time "
        "(both ranks summed) is the steadier measure.",
        "",
        "Optimizer state = Adam moments the Megatron optimizer holds, summed over both TP "
        "ranks (fp32 model: no separate master copy). *expected* = 8 B x trainable elements "
        "held on the ranks (TP shards once, replicated norms per rank). Grad buffer = Megatron "
        "DDP's fp32 main-grad buffers over both ranks.",
        "",
        "| plan | trainable (TP ranks summed) | step wall s | step CPU s | wall ratio | CPU ratio "
        "| opt-state MiB | opt ratio | expected MiB | grad-buffer MiB | grad ratio | loss@0 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['plan']} | {r['trainable_elements']:,} | {r['step_wall_s']:.3f} | "
            f"{r['step_cpu_s']:.3f} | {r['wall_ratio']:.3f} | {r['cpu_ratio']:.3f} | "
            f"{_fmt_bytes(r['optimizer_state_bytes'])} | {r['optimizer_state_ratio']:.3f} | "
            f"{_fmt_bytes(r['expected_state_bytes'])} | {_fmt_bytes(r['grad_buffer_bytes'])} | "
            f"{r['grad_buffer_ratio']:.3f} | {r['loss_at_step0']:.4f} |"
        )
    lines += [
        "",
        "## Distributed checkpoints: adapter-only vs full (TP=2)",
        "",
        "megatron-core `dist_checkpointing.save` (`torch_dist`) of the trained model's weights "
        "(no optimizer state), once per plan after round 0's steps, on both ranks: "
        "*adapter-only* = `layerfreeze.engines.megatron.sharded.save_trained` (what the plan "
        "trains: adapters and fully trained layers), *full* = `model.sharded_state_dict()` "
        "(per-layer keys). Size = bytes on disk; save time = slowest rank, the faster of two "
        "saves (the first pays one-time start-up costs; noisy on the shared machine).",
        "",
        "| plan | adapter-only MiB | full MiB | size ratio | adapter-only save s | full save s |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['plan']} | {_fmt_bytes(r['ckpt_adapter_only_bytes'])} | "
            f"{_fmt_bytes(r['ckpt_full_bytes'])} | {r['ckpt_size_ratio']:.3f} | "
            f"{r['ckpt_adapter_only_save_s']:.3f} | {r['ckpt_full_save_s']:.3f} |"
        )
    lines += ["", "## Plans", ""]
    from layerfreeze.plan import PRESETS, LayerPlan

    for name in plans:
        desc = PRESETS[name][2] if name in PRESETS else name
        lines.append(f"- `{name}`: {desc.rstrip('.')}. Plan: `{LayerPlan.parse(name)}`.")
    lines.append("")
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines))
    print(json.dumps({r["plan"]: round(r["cpu_ratio"], 3) for r in rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
