"""Benchmark: Gromov et al.'s layer pruning with healing, in miniature.

1. Pre-train a small Llama from scratch on the bundled corpus's English documents plus its
   bilingual file (``bench/cpt_study.py``'s data, base and training loop, imported from it).
2. Measure the angular distances ``d(l, n)`` between layer inputs on a probe set (training text,
   last token of each sequence, as the paper) and, for every block size ``n`` (the fraction of
   layers removed ``n / L``), remove ``n`` layers chosen two ways: ``angular`` (the block
   starting at ``l*(n) = argmin_l d(l, n)``) and ``deepest`` (the paper's baseline: the ``n``
   layers before the last one).
3. Heal each pruned model (``layerfreeze.diagnostics.heal.heal_model``: LoRA on every linear, the
   paper's QLoRA recipe) over a full-precision base and over a 4-bit NF4 base (bitsandbytes), with
   the same steps, data order and seed.
4. Report the held-out loss (English documents never trained on) unhealed / healed (fp, NF4) per
   ``n`` and strategy; ``l*(n)`` next to the loss-optimal start (every block tried, unhealed);
   and whether the paper's qualitative findings reproduce at this scale (criteria below).

The paper's criteria, made measurable here (our choices, stated in the report):

* *angular beats deepest*: the angular block's held-out loss is at most the deepest block's for
  most ``n`` (unhealed and healed), strictly lower for at least one.
* *sharp transition*: the paper sees QA accuracy stay flat and then collapse at a model-dependent
  fraction, while the healed loss grows smoothly. We have no QA task at this scale; we report
  the unhealed loss increments per added layer and call the transition sharp when the largest
  increment is at least 3x the median increment.

Run (the full study takes minutes to tens of minutes of CPU; the lead runs it)::

    python bench/prune_study.py                  # writes bench/results/prune_study.{json,md}
    python bench/prune_study.py --smoke          # < 2 min check of the pipeline; writes to a
                                                 # temporary directory, never bench/results/
    python bench/prune_study.py --report-only    # re-render the .md from the JSON
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
for _p in (_HERE.parent, _HERE):  # layerfreeze from this checkout; cpt_study beside this file
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import torch  # noqa: E402

from layerfreeze.utils.io import atomic_write_json, atomic_write_text  # noqa: E402

STRATEGIES = ("angular", "deepest")
QUANTIZE = ("none", "nf4")


@dataclass
class PruneStudyConfig:
    """Every knob of the study (recorded in the JSON)."""

    seed: int = 0
    vocab_size: int = 1000
    hidden: int = 128
    layers: int = 12
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 344
    seq_len: int = 64
    batch: int = 16
    pretrain_steps: int = 800
    pretrain_lr: float = 3e-3
    weight_decay: float = 0.1
    warmup_frac: float = 0.05
    heal_steps: int = 100
    heal_lr: float = 1e-3
    heal_batch: int = 8
    heal_rank: int = 8
    eval_blocks: int = 64
    probe_blocks: int = 32
    max_fraction: float = 0.75
    quantize: list[str] = field(default_factory=lambda: list(QUANTIZE))
    threads: int = 1


SMOKE = {
    "hidden": 32, "layers": 4, "heads": 2, "kv_heads": 1, "intermediate": 64, "seq_len": 32,
    "batch": 8, "pretrain_steps": 30, "heal_steps": 3, "heal_batch": 4, "eval_blocks": 8,
    "probe_blocks": 8,
}


def _cpt_config(cfg: PruneStudyConfig):
    """The cpt_study configuration its helpers read (data, base model, training loop)."""
    from cpt_study import StudyConfig

    return StudyConfig(
        seed=cfg.seed, vocab_size=cfg.vocab_size, hidden=cfg.hidden, layers=cfg.layers,
        heads=cfg.heads, kv_heads=cfg.kv_heads, intermediate=cfg.intermediate,
        seq_len=cfg.seq_len, batch=cfg.batch, pretrain_steps=cfg.pretrain_steps,
        pretrain_lr=cfg.pretrain_lr, weight_decay=cfg.weight_decay, warmup_frac=cfg.warmup_frac,
        threads=cfg.threads,
    )


def _probe_batches(blocks: torch.Tensor, batch: int = 8) -> list[dict[str, torch.Tensor]]:
    return [
        {"input_ids": blocks[i : i + batch], "attention_mask": torch.ones_like(blocks[i : i + batch])}
        for i in range(0, len(blocks), batch)
    ]


def _pruned(base: torch.nn.Module, start: int, n: int) -> torch.nn.Module:
    from layerfreeze.diagnostics.prune import remove_layers

    model = copy.deepcopy(base)
    remove_layers(model, start, n)
    return model.eval()


def run_study(cfg: PruneStudyConfig, work: Path, log) -> dict[str, Any]:
    from cpt_study import build_base, build_data, eval_loss, train

    from layerfreeze.diagnostics.angular import trace_angular
    from layerfreeze.diagnostics.heal import HealConfig, heal_model
    from layerfreeze.diagnostics.prune import choose_block

    torch.set_num_threads(cfg.threads)
    start, load0 = time.perf_counter(), os.getloadavg()[0]
    ccfg = _cpt_config(cfg)
    tok, data, data_stats = build_data(ccfg, work)
    heldout = data["old"]["val"][: cfg.eval_blocks]
    train_text = torch.cat([data["old"]["train"], data["parallel"]["train"]])
    probe = data["old"]["train"][: cfg.probe_blocks]

    base = build_base(ccfg, len(tok))
    groups = [
        {"params": [p for p in base.parameters() if p.ndim >= 2],
         "weight_decay": cfg.weight_decay, "lr": cfg.pretrain_lr},
        {"params": [p for p in base.parameters() if p.ndim < 2],
         "weight_decay": 0.0, "lr": cfg.pretrain_lr},
    ]
    log(f"pre-training the base: {cfg.pretrain_steps} steps x {cfg.batch} x {cfg.seq_len} tokens")
    pre = train(base, groups, train_text, cfg.pretrain_steps, ccfg, seed=cfg.seed + 1)
    base.eval()
    base_loss = eval_loss(base, heldout)
    log(f"base: held-out loss {base_loss:.4f} ({pre['wall_s']:.0f} s)")
    distances = trace_angular(base, _probe_batches(probe))

    L = cfg.layers
    ns = [n for n in range(1, L) if n / L <= cfg.max_fraction + 1e-9]
    rows = []
    for n in ns:
        # every block start, unhealed: the loss-optimal start next to the angular l*(n)
        by_start = [eval_loss(_pruned(base, s, n), heldout) for s in range(L - n + 1)]
        row: dict[str, Any] = {
            "n": n,
            "fraction": n / L,
            "scores": distances.block_scores(n, last_token=True),
            "loss_by_start": by_start,
            "loss_optimal_start": min(range(len(by_start)), key=by_start.__getitem__),
        }
        for strategy in STRATEGIES:
            choice = choose_block(L, n, strategy, distances, last_token=True)
            res: dict[str, Any] = {
                "start": choice.start, "distance": choice.distance,
                "unhealed": by_start[choice.start],
            }
            for q in cfg.quantize:
                model = _pruned(base, choice.start, n)
                hcfg = HealConfig(
                    plan=f"lora_all(r={cfg.heal_rank})", quantize=q, steps=cfg.heal_steps,
                    lr=cfg.heal_lr, batch_size=cfg.heal_batch, seq_len=cfg.seq_len,
                    seed=cfg.seed + 3,
                )
                _applied, rep = heal_model(model, data["old"]["train"], hcfg)
                res[f"healed_{q}"] = eval_loss(model, heldout)
                res[f"heal_{q}_s"] = rep.seconds
            row[strategy] = res
        row["l_star"] = row["angular"]["start"]
        log(
            f"n={n} ({n / L:.0%}): l*={row['l_star']} (loss-optimal {row['loss_optimal_start']}); "
            + "; ".join(
                f"{s} @{row[s]['start']} unhealed {row[s]['unhealed']:.3f} "
                + " ".join(f"{q} {row[s][f'healed_{q}']:.3f}" for q in cfg.quantize)
                for s in STRATEGIES
            )
        )
        rows.append(row)
    return {
        "config": asdict(cfg),
        "data": data_stats,
        "base": {"params": sum(p.numel() for p in base.parameters()), "heldout_loss": base_loss,
                 "pretrain": {k: v for k, v in pre.items() if k != "curve"}},
        "angular_distances": distances.to_dict(),
        "rows": rows,
        "findings": findings(rows, cfg.quantize),
        "machine": {
            "python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(), "threads": cfg.threads, "load_avg_start": load0,
            "load_avg_end": os.getloadavg()[0], "wall_s": round(time.perf_counter() - start, 1),
        },
    }


def findings(rows: list[dict[str, Any]], quantize: list[str]) -> dict[str, Any]:
    """The paper's qualitative claims, tested with the criteria in the module docstring."""
    out: dict[str, Any] = {}
    for key in ["unhealed", *(f"healed_{q}" for q in quantize)]:
        a = [r["angular"][key] for r in rows]
        d = [r["deepest"][key] for r in rows]
        wins = sum(x <= y for x, y in zip(a, d, strict=True))
        strict = sum(x < y for x, y in zip(a, d, strict=True))
        out[f"angular_beats_deepest_{key}"] = {
            "n_at_most": wins, "n_strictly": strict, "of": len(rows),
            "reproduced": wins * 2 > len(rows) and strict >= 1,
        }
    best = [min(r["angular"]["unhealed"], r["deepest"]["unhealed"]) for r in rows]
    steps = [b - a for a, b in zip(best, best[1:], strict=False)]
    if len(steps) >= 2:
        med = statistics.median(abs(s) for s in steps) or 1e-12
        i = max(range(len(steps)), key=steps.__getitem__)
        out["transition"] = {
            "increments": steps, "largest_at_n": rows[i + 1]["n"],
            "largest_over_median": steps[i] / med, "sharp": steps[i] >= 3 * med,
        }
    else:
        out["transition"] = {"increments": steps, "sharp": None}
    out["angular_start_is_loss_optimal"] = sum(
        r["l_star"] == r["loss_optimal_start"] for r in rows
    )
    if "nf4" in quantize and "none" in quantize:
        gaps = [r[s]["healed_nf4"] - r[s]["healed_none"] for r in rows for s in STRATEGIES]
        out["nf4_minus_fp_healed_loss"] = {"mean": statistics.mean(gaps), "max": max(gaps)}
    return out


def render_markdown(result: dict[str, Any]) -> str:
    cfg, rows, f = result["config"], result["rows"], result["findings"]
    qs = cfg["quantize"]
    lines = [
        "# Layer pruning with healing (Gromov et al.) in miniature",
        "",
        "Written by `bench/prune_study.py`; every number is in `prune_study.json`.",
        "",
        f"Base: Llama, {cfg['layers']} layers, hidden {cfg['hidden']}, "
        f"{result['base']['params']:,} parameters, pre-trained {cfg['pretrain_steps']} steps; "
        f"held-out loss {result['base']['heldout_loss']:.4f}. Healing: LoRA r={cfg['heal_rank']} "
        f"on every linear, {cfg['heal_steps']} steps, lr {cfg['heal_lr']:g}, base "
        f"{' / '.join(qs)}. Wall time {result['machine']['wall_s']:.0f} s "
        f"({result['machine']['threads']} thread(s), 1-min load average "
        f"{result['machine']['load_avg_start']:.1f} at the start and "
        f"{result['machine']['load_avg_end']:.1f} at the end; the wall time grows with the load).",
        "",
        "| n | fraction | l*(n) | loss-optimal start | angular unhealed | deepest unhealed | "
        + " | ".join(f"angular {q} | deepest {q}" for q in qs) + " |",
        "|---" * (6 + 2 * len(qs)) + "|",
    ]
    for r in rows:
        lines.append(
            f"| {r['n']} | {r['fraction']:.2f} | {r['l_star']} | {r['loss_optimal_start']} | "
            f"{r['angular']['unhealed']:.4f} | {r['deepest']['unhealed']:.4f} | "
            + " | ".join(
                f"{r['angular'][f'healed_{q}']:.4f} | {r['deepest'][f'healed_{q}']:.4f}" for q in qs
            ) + " |"
        )
    lines += ["", "## The paper's qualitative findings at this scale", ""]
    for key in ["unhealed", *(f"healed_{q}" for q in qs)]:
        v = f[f"angular_beats_deepest_{key}"]
        lines.append(
            f"- Angular beats deepest ({key}): {'reproduced' if v['reproduced'] else 'not reproduced'}"
            f" (angular <= deepest for {v['n_at_most']} of {v['of']} n, strictly lower for "
            f"{v['n_strictly']})."
        )
    t = f["transition"]
    if t.get("sharp") is None:
        lines.append("- Sharp transition: too few block sizes to tell.")
    else:
        lines.append(
            f"- Sharp transition (unhealed loss; the paper's is in QA accuracy): "
            f"{'reproduced' if t['sharp'] else 'not reproduced'} (largest increment at n="
            f"{t['largest_at_n']}, {t['largest_over_median']:.1f}x the median; criterion 3x)."
        )
    lines.append(
        f"- l*(n) equals the loss-optimal start for {f['angular_start_is_loss_optimal']} of "
        f"{len(rows)} n."
    )
    if "nf4_minus_fp_healed_loss" in f:
        g = f["nf4_minus_fp_healed_loss"]
        lines.append(
            f"- NF4 healing vs full-precision healing: held-out loss higher by {g['mean']:+.4f} on "
            f"average (max {g['max']:+.4f})."
        )
    return "\n".join(lines) + "\n"


def write_outputs(result: dict[str, Any], out_dir: Path) -> None:
    atomic_write_json(out_dir / "prune_study.json", result)
    atomic_write_text(out_dir / "prune_study.md", render_markdown(result))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = PruneStudyConfig()
    parser.add_argument("--smoke", action="store_true",
                        help="tiny model, few steps (< 2 min); output to a temporary directory")
    parser.add_argument("--pretrain-steps", type=int, default=d.pretrain_steps)
    parser.add_argument("--heal-steps", type=int, default=d.heal_steps)
    parser.add_argument("--layers", type=int, default=d.layers)
    parser.add_argument("--hidden", type=int, default=d.hidden)
    parser.add_argument("--quantize", default=",".join(d.quantize), help="none,nf4")
    parser.add_argument("--threads", type=int, default=d.threads)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--out-dir", help="default: bench/results (a temporary one with --smoke)")
    parser.add_argument("--report-only", action="store_true", help="re-render from the JSON")
    args = parser.parse_args(argv)
    if args.report_only:
        out_dir = Path(args.out_dir or _HERE / "results")
        result = json.loads((out_dir / "prune_study.json").read_text(encoding="utf-8"))
        write_outputs(result, out_dir)
        return 0
    quantize = [q.strip() for q in args.quantize.split(",") if q.strip()]
    if not quantize or any(q not in QUANTIZE for q in quantize):
        parser.error(f"--quantize: expected a comma list of {', '.join(QUANTIZE)}, got {args.quantize!r}")
    if args.smoke:
        cfg = PruneStudyConfig(seed=args.seed, threads=args.threads, quantize=quantize, **SMOKE)
    else:
        cfg = PruneStudyConfig(
            seed=args.seed, layers=args.layers, hidden=args.hidden, threads=args.threads,
            pretrain_steps=args.pretrain_steps, heal_steps=args.heal_steps, quantize=quantize,
        )
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="lf_prune_study_") as work:
        result = run_study(cfg, Path(work), log)
        if args.smoke and not args.out_dir:
            out_dir = Path(work) / "results"
            out_dir.mkdir()
            write_outputs(result, out_dir)
            sys.stdout.write((out_dir / "prune_study.md").read_text(encoding="utf-8"))
            log("smoke run: results not kept (pass --out-dir to keep them)")
            return 0
    out_dir = Path(args.out_dir or _HERE / "results")
    write_outputs(result, out_dir)
    log(f"wrote {out_dir / 'prune_study.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
