"""Benchmark: LISA-style rotation vs ``full`` vs ``freeze_deep`` on the same model, side by side,
and the cost of a rotation's phase switch (``optimizer_state: carry`` vs ``reset``).

Each configuration trains the same seeded random Llama (built from a config) on the same batches
through the real :class:`~layerfreeze.engines.deepspeed.DeepSpeedRunner` (DeepSpeed ZeRO-2, one
gloo rank, CPU), in a fresh subprocess so its peak RSS is its own. Configurations are interleaved
over ``--rounds`` rounds with a rotating order; values are medians over rounds.

Measured per configuration:

* step time: process CPU time of each optimizer step (1 thread), as a ratio to ``full``'s median
  step; wall time alongside;
* switch cost: for the rotations, the CPU time of each step that crosses an interval boundary
  where the sampled layers change (the engine is rebuilt inside it) over the median step that
  crosses none;
* model-state bytes: weights + every tensor the torch optimizer under the ZeRO wrapper holds
  (fp32 master partitions, their fp32 gradients, Adam moments), counted from the optimizer
  inside each step (a step pre-hook), maximum over the run; next to the planner's
  (:func:`layerfreeze.memory.estimate_rotation_memory` / ``estimate_memory``) weights +
  gradients + optimizer;
* peak RSS (``ru_maxrss``) of the worker over its RSS right before the engine is built: model
  states plus activations, allocator slack and whatever DeepSpeed allocates (tracemalloc does not
  see torch's allocations, so it is not used). The workers run with a fixed glibc
  ``MALLOC_MMAP_THRESHOLD_`` (``--malloc-mmap-threshold``, 0 for glibc's dynamic default, which
  keeps the buffers a phase switch frees in the heap, so RSS would grow at every switch).

Writes ``bench/results/rotation.{json,md}`` atomically. Run::

    python bench/rotation.py                 # 8 layers, hidden 256, ~5 min on 1 free core
    python bench/rotation.py --smoke         # tiny, seconds: checks the script runs
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
if str(_HERE.parent) not in sys.path:  # run from a checkout without installing layerfreeze
    sys.path.insert(0, str(_HERE.parent))

CONFIGS = ("full", "freeze_deep", "lisa_carry", "lisa_reset")


def _model_config(args: argparse.Namespace):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.ffn, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=args.vocab,
        tie_word_embeddings=False, max_position_embeddings=max(args.seq, 128),
    )


def _rotation(args: argparse.Namespace, name: str):
    from layerfreeze.rotation import RotationConfig

    return RotationConfig.parse({"rotate": "lisa", "layers": args.lisa_layers,
                                 "interval": args.interval, "seed": 0,
                                 "optimizer_state": name.split("_")[1]})


def _ds_config() -> dict:
    return {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
        "zero_optimization": {"stage": 2, "overlap_comm": False},
        "steps_per_print": 10**9,
    }


def _rss_kib() -> int:
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """One configuration in this (fresh) process: per-step times, model-state bytes, RSS."""
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from layerfreeze.engines.deepspeed import DeepSpeedRunner
    from layerfreeze.rotation import build_rotation_schedule, interval_layers

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("gloo", rank=0, world_size=1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_model_config(args)).train()
    name = args.worker
    rss0 = _rss_kib()
    if name.startswith("lisa"):
        rot = _rotation(args, name)
        runner = DeepSpeedRunner(model, _ds_config(),
                                 schedule=build_rotation_schedule(rot, args.layers, args.steps))
        layers = [interval_layers(rot, i, args.layers) for i in range(args.steps)]
        switch_steps = {j * args.interval for j in range(1, len(layers))
                        if j * args.interval < args.steps and layers[j] != layers[j - 1]}
    else:
        runner = DeepSpeedRunner(model, _ds_config(), plan=name)
        switch_steps = set()
    weights = sum(p.nbytes for p in model.parameters())
    states: list[int] = []

    def hook(opt, _a, _k):
        held = 0
        for group in opt.param_groups:
            for p in group["params"]:
                held += p.nbytes + (p.grad.nbytes if p.grad is not None else 0)
                held += sum(v.nbytes for k, v in opt.state.get(p, {}).items()
                            if isinstance(v, torch.Tensor) and k != "step")
        states.append(weights + held)

    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, args.vocab, (2, args.seq), generator=g) for _ in range(4)]
    cpu, wall, hooked = [], [], None
    for step in range(args.steps):
        ids = batches[step % len(batches)]
        t0, w0 = time.process_time(), time.perf_counter()
        runner.train_step([{"input_ids": ids, "labels": ids}])
        cpu.append(time.process_time() - t0)
        wall.append(time.perf_counter() - w0)
        # a new engine after a switch; a weak reference, so that this loop never keeps the old
        # engine (and its optimizer state) alive through the next switch
        if hooked is None or hooked[0]() is not runner.engine:
            hooked = (weakref.ref(runner.engine),
                      runner.engine.optimizer.optimizer.register_step_pre_hook(hook))
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    runner.close()
    dist.destroy_process_group()
    return {"cpu": cpu, "wall": wall, "switch_steps": sorted(switch_steps),
            "model_states_max": max(states), "rss_over_base_bytes": (peak_kib - rss0) * 1024,
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def planner(args: argparse.Namespace) -> dict[str, Any]:
    """The planner's per-rank model states (weights + gradients + optimizer) per configuration,
    maximum over the phases."""
    import torch
    from transformers import AutoModelForCausalLM

    from layerfreeze.apply import apply_plan
    from layerfreeze.memory import TrainSetup, estimate_memory, estimate_rotation_memory

    setup = TrainSetup(world_size=1, zero_stage=2, dtype="fp32", micro_batch=2, seq_len=args.seq)

    def build():
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(_model_config(args))

    def states(e) -> int:
        return int(sum(e.parts[k].device + e.parts[k].cpu
                       for k in ("weights", "gradients", "optimizer")))

    out = {}
    for name in CONFIGS:
        if name.startswith("lisa"):
            phases = estimate_rotation_memory(build, _rotation(args, name), setup, args.steps)
            out[name] = {"model_states": max(states(e) for _, e in phases),
                         "phase_switch_host": max(int(e.phase_switch.cpu) for _, e in phases),
                         "trainable": max(e.trainable_params for _, e in phases)}
        else:
            e = estimate_memory(apply_plan(build(), name), setup)
            out[name] = {"model_states": states(e), "phase_switch_host": 0,
                         "trainable": e.trainable_params}
    return out


def _spawn(args: argparse.Namespace, name: str, port: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", name, "--port", str(port)]
    for key in ("layers", "hidden", "ffn", "heads", "vocab", "seq", "steps", "interval",
                "lisa_layers"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if args.malloc_mmap_threshold:
        # a fixed threshold: glibc's default raises it whenever a large block is freed, after
        # which freed engine buffers stay in the heap and RSS keeps what the process let go
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {name} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def summarize(runs: dict[str, list[dict]], plan: dict, args: argparse.Namespace) -> dict:
    """Medians over rounds; ratios to ``full``."""
    warm = args.warmup
    out: dict[str, Any] = {}
    for name, rs in runs.items():
        normal = [_med([c for i, c in enumerate(r["cpu"])
                        if i >= warm and i not in r["switch_steps"]]) for r in rs]
        switch = [_med([r["cpu"][i] for i in r["switch_steps"]]) for r in rs if r["switch_steps"]]
        out[name] = {
            "step_cpu_s": _med(normal),
            "step_cpu_s_rounds": normal,
            "step_wall_s": _med([_med(r["wall"][warm:]) for r in rs]),
            "switch_step_cpu_s": _med(switch) if switch else None,
            "switch_steps": rs[0]["switch_steps"],
            "model_states_bytes": max(r["model_states_max"] for r in rs),
            "peak_rss_over_base_bytes": _med([r["rss_over_base_bytes"] for r in rs]),
            "trainable_params": rs[0]["trainable"],
            "planner": plan[name],
        }
    full = out["full"]
    for r in out.values():
        r["step_time_ratio_to_full"] = r["step_cpu_s"] / full["step_cpu_s"]
        r["model_states_ratio_to_full"] = r["model_states_bytes"] / full["model_states_bytes"]
        r["peak_rss_ratio_to_full"] = (r["peak_rss_over_base_bytes"]
                                       / full["peak_rss_over_base_bytes"])
        r["measured_over_planner"] = r["model_states_bytes"] / r["planner"]["model_states"]
        r["switch_cost_ratio"] = (r["switch_step_cpu_s"] / r["step_cpu_s"]
                                  if r["switch_step_cpu_s"] else None)
    return out


def markdown(res: dict) -> str:
    """The results table."""
    m = res["meta"]
    lines = [
        "# LISA-style rotation vs full vs freeze_deep",
        "",
        f"Code commit `{m['commit']}`, {m['date']}, {m['machine']}; load average at start "
        f"{m['load_start']}, at end {m['load_end']} (the machine is shared). Llama "
        f"{m['args']['layers']} layers, hidden {m['args']['hidden']}, FFN {m['args']['ffn']}, "
        f"vocab {m['args']['vocab']}, batch 2 x {m['args']['seq']} tokens, DeepSpeed ZeRO-2, 1 "
        f"gloo rank, fp32, 1 thread; {m['args']['steps']} steps ({m['args']['warmup']} warm-up "
        f"dropped), {m['args']['rounds']} interleaved rounds; LISA {m['args']['lisa_layers']} "
        f"layers per {m['args']['interval']}-step interval + embeddings + lm_head.",
        "",
        "| config | trainable | step CPU time / full | model states / full (measured) | "
        "measured / planner | peak RSS over base / full | switch step / normal step |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in res["configs"].items():
        sw = f"{r['switch_cost_ratio']:.2f}" if r["switch_cost_ratio"] else "-"
        lines.append(
            f"| {name} | {r['trainable_params']:,} | {r['step_time_ratio_to_full']:.2f} | "
            f"{r['model_states_ratio_to_full']:.3f} | {r['measured_over_planner']:.3f} | "
            f"{r['peak_rss_ratio_to_full']:.2f} | {sw} |"
        )
    lines += [
        "",
        "Step time: median process CPU time of the steps that cross no interval boundary. "
        "Model states: weights + what the optimizer under the ZeRO wrapper holds (fp32 master, "
        "fp32 gradients, Adam moments), counted inside each step, maximum over the run; the "
        "planner's is weights + gradients + optimizer of `layerfreeze.memory` (its ZeRO-2 "
        "gradient line also counts the reduced 16-bit partition, released by the step). Peak "
        "RSS: `ru_maxrss` over the RSS before the engine was built (model states + activations "
        "+ allocator slack), with glibc's `MALLOC_MMAP_THRESHOLD_` = "
        f"{m['args'].get('malloc_mmap_threshold') or 'its dynamic default'} (glibc's dynamic "
        "default keeps freed engine buffers in the heap, so RSS would also count what earlier "
        "phases freed; jemalloc / tcmalloc behave like a fixed threshold). Switch: CPU time of a step in which the sampled layers change "
        "(engine rebuilt, `carry` also gathers and restores the kept state) over a normal step.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=29650, help=argparse.SUPPRESS)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=688)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4000)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--interval", type=int, default=4)
    p.add_argument("--lisa-layers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--malloc-mmap-threshold", type=int, default=131072,
                   help="glibc MALLOC_MMAP_THRESHOLD_ of the workers (bytes; 0: glibc's dynamic "
                        "default, under which RSS keeps freed engine buffers)")
    p.add_argument("--smoke", action="store_true", help="tiny model, 1 round, few steps")
    p.add_argument("--out", help="results folder (default bench/results; --smoke: a temp dir)")
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    if args.smoke:
        args.layers, args.hidden, args.ffn, args.vocab, args.seq = 2, 32, 64, 128, 16
        args.steps, args.interval, args.lisa_layers, args.rounds, args.warmup = 6, 2, 1, 1, 1
    from layerfreeze.utils.io import atomic_write_json, atomic_write_text

    if args.out is None:
        args.out = (tempfile.mkdtemp(prefix="rotation_smoke_") if args.smoke
                    else str(_HERE / "results"))
    load_start = os.getloadavg()
    runs: dict[str, list[dict]] = {c: [] for c in CONFIGS}
    port = args.port
    for r in range(args.rounds):
        order = CONFIGS[r % len(CONFIGS):] + CONFIGS[:r % len(CONFIGS)]
        for name in order:
            port += 1
            runs[name].append(_spawn(args, name, port))
    configs = summarize(runs, planner(args), args)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=_HERE, text=True,
                            capture_output=True).stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "bench/rotation.py",
                            "layerfreeze"], cwd=_HERE.parent, text=True,
                           capture_output=True).stdout.strip()
    meta = {"commit": commit + (" (dirty)" if dirty else ""),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.python_version()}",
            "load_start": [round(x, 2) for x in load_start],
            "load_end": [round(x, 2) for x in os.getloadavg()],
            "args": {k: v for k, v in vars(args).items() if k != "out"}}  # no machine path
    res = {"meta": meta, "configs": configs, "runs": runs}
    out = Path(args.out)
    atomic_write_json(out / "rotation.json", res)
    atomic_write_text(out / "rotation.md", markdown(res))
    sys.stdout.write(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
