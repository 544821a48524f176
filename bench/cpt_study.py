"""Benchmark: LayerTracer's controlled CPT trials in miniature, like for like, over seeds.

1. Pre-train one small Llama from scratch on the *old* domain: the bundled corpus's English
   documents plus its bilingual parallel file (so Chinese tokens are not unseen, as in a real
   English-centric base model that saw a little Chinese). One base per study.
2. Continue pre-training that base on the *new* domain, the Chinese documents, under seven
   plans, each an explicit plan string (layer ranges + embeddings / final norm / LM head) or a
   preset at its defaults: ``full``; ``freeze_deep`` (bottom half trains) and ``freeze_shallow``
   (top half trains), both with embeddings, final norm and LM head **frozen**; the same two with
   embeddings, final norm and head **trained** (``+emb/head``); ``hlpt`` and ``h2lpt`` at their
   preset defaults (paper form of the prefix). Same token budget, schedule and data order.
3. Learning rate per plan: each rate of ``--lrs`` is tried with the first seed and the one with
   the lowest new + old *validation* loss is kept; validation and test are disjoint halves of
   each domain's held-out blocks, and every reported number is on the test half.
4. Seeds (``--seeds``): each seed sets the CPT data order, the adapter initialisation and the
   data subset; every reported number is a mean with its spread over seeds.
5. Overfitting: ``full``, ``freeze_deep`` and ``freeze_shallow`` on 100 %, 25 % and 6.25 % of the
   new-domain training blocks, repeated to the same step budget; the gap is test loss minus the
   loss on the training blocks the run actually saw.
6. Hybrid models (LayerTracer's case study) with ``layerfreeze.diagnostics.compose``: the
   ``full``-CPT model's shallow half over the base's deep half and the reverse, non-layer weights
   from either model, next to the trained plans.
7. Verdicts on the papers' claims, computed from the numbers by criteria stated on the page.

Training path: ``layerfreeze.apply_plan`` + ``AppliedPlan.param_groups`` + ``torch.optim.AdamW``
(warm-up then cosine, gradient clipping 1.0), in this process: the recipe's optimizer set-up
without DeepSpeed, which would add nothing on one CPU process.

Held-out text: every 10th document of each file, never trained on; its packed blocks are split
into a validation half (the first blocks) and a test half (the rest). Losses are mean next-token
cross-entropy.

Run (default sized for <= 25 min wall on a shared 2-core machine, ~10 min of one core)::

    python bench/cpt_study.py                    # writes bench/results/cpt_study.*
    python bench/cpt_study.py --smoke            # < 3 min pipeline check, temporary directory only
    python bench/cpt_study.py --report-only      # re-render .md / .png from the JSON

Writes ``bench/results/cpt_study.json`` (every number), ``cpt_study.md`` (tables and verdicts)
and ``cpt_study_*.png`` atomically; commentary belongs in ``bench/README.md``.
"""

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

#: The trained plans, in report order. ``freeze_deep`` / ``freeze_shallow`` freeze embeddings,
#: final norm and LM head; the ``+emb/head`` rows train all three (see :func:`plan_spec`).
PLANS = (
    "full",
    "freeze_deep",
    "freeze_shallow",
    "freeze_deep+emb/head",
    "freeze_shallow+emb/head",
    "hlpt",
    "h2lpt",
)
#: Plans run on shrinking CPT data for the overfitting measure.
OVERFIT_PLANS = ("full", "freeze_deep", "freeze_shallow")


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
    pretrain_steps: int = 400
    pretrain_lr: float = 3e-3
    cpt_steps: int = 60
    lrs: list[float] = field(default_factory=lambda: [1e-4, 3e-4, 1e-3])
    weight_decay: float = 0.1
    warmup_frac: float = 0.05
    eval_blocks: int = 64
    probe_blocks: int = 16
    curve_points: int = 5
    threads: int = 1
    plans: list[str] = field(default_factory=lambda: list(PLANS))
    # Fields below are read by run_study only (prune_study never sets them).
    cpt_batch: int = 8
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    fractions: list[float] = field(default_factory=lambda: [1.0, 0.25, 0.0625])
    gap_blocks: int = 64
    curve_blocks: int = 16
    adapter_lrs: list[float] = field(default_factory=lambda: [3e-4, 1e-3, 3e-3])
    comparable_gain: float = 0.9
    far_fewer: float = 0.3
    smoke: bool = False


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


def _half(layers: int) -> int:
    """``b(0.5)``: the rounding rule of docs/plans.md (round half up) for half the layers."""
    return int(math.floor(layers / 2 + 0.5))


def plan_spec(name: str, layers: int) -> str:
    """The plan string a study row trains: explicit layer ranges and non-layer parts, or a preset.

    ``freeze_deep`` / ``freeze_shallow`` keep embeddings, final norm and LM head frozen so that
    the two allocations differ only in which half of the decoder trains; ``+emb/head`` trains
    all three for both. ``hlpt`` / ``h2lpt`` are the presets at their defaults.
    """
    h, last = _half(layers), layers - 1
    non_layer = {"": "freeze", "+emb/head": "full"}
    for stem, ranges in (
        ("freeze_deep", f"0-{h - 1}:full,{h}-{last}:freeze"),
        ("freeze_shallow", f"0-{h - 1}:freeze,{h}-{last}:full"),
    ):
        for suffix, pol in non_layer.items():
            if name == stem + suffix:
                return f"{ranges},embeddings:{pol},final_norm:{pol},lm_head:{pol}"
    if name == "full":
        return f"0-{last}:full,embeddings:full,final_norm:full,lm_head:full"
    if name in ("hlpt", "h2lpt"):
        return name
    raise ValueError(f"plan_spec: unknown plan {name!r}; valid: {', '.join(PLANS)}.")


def _plan(spec: str):
    from layerfreeze import LayerPlan

    return LayerPlan.from_preset(spec) if spec in ("hlpt", "h2lpt") else LayerPlan.parse(spec)


def allocation(summary) -> str:
    """The resolved allocation as ranges, e.g. ``0-3 full, 4-7 freeze; emb/norm/head freeze``."""
    runs: list[list] = []
    for r in summary.rows:
        if r["index"] is None:
            continue
        if runs and runs[-1][2] == r["policy"] and runs[-1][1] + 1 == r["index"]:
            runs[-1][1] = r["index"]
        else:
            runs.append([r["index"], r["index"], r["policy"]])
    parts = [f"{a}-{b} {p}" if a != b else f"{a} {p}" for a, b, p in runs]
    rest = {r["name"]: r["policy"] for r in summary.rows if r["index"] is None}
    tail = "/".join(rest.get(k, "?") for k in ("embeddings", "final_norm", "lm_head"))
    return ", ".join(parts) + f"; emb/norm/head {tail}"


def split_heldout(
    data: dict[str, dict[str, torch.Tensor]], cap: int
) -> dict[str, dict[str, torch.Tensor]]:
    """Validation / test halves of each domain's held-out blocks (``build_data``'s ``"val"``).

    The first half of the blocks is validation, the rest test (contiguous, so a document spans
    at most the one boundary block pair); each is capped at ``cap`` blocks.
    """
    out = {}
    for domain in ("old", "new"):
        held = data[domain]["val"]
        k = len(held) // 2
        out[domain] = {"val": held[:k][:cap], "test": held[k:][:cap]}
    return out


def seen_blocks(n_blocks: int, steps: int, batch: int, seed: int) -> list[int]:
    """The block indices :func:`train` draws with ``seed`` (its generator, replayed), sorted."""
    gen = torch.Generator().manual_seed(seed)
    seen: set[int] = set()
    for _ in range(steps):
        seen.update(torch.randint(n_blocks, (batch,), generator=gen).tolist())
    return sorted(seen)


def subset(blocks: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """A seeded random ``fraction`` of ``blocks`` (all of them at 1.0)."""
    if fraction >= 1.0:
        return blocks
    gen = torch.Generator().manual_seed(20_000 + seed)
    keep = torch.randperm(len(blocks), generator=gen)[: max(1, math.ceil(fraction * len(blocks)))]
    return blocks[keep.sort().values]


def stats(values: list[float]) -> dict[str, Any]:
    """Mean, sample std (0 for one value), min, max and the values themselves."""
    import statistics

    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
        "values": list(values),
    }


def cpt_run(
    base: torch.nn.Module,
    name: str,
    lr: float,
    seed: int,
    fraction: float,
    cfg: StudyConfig,
    new_train: torch.Tensor,
    splits: dict[str, dict[str, torch.Tensor]],
    base_test: dict[str, float],
    curves: bool = False,
) -> tuple[dict[str, Any], torch.nn.Module]:
    """One CPT run of plan ``name`` (``curves``: test losses during training); returns the model."""
    from dataclasses import replace

    from layerfreeze import apply_plan

    spec = plan_spec(name, cfg.layers)
    model = copy.deepcopy(base)
    torch.manual_seed(seed)  # adapter initialisation
    applied = apply_plan(model, _plan(spec))
    summary = applied.summary()
    blocks = subset(new_train, fraction, seed)
    ccfg = replace(cfg, batch=cfg.cpt_batch)
    data_seed = 10_000 + seed
    test = {d: splits[d]["test"] for d in ("old", "new")}
    res = train(
        model,
        applied.param_groups(lr=lr, weight_decay=cfg.weight_decay),
        blocks,
        cfg.cpt_steps,
        ccfg,
        seed=data_seed,
        evals={d: b[: cfg.curve_blocks] for d, b in test.items()} if curves else None,
    )
    model.eval()
    seen = seen_blocks(len(blocks), cfg.cpt_steps, cfg.cpt_batch, data_seed)
    step = max(1, len(seen) // cfg.gap_blocks)
    seen_eval = blocks[torch.tensor(seen[::step][: cfg.gap_blocks])]
    run: dict[str, Any] = {
        "plan": name,
        "spec": spec,
        "allocation": allocation(summary),
        "lr": lr,
        "seed": seed,
        "fraction": fraction,
        "train_blocks": len(blocks),
        "seen_blocks": len(seen),
        "trainable_params": summary.trainable_params,
        "total_params": summary.total_params,
        "val_new": eval_loss(model, splits["new"]["val"]),
        "val_old": eval_loss(model, splits["old"]["val"]),
        "test_new": eval_loss(model, test["new"]),
        "test_old": eval_loss(model, test["old"]),
        "train_seen": eval_loss(model, seen_eval),
        "base_seen": eval_loss(base, seen_eval),
        **{k: v for k, v in res.items() if k != "curve" or curves},
    }
    run["gain"] = base_test["new"] - run["test_new"]
    run["forgetting"] = run["test_old"] - base_test["old"]
    run["gap"] = run["test_new"] - run["train_seen"]
    # the base's own gap on the same blocks (they differ in difficulty from the test half);
    # what CPT opened is the difference
    run["gap_base"] = base_test["new"] - run["base_seen"]
    run["gap_opened"] = run["gap"] - run["gap_base"]
    return run, model


def add_trace(run: dict[str, Any], model: torch.nn.Module, probes, base_states) -> None:
    """Trace (angular distances, logit lens) and drift from the base, into ``run``."""
    run["trace"] = trace(model, probes)
    run["drift"] = {d: drift(base_states[d], model, b) for d, b in probes.items()}


def _save(model: torch.nn.Module, path: Path) -> str:
    model.save_pretrained(str(path))
    return str(path)


def hybrids(
    base_dir: str, cpt_dir: str, layers: int, work: Path, splits: dict[str, dict[str, torch.Tensor]]
) -> list[dict[str, Any]]:
    """LayerTracer's hybrid models from the base (B) and the full-CPT model (C), test losses."""
    from layerfreeze.diagnostics.compose import compose_checkpoints
    from layerfreeze.diagnostics.prune import load_causal_lm

    h, last = _half(layers), layers - 1
    out = []
    for label, layer_map in (
        ("CPT shallow + base deep", f"0-{h - 1}:C,{h}-{last}:B"),
        ("base shallow + CPT deep", f"0-{h - 1}:B,{h}-{last}:C"),
    ):
        for nonlayer in ("B", "C"):
            target = work / f"hybrid_{len(out)}"
            compose_checkpoints(
                nonlayer, {"B": base_dir, "C": cpt_dir}, layer_map, target, overwrite=True
            )
            model = load_causal_lm(target)
            out.append(
                {
                    "hybrid": label,
                    "layers": layer_map,
                    "non_layer_from": {"B": "base", "C": "CPT"}[nonlayer],
                    "test_new": eval_loss(model, splits["new"]["test"]),
                    "test_old": eval_loss(model, splits["old"]["test"]),
                }
            )
            del model
    return out


def lr_grid(cfg: StudyConfig | dict[str, Any], name: str) -> list[float]:
    """The learning rates tried for plan ``name``: ``adapter_lrs`` for hlpt / h2lpt, else ``lrs``.

    Adapter plans get a grid one step (x3) higher, as is usual for LoRA-style adapters against
    full-parameter training; both grids hold three rates.
    """
    get = cfg.get if isinstance(cfg, dict) else lambda k: getattr(cfg, k)
    return list((name in ("hlpt", "h2lpt") and get("adapter_lrs")) or get("lrs"))


def run_study(cfg: StudyConfig, work: Path, log) -> dict[str, Any]:
    torch.set_num_threads(cfg.threads)
    start, cpu0 = time.perf_counter(), time.process_time()
    loads = [os.getloadavg()[0]]
    tok, data, data_stats = build_data(cfg, work)
    splits = split_heldout(data, cfg.eval_blocks)
    data_stats["splits"] = {
        d: {k: int(v.shape[0]) for k, v in s.items()} | {"train": int(data[d]["train"].shape[0])}
        for d, s in splits.items()
    }
    log(f"data: {json.dumps(data_stats)}")
    test = {d: splits[d]["test"] for d in ("old", "new")}
    probes = {d: splits[d]["test"][: cfg.probe_blocks] for d in ("old", "new")}

    base = build_base(cfg, len(tok))
    old_train = torch.cat([data["old"]["train"], data["parallel"]["train"]])
    groups = [
        {
            "params": [p for p in base.parameters() if p.ndim >= 2],
            "weight_decay": cfg.weight_decay,
            "lr": cfg.pretrain_lr,
        },
        {
            "params": [p for p in base.parameters() if p.ndim < 2],
            "weight_decay": 0.0,
            "lr": cfg.pretrain_lr,
        },
    ]
    log(f"pre-training the base: {cfg.pretrain_steps} steps x {cfg.batch} x {cfg.seq_len} tokens")
    pre = train(base, groups, old_train, cfg.pretrain_steps, cfg, seed=cfg.seed + 1, evals=test)
    base.eval()
    base_test = {d: eval_loss(base, test[d]) for d in ("old", "new")}
    base_result = {
        "params": sum(p.numel() for p in base.parameters()),
        "pretrain": pre,
        "test_old": base_test["old"],
        "test_new": base_test["new"],
        "val_old": eval_loss(base, splits["old"]["val"]),
        "val_new": eval_loss(base, splits["new"]["val"]),
        "trace": trace(base, probes),
    }
    log(f"base: test old {base_test['old']:.3f} new {base_test['new']:.3f} ({pre['wall_s']:.0f} s)")
    base_states = {d: layer_inputs(base, b) for d, b in probes.items()}
    base_dir = _save(base, work / "base")
    new_train = data["new"]["train"]
    common = dict(cfg=cfg, new_train=new_train, splits=splits, base_test=base_test)

    def note(r: dict[str, Any]) -> None:
        loads.append(os.getloadavg()[0])
        log(
            f"{r['plan']:>24} lr {r['lr']:g} seed {r['seed']} data {r['fraction']:g}: "
            f"val {r['val_new']:.3f}+{r['val_old']:.3f} test new {r['test_new']:.3f} "
            f"old {r['test_old']:.3f} gap {r['gap']:+.3f} ({r['cpu_s']:.0f} CPU s)"
        )

    # 1. learning rate per plan, on the validation halves, first seed
    s0 = cfg.seeds[0]
    sweep, chosen, runs, full_dirs = [], {}, [], {}
    for name in cfg.plans:
        best = None
        for lr in lr_grid(cfg, name):
            r, model = cpt_run(base, name, lr, s0, 1.0, curves=True, **common)
            note(r)
            sweep.append(
                {
                    k: r[k]
                    for k in ("plan", "lr", "seed", "val_new", "val_old", "test_new", "test_old")
                }
            )
            if (
                best is None
                or r["val_new"] + r["val_old"] < best[0]["val_new"] + best[0]["val_old"]
            ):
                best = (r, model)
            del model
        chosen[name] = best[0]["lr"]
        add_trace(best[0], best[1], probes, base_states)
        runs.append(best[0])
        if name == "full":
            full_dirs[s0] = _save(best[1], work / f"full_{s0}")
        del best
    log(f"chosen learning rates: {chosen}")

    # 2. the other seeds at the chosen rate
    for name in cfg.plans:
        for seed in cfg.seeds[1:]:
            r, model = cpt_run(base, name, chosen[name], seed, 1.0, curves=True, **common)
            add_trace(r, model, probes, base_states)
            note(r)
            runs.append(r)
            if name == "full":
                full_dirs[seed] = _save(model, work / f"full_{seed}")
            del model

    # 3. overfitting: shrinking CPT data, same step budget, chosen rate
    for name in [p for p in OVERFIT_PLANS if p in cfg.plans]:
        for fraction in [f for f in cfg.fractions if f < 1.0]:
            for seed in cfg.seeds:
                r, model = cpt_run(base, name, chosen[name], seed, fraction, **common)
                note(r)
                runs.append(r)
                del model

    # 4. hybrid models
    hyb = []
    for seed, cdir in full_dirs.items():
        for h in hybrids(base_dir, cdir, cfg.layers, work / f"hyb_{seed}", splits):
            h["seed"] = seed
            h["gain"] = base_test["new"] - h["test_new"]
            h["forgetting"] = h["test_old"] - base_test["old"]
            hyb.append(h)
    loads.append(os.getloadavg()[0])
    return {
        "format": "layerfreeze-cpt-study/2",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": asdict(cfg),
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "threads": cfg.threads,
            "loadavg_start": loads[0],
            "loadavg_end": loads[-1],
            "loadavg_mean": sum(loads) / len(loads),
            "loadavg_max": max(loads),
            "total_wall_s": time.perf_counter() - start,
            "total_cpu_s": time.process_time() - cpu0,
        },
        "training_path": "layerfreeze.apply_plan + AppliedPlan.param_groups + torch.optim.AdamW "
        "(warm-up + cosine to 10%, clip 1.0), one process",
        "data": data_stats,
        "base": base_result,
        "chosen_lr": chosen,
        "lr_sweep": sweep,
        "runs": runs,
        "hybrids": hyb,
    }


# ------------------------------------------------------------------------------ report


def runs_of(result: dict[str, Any], plan: str, fraction: float = 1.0) -> list[dict[str, Any]]:
    """The runs of ``plan`` at its chosen learning rate and data ``fraction``, by seed."""
    lr = result["chosen_lr"][plan]
    rs = [
        r
        for r in result["runs"]
        if r["plan"] == plan and r["lr"] == lr and abs(r["fraction"] - fraction) < 1e-12
    ]
    return sorted(rs, key=lambda r: r["seed"])


def _vals(rs: list[dict[str, Any]], key: str) -> list[float]:
    if key == "sum":
        return [r["test_new"] + r["test_old"] for r in rs]
    return [r[key] for r in rs]


def _ms(values: list[float], fmt: str = ".3f", sign: bool = False) -> str:
    s = stats(values)
    f = ("+" if sign else "") + fmt
    return f"{s['mean']:{f}} ± {s['std']:{fmt}}"


def compare(a: list[float], b: list[float]) -> str:
    """A vs B where lower is better, paired by seed: ``better``, ``worse`` or ``not established``.

    A is ``better`` when its mean is lower by more than the larger of the two seed standard
    deviations *and* it is lower in every seed; ``worse`` symmetrically.
    """
    sa, sb = stats(a), stats(b)
    spread = max(sa["std"], sb["std"])
    diff = sb["mean"] - sa["mean"]
    if diff > spread and all(x < y for x, y in zip(a, b, strict=True)):
        return "better"
    if -diff > spread and all(x > y for x, y in zip(a, b, strict=True)):
        return "worse"
    return "not established"


def verdicts(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The papers' claims, each with the evidence and a verdict computed by stated criteria."""
    cfg = result["config"]
    have = set(cfg["plans"])
    out: list[dict[str, Any]] = []

    def pair(a: str, b: str) -> dict[str, str]:
        ra, rb = runs_of(result, a), runs_of(result, b)
        return {k: compare(_vals(ra, k), _vals(rb, k)) for k in ("test_new", "test_old", "sum")}

    def word(c: str) -> str:
        return {"better": "reproduces", "worse": "does not reproduce (the opposite holds)"}.get(
            c, "not established at this scale"
        )

    for a, b, claim in (
        (
            "freeze_deep",
            "full",
            "LayerTracer: after CPT, freezing the deep layers and training the "
            "shallow ones beats full-parameter CPT",
        ),
        ("freeze_deep+emb/head", "full", "the same, with embeddings and head trained"),
        (
            "freeze_deep",
            "freeze_shallow",
            "LayerTracer: ... and beats the opposite allocation (train deep, freeze shallow)",
        ),
        (
            "freeze_deep+emb/head",
            "freeze_shallow+emb/head",
            "the same, with embeddings and head trained in both",
        ),
    ):
        if {a, b} <= have:
            c = pair(a, b)
            out.append({"claim": claim, "a": a, "b": b, "outcomes": c, "verdict": word(c["sum"])})
    if "full" in have:
        full = runs_of(result, "full")
        full_gain = stats(_vals(full, "gain"))["mean"]
        full_tp = full[0]["trainable_params"]
        for name in ("hlpt", "h2lpt"):
            if name not in have:
                continue
            rs = runs_of(result, name)
            gain = stats(_vals(rs, "gain"))["mean"]
            ratio_p = rs[0]["trainable_params"] / full_tp
            ratio_g = gain / full_gain if full_gain > 0 else float("nan")
            fewer, comparable = ratio_p <= cfg["far_fewer"], ratio_g >= cfg["comparable_gain"]
            out.append(
                {
                    "claim": f"HLPT/H2LPT: {name} reaches quality comparable to full CPT with far "
                    "fewer trainable parameters",
                    "a": name,
                    "b": "full",
                    "outcomes": {
                        "trainable_ratio": ratio_p,
                        "gain_ratio": ratio_g,
                        "test_new": compare(_vals(rs, "test_new"), _vals(full, "test_new")),
                        "test_old": compare(_vals(rs, "test_old"), _vals(full, "test_old")),
                    },
                    "verdict": "reproduces"
                    if fewer and comparable
                    else (
                        "does not reproduce"
                        if fewer
                        else "not applicable (not far fewer parameters)"
                    ),
                }
            )
    fracs = sorted(f for f in cfg["fractions"] if f < 1.0)
    if fracs and "full" in have:
        small = fracs[0]
        for name in ("freeze_deep", "freeze_shallow"):
            if name not in have:
                continue

            c = compare(
                _vals(runs_of(result, name, small), "gap_opened"),
                _vals(runs_of(result, "full", small), "gap_opened"),
            )
            out.append(
                {
                    "claim": f"freezing half the layers ({name}) overfits less than full CPT when the "
                    f"CPT data shrinks (gap opened by CPT at {small:.2%} of the data)",
                    "a": name,
                    "b": "full",
                    "outcomes": {
                        "gap opened": c,
                        f"gap at {small:.2%}": compare(
                            _vals(runs_of(result, name, small), "gap"),
                            _vals(runs_of(result, "full", small), "gap"),
                        ),
                    },
                    "verdict": {
                        "better": "reproduces",
                        "worse": "does not reproduce (the opposite holds)",
                    }.get(c, "not established at this scale"),
                }
            )
    hy = result.get("hybrids") or []
    for src in ("base", "CPT"):
        a = sorted(
            (h for h in hy if h["hybrid"].startswith("CPT shallow") and h["non_layer_from"] == src),
            key=lambda h: h["seed"],
        )
        b = sorted(
            (
                h
                for h in hy
                if h["hybrid"].startswith("base shallow") and h["non_layer_from"] == src
            ),
            key=lambda h: h["seed"],
        )
        if a and b:
            c = compare(_vals(a, "test_new"), _vals(b, "test_new"))
            out.append(
                {
                    "claim": "hybrid (our reading of the LayerTracer premise: the new domain is learnt in "
                    f"the shallow layers): the CPT model's shallow half over the base's deep half keeps "
                    f"more new-domain gain than the reverse (non-layer weights from {src})",
                    "a": "CPT shallow + base deep",
                    "b": "base shallow + CPT deep",
                    "outcomes": {"test_new": c},
                    "verdict": {
                        "better": "consistent",
                        "worse": "inconsistent (the reverse keeps more)",
                    }.get(c, "not established"),
                }
            )
    return out


def render_markdown(result: dict[str, Any]) -> str:
    cfg, env, base = result["config"], result["environment"], result["base"]
    L = cfg["layers"]
    seeds = cfg["seeds"]
    split = result["data"]["splits"]
    all_lrs = sorted({lr for p in cfg["plans"] for lr in lr_grid(cfg, p)})
    lines = [
        "# CPT study in miniature, like for like (generated by `bench/cpt_study.py`; commentary in "
        "bench/README.md)",
        "",
        f"Run {result['date']}{' (SMOKE: tiny settings, numbers meaningless)' if cfg.get('smoke') else ''}; "
        f"torch {env['torch']}, {env['threads']} thread on {env['cpu_count']} shared CPUs, load average "
        f"{env['loadavg_start']:.1f} at start, {env['loadavg_mean']:.1f} mean, {env['loadavg_max']:.1f} max, "
        f"{env['loadavg_end']:.1f} at end; total {env['total_wall_s']:.0f} s wall, "
        f"{env['total_cpu_s']:.0f} s CPU.",
        "Budget: the default run is sized to take at most 25 min wall on the shared 2-core machine "
        "(about 10 min of one core alone), which fixes the model size, the step counts and the number of "
        "runs below.",
        f"Training path: {result['training_path']}.",
        "",
        f"Model: Llama, {L} layers, hidden {cfg['hidden']}, {cfg['heads']} heads ({cfg['kv_heads']} kv), "
        f"intermediate {cfg['intermediate']}, vocab {result['data']['tokenizer_vocab']}, "
        f"{base['params']:,} parameters, sequences of {cfg['seq_len']} tokens. **One base model** "
        f"(seed {cfg['seed']}): {cfg['pretrain_steps']} steps x {cfg['batch']} sequences on the old domain "
        f"(English + the bilingual parallel file), lr {cfg['pretrain_lr']:g}.",
        f"CPT on the new domain (Chinese, {split['new']['train']} training blocks): {cfg['cpt_steps']} steps x "
        f"{cfg['cpt_batch']} sequences ({cfg['cpt_steps'] * cfg['cpt_batch'] * cfg['seq_len']:,} tokens) for every "
        f"plan, seeds {seeds}; a seed sets the CPT data order, the adapter initialisation and the data subset.",
        "",
        "Held-out blocks (every 10th document, never trained on) are split per domain into a **validation** "
        f"half (old {split['old']['val']}, new {split['new']['val']} blocks) and a **test** half (old "
        f"{split['old']['test']}, new {split['new']['test']} blocks). The learning rate of each plan is the rate of "
        f"its grid ({cfg['lrs']}; adapter plans {cfg.get('adapter_lrs', cfg['lrs'])}, one step higher as is usual for "
        "adapters) with the lowest new + old *validation* loss (first seed); every other number is on the "
        "*test* half. Losses: mean next-token cross-entropy (nats). Gain = new-domain test loss of the base - "
        "after (higher is better); forgetting = old-domain test loss after - base (lower is better). "
        f"Every number is mean ± sample std over {len(seeds)} seeds (per-seed values in the JSON).",
        "",
        f"Base model (test): old-domain loss {base['test_old']:.4f}, new-domain loss {base['test_new']:.4f}.",
        "",
        "## Plans (allocation as resolved by `apply_plan`)",
        "",
        "| plan | plan string | allocation | trainable params | % of model | chosen lr |",
        "|---|---|---|---:|---:|---:|",
    ]
    for p in cfg["plans"]:
        r = runs_of(result, p)[0]
        lr = result["chosen_lr"][p]
        grid = lr_grid(cfg, p)
        edge = " (grid edge)" if lr in (min(grid), max(grid)) and len(grid) > 1 else ""
        spec = f"`{r['spec']}`" + (" (preset defaults)" if r["spec"] in ("hlpt", "h2lpt") else "")
        lines.append(
            f"| {p} | {spec} | {r['allocation']} | {r['trainable_params']:,} | "
            f"{100 * r['trainable_params'] / r['total_params']:.1f} | {lr:g}{edge} |"
        )
    lines += [
        "",
        "`hlpt` / `h2lpt` are the presets at their defaults, i.e. the paper form of the prefix (one softmax "
        "over prefix and real tokens, input-dependent gate on the prefix logits; docs/plans.md).",
        "",
        f"## Learning-rate selection (validation, seed {seeds[0]}): new + old validation loss",
        "",
        "| plan | " + " | ".join(f"lr {lr:g}" for lr in all_lrs) + " |",
        "|---|" + "---:|" * len(all_lrs),
    ]
    for p in cfg["plans"]:
        cells = []
        for lr in all_lrs:
            if lr not in lr_grid(cfg, p):
                cells.append("")
                continue
            s = [x for x in result["lr_sweep"] if x["plan"] == p and x["lr"] == lr]
            v = s[0]["val_new"] + s[0]["val_old"] if s else float("nan")
            cells.append(f"**{v:.3f}**" if lr == result["chosen_lr"][p] else f"{v:.3f}")
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Results at the chosen learning rate (test half, all CPT data)",
        "",
        "| plan | new after | gain | old after | forgetting | new + old | gain / forgetting | "
        "train CPU s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        f"| base | {base['test_new']:.3f} | - | {base['test_old']:.3f} | - | "
        f"{base['test_new'] + base['test_old']:.3f} | - | - |",
    ]
    for p in cfg["plans"]:
        rs = runs_of(result, p)
        g, f = stats(_vals(rs, "gain"))["mean"], stats(_vals(rs, "forgetting"))["mean"]
        ratio = f"{g / f:.2f}" if f > 1e-9 else "inf"
        lines.append(
            f"| {p} | {_ms(_vals(rs, 'test_new'))} | {_ms(_vals(rs, 'gain'), sign=True)} | "
            f"{_ms(_vals(rs, 'test_old'))} | {_ms(_vals(rs, 'forgetting'), sign=True)} | "
            f"{_ms(_vals(rs, 'sum'))} | {ratio} | {_ms(_vals(rs, 'cpu_s'), '.1f')} |"
        )
    hy = result.get("hybrids") or []
    if hy:
        lines += [
            "",
            "## Hybrid models (`layerfreeze.diagnostics.compose`), next to the trained plans",
            "",
            f"B = the base, C = the `full`-CPT model of the same seed; layers 0-{_half(L) - 1} are the shallow "
            f"half, {_half(L)}-{L - 1} the deep half. No training: the composed checkpoints are evaluated as "
            "they are. Retention = old-domain test loss (lower keeps more), gain as above.",
            "",
            "| model | layer map | embeddings, norm, head from | new after | gain | old after | forgetting |",
            "|---|---|---|---:|---:|---:|---:|",
        ]
        full = runs_of(result, "full")
        lines.append(
            f"| base (B) | all B | B | {base['test_new']:.3f} | - | {base['test_old']:.3f} | - |"
        )
        if full:
            lines.append(
                f"| full CPT (C) | all C | C | {_ms(_vals(full, 'test_new'))} | {_ms(_vals(full, 'gain'), sign=True)} | "
                f"{_ms(_vals(full, 'test_old'))} | {_ms(_vals(full, 'forgetting'), sign=True)} |"
            )
        keys = []
        for h in hy:
            k = (h["hybrid"], h["layers"], h["non_layer_from"])
            if k not in keys:
                keys.append(k)
        for k in keys:
            hs = sorted(
                (h for h in hy if (h["hybrid"], h["layers"], h["non_layer_from"]) == k),
                key=lambda h: h["seed"],
            )
            lines.append(
                f"| {k[0]} | `{k[1]}` | {k[2]} | {_ms(_vals(hs, 'test_new'))} | {_ms(_vals(hs, 'gain'), sign=True)} | "
                f"{_ms(_vals(hs, 'test_old'))} | {_ms(_vals(hs, 'forgetting'), sign=True)} |"
            )
    fracs = sorted(cfg["fractions"], reverse=True)
    oplans = [p for p in OVERFIT_PLANS if p in cfg["plans"]]
    if len(fracs) > 1 and oplans:
        lines += [
            "",
            "## Overfitting as the CPT data shrinks (same step budget, chosen learning rate)",
            "",
            "Train = loss on (up to "
            f"{cfg['gap_blocks']} of) the training blocks the run actually drew; gap = new-domain test loss - train "
            "loss; the base model has a gap of its own on the same blocks (they differ in difficulty from the test "
            "half), so **gap opened** = gap - the base's gap on those blocks is what CPT added. Epochs = sequences "
            "drawn / training blocks.",
            "",
            "| plan | data | blocks | epochs | train loss | new test loss | gap | gap opened | old test loss |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for p in oplans:
            for f in fracs:
                rs = runs_of(result, p, f)
                if not rs:
                    continue
                ep = cfg["cpt_steps"] * cfg["cpt_batch"] / rs[0]["train_blocks"]
                lines.append(
                    f"| {p} | {f:.2%} | {rs[0]['train_blocks']} | {ep:.1f} | {_ms(_vals(rs, 'train_seen'))} | "
                    f"{_ms(_vals(rs, 'test_new'))} | {_ms(_vals(rs, 'gap'), sign=True)} | "
                    f"{_ms(_vals(rs, 'gap_opened'), sign=True)} | {_ms(_vals(rs, 'test_old'))} |"
                )
    vs = verdicts(result)
    lines += [
        "",
        "## The papers' claims at this scale (verdicts computed from the numbers above)",
        "",
        "Criteria (ours): on a measure where lower is better, plan A **beats** plan B when A's mean is lower "
        "by more than the larger of the two seed standard deviations *and* A is lower in every seed (runs "
        "paired by seed: same data order). LayerTracer's claims are judged on new + old test loss (the "
        "objective the learning rate was chosen for), with the new-domain and old-domain outcomes listed. "
        f'HLPT/H2LPT\'s "comparable quality with far fewer trainable parameters": at most '
        f"{cfg['far_fewer']:.0%} of `full`'s trainable parameters and a mean gain of at least "
        f"{cfg['comparable_gain']:.0%} of `full`'s (the paper's results are on fine-tuning tasks, not CPT; "
        "this is the CPT reading). Overfitting: the gap opened by CPT at the smallest data "
        "fraction, paired by seed (a plan that learns less also opens less gap: read it with the train loss). Hybrids: a prediction "
        'we derive from the premise of `freeze_deep`, not a number the paper reports. "Not established" '
        f"means the {len(seeds)} seeds cannot separate the plans, not that they are equal.",
        "",
        "| claim | A vs B | outcomes (A's result) | verdict |",
        "|---|---|---|---|",
    ]
    for v in vs:
        oc = ", ".join(
            f"{k}: {x:.2f}" if isinstance(x, float) else f"{k}: {x}"
            for k, x in v["outcomes"].items()
        )
        lines.append(f"| {v['claim']} | {v['a']} vs {v['b']} | {oc} | **{v['verdict']}** |")
    lines += [
        "",
        "What this page does not test: LayerTracer's per-layer diagnostics on large models, benchmark "
        "accuracy (C-Eval, CMMLU, English suites) instead of held-out loss, billions of CPT tokens, or "
        "the memory saved by frozen layers. Deep-layer redundancy (small d(l, n) in the deep half) is the "
        "pruning paper's (Gromov et al.) observation, not LayerTracer's argument, and is not claimed here.",
    ]
    main = {p: runs_of(result, p) for p in cfg["plans"]}
    traced = {p: [r for r in rs if "trace" in r] for p, rs in main.items()}
    traced = {p: rs for p, rs in traced.items() if rs}
    if traced:
        worst = 0.0
        rows = []
        for p, rs in traced.items():
            cols = []
            for i in range(L):
                v = [r["trace"]["new"]["angular"]["mean"][i][0] for r in rs]
                worst = max(worst, stats(v)["std"])
                cols.append(stats(v)["mean"])
            rows.append((p, cols))
        lines += [
            "",
            "## Trace: angular distance across each layer, d(l, 1), new-domain test probe (mean over seeds)",
            "",
            "| model | " + " | ".join(f"L{i}" for i in range(L)) + " |",
            "|---|" + "---:|" * L,
            "| base | "
            + " | ".join(f"{base['trace']['new']['angular']['mean'][i][0]:.3f}" for i in range(L))
            + " |",
        ]
        lines += [f"| {p} | " + " | ".join(f"{v:.3f}" for v in cols) + " |" for p, cols in rows]
        dworst = 0.0
        drows = []
        for p, rs in traced.items():
            cells = []
            for j in range(L + 1):
                a = [r["drift"]["new"][j] for r in rs]
                b = [r["drift"]["old"][j] for r in rs]
                dworst = max(dworst, stats(a)["std"], stats(b)["std"])
                cells.append(f"{stats(a)['mean']:.3f} ({stats(b)['mean']:.3f})")
            drows.append(f"| {p} | " + " | ".join(cells) + " |")
        lines += [
            "",
            f"Largest seed std in this table: {worst:.3f}.",
            "",
            "## Drift from the base: angular distance between the base's and the CPT model's input of each layer",
            "",
            "Points 0..L-1 are the inputs of layers 0..L-1, point L the final-norm input; new-domain probe "
            f"(old-domain in parentheses), mean over seeds; largest seed std {dworst:.3f}.",
            "",
            "| plan | " + " | ".join(f"x{i}" for i in range(L + 1)) + " |",
            "|---|" + "---:|" * (L + 1),
            *drows,
        ]
    lines += [
        "",
        "Plots: `cpt_study_tradeoff.png`, `cpt_study_curves.png`, `cpt_study_overfit.png`, "
        "`cpt_study_angular.png`, `cpt_study_lens_drift.png`.",
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

    cfg, base = result["config"], result["base"]
    plans = cfg["plans"]
    L = cfg["layers"]
    colors = dict(zip(PLANS, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    main = {p: runs_of(result, p) for p in plans}
    out: dict[str, bytes] = {}

    fig, ax = plt.subplots(figsize=(7, 5))
    for p, rs in main.items():
        g, f = stats(_vals(rs, "gain")), stats(_vals(rs, "forgetting"))
        ax.errorbar(
            f["mean"],
            g["mean"],
            xerr=f["std"],
            yerr=g["std"],
            fmt="o",
            color=colors.get(p),
            label=f"{p} (lr {result['chosen_lr'][p]:g})",
            capsize=3,
        )
    hy = result.get("hybrids") or []
    for i, k in enumerate(sorted({(h["hybrid"], h["non_layer_from"]) for h in hy})):
        hs = [h for h in hy if (h["hybrid"], h["non_layer_from"]) == k]
        g, f = stats(_vals(hs, "gain")), stats(_vals(hs, "forgetting"))
        ax.errorbar(
            f["mean"],
            g["mean"],
            xerr=f["std"],
            yerr=g["std"],
            fmt="s",
            mfc="none",
            color=("tab:gray", "tab:olive", "tab:cyan", "black")[i % 4],
            capsize=3,
            label=f"hybrid: {k[0]} (non-layer {k[1]})",
        )
    ax.axvline(0, color="grey", lw=0.6)
    ax.axhline(0, color="grey", lw=0.6)
    ax.set_xlabel("forgetting: old-domain test loss after - base (nats)")
    ax.set_ylabel("gain: new-domain test loss base - after (nats)")
    ax.set_title(f"CPT trade-off, mean ± std over {len(cfg['seeds'])} seeds")
    ax.legend(fontsize=7)
    out["cpt_study_tradeoff.png"] = _png(fig)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for p, rs in main.items():
        rs = [r for r in rs if r.get("curve")]
        if not rs:
            continue
        steps = [c["step"] for c in rs[0]["curve"]]
        for ax, key in zip(axes, ("new", "old"), strict=True):
            ys = [[r["curve"][i][key] for r in rs] for i in range(len(steps))]
            mean = [stats(y)["mean"] for y in ys]
            ax.plot(steps, mean, marker=".", color=colors.get(p), label=p)
            ax.fill_between(
                steps, [min(y) for y in ys], [max(y) for y in ys], color=colors.get(p), alpha=0.15
            )
    for ax, title in zip(
        axes, ("new domain (Chinese) test loss", "old domain (English) test loss"), strict=True
    ):
        ax.set_xlabel("CPT step")
        ax.set_ylabel("loss (nats)")
        ax.set_title(
            title + f"\n(first {cfg['curve_blocks']} test blocks; mean, band min-max)", fontsize=9
        )
        ax.legend(fontsize=7)
    out["cpt_study_curves.png"] = _png(fig)
    plt.close(fig)

    oplans = [p for p in OVERFIT_PLANS if p in plans]
    fracs = sorted(cfg["fractions"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for p in oplans:
        xs, gaps, gstd, tr, te = [], [], [], [], []
        for f in fracs:
            rs = runs_of(result, p, f)
            if not rs:
                continue
            xs.append(100 * f)
            s = stats(_vals(rs, "gap_opened"))
            gaps.append(s["mean"])
            gstd.append(s["std"])
            tr.append(stats(_vals(rs, "train_seen"))["mean"])
            te.append(stats(_vals(rs, "test_new"))["mean"])
        axes[0].errorbar(xs, gaps, yerr=gstd, marker="o", color=colors.get(p), label=p, capsize=3)
        axes[1].plot(xs, tr, ls="--", marker=".", color=colors.get(p), label=f"{p} train")
        axes[1].plot(xs, te, ls="-", marker="o", color=colors.get(p), label=f"{p} test")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("% of the new-domain training blocks (same step budget)")
        ax.legend(fontsize=7)
    axes[0].set_title("gap opened by CPT (test - train, minus the base's), mean ± std", fontsize=9)
    axes[1].set_title("new-domain train (dashed) and test (solid) loss, mean", fontsize=9)
    axes[0].set_ylabel("nats")
    out["cpt_study_overfit.png"] = _png(fig)
    plt.close(fig)

    def mean_grid(traces: list[dict[str, Any]]) -> list[list[float]]:
        mean = traces[0]["new"]["angular"]["mean"]
        grid = [[float("nan")] * len(mean) for _ in range(len(mean))]
        for i, row in enumerate(mean):
            for n in range(1, len(row) + 1):
                grid[n - 1][i] = stats([t["new"]["angular"]["mean"][i][n - 1] for t in traces])[
                    "mean"
                ]
        return grid

    panels = [("base", [base["trace"]])] + [
        (p, [r["trace"] for r in rs if "trace" in r]) for p, rs in main.items()
    ]
    panels = [(label, ts) for label, ts in panels if ts]
    cols = 4
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(3.6 * cols, 3.2 * rows), squeeze=False, constrained_layout=True
    )
    im = None
    for ax, (label, ts) in zip(axes.flat, panels, strict=False):
        im = ax.imshow(
            mean_grid(ts), origin="lower", vmin=0, vmax=0.6, cmap="viridis", aspect="auto"
        )
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("layer l")
        ax.set_ylabel("block length n")
        ax.set_yticks(range(L), [str(n) for n in range(1, L + 1)])
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.8, label="d(l, n), new-domain probe, mean over seeds")
    out["cpt_study_angular.png"] = _png(fig)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(range(L), base["trace"]["new"]["lens_loss"], color="black", ls="--", label="base")
    for p, rs in main.items():
        rs = [r for r in rs if "trace" in r]
        if not rs:
            continue
        axes[0].plot(
            range(L),
            [stats([r["trace"]["new"]["lens_loss"][i] for r in rs])["mean"] for i in range(L)],
            marker=".",
            color=colors.get(p),
            label=p,
        )
        for ax, key in zip(axes[1:], ("new", "old"), strict=True):
            ax.plot(
                range(L + 1),
                [stats([r["drift"][key][j] for r in rs])["mean"] for j in range(L + 1)],
                marker=".",
                color=colors.get(p),
                label=p,
            )
    axes[0].set_title("logit lens: new-domain loss of each layer's output (mean)")
    axes[0].set_xlabel("layer")
    axes[0].set_ylabel("loss (nats)")
    for ax, key in zip(axes[1:], ("new", "old"), strict=True):
        ax.set_title(f"drift from the base ({key}-domain probe, mean)")
        ax.set_xlabel("residual point (input of layer i; L = final-norm input)")
        ax.set_ylabel("angular distance to the base")
    for ax in axes:
        ax.legend(fontsize=7)
    out["cpt_study_lens_drift.png"] = _png(fig)
    plt.close(fig)
    return out


def write_outputs(result: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "cpt_study.json", result)
    atomic_write_text(out_dir / "cpt_study.md", render_markdown(result))
    for name, data in render_plots(result).items():
        atomic_write_bytes(out_dir / name, data)


#: ``--smoke``: every stage on a tiny model, minutes of CPU at most.
SMOKE = dict(
    hidden=32,
    layers=4,
    heads=4,
    kv_heads=2,
    intermediate=64,
    pretrain_steps=20,
    cpt_steps=4,
    lrs=[1e-3, 3e-3],
    adapter_lrs=[3e-3, 1e-2],
    seeds=[0, 1],
    eval_blocks=16,
    probe_blocks=4,
    gap_blocks=8,
    curve_blocks=8,
    curve_points=2,
)


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(
            f"cpt_study: {what}: expected comma-separated numbers, got {text!r}."
        ) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = StudyConfig()
    parser.add_argument("--pretrain-steps", type=int, default=d.pretrain_steps)
    parser.add_argument("--cpt-steps", type=int, default=d.cpt_steps)
    parser.add_argument(
        "--lrs", default=",".join(f"{x:g}" for x in d.lrs), help="CPT learning rates"
    )
    parser.add_argument(
        "--adapter-lrs",
        default=",".join(f"{x:g}" for x in d.adapter_lrs),
        help="CPT learning rates of hlpt / h2lpt",
    )
    parser.add_argument("--seeds", default=",".join(str(s) for s in d.seeds), help="CPT seeds")
    parser.add_argument(
        "--fractions",
        default=",".join(f"{x:g}" for x in d.fractions),
        help="fractions of the new-domain training blocks (overfitting measure)",
    )
    parser.add_argument("--plans", default=",".join(d.plans))
    parser.add_argument("--layers", type=int, default=d.layers)
    parser.add_argument("--hidden", type=int, default=d.hidden)
    parser.add_argument("--threads", type=int, default=d.threads)
    parser.add_argument("--seed", type=int, default=d.seed, help="base model seed")
    parser.add_argument("--out-dir", default=str(_HERE / "results"))
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny settings, writes to a temporary directory (never bench/results)",
    )
    parser.add_argument("--report-only", action="store_true", help="re-render from the JSON")
    args = parser.parse_args(argv)
    out_dir = Path(args.out_dir)
    if args.report_only:
        path = out_dir / "cpt_study.json"
        if not path.is_file():
            print(f"cpt_study: --report-only: no {path}; run the study first.", file=sys.stderr)
            return 2
        write_outputs(json.loads(path.read_text(encoding="utf-8")), out_dir)
        return 0
    plans = [p.strip() for p in args.plans.split(",") if p.strip()]
    unknown = [p for p in plans if p not in PLANS]
    if unknown:
        parser.error(f"--plans: unknown {unknown}; valid: {', '.join(PLANS)}")
    seeds = [int(x) for x in _floats(args.seeds, "--seeds")]
    fractions = _floats(args.fractions, "--fractions")
    if not seeds or len(set(seeds)) != len(seeds):
        parser.error(f"--seeds: give distinct seeds, got {args.seeds!r}")
    if not all(0 < f <= 1 for f in fractions) or 1.0 not in fractions:
        parser.error(f"--fractions: values in (0, 1] including 1, got {args.fractions!r}")
    if args.smoke:
        cfg = StudyConfig(
            seed=args.seed,
            threads=args.threads,
            plans=plans,
            fractions=[1.0, 0.25]
            if args.fractions == parser.get_default("fractions")
            else fractions,
            smoke=True,
            **SMOKE,
        )
    else:
        cfg = StudyConfig(
            seed=args.seed,
            layers=args.layers,
            hidden=args.hidden,
            pretrain_steps=args.pretrain_steps,
            cpt_steps=args.cpt_steps,
            threads=args.threads,
            lrs=_floats(args.lrs, "--lrs"),
            adapter_lrs=_floats(args.adapter_lrs, "--adapter-lrs"),
            seeds=seeds,
            fractions=fractions,
            plans=plans,
        )
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="lf_cpt_study_") as work:
        result = run_study(cfg, Path(work), log)
        if args.smoke:
            out_dir = Path(work) / "results"
            write_outputs(result, out_dir)
            print(render_markdown(result))
            log(
                f"smoke: wrote {sorted(p.name for p in out_dir.iterdir())} to a temporary directory"
            )
            return 0
    write_outputs(result, out_dir)
    log(f"wrote {out_dir / 'cpt_study.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
