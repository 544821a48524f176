"""Benchmark: the same model and batch trained under each layer plan, next to the peers a user
would pick instead (Hugging Face PEFT LoRA, hand-written ``requires_grad=False`` freezing).

Each configuration runs in a fresh subprocess (so its peak memory is its own), a few warm-up
steps are dropped, configurations are interleaved over several rounds (rotating the order) and
the medians are reported. Every time ratio is shown next to the ratio the FLOP model in
``bench/flops.py`` predicts. Writes ``bench/results/train_plans.{json,md}`` atomically.

Run (defaults: Llama, hidden 512, 8 layers, seq 256, batch 2, 1 thread, CPU)::

    python bench/train_plans.py
    python bench/train_plans.py --hidden 1024 --seq 512 --device cuda --rounds 5
    python bench/train_plans.py --configs full,freeze_deep,hand_freeze_deep --rounds 2
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
if str(_HERE.parent) not in sys.path:  # run from a checkout without installing layerfreeze
    sys.path.insert(0, str(_HERE.parent))
_spec = importlib.util.spec_from_file_location("layerfreeze_bench_flops", _HERE / "flops.py")
flops = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = flops
_spec.loader.exec_module(flops)


@dataclass(frozen=True)
class BenchConfig:
    """One benchmarked way of training.

    Attributes:
        name: key used on the command line and in the results.
        kind: ``layerfreeze`` (a plan through ``apply_plan``), ``hand`` (``requires_grad=False``
            written by hand) or ``peft`` (``peft.get_peft_model``).
        source: the layerfreeze preset whose layers / rank / targets it reproduces.
        lora_only: keep only the preset's LoRA layers (the gate-cost comparison).
        description: one line for the report.
    """

    name: str
    kind: str
    source: str
    lora_only: bool = False
    description: str = ""


CONFIGS: dict[str, BenchConfig] = {
    c.name: c
    for c in [
        BenchConfig("full", "layerfreeze", "full", description="every parameter trains"),
        BenchConfig("freeze_deep", "layerfreeze", "freeze_deep", description="bottom half trains"),
        BenchConfig(
            "freeze_shallow", "layerfreeze", "freeze_shallow", description="top half trains"
        ),
        BenchConfig(
            "hlpt",
            "layerfreeze",
            "hlpt",
            description="gated LoRA FFN bottom 3/4, gated prefix (paper form) top 1/4",
        ),
        BenchConfig(
            "h2lpt",
            "layerfreeze",
            "h2lpt",
            description="gated LoRA FFN bottom 1/4, middle half frozen, gated prefix top 1/4",
        ),
        BenchConfig("lora_all", "layerfreeze", "lora_all", description="plain LoRA on every layer"),
        BenchConfig(
            "hlpt_lora",
            "layerfreeze",
            "hlpt",
            lora_only=True,
            description="hlpt's gated-LoRA rule alone (isolates the gate cost)",
        ),
        BenchConfig(
            "hand_freeze_deep",
            "hand",
            "freeze_deep",
            description="requires_grad=False by hand, same layers as freeze_deep",
        ),
        BenchConfig(
            "hand_freeze_shallow",
            "hand",
            "freeze_shallow",
            description="requires_grad=False by hand, same layers as freeze_shallow",
        ),
        BenchConfig(
            "peft_lora_all", "peft", "lora_all", description="PEFT LoRA, lora_all's rank/targets"
        ),
        BenchConfig(
            "peft_hlpt_lora",
            "peft",
            "hlpt",
            lora_only=True,
            description="PEFT LoRA on hlpt's LoRA layers/targets/rank (no gates, no prefix)",
        ),
        BenchConfig(
            "peft_h2lpt_lora",
            "peft",
            "h2lpt",
            lora_only=True,
            description="PEFT LoRA on h2lpt's LoRA layers/targets/rank (no gates, no prefix)",
        ),
    ]
}

#: Pairs checked by the targets: (layerfreeze config, peer config).
FREEZE_PAIRS = [("freeze_deep", "hand_freeze_deep"), ("freeze_shallow", "hand_freeze_shallow")]
GATED_PAIRS = [
    ("hlpt_lora", "peft_hlpt_lora"),
    ("hlpt", "peft_hlpt_lora"),
    ("h2lpt", "peft_h2lpt_lora"),
]
FLOP_TOLERANCE = 0.10
NOISE_FLOOR = 0.05


# --------------------------------------------------------------------------------------------
# Model, plans and the peers
# --------------------------------------------------------------------------------------------


def build_model(args: argparse.Namespace):
    """The benchmark model: a seeded random Llama built from the CLI sizes (no model hub)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        intermediate_size=args.intermediate,
        vocab_size=args.vocab,
        max_position_embeddings=args.seq,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(cfg)


def dims_of(args: argparse.Namespace) -> flops.LlamaDims:
    """Shapes for the FLOP model, from the same CLI sizes."""
    return flops.LlamaDims(
        hidden=args.hidden,
        intermediate=args.intermediate,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        vocab=args.vocab,
        seq_len=args.seq,
        batch=args.batch,
    )


def preset_plan(name: str):
    """The layerfreeze preset ``name`` at its defaults (freeze fractions 0.5; hlpt: gated LoRA
    r=16 on the FFN of the bottom 3/4, gated 16-token prefix (paper form) on the top 1/4; h2lpt:
    the same on the bottom and top quarters, the middle half frozen; lora_all: r=16)."""
    from layerfreeze.plan import LayerPlan

    return LayerPlan.from_preset(name)


def policy_options(spec) -> dict[str, Any]:
    """A PolicySpec's options as plain values (``lora``: r, alpha, dropout, target, gated, ...)."""
    from layerfreeze.utils.schema import to_dict

    return to_dict(spec.options)


def lora_linears(layer_module, spec) -> list[str]:
    """Names (relative to the block) of the base linears a ``lora`` spec targets.

    Independent of layerfreeze's own target resolution (so the PEFT peer is built without it);
    uses the Llama attribute names ``self_attn`` / ``mlp`` of the benchmark's model. The report
    checks the result: equal LoRA A/B parameter counts for the layerfreeze plan and its peer.
    """
    from torch import nn

    target = policy_options(spec)["target"]
    kinds = {"mlp": ("mlp",), "attn": ("self_attn",), "all": ("self_attn", "mlp")}
    if isinstance(target, str) and target in kinds:
        prefixes = kinds[target]
        return [
            n
            for n, m in layer_module.named_modules()
            if isinstance(m, nn.Linear) and n.split(".")[0] in prefixes and "lora" not in n
        ]
    names = [target] if isinstance(target, str) else list(target)
    found = dict(layer_module.named_modules())
    out = []
    for t in names:
        hits = [n for n in found if n == t or n.endswith("." + t)]
        if not hits:
            raise ValueError(
                f"lora target {t!r} matches no module of the block; modules: {sorted(found)}."
            )
        out.extend(hits)
    return out


def lora_layers(resolved) -> dict[int, Any]:
    """Layer index -> ``lora`` PolicySpec for the layers a resolved plan gives LoRA."""
    return {i: s for i, s in enumerate(resolved.layers) if s.name == "lora"}


def lora_only_plan(resolved):
    """A plan with only ``resolved``'s LoRA layers (same specs), everything else frozen."""
    from layerfreeze.plan import LayerPlan

    rules = [
        {"layers": f"{first}-{last}", "policy": "lora", **policy_options(spec)}
        for first, last, spec in resolved.runs()
        if spec.name == "lora"
    ]
    return LayerPlan.parse({"name": "lora_only", "default": "freeze", "rules": rules})


def hand_freeze(model, resolved) -> None:
    """What a user writes without layerfreeze: ``requires_grad=False`` on the frozen layers.

    Trains exactly the layers (and embeddings / final norm / head) the plan gives ``full``.
    """
    for p in model.parameters():
        p.requires_grad = False
    for i, spec in enumerate(resolved.layers):
        if spec.name == "full":
            for p in model.model.layers[i].parameters():
                p.requires_grad = True
        elif spec.name != "freeze":
            raise ValueError(
                f"hand freezing reproduces full/freeze layers only, layer {i} is {spec.name}."
            )
    if resolved.embeddings.name == "full":
        model.model.embed_tokens.weight.requires_grad = True
    if resolved.final_norm.name == "full":
        model.model.norm.weight.requires_grad = True
    if resolved.lm_head.name == "full":
        model.lm_head.weight.requires_grad = True


def peft_lora(model, resolved):
    """PEFT LoRA at the plan's LoRA layers with the same rank / alpha / dropout / targets."""
    from peft import LoraConfig, get_peft_model

    layers = lora_layers(resolved)
    if not layers:
        raise ValueError("the source plan has no lora layers to reproduce with PEFT.")
    opts = {(policy_options(s)["r"], policy_options(s)["alpha"]) for s in layers.values()}
    if len(opts) != 1:
        raise ValueError(f"PEFT LoRA takes one rank/alpha here; the plan uses {sorted(opts)}.")
    first = policy_options(next(iter(layers.values())))
    targets = [
        f"model.layers.{i}.{n}"
        for i, s in layers.items()
        for n in lora_linears(model.model.layers[i], s)
    ]
    cfg = LoraConfig(
        r=first["r"],
        lora_alpha=first["alpha"],
        lora_dropout=first["dropout"],
        target_modules=targets,
        bias="none",
    )
    return get_peft_model(model, cfg)


def layer_costs(model, resolved, *, keep_gates: bool = True, lora_only: bool = False):
    """The FLOP model's description of a plan (or of a peer reproducing it)."""
    costs = []
    for i, spec in enumerate(resolved.layers):
        if spec.name == "full":
            costs.append(flops.LayerCost.full() if not lora_only else flops.LayerCost.frozen())
        elif spec.name == "freeze" or (lora_only and spec.name != "lora"):
            costs.append(flops.LayerCost.frozen())
        elif spec.name == "lora":
            o = policy_options(spec)
            targets = tuple(n.split(".")[-1] for n in lora_linears(model.model.layers[i], spec))
            costs.append(
                flops.LayerCost(lora=flops.LoraCost(o["r"], targets, o["gated"] and keep_gates))
            )
        elif spec.name == "prefix":
            o = policy_options(spec)
            costs.append(
                flops.LayerCost(prefix=flops.PrefixCost(o["tokens"], o["gated"], o["reparam"]))
            )
        else:
            raise ValueError(f"layer {i}: the FLOP model has no rule for policy {spec.name!r}.")
    emb = resolved.embeddings.name == "full" and not lora_only
    head = resolved.lm_head.name == "full" and not lora_only
    return costs, emb, head


# --------------------------------------------------------------------------------------------
# Worker: one configuration in a fresh process
# --------------------------------------------------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def prepare(cfg: BenchConfig, model, args) -> tuple[Any, list[dict], dict[str, Any]]:
    """Apply ``cfg`` to ``model``; return the model to call, optimizer groups and FLOP inputs."""
    resolved_src = preset_plan(cfg.source).resolve(args.layers)
    costs, emb, head = layer_costs(
        model, resolved_src, keep_gates=cfg.kind != "peft", lora_only=cfg.lora_only
    )
    if cfg.kind == "layerfreeze":
        from layerfreeze.apply import apply_plan

        plan = lora_only_plan(resolved_src) if cfg.lora_only else preset_plan(cfg.source)
        applied = apply_plan(model, plan)
        groups = applied.param_groups(args.lr, args.weight_decay)
        info = {"plan": str(plan)}
    elif cfg.kind == "hand":
        hand_freeze(model, resolved_src)
        groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
        info = {"plan": f"hand freezing of {cfg.source}'s layers"}
    elif cfg.kind == "peft":
        model = peft_lora(model, resolved_src)
        groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
        info = {"plan": f"peft LoRA on {cfg.source}'s LoRA layers"}
    else:
        raise ValueError(f"config {cfg.name}: unknown kind {cfg.kind!r}.")
    info["flops"] = {
        "layers": [_cost_to_dict(c) for c in costs],
        "embeddings": emb,
        "lm_head": head,
    }
    return model, groups, info


def _cost_to_dict(c: flops.LayerCost) -> dict[str, Any]:
    return {
        "trainable_linears": list(c.trainable_linears),
        "lora": None
        if c.lora is None
        else {"rank": c.lora.rank, "targets": list(c.lora.targets), "gated": c.lora.gated},
        "prefix": None
        if c.prefix is None
        else {"tokens": c.prefix.tokens, "gated": c.prefix.gated, "reparam": c.prefix.reparam},
    }


def _cost_from_dict(d: dict[str, Any]) -> flops.LayerCost:
    lora = d["lora"] and flops.LoraCost(
        d["lora"]["rank"], tuple(d["lora"]["targets"]), d["lora"]["gated"]
    )
    prefix = d["prefix"] and flops.PrefixCost(
        d["prefix"]["tokens"], d["prefix"]["gated"], d["prefix"]["reparam"]
    )
    return flops.LayerCost(tuple(d["trainable_linears"]), lora or None, prefix or None)


def _train_tiny_copy(cfg: BenchConfig, args: argparse.Namespace) -> None:
    import torch

    tiny = argparse.Namespace(**vars(args))
    tiny.hidden, tiny.heads, tiny.kv_heads, tiny.intermediate = 32, 2, 2, 64
    tiny.vocab, tiny.seq, tiny.batch = 64, 8, 1
    device = torch.device(args.device)
    model = build_model(tiny).to(device=device, dtype=getattr(torch, args.dtype))
    model, groups, _ = prepare(cfg, model, tiny)
    opt = torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=args.lr, weight_decay=args.weight_decay
    )
    ids = torch.zeros(1, 8, dtype=torch.long, device=device)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Train one configuration for ``warmup + steps`` steps and measure it."""
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    cfg = CONFIGS[args.worker]
    # Load every library and lazily imported code path before the memory baseline (code is not
    # training memory): one step of the same configuration on a tiny copy of the model.
    _train_tiny_copy(cfg, args)
    gc.collect()
    rss0 = _rss_bytes()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        mem0 = torch.cuda.memory_allocated(device)
    # Device and dtype first: adapters are created like the base weights (gates stay fp32).
    model = build_model(args).to(device=device, dtype=getattr(torch, args.dtype))
    model, groups, info = prepare(cfg, model, args)
    model.train()
    groups = [g for g in groups if g["params"]]
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)
    gen = torch.Generator().manual_seed(args.seed + 1)
    batch = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(device)

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    def now() -> tuple[float, float]:
        sync()
        return time.perf_counter(), time.process_time()

    times: dict[str, list[float]] = {
        k: [] for k in ("fwd", "bwd", "opt", "fwd_cpu", "bwd_cpu", "opt_cpu")
    }
    losses = []
    for _ in range(args.warmup + args.steps):
        t0 = now()
        loss = model(input_ids=batch, labels=batch).loss
        t1 = now()
        loss.backward()
        t2 = now()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = now()
        for key, (a, b) in (("fwd", (t0, t1)), ("bwd", (t1, t2)), ("opt", (t2, t3))):
            times[key].append(b[0] - a[0])
            times[f"{key}_cpu"].append(b[1] - a[1])
        losses.append(loss.item())
    if cuda:
        peak = torch.cuda.max_memory_allocated(device) - mem0
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
    opt_bytes = sum(
        t.numel() * t.element_size()
        for state in opt.state.values()
        for t in state.values()
        if torch.is_tensor(t)
    )
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    w = args.warmup
    return {
        "name": cfg.name,
        **{f"{k}_s": v[w:] for k, v in times.items()},
        "losses": losses,
        "peak_mem_bytes": peak,
        "opt_state_bytes": opt_bytes,
        "trainable_params": sum(p.numel() for p in params),
        "trainable_tensors": len(params),
        "total_params": sum(p.numel() for p in model.parameters()),
        "lora_ab_params": sum(
            p.numel()
            for n, p in named
            if "lora" in n.lower() and p.dim() == 2 and "lora_gate" not in n
        ),
        "trainable_names": sorted(n for n, _ in named),
        "info": info,
    }


# --------------------------------------------------------------------------------------------
# Driver: interleaved rounds, aggregation, report
# --------------------------------------------------------------------------------------------

_FORWARDED = (
    "hidden",
    "layers",
    "heads",
    "kv_heads",
    "intermediate",
    "vocab",
    "seq",
    "batch",
    "steps",
    "warmup",
    "threads",
    "device",
    "clock",
    "dtype",
    "lr",
    "weight_decay",
    "seed",
)


def _spawn(name: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="lf_bench_") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--worker",
            name,
            "--result",
            str(out),
        ]
        for key in _FORWARDED:
            cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(
                f"config {name}: worker failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
            )
        return json.loads(out.read_text())


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _clock(args: argparse.Namespace) -> str:
    """Key suffix of the timings used for ratios: process CPU time on CPU, wall time on CUDA."""
    if args.clock == "auto":
        return "_cpu" if args.device == "cpu" else ""
    return "_cpu" if args.clock == "cpu" else ""


def _step_times(run: dict[str, Any], suffix: str) -> list[float]:
    return [
        a + b + c
        for a, b, c in zip(
            run[f"fwd{suffix}_s"], run[f"bwd{suffix}_s"], run[f"opt{suffix}_s"], strict=True
        )
    ]


def aggregate(name: str, runs: list[dict[str, Any]], args) -> dict[str, Any]:
    """Per-config medians over rounds (each round: median of its measured steps)."""
    sfx = _clock(args)

    def per_round(key: str) -> float:
        return _median([_median(r[key]) for r in runs])

    step_rounds = [_median(_step_times(r, sfx)) for r in runs]
    step = _median(step_rounds)
    first = runs[0]
    return {
        "name": name,
        "kind": CONFIGS[name].kind,
        "description": CONFIGS[name].description,
        "plan": first["info"]["plan"],
        "step_s": step,
        "step_s_rounds": step_rounds,
        "spread": (max(step_rounds) - min(step_rounds)) / step if step > 0 else 0.0,
        "fwd_s": per_round(f"fwd{sfx}_s"),
        "bwd_s": per_round(f"bwd{sfx}_s"),
        "opt_s": per_round(f"opt{sfx}_s"),
        "wall_step_s": _median([_median(_step_times(r, "")) for r in runs]),
        "cpu_step_s": _median([_median(_step_times(r, "_cpu")) for r in runs]),
        "tokens_per_s": args.batch * args.seq / step,
        "peak_mem_bytes": _median([r["peak_mem_bytes"] for r in runs]),
        "opt_state_bytes": first["opt_state_bytes"],
        "trainable_params": first["trainable_params"],
        "trainable_tensors": first["trainable_tensors"],
        "total_params": first["total_params"],
        "lora_ab_params": first["lora_ab_params"],
        "loss_step0": first["losses"][0],
        "losses": first["losses"],
        "trainable_names": first["trainable_names"],
        "flops_input": first["info"]["flops"],
        "raw_runs": [
            {k: v for k, v in r.items() if k.endswith("_s") or k == "peak_mem_bytes"} for r in runs
        ],
    }


def predicted(agg: dict[str, Any], dims: flops.LlamaDims) -> flops.FlopBreakdown:
    """FLOP-model breakdown for an aggregated config."""
    f = agg["flops_input"]
    net = flops.llama_network(
        dims,
        [_cost_from_dict(c) for c in f["layers"]],
        embeddings_trainable=f["embeddings"],
        lm_head_trainable=f["lm_head"],
    )
    return flops.step_flops(net)


def analyse(results: dict[str, dict[str, Any]], args) -> dict[str, Any]:
    """Ratios to ``full``, FLOP-model predictions, and the three targets."""
    dims = dims_of(args)
    full = results["full"]
    f_full = predicted(full, dims)
    for r in results.values():
        f = predicted(r, dims)
        r["flops_per_token"] = f.to_dict()
        r["time_ratio"] = r["step_s"] / full["step_s"]
        r["gflop_per_s"] = f.total * args.batch * args.seq / r["step_s"] / 1e9
        r["flop_ratio"] = f.total / f_full.total
        r["flop_fwd_ratio"] = f.forward / f_full.forward
        r["flop_bwd_ratio"] = (f.input_grad + f.weight_grad) / (
            f_full.input_grad + f_full.weight_grad
        )
        r["fwd_ratio"] = r["fwd_s"] / full["fwd_s"]
        r["bwd_ratio"] = r["bwd_s"] / full["bwd_s"]
        r["opt_share"] = r["opt_s"] / r["step_s"]
        r["fwdbwd_ratio"] = (r["fwd_s"] + r["bwd_s"]) / (full["fwd_s"] + full["bwd_s"])
        r["time_vs_flop"] = r["time_ratio"] / r["flop_ratio"] - 1.0
        r["mem_ratio"] = r["peak_mem_bytes"] / full["peak_mem_bytes"]
        r["opt_ratio"] = r["opt_state_bytes"] / full["opt_state_bytes"]
        r["opt_bytes_expected"] = 8 * r["trainable_params"] + 4 * r["trainable_tensors"]
        r["opt_ratio_expected"] = r["opt_bytes_expected"] / (
            8 * full["trainable_params"] + 4 * full["trainable_tensors"]
        )
        static = 4 * r["total_params"] + 12 * r["trainable_params"]  # weights + grads + Adam
        r["static_mem_ratio"] = static / (4 * full["total_params"] + 12 * full["trainable_params"])

    targets: list[dict[str, Any]] = []
    for a, b in FREEZE_PAIRS:
        if a in results and b in results:
            ra, rb = results[a], results[b]
            noise = max(NOISE_FLOOR, ra["spread"], rb["spread"])
            ratio = ra["step_s"] / rb["step_s"]
            targets.append(
                {
                    "target": f"{a} no slower than hand freezing ({b})",
                    "measured": ratio,
                    "expected": 1.0,
                    "noise": noise,
                    "allowed": f"<= {1 + noise:.3f}",
                    "limit": 1 + noise,
                    "ok": ratio <= 1 + noise,
                    "same_trainable_set": ra["trainable_names"] == rb["trainable_names"],
                    "why": _why_pair(ra, rb, ratio, noise),
                }
            )
    for a, b in GATED_PAIRS:
        if a in results and b in results:
            ra, rb = results[a], results[b]
            noise = max(NOISE_FLOOR, ra["spread"], rb["spread"])
            ratio = ra["step_s"] / rb["step_s"]
            flop = ra["flop_ratio"] / rb["flop_ratio"]  # the gates' (and prefix's) own FLOPs
            targets.append(
                {
                    "target": f"{a} no slower than PEFT LoRA at equal rank ({b})",
                    "measured": ratio,
                    "expected": flop,
                    "noise": noise,
                    "allowed": f"<= {flop * (1 + noise):.3f}",
                    "limit": flop * (1 + noise),
                    "ok": ratio <= flop * (1 + noise),
                    "same_lora_params": ra["lora_ab_params"] == rb["lora_ab_params"],
                    "why": _why_pair(ra, rb, ratio / flop, noise),
                }
            )
    for name, r in results.items():
        if name == "full" or r["kind"] != "layerfreeze":
            continue
        ok = abs(r["time_vs_flop"]) <= FLOP_TOLERANCE
        targets.append(
            {
                "target": f"{name}: time ratio within {FLOP_TOLERANCE:.0%} of FLOP ratio",
                "measured": r["time_ratio"],
                "expected": r["flop_ratio"],
                "allowed": f"{r['flop_ratio'] * (1 - FLOP_TOLERANCE):.3f}"
                f"-{r['flop_ratio'] * (1 + FLOP_TOLERANCE):.3f}",
                "deviation": r["time_vs_flop"],
                "ok": ok,
                "why": "" if ok else _why_flop(r, full),
            }
        )
    return {"targets": targets}


def _why_pair(a: dict, b: dict, ratio: float, noise: float) -> str:
    if ratio <= 1 + noise:
        return ""
    parts = [
        f"{a['name']} is {ratio - 1:+.1%} vs {b['name']} (noise band {noise:.1%})",
        f"forward {a['fwd_s'] / b['fwd_s']:.2f}x, backward {a['bwd_s'] / b['bwd_s']:.2f}x, "
        f"optimizer {a['opt_s'] / max(b['opt_s'], 1e-12):.2f}x",
    ]
    if a["trainable_tensors"] != b["trainable_tensors"]:
        parts.append(f"{a['trainable_tensors']} vs {b['trainable_tensors']} trainable tensors")
    return "; ".join(parts)


def _why_flop(r: dict, full: dict) -> str:
    parts = [f"off by {r['time_vs_flop']:+.1%}"]
    noise = max(r["spread"], full["spread"])
    if noise > FLOP_TOLERANCE:
        parts.append(
            f"round-to-round spread up to {noise:.0%} (noise of the shared machine; "
            "more --rounds narrow it)"
        )
    parts += [
        f"forward {r['fwd_ratio']:.2f}x full (model {r['flop_fwd_ratio']:.2f}x)",
        f"backward {r['bwd_ratio']:.2f}x full (model {r['flop_bwd_ratio']:.2f}x)",
        f"optimizer step {r['opt_share']:.0%} of its step vs {full['opt_share']:.0%} for full "
        "(elementwise, not in the FLOP model)",
        f"forward+backward alone {r['fwdbwd_ratio']:.3f} vs {r['flop_ratio']:.3f}",
        f"{r['gflop_per_s']:.0f} GFLOP/s vs {full['gflop_per_s']:.0f} for full",
    ]
    return "; ".join(parts)


def _mib(x: float) -> str:
    return f"{x / 2**20:.1f}"


_COLUMNS = [
    "config", "kind", "trainable", "step s (round spread)", "wall s", "tokens/s", "time ratio",
    "FLOP ratio", "time/FLOP", "GFLOP/s", "fwd / bwd / opt s", "peak MiB", "mem ratio", "static",
    "opt-state MiB", "opt ratio", "expected", "loss@0",
]  # fmt: skip


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def render_markdown(report: dict[str, Any]) -> str:
    """The results table and target checks as markdown."""
    env, a = report["environment"], report["args"]
    rows = report["results"]
    lines = [
        "# Training-step benchmark: layer plans vs peers",
        "",
        f"Generated by `python bench/train_plans.py` on {env['date']} ({env['device']}, "
        f"{a['threads']} thread(s), torch {env['torch']}, transformers {env['transformers']}, "
        f"peft {env['peft']}).",
        f"Model: Llama, hidden {a['hidden']}, {a['layers']} layers, {a['heads']} heads "
        f"({a['kv_heads']} KV), intermediate {a['intermediate']}, vocab {a['vocab']}; "
        f"batch {a['batch']} x seq {a['seq']} = {a['batch'] * a['seq']} tokens/step; {a['dtype']}; "
        f"AdamW lr {a['lr']}. {a['warmup']} warm-up + {a['steps']} measured steps per run, "
        f"{a['rounds']} interleaved rounds, each config in a fresh process; medians.",
        f"Load average (1 min) at start / end: {env['loadavg_start']:.2f} / "
        f"{env['loadavg_end']:.2f} on {env['cpu_count']} CPUs"
        + (
            " — other processes were running; timings are noisy."
            if env["loadavg_start"] > 1.5
            else "."
        ),
        f"Total wall time {report['wall_s']:.0f} s. Step times below are "
        + (
            "**process CPU time** (1 thread per run, so it is the compute the step needed; "
            "much less sensitive than wall time to the other processes sharing the cores; "
            "wall-clock medians are in the `wall s` column and the JSON)."
            if report["clock"] == "cpu"
            else "wall-clock time (synchronised)."
        ),
        "",
        "Ratios are to `full`. *FLOP* = the FLOP model's prediction (`bench/flops.py`); "
        "*time/FLOP* = measured time ratio / FLOP ratio - 1; *GFLOP/s* = the FLOP model's count "
        "over the measured time (how efficiently the step's matmul work ran). Memory = peak "
        + (
            "`torch.cuda.max_memory_allocated`"
            if a["device"].startswith("cuda")
            else "process RSS over the post-import baseline"
        )
        + " (weights + grads + optimizer + activations); *static* = the ratio of "
        "4 B weights + 12 B per trainable element (grad + Adam). Optimizer state is counted from "
        "`optimizer.state`; *expected* = 8 B per trainable element + 4 B step per tensor.",
        "",
        _row(_COLUMNS),
        _row(["---", "---"] + ["---:"] * (len(_COLUMNS) - 2)),
    ]
    for r in rows.values():
        cells = [
            r["name"],
            r["kind"],
            f"{r['trainable_params']:,}",
            f"{r['step_s']:.3f} ({r['spread']:.0%})",
            f"{r['wall_step_s']:.2f}",
            f"{r['tokens_per_s']:.0f}",
            f"{r['time_ratio']:.3f}",
            f"{r['flop_ratio']:.3f}",
            f"{r['time_vs_flop']:+.1%}",
            f"{r['gflop_per_s']:.1f}",
            f"{r['fwd_s']:.2f} / {r['bwd_s']:.2f} / {r['opt_s']:.2f}",
            _mib(r["peak_mem_bytes"]),
            f"{r['mem_ratio']:.2f}",
            f"{r['static_mem_ratio']:.2f}",
            _mib(r["opt_state_bytes"]),
            f"{r['opt_ratio']:.3f}",
            f"{r['opt_ratio_expected']:.3f}",
            f"{r['loss_step0']:.4f}",
        ]
        lines.append(_row(cells))
    lines += ["", "## Configurations", ""]
    for r in rows.values():
        lines.append(f"- `{r['name']}` ({r['kind']}): {r['description']}. Plan: `{r['plan']}`.")
    lines += [
        "",
        "## Targets",
        "",
        "*expected* is the FLOP model's ratio (1 for the same layers trained two ways; for the "
        "gated plans the FLOPs of their gates and prefix relative to the PEFT LoRA of the same "
        "layers); *allowed* adds the noise band max(5%, round-to-round spread) or the 10% FLOP "
        "tolerance.",
        "",
        "| target | measured | expected | allowed | result | why (when missed) |",
        "|---|---:|---:|---:|---|---|",
    ]
    for t in report["targets"]:
        extra = ""
        if "same_trainable_set" in t:
            extra = (
                " (same trainable set)" if t["same_trainable_set"] else " (TRAINABLE SETS DIFFER)"
            )
        if "same_lora_params" in t:
            extra = (
                " (same LoRA A/B params)" if t["same_lora_params"] else " (LoRA A/B PARAMS DIFFER)"
            )
        result = "met" if t["ok"] else "MISSED"
        lines.append(
            _row(
                [
                    f"{t['target']}{extra}",
                    f"{t['measured']:.3f}",
                    f"{t['expected']:.3f}",
                    t["allowed"],
                    result,
                    t["why"],
                ]
            )
        )
    lines += [
        "",
        f"Sanity: step-0 losses identical across configs (adapters are identity at init): "
        f"{report['identical_step0_loss']}.",
        "",
    ]
    return "\n".join(lines)


def summary_text(report: dict[str, Any]) -> str:
    """Short console summary."""
    out = [f"{'config':<22}{'step s':>9}{'time':>8}{'FLOP':>8}{'dev':>8}{'mem':>7}{'opt':>7}"]
    for r in report["results"].values():
        out.append(
            f"{r['name']:<22}{r['step_s']:>9.3f}{r['time_ratio']:>8.3f}{r['flop_ratio']:>8.3f}"
            f"{r['time_vs_flop']:>+8.1%}{r['mem_ratio']:>7.2f}{r['opt_ratio']:>7.3f}"
        )
    missed = [t for t in report["targets"] if not t["ok"]]
    out.append(f"targets met: {len(report['targets']) - len(missed)}/{len(report['targets'])}")
    out += [f"  MISSED {t['target']}: {t['why']}" for t in missed]
    return "\n".join(out)


def run_driver(args: argparse.Namespace) -> int:
    """Run the selected configs over interleaved rounds, analyse, write results, print a summary."""
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"--configs: unknown {unknown}; valid: {', '.join(CONFIGS)}.")
    if "full" not in names:
        raise SystemExit("--configs: 'full' is needed (every ratio is to full).")
    start, load0 = time.perf_counter(), os.getloadavg()[0]
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for rnd in range(args.rounds):
        order = names[rnd % len(names) :] + names[: rnd % len(names)]
        for name in order:
            t = time.perf_counter()
            res = _spawn(name, args)
            runs[name].append(res)
            wall, cpu = _median(_step_times(res, "")), _median(_step_times(res, "_cpu"))
            print(
                f"[round {rnd + 1}/{args.rounds}] {name:<22} step {wall:.3f} s wall, "
                f"{cpu:.3f} s CPU (process {time.perf_counter() - t:.1f} s)",
                flush=True,
            )
    results = {n: aggregate(n, runs[n], args) for n in names}
    report = build_report(args, results, load0, time.perf_counter() - start)
    write_report(report, Path(args.out_dir))
    return 0


def build_report(
    args: argparse.Namespace, results: dict[str, dict[str, Any]], load0: float, wall_s: float
) -> dict[str, Any]:
    """The JSON report: arguments, environment, per-config results and the target checks."""
    import peft
    import torch
    import transformers

    analysis = analyse(results, args)
    losses0 = [r["loss_step0"] for r in results.values()]
    report = {
        "args": {k: getattr(args, k) for k in (*_FORWARDED, "rounds", "configs")},
        "environment": {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": torch.cuda.get_device_name(0)
            if args.device.startswith("cuda")
            else platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "python": platform.python_version(),
            "loadavg_start": load0,
            "loadavg_end": os.getloadavg()[0],
        },
        "wall_s": wall_s,
        "clock": "cpu" if _clock(args) == "_cpu" else "wall",
        "flop_model": "bench/flops.py (see its docstring for the counting rules)",
        "identical_step0_loss": max(losses0) - min(losses0) <= 1e-4 * abs(losses0[0]),
        "results": results,
        "targets": analysis["targets"],
    }
    return report


def write_report(report: dict[str, Any], out: Path) -> None:
    """Write ``train_plans.json`` and ``train_plans.md`` atomically and print the summary."""
    from layerfreeze.utils.io import atomic_write_json, atomic_write_text

    atomic_write_json(out / "train_plans.json", report)
    atomic_write_text(out / "train_plans.md", render_markdown(report))
    print(summary_text(report))
    print(f"wrote {out / 'train_plans.json'} and {out / 'train_plans.md'}")


def rerender(path: Path, out: Path) -> int:
    """Recompute the analysis and the markdown from a results JSON (no re-run; same numbers)."""
    report = json.loads(path.read_text())
    args = argparse.Namespace(**report["args"])
    report.update(analyse(report["results"], args))
    write_report(report, out)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (sizes, steps, rounds, device, output)."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=1376)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=1, help="measured steps per run")
    p.add_argument("--warmup", type=int, default=2, help="steps dropped before measuring")
    p.add_argument("--rounds", type=int, default=3, help="interleaved repeats of every config")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per run")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument(
        "--clock",
        default="auto",
        choices=["auto", "wall", "cpu"],
        help="timings behind the ratios: process CPU time (auto on CPU: robust to other processes "
        "sharing the cores) or wall time (auto on CUDA, with synchronisation)",
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--configs", default=",".join(CONFIGS), help="comma-separated subset; must include full"
    )
    p.add_argument("--out-dir", default=str(_HERE / "results"))
    p.add_argument(
        "--report-only",
        metavar="JSON",
        help="re-analyse and re-render an existing train_plans.json into --out-dir (no training)",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    problems = []
    if args.hidden % args.heads:
        problems.append(f"--hidden {args.hidden} must be divisible by --heads {args.heads}")
    if args.heads % args.kv_heads:
        problems.append(f"--heads {args.heads} must be divisible by --kv-heads {args.kv_heads}")
    if args.steps < 1 or args.rounds < 1 or args.warmup < 0:
        problems.append("--steps and --rounds must be >= 1, --warmup >= 0")
    if problems:
        p.error("; ".join(problems))
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point: the driver, or (internally) one worker process."""
    args = parse_args(argv)
    if args.worker:
        if args.worker not in CONFIGS:
            raise SystemExit(
                f"--worker: unknown config {args.worker!r}; valid: {', '.join(CONFIGS)}."
            )
        result = run_worker(args)
        Path(args.result).write_text(json.dumps(result))
        return 0
    if args.report_only:
        return rerender(Path(args.report_only), Path(args.out_dir))
    return run_driver(args)


if __name__ == "__main__":
    sys.exit(main())
