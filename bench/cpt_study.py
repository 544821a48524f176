"""Benchmark: LayerTracer's controlled CPT trials in miniature (base model, then five plans).

1. Pre-train a small Llama from scratch on the *old* domain: the bundled corpus's English
   documents plus its bilingual parallel file (so Chinese tokens are not unseen, as in a real
   English-centric base model that saw a little Chinese).
2. Continue pre-training that base on the *new* domain, the Chinese documents, under ``full``,
   ``freeze_deep``, ``freeze_shallow``, ``hlpt`` and ``h2lpt`` (preset defaults) with the same
   token budget, data order, schedule and seed, at each learning rate of ``--lrs``.
3. Report new-domain loss gained, old-domain loss lost (forgetting), trainable parameters and
   time, and the trace before and after: angular distances ``d(l, n)`` between layer inputs and
   the logit lens per layer (``layerfreeze.diagnostics.trace.run_trace``) on held-out text of
   each domain, plus each layer's representation drift from the base model.

Training path: ``layerfreeze.apply_plan`` + ``AppliedPlan.param_groups`` + ``torch.optim.AdamW``
(warm-up then cosine, gradient clipping 1.0), in this process. This is the recipe's optimizer
set-up without DeepSpeed, which would add nothing on one CPU process.

Held-out text: every 10th document of each file; never trained on. Losses are mean next-token
cross-entropy over fixed held-out blocks.

Run (defaults: one thread, ~5 min of CPU time; longer in wall time when the cores are shared)::

    python bench/cpt_study.py
    python bench/cpt_study.py --cpt-steps 600 --lrs 3e-4,1e-3,3e-3
    python bench/cpt_study.py --report-only      # re-render .md / .png from the JSON

Writes ``bench/results/cpt_study.json`` (every number), ``cpt_study.md`` (tables) and
``cpt_study_*.png`` atomically; commentary belongs in ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import io
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
if str(_HERE.parent) not in sys.path:  # run from a checkout without installing layerfreeze
    sys.path.insert(0, str(_HERE.parent))

import torch  # noqa: E402

from layerfreeze.utils.io import atomic_write_bytes, atomic_write_json, atomic_write_text  # noqa: E402

PLANS = ("full", "freeze_deep", "freeze_shallow", "hlpt", "h2lpt")


@dataclass
class StudyConfig:
    """Every knob of the study (recorded in the JSON)."""

    seed: int = 0
    vocab_size: int = 1000
    hidden: int = 64
    layers: int = 8
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 176
    seq_len: int = 64
    batch: int = 16
    pretrain_steps: int = 500
    pretrain_lr: float = 3e-3
    cpt_steps: int = 200
    lrs: list[float] = field(default_factory=lambda: [1e-3, 3e-3, 1e-2])
    weight_decay: float = 0.1
    warmup_frac: float = 0.05
    eval_blocks: int = 48
    probe_blocks: int = 16
    curve_points: int = 5
    threads: int = 1
    plans: list[str] = field(default_factory=lambda: list(PLANS))


# ------------------------------------------------------------------------------ data


def build_data(
    cfg: StudyConfig, work: Path
) -> tuple[Any, dict[str, dict[str, torch.Tensor]], dict]:
    """Tokenizer + packed blocks: ``{"old"|"new"|"parallel": {"train"|"val": (n, seq_len)}}``."""
    from layerfreeze.data import train_tokenizer
    from layerfreeze.data.corpus import default_corpus_files, iter_documents
    from layerfreeze.data.tokenizer import load_tokenizer

    files = {p.name: p for p in default_corpus_files()}
    tok_dir = train_tokenizer(
        [files["en.txt"], files["zh.txt"], files["mixed.jsonl"]],
        work / "tokenizer",
        vocab_size=cfg.vocab_size,
        character_coverage=1.0,
        seed=cfg.seed,
    )
    tok = load_tokenizer(str(tok_dir))
    eos = tok.eos_token_id
    data: dict[str, dict[str, torch.Tensor]] = {}
    stats: dict[str, Any] = {}
    for domain, name in (("old", "en.txt"), ("new", "zh.txt"), ("parallel", "mixed.jsonl")):
        docs = list(iter_documents(files[name]))
        parts: dict[str, list[int]] = {"train": [], "val": []}
        for i, doc in enumerate(docs):
            ids = tok(doc, add_special_tokens=True)["input_ids"] + [eos]
            parts["val" if i % 10 == 9 else "train"].extend(ids)
        data[domain] = {}
        for split, ids in parts.items():
            n = len(ids) // cfg.seq_len
            data[domain][split] = torch.tensor(ids[: n * cfg.seq_len]).view(n, cfg.seq_len)
        stats[domain] = {
            "file": name,
            "documents": len(docs),
            "train_tokens": int(data[domain]["train"].numel()),
            "val_tokens": int(data[domain]["val"].numel()),
        }
    return tok, data, {"tokenizer_vocab": len(tok), "domains": stats}


# ------------------------------------------------------------------------------ training


def build_base(cfg: StudyConfig, vocab: int) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    mc = LlamaConfig(
        hidden_size=cfg.hidden,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        intermediate_size=cfg.intermediate,
        vocab_size=vocab,
        max_position_embeddings=cfg.seq_len,
        tie_word_embeddings=False,
    )
    torch.manual_seed(cfg.seed)
    return AutoModelForCausalLM.from_config(mc, attn_implementation="sdpa")


@torch.no_grad()
def eval_loss(model: torch.nn.Module, blocks: torch.Tensor, batch: int = 16) -> float:
    """Mean next-token cross-entropy over ``blocks`` (every block the same length)."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch):
        x = blocks[i : i + batch]
        loss = model(input_ids=x, labels=x).loss
        n = x.shape[0] * (x.shape[1] - 1)
        total += float(loss) * n
        count += n
    model.train(was)
    return total / count


def train(
    model: torch.nn.Module,
    groups: list[dict],
    blocks: torch.Tensor,
    steps: int,
    cfg: StudyConfig,
    seed: int,
    evals: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """AdamW with linear warm-up and cosine decay to 10 %; fixed, seeded batch order."""
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.95), eps=1e-8)
    warm = max(1, int(cfg.warmup_frac * steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, steps - warm)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    params = [p for g in groups for p in g["params"]]
    gen = torch.Generator().manual_seed(seed)
    marks = {round(steps * k / cfg.curve_points) for k in range(1, cfg.curve_points + 1)}
    curve: list[dict[str, float]] = []
    if evals:
        curve.append({"step": 0, **{k: eval_loss(model, v) for k, v in evals.items()}})
    losses = []
    model.train()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    eval_wall = eval_cpu = 0.0  # held-out evaluations are not training time
    for step in range(steps):
        x = blocks[torch.randint(len(blocks), (cfg.batch,), generator=gen)]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if evals and step + 1 in marks:
            t, c = time.perf_counter(), time.process_time()
            curve.append({"step": step + 1, **{k: eval_loss(model, v) for k, v in evals.items()}})
            eval_wall += time.perf_counter() - t
            eval_cpu += time.process_time() - c
    return {
        "train_loss_first": losses[0],
        "train_loss_last10": sum(losses[-10:]) / len(losses[-10:]),
        "wall_s": time.perf_counter() - wall0 - eval_wall,
        "cpu_s": time.process_time() - cpu0 - eval_cpu,
        "curve": curve,
    }


# ------------------------------------------------------------------------------ traces


def _probe(blocks: torch.Tensor, batch: int = 8):
    from layerfreeze.diagnostics.probe import ProbeBatch, ProbeSet

    return ProbeSet(
        kind="text",
        batches=[
            ProbeBatch(blocks[i : i + batch], torch.ones_like(blocks[i : i + batch]))
            for i in range(0, len(blocks), batch)
        ],
    )


def trace(model: torch.nn.Module, probes: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Angular distances and logit lens per probe domain (the trace engineer's ``run_trace``)."""
    from layerfreeze.diagnostics.trace import TraceSettings, run_trace

    out = {}
    for domain, blocks in probes.items():
        r = run_trace(model, _probe(blocks), TraceSettings(measures=("angular", "logit_lens")))
        lens = r["logit_lens"]
        out[domain] = {
            "angular": r["representation"]["angular"],
            "lens_loss": lens["loss"],
            "lens_embeddings_loss": lens["embeddings_loss"],
            "lens_accuracy": lens["accuracy"],
            "converged_layer": lens["converged_layer"],
        }
    return out


@torch.no_grad()
def layer_inputs(model: torch.nn.Module, blocks: torch.Tensor) -> list[torch.Tensor]:
    """Every layer's input (and the final-norm input) on ``blocks``: ``P x (tokens, hidden)``."""
    from layerfreeze.diagnostics.angular import LayerInputRecorder

    model.eval()
    with LayerInputRecorder(model) as rec:
        model(input_ids=blocks)
        return [s.reshape(-1, s.shape[-1]).float() for s in rec.take()]


def drift(
    base_states: list[torch.Tensor], model: torch.nn.Module, blocks: torch.Tensor
) -> list[float]:
    """Per point, the mean angular distance between the base's and ``model``'s residual stream."""
    from layerfreeze.diagnostics.angular import angular_distance

    return [
        float(angular_distance(a, b).mean())
        for a, b in zip(base_states, layer_inputs(model, blocks), strict=True)
    ]


# ------------------------------------------------------------------------------ the study


def run_study(cfg: StudyConfig, work: Path, log) -> dict[str, Any]:
    from layerfreeze import LayerPlan, apply_plan

    torch.set_num_threads(cfg.threads)
    start, load0 = time.perf_counter(), os.getloadavg()[0]
    tok, data, data_stats = build_data(cfg, work)
    log(f"data: {json.dumps(data_stats)}")
    evals = {d: data[d]["val"][: cfg.eval_blocks] for d in ("old", "new")}
    probes = {d: data[d]["val"][: cfg.probe_blocks] for d in ("old", "new")}

    base = build_base(cfg, len(tok))
    old_train = torch.cat([data["old"]["train"], data["parallel"]["train"]])
    groups = [
        {
            "params": [p for n, p in base.named_parameters() if p.ndim >= 2],
            "weight_decay": cfg.weight_decay,
            "lr": cfg.pretrain_lr,
        },
        {
            "params": [p for n, p in base.named_parameters() if p.ndim < 2],
            "weight_decay": 0.0,
            "lr": cfg.pretrain_lr,
        },
    ]
    log(f"pre-training the base: {cfg.pretrain_steps} steps x {cfg.batch} x {cfg.seq_len} tokens")
    pre = train(base, groups, old_train, cfg.pretrain_steps, cfg, seed=cfg.seed + 1, evals=evals)
    base.eval()
    base_result = {
        "params": sum(p.numel() for p in base.parameters()),
        "pretrain": pre,
        "old_loss": eval_loss(base, evals["old"]),
        "new_loss": eval_loss(base, evals["new"]),
        "trace": trace(base, probes),
    }
    log(
        f"base: old {base_result['old_loss']:.3f} new {base_result['new_loss']:.3f} "
        f"({pre['wall_s']:.0f} s)"
    )
    base_states = {d: layer_inputs(base, b) for d, b in probes.items()}

    runs = []
    for lr in cfg.lrs:
        for name in cfg.plans:
            model = copy.deepcopy(base)
            applied = apply_plan(model, LayerPlan.from_preset(name))
            summary = applied.summary()
            res = train(
                model,
                applied.param_groups(lr=lr, weight_decay=cfg.weight_decay),
                data["new"]["train"],
                cfg.cpt_steps,
                cfg,
                seed=cfg.seed + 2,
                evals=evals,
            )
            model.eval()
            old_after, new_after = eval_loss(model, evals["old"]), eval_loss(model, evals["new"])
            run = {
                "plan": name,
                "lr": lr,
                "trainable_params": summary.trainable_params,
                "total_params": summary.total_params,
                "trainable_layers": [
                    r["index"]
                    for r in summary.rows
                    if r["index"] is not None and r["trainable_params"]
                ],
                "policies": [r["policy"] for r in summary.rows if r["index"] is not None],
                "new_before": base_result["new_loss"],
                "new_after": new_after,
                "gain": base_result["new_loss"] - new_after,
                "old_before": base_result["old_loss"],
                "old_after": old_after,
                "forgetting": old_after - base_result["old_loss"],
                "tokens": cfg.cpt_steps * cfg.batch * cfg.seq_len,
                **res,
                "trace": trace(model, probes),
                "drift": {d: drift(base_states[d], model, b) for d, b in probes.items()},
            }
            runs.append(run)
            log(
                f"{name:>15} lr {lr:g}: new {new_after:.3f} (gain {run['gain']:+.3f}) old {old_after:.3f} "
                f"(forgetting {run['forgetting']:+.3f}) trainable {run['trainable_params']} "
                f"{res['wall_s']:.0f} s"
            )
            del model, applied
    return {
        "format": "layerfreeze-cpt-study/1",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": asdict(cfg),
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "threads": cfg.threads,
            "loadavg_start": load0,
            "loadavg_end": os.getloadavg()[0],
            "total_wall_s": time.perf_counter() - start,
        },
        "training_path": "layerfreeze.apply_plan + AppliedPlan.param_groups + torch.optim.AdamW "
        "(warm-up + cosine to 10%, clip 1.0), one process",
        "data": data_stats,
        "base": base_result,
        "runs": runs,
    }


# ------------------------------------------------------------------------------ report


def best_runs(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per plan, the learning rate with the lowest sum of new- and old-domain loss after CPT.

    Equal weight on learning the new domain and keeping the old one; picking the lowest
    new-domain loss alone would always pick the most aggressive rate, whatever it forgets.
    """
    best: dict[str, dict] = {}
    for r in result["runs"]:
        score = r["new_after"] + r["old_after"]
        if (
            r["plan"] not in best
            or score < best[r["plan"]]["new_after"] + best[r["plan"]]["old_after"]
        ):
            best[r["plan"]] = r
    return [best[p] for p in result["config"]["plans"] if p in best]


def render_markdown(result: dict[str, Any]) -> str:
    cfg, env, base = result["config"], result["environment"], result["base"]
    L = cfg["layers"]
    lines = [
        "# CPT study in miniature (generated by `bench/cpt_study.py`; commentary in bench/README.md)",
        "",
        f"Run {result['date']}; torch {env['torch']}, {env['threads']} threads on {env['cpu_count']} CPUs, "
        f"load average {env['loadavg_start']:.1f} -> {env['loadavg_end']:.1f}, total {env['total_wall_s']:.0f} s.",
        f"Training path: {result['training_path']}.",
        "",
        f"Model: Llama, {L} layers, hidden {cfg['hidden']}, {cfg['heads']} heads ({cfg['kv_heads']} kv), "
        f"intermediate {cfg['intermediate']}, vocab {result['data']['tokenizer_vocab']}, "
        f"{base['params']:,} parameters. Sequences of {cfg['seq_len']} tokens, batch {cfg['batch']}.",
        f"Base: {cfg['pretrain_steps']} steps on the old domain (English + the bilingual parallel file), "
        f"lr {cfg['pretrain_lr']:g}. CPT: {cfg['cpt_steps']} steps "
        f"({cfg['cpt_steps'] * cfg['batch'] * cfg['seq_len']:,} tokens) on the new domain (Chinese), same "
        f"data order for every plan, seed {cfg['seed']}.",
        "",
        "Losses: mean next-token cross-entropy (nats) on held-out blocks "
        f"({cfg['eval_blocks']} x {cfg['seq_len']} tokens per domain). Gain = new-domain loss before - after "
        "(higher is better); forgetting = old-domain loss after - before (lower is better).",
        "",
        f"Base model: old-domain loss {base['old_loss']:.4f}, new-domain loss {base['new_loss']:.4f}.",
        "",
        "## Every run",
        "",
        "| plan | lr | trainable params | % of model | new after | gain | old after | forgetting | "
        "train wall s | train CPU s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["runs"]:
        lines.append(
            f"| {r['plan']} | {r['lr']:g} | {r['trainable_params']:,} | "
            f"{100 * r['trainable_params'] / r['total_params']:.1f} | {r['new_after']:.4f} | {r['gain']:+.4f} | "
            f"{r['old_after']:.4f} | {r['forgetting']:+.4f} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} |"
        )
    best = best_runs(result)
    lines += [
        "",
        "## Best learning rate per plan (lowest new + old loss after CPT, chosen on the reported "
        "held-out sets)",
        "",
        "| plan | lr | trainable | gain | forgetting | gain / forgetting | lens loss at the last layer, new (old) | "
        "converged layer new (old) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    bt = base["trace"]
    lines.append(
        f"| base | - | - | - | - | - | {bt['new']['lens_loss'][-1]:.3f} ({bt['old']['lens_loss'][-1]:.3f}) | "
        f"{bt['new']['converged_layer']} ({bt['old']['converged_layer']}) |"
    )
    for r in best:
        ratio = r["gain"] / r["forgetting"] if r["forgetting"] > 1e-9 else float("inf")
        t = r["trace"]
        lines.append(
            f"| {r['plan']} | {r['lr']:g} | {r['trainable_params']:,} | {r['gain']:+.4f} | {r['forgetting']:+.4f} | "
            f"{ratio:.2f} | {t['new']['lens_loss'][-1]:.3f} ({t['old']['lens_loss'][-1]:.3f}) | "
            f"{t['new']['converged_layer']} ({t['old']['converged_layer']}) |"
        )
    lines += [
        "",
        "## Trace: angular distance across each layer, d(l, 1), on the new-domain probe",
        "",
        "| model | " + " | ".join(f"L{i}" for i in range(L)) + " |",
        "|---|" + "---:|" * L,
    ]
    for label, tr in [("base", base["trace"])] + [
        (f"{r['plan']} (lr {r['lr']:g})", r["trace"]) for r in best
    ]:
        row = [tr["new"]["angular"]["mean"][i][0] for i in range(L)]
        lines.append(f"| {label} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
    lines += [
        "",
        "## Drift from the base: angular distance between the base's and the CPT model's input of each layer",
        "",
        "Points 0..L-1 are the inputs of layers 0..L-1, point L the final-norm input. New-domain probe (old-domain in "
        "parentheses).",
        "",
        "| plan | " + " | ".join(f"x{i}" for i in range(L + 1)) + " |",
        "|---|" + "---:|" * (L + 1),
    ]
    for r in best:
        lines.append(
            f"| {r['plan']} | "
            + " | ".join(
                f"{a:.3f} ({b:.3f})"
                for a, b in zip(r["drift"]["new"], r["drift"]["old"], strict=True)
            )
            + " |"
        )
    lines += [
        "",
        "Plots: `cpt_study_tradeoff.png`, `cpt_study_curves.png`, `cpt_study_angular.png`, "
        "`cpt_study_lens_drift.png`.",
        "",
    ]
    return "\n".join(lines)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def render_plots(result: dict[str, Any]) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, bytes] = {}
    best = best_runs(result)
    base = result["base"]
    colors = dict(zip(PLANS, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for r in result["runs"]:
        marker = "o" if r in best else "x"
        ax.scatter(r["forgetting"], r["gain"], color=colors.get(r["plan"]), marker=marker, s=50)
        ax.annotate(
            f"{r['plan']} {r['lr']:g}",
            (r["forgetting"], r["gain"]),
            fontsize=7,
            xytext=(4, 3),
            textcoords="offset points",
        )
    ax.axvline(0, color="grey", lw=0.6)
    ax.set_xscale("symlog", linthresh=0.1)  # forgetting spans two orders of magnitude
    ax.set_xlabel("forgetting: old-domain loss after - before (nats, symlog)")
    ax.set_ylabel("gain: new-domain loss before - after (nats)")
    ax.set_title("CPT trade-off (o: lr with the lowest new + old loss, x: other lrs)")
    out["cpt_study_tradeoff.png"] = _png(fig)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in best:
        steps = [c["step"] for c in r["curve"]]
        for ax, key in zip(axes, ("new", "old"), strict=True):
            ax.plot(
                steps,
                [c[key] for c in r["curve"]],
                marker=".",
                color=colors.get(r["plan"]),
                label=f"{r['plan']} (lr {r['lr']:g})",
            )
    for ax, title in zip(
        axes,
        ("new domain (Chinese) held-out loss", "old domain (English) held-out loss"),
        strict=True,
    ):
        ax.set_xlabel("CPT step")
        ax.set_ylabel("loss (nats)")
        ax.set_title(title)
        ax.legend(fontsize=7)
    out["cpt_study_curves.png"] = _png(fig)
    plt.close(fig)

    panels = [("base", base["trace"])] + [
        (f"{r['plan']} (lr {r['lr']:g})", r["trace"]) for r in best
    ]
    cols = 3
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(4 * cols, 3.4 * rows), squeeze=False, constrained_layout=True
    )
    for ax, (label, tr) in zip(axes.flat, panels, strict=False):
        mean = tr["new"]["angular"]["mean"]
        p = len(mean) + 1
        grid = [[float("nan")] * (p - 1) for _ in range(p - 1)]
        for i, row in enumerate(mean):
            for n, v in enumerate(row, start=1):
                grid[n - 1][i] = v
        im = ax.imshow(grid, origin="lower", vmin=0, vmax=0.6, cmap="viridis", aspect="auto")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("layer l")
        ax.set_ylabel("block length n")
        ax.set_yticks(range(p - 1), [str(n) for n in range(1, p)])
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.colorbar(im, ax=axes, shrink=0.8, label="d(l, n) on the new-domain probe")
    out["cpt_study_angular.png"] = _png(fig)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    L = result["config"]["layers"]
    axes[0].plot(range(L), base["trace"]["new"]["lens_loss"], color="black", ls="--", label="base")
    for r in best:
        axes[0].plot(
            range(L),
            r["trace"]["new"]["lens_loss"],
            marker=".",
            color=colors.get(r["plan"]),
            label=r["plan"],
        )
        for ax, key in zip(axes[1:], ("new", "old"), strict=True):
            ax.plot(
                range(L + 1),
                r["drift"][key],
                marker=".",
                color=colors.get(r["plan"]),
                label=r["plan"],
            )
    axes[0].set_title("logit lens: new-domain loss of each layer's output")
    axes[0].set_xlabel("layer")
    axes[0].set_ylabel("loss (nats)")
    for ax, key in zip(axes[1:], ("new", "old"), strict=True):
        ax.set_title(f"drift from the base ({key}-domain probe)")
        ax.set_xlabel("residual point (input of layer i; L = final-norm input)")
        ax.set_ylabel("angular distance to the base")
    for ax in axes:
        ax.legend(fontsize=7)
    out["cpt_study_lens_drift.png"] = _png(fig)
    plt.close(fig)
    return out


def write_outputs(result: dict[str, Any], out_dir: Path) -> None:
    atomic_write_json(out_dir / "cpt_study.json", result)
    atomic_write_text(out_dir / "cpt_study.md", render_markdown(result))
    for name, data in render_plots(result).items():
        atomic_write_bytes(out_dir / name, data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = StudyConfig()
    parser.add_argument("--pretrain-steps", type=int, default=d.pretrain_steps)
    parser.add_argument("--cpt-steps", type=int, default=d.cpt_steps)
    parser.add_argument(
        "--lrs", default=",".join(f"{x:g}" for x in d.lrs), help="CPT learning rates"
    )
    parser.add_argument("--plans", default=",".join(d.plans))
    parser.add_argument("--layers", type=int, default=d.layers)
    parser.add_argument("--hidden", type=int, default=d.hidden)
    parser.add_argument("--batch", type=int, default=d.batch)
    parser.add_argument("--threads", type=int, default=d.threads)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--out-dir", default=str(_HERE / "results"))
    parser.add_argument("--report-only", action="store_true", help="re-render from the JSON")
    args = parser.parse_args(argv)
    out_dir = Path(args.out_dir)
    if args.report_only:
        result = json.loads((out_dir / "cpt_study.json").read_text(encoding="utf-8"))
        write_outputs(result, out_dir)
        return 0
    plans = [p.strip() for p in args.plans.split(",") if p.strip()]
    unknown = [p for p in plans if p not in PLANS]
    if unknown:
        parser.error(f"--plans: unknown {unknown}; valid: {', '.join(PLANS)}")
    cfg = StudyConfig(
        seed=args.seed,
        layers=args.layers,
        hidden=args.hidden,
        batch=args.batch,
        pretrain_steps=args.pretrain_steps,
        cpt_steps=args.cpt_steps,
        threads=args.threads,
        lrs=[float(x) for x in args.lrs.split(",") if x.strip()],
        plans=plans,
    )
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="lf_cpt_study_") as work:
        result = run_study(cfg, Path(work), log)
    write_outputs(result, out_dir)
    log(f"wrote {out_dir / 'cpt_study.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
