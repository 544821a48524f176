"""Benchmark: layerfreeze's C-Eval scorer vs lm-evaluation-harness, same model, data and machine.

Both score k-shot C-Eval ``val`` (lm-eval task ``ceval-valid``, its installed YAML pointed at
local copies of the released CSVs because the hub is unreachable) with the same saved Hugging
Face model directory and tokenizer, in one process, with the same number of torch threads.
Timed: building prompts, tokenising, scoring and aggregating (not loading data, tasks or the
model; for lm-eval the timed call is ``lm_eval.evaluator.evaluate``). Reports the
time ratio (target >= 3x) and per-question prediction agreement; every disagreement is listed
with whether lm-eval's two letters tie within 1e-4.

Run (about 3 minutes on 2 CPU cores with the defaults; ``--subjects all`` is the full val set,
about 12 minutes)::

    python bench/eval_speed.py                                   # 4 subjects, 4 layers x 384
    python bench/eval_speed.py --subjects all --layers 8 --hidden 512 --device cuda
    python bench/eval_speed.py --data-dir /path/to/data --limit 10
    python bench/eval_speed.py --report-only bench/results/eval_speed.json   # re-render the .md

Writes ``bench/results/eval_speed.json`` and ``bench/results/eval_speed.md``.
The model is a seeded random tiny Llama and the tokenizer a SentencePiece model trained on
generated text (``tests/helpers/eval_fixtures.py``): timings and agreement are meaningful,
accuracies are chance level.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_SUBJECTS = ["basic_medicine", "computer_network", "law", "marxism"]
TIE = 1e-4


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=os.environ.get("LAYERFREEZE_EVAL_DATA",
                                                       str(REPO.parent / "shared" / "data")))
    p.add_argument("--subjects", default=",".join(DEFAULT_SUBJECTS),
                   help="comma-separated C-Eval subjects, or 'all'")
    p.add_argument("--limit", type=int, default=None, help="first N questions per subject")
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=8000, help="tokenizer vocabulary")
    p.add_argument("--batch-size", type=int, default=8, help="both tools")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; 1 by default because on a shared 2-core machine OpenMP "
                        "spin-waiting makes 2-thread timings noise")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--out-dir", default=str(REPO / "bench" / "results"))
    p.add_argument("--work-dir", default=None, help="where the model/tokenizer go (default: tmp)")
    p.add_argument("--report-only", metavar="JSON", default=None,
                   help="re-render an existing eval_speed.json into --out-dir/eval_speed.md "
                        "(no model, no scoring)")
    return p.parse_args()


def _subjects_arg(report: dict) -> str:
    """The ``--subjects`` value that reproduces ``report`` ('all' or the comma-separated list)."""
    if "subjects_arg" in report:
        return report["subjects_arg"]
    # results written before ``subjects_arg`` was recorded: 'all' when every C-Eval subject ran
    from layerfreeze.evaluation.data import list_subjects

    return "all" if set(report["subjects"]) == set(list_subjects("ceval")) else ",".join(
        report["subjects"])


def render_markdown(report: dict) -> str:
    """The ``eval_speed.md`` text, computed from the ``eval_speed.json`` report alone."""
    names, model, machine = report["subjects"], report["model"], report["machine"]
    n = report["num_questions"]
    t_ours, t_ref = report["seconds"]["layerfreeze"], report["seconds"]["lm_eval"]
    c_ours, c_ref = report["cpu_seconds"]["layerfreeze"], report["cpu_seconds"]["lm_eval"]
    disagreements = report["disagreements"]
    subj_arg = _subjects_arg(report)
    limit = report["limit_per_subject"]
    lines = [
        "# Evaluation speed: layerfreeze vs lm-evaluation-harness",
        "",
        f"C-Eval val, {report['shots']}-shot, lm-eval `ceval-valid` format, {n} questions "
        f"from {len(names)} subjects ({'all' if subj_arg == 'all' else ', '.join(names)})"
        + (f", first {limit} per subject" if limit else "") + ".",
        f"Model: random Llama, {model['layers']} layers x {model['hidden']} hidden, "
        f"{model['params']:,} parameters, vocab {model['vocab']}, {model['dtype']}, batch size "
        f"{report['batch_size']}, device {machine['device']}, {machine['torch_threads']} torch "
        "threads.",
        "",
        "| tool | wall seconds | CPU seconds | questions/s (wall) |",
        "|---|---|---|---|",
        f"| lm-evaluation-harness (HFLM) | {t_ref:.1f} | {c_ref:.1f} | {n / t_ref:.2f} |",
        f"| layerfreeze | {t_ours:.1f} | {c_ours:.1f} | {n / t_ours:.2f} |",
        "",
        f"**Speedup: {t_ref / t_ours:.2f}x wall-clock, {c_ref / c_ours:.2f}x CPU time** (target "
        f">= {report['target_speedup']:g}x). 1-minute load average at the end: "
        f"{report['load_average_1min']:.1f} on {machine['cpu_count']} cores "
        "(a shared machine: CPU time is the steadier measure). Prediction agreement: "
        f"{100 * report['prediction_agreement']:.2f}% ({len(disagreements)} disagreements"
        + (", all ties within 1e-4" if disagreements and report["disagreements_all_ties"]
           else "") + f"); max |log-likelihood difference| {report['max_abs_loglik_diff']:.2e}.",
        "",
    ]
    if disagreements:
        lines += ["| subject | row | ours | lm-eval | lm-eval gap | tie (<1e-4) |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {d['subject']} | {d['index']} | {d['ours']} | {d['lm_eval']} | "
                  f"{d['lm_eval_gap']:.2e} | {d['tie']} |" for d in disagreements]
        lines.append("")
    lines.append(f"Reproduce: `python bench/eval_speed.py --subjects {subj_arg} "
                 f"--layers {model['layers']} --hidden {model['hidden']} "
                 f"--threads {machine['torch_threads']}"
                 + (f" --limit {limit}" if limit else "") + "`")
    return "\n".join(lines) + "\n"


def _build_model_dir(args, work: Path) -> Path:
    from tests.helpers.eval_fixtures import build_eval_model, build_tokenizer

    tok = build_tokenizer(work / "tok", "merged", vocab_size=args.vocab_size, num_chars=3500)
    model = build_eval_model(len(tok), num_layers=args.layers, hidden=args.hidden,
                             max_positions=8192, attn_implementation="sdpa")
    out = work / "model"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _warmup(model, device: str) -> None:
    """One untimed forward so neither tool pays the first-call allocation and kernel set-up."""
    import torch

    with torch.no_grad():
        model(input_ids=torch.ones((4, 256), dtype=torch.long, device=device))


def _run_ours(args, model_dir: Path, bench):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from layerfreeze.evaluation.runner import evaluate

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, args.dtype))
    model.to(args.device).eval()
    _warmup(model, args.device)
    t0, c0 = time.perf_counter(), time.process_time()
    result, records = evaluate(model, tok, bench, shots=args.shots, batch_size=args.batch_size,
                               max_questions=args.limit)
    return (time.perf_counter() - t0, time.process_time() - c0), result, records


def _run_lm_eval(args, model_dir: Path, subjects: list[str], work: Path):
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from tests.helpers.eval_fixtures import lm_eval_task

    tasks = [lm_eval_task("ceval", s, Path(args.data_dir), work / "lm_eval_data") for s in subjects]
    lm = HFLM(pretrained=str(model_dir), tokenizer=str(model_dir), batch_size=args.batch_size,
              device=args.device, dtype=args.dtype)
    # What simple_evaluate does before its evaluate() call, untimed: index the task registry
    # (tens of seconds, a one-off), load the tasks, set num_fewshot and the few-shot seed.
    loaded = TaskManager().load(tasks)
    _warmup(lm.model, args.device)
    for task in loaded["tasks"].values():
        task.set_config(key="num_fewshot", value=args.shots)
        task.set_fewshot_seed(seed=0)
    t0, c0 = time.perf_counter(), time.process_time()
    out = evaluator.evaluate(lm=lm, task_dict=loaded, limit=args.limit, bootstrap_iters=0,
                             log_samples=True)
    seconds = (time.perf_counter() - t0, time.process_time() - c0)
    preds = {}
    for task_name, samples in out["samples"].items():
        subject = task_name.removeprefix("ceval-valid_")
        for smp in samples:
            lls = [float(r[0]) for r in smp["filtered_resps"]]
            preds[(subject, int(smp["doc_id"]))] = lls
    accs = {k.removeprefix("ceval-valid_"): v.get("acc,none") for k, v in out["results"].items()}
    return seconds, preds, accs


def main() -> int:
    args = _args()
    if args.report_only:
        import json

        from layerfreeze.utils.io import atomic_write_text

        text = render_markdown(json.loads(Path(args.report_only).read_text(encoding="utf-8")))
        out_dir = Path(args.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "eval_speed.md", text)
        print(text, end="")
        return 0
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from layerfreeze.evaluation.data import load_benchmark

    subjects = None if args.subjects == "all" else args.subjects.split(",")
    bench = load_benchmark("ceval", args.data_dir, "val", subjects)
    names = [s.name for s in bench.subjects]
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="lf-eval-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = _build_model_dir(args, work)

    (t_ours, c_ours), result, records = _run_ours(args, model_dir, bench)
    print(f"layerfreeze: {len(records)} questions in {t_ours:.1f}s", flush=True)
    (t_ref, c_ref), ref, ref_acc = _run_lm_eval(args, model_dir, names, work)
    print(f"lm-eval:     {len(ref)} questions in {t_ref:.1f}s", flush=True)

    letters = "ABCD"
    disagreements = []
    max_diff = 0.0
    for r in records:
        lls = ref[(r["subject"], r["index"])]
        ours = [r["loglik"][k] for k in letters]
        max_diff = max(max_diff, max(abs(a - b) for a, b in zip(ours, lls, strict=True)))
        ref_pred = letters[lls.index(max(lls))]
        if ref_pred != r["pred"]:
            gap = abs(lls[letters.index(r["pred"])] - lls[letters.index(ref_pred)])
            disagreements.append({"subject": r["subject"], "index": r["index"], "ours": r["pred"],
                                  "lm_eval": ref_pred, "lm_eval_gap": gap, "tie": gap < TIE})
    assert len(ref) == len(records), (len(ref), len(records))
    ratio = t_ref / t_ours
    agree = 1 - len(disagreements) / len(records)
    ours_acc = {s: v["acc"] for s, v in result["subjects"].items()}
    n_params = sum(p.numel() for p in __import__("transformers").AutoModelForCausalLM
                   .from_pretrained(model_dir).parameters())
    report = {
        "benchmark": "ceval val (lm-eval task ceval-valid)",
        "shots": args.shots,
        "subjects": names,
        "subjects_arg": "all" if args.subjects == "all" else ",".join(names),
        "limit_per_subject": args.limit,
        "num_questions": len(records),
        "model": {"family": "llama (random init)", "layers": args.layers, "hidden": args.hidden,
                  "heads": args.heads, "params": n_params, "vocab": args.vocab_size,
                  "dtype": args.dtype},
        "batch_size": args.batch_size,
        "machine": {"device": args.device, "torch_threads": args.threads,
                    "cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "lm_eval": __import__("lm_eval").__version__ if hasattr(
                        __import__("lm_eval"), "__version__") else "0.4.x"},
        "seconds": {"layerfreeze": round(t_ours, 3), "lm_eval": round(t_ref, 3)},
        "cpu_seconds": {"layerfreeze": round(c_ours, 3), "lm_eval": round(c_ref, 3)},
        "speedup": round(ratio, 2),
        "speedup_cpu_time": round(c_ref / c_ours, 2),
        "load_average_1min": os.getloadavg()[0],
        "target_speedup": 3.0,
        "prediction_agreement": agree,
        "max_abs_loglik_diff": max_diff,
        "disagreements": disagreements,
        "disagreements_all_ties": all(d["tie"] for d in disagreements),
        "accuracy_per_subject": {"layerfreeze": ours_acc, "lm_eval": ref_acc},
    }
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from layerfreeze.utils.io import atomic_write_json, atomic_write_text

    atomic_write_json(out_dir / "eval_speed.json", report)
    text = render_markdown(report)
    atomic_write_text(out_dir / "eval_speed.md", text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
