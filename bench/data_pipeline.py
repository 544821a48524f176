"""Tokenise-and-pack throughput and peak memory: layerfreeze's token cache vs the Hugging Face
``datasets`` route (``load_dataset("json")`` + ``map(tokenize, batched, num_proc)`` + group-texts,
as in transformers' ``run_clm.py``), on the same generated corpus and the same tokenizer.

Run (about 10 minutes on 2 idle CPU cores; 25 minutes when the committed run shared them)::

    python bench/data_pipeline.py                       # 1 GiB corpus, HF route on 64 MiB of it
    python bench/data_pipeline.py --size-mb 64 --hf-mb 16 --out /tmp/quick   # a smoke run

What it does:

1. generates a JSONL corpus of ``--size-mb`` MiB under ``--work`` (never in the repo) from
   ``layerfreeze.data.corpus_gen`` documents (many seeds, shuffled, repeated to size), in files of
   ``--file-mb`` MiB;
2. trains one SentencePiece tokenizer with ``layerfreeze.data.train_tokenizer`` (the project's
   own; the saved directory loads with ``transformers.AutoTokenizer``);
3. runs each route in a fresh subprocess while this process samples the RSS of the subprocess
   and all its children every 50 ms (psutil): peak PSS (proportional set size: pages shared by
   forked workers counted once in total), peak RSS, and peak anonymous RSS (RSS minus
   file-backed/shared pages, i.e. without the memory-mapped token files the OS can drop):

   - ``layerfreeze 1 worker`` / ``layerfreeze N workers``: ``build_token_cache`` (``encoder:
     auto``, which uses the SentencePiece processor for this tokenizer) + one pass over every
     packed sequence through ``DistributedBatchIterator``, on the full corpus and on the HF
     subset;
   - ``layerfreeze 1 worker, HF encoder``: the same with ``encoder="hf"`` (the HF fast tokenizer
     inside layerfreeze's pipeline), on the HF subset: separates the encoder from the pipeline;
   - ``HF datasets``: ``load_dataset("json")``, ``map(tokenize, batched=True, num_proc=N,
     remove_columns=["text"])``, ``map(group_texts, batched=True, num_proc=N)`` with
     ``block_size = seq_len`` (run_clm), then one pass over the blocks; its own Arrow cache in
     a fresh directory. The tokenizer is ``AutoTokenizer.from_pretrained`` of the same saved
     directory; run_clm calls it with special tokens, so HF blocks hold BOS + text per document
     and layerfreeze BOS + text + EOS: the report checks ``HF tokens == layerfreeze tokens -
     documents`` on the subset (same text, same ids).

Throughput is input MiB and output tokens per second of wall time and of CPU time (user +
system of the process and its waited children: on a shared machine CPU time is the stabler
figure; the ratio layerfreeze/HF uses text MiB per CPU-second and per wall-second on the same
subset). Everything in ``bench/results/data_pipeline.{json,md}`` is written by this script.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MIB = 1 << 20


# --------------------------------------------------------------------------- corpus + tokenizer


def _documents(seeds: int) -> list[str]:
    from layerfreeze.data.corpus_gen import generate

    docs: list[str] = []
    for seed in range(seeds):
        g = generate(seed)
        docs += [d.strip() for d in g["zh.txt"].split("\n\n") if d.strip()]
        docs += [d.strip() for d in g["en.txt"].split("\n\n") if d.strip()]
        docs += [json.loads(line)["text"] for line in g["mixed.jsonl"].splitlines() if line]
    return docs


def make_corpus(work: Path, size_mb: int, file_mb: int, seeds: int) -> list[Path]:
    """JSONL files of about ``file_mb`` MiB summing to at least ``size_mb`` MiB (reused if there)."""
    out = work / f"corpus_{size_mb}mb_{file_mb}"
    done = out / "DONE"
    if done.is_file():
        return sorted(out.glob("*.jsonl"))
    out.mkdir(parents=True, exist_ok=True)
    docs = [json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in _documents(seeds)]
    rng = random.Random(0)
    files, total, i = [], 0, 0
    while total < size_mb * MIB:
        path = out / f"part-{i:04d}.jsonl"
        size = 0
        with path.open("w", encoding="utf-8") as f:
            while size < file_mb * MIB:
                rng.shuffle(docs)
                for k in range(0, len(docs), 1000):
                    chunk = "".join(docs[k : k + 1000])
                    f.write(chunk)
                    size += len(chunk.encode("utf-8"))
                    if size >= file_mb * MIB:
                        break
        total += size
        files.append(path)
        i += 1
    done.write_text("ok\n")
    return files


def make_tokenizer(work: Path, files: list[Path], vocab_size: int) -> Path:
    from layerfreeze.data import train_tokenizer

    tok_dir = work / f"tokenizer_{vocab_size}"
    if not (tok_dir / "tokenizer.json").is_file():
        train_tokenizer(
            [str(files[0])], tok_dir, vocab_size=vocab_size, input_sentence_size=200_000
        )
    return tok_dir


# --------------------------------------------------------------------------- workers (subprocess)


def _cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def worker_layerfreeze(args) -> dict:
    from layerfreeze.data import (
        DistributedBatchIterator,
        PackedDataset,
        build_token_cache,
        load_tokenizer,
    )

    tok = load_tokenizer(args.tokenizer)
    t0, c0 = time.perf_counter(), _cpu()
    cache = build_token_cache(
        args.files,
        tok,
        args.cache,
        num_workers=args.num_workers,
        encoder=args.encoder,
        chunk_bytes=args.chunk_mb * MIB,
    )
    t1, c1 = time.perf_counter(), _cpu()
    ds = PackedDataset(cache, args.seq_len)
    it = DistributedBatchIterator(ds, 64, 0, 1, seed=0)
    checksum = 0
    for _ in range(len(ds) // 64):
        checksum += int(it.next_batch()["input_ids"][:, 0].sum())
    t2, c2 = time.perf_counter(), _cpu()
    return {
        "tokens": cache.num_tokens,
        "documents": cache.num_documents,
        "sequences": len(ds),
        "tokenize_wall_s": t1 - t0,
        "tokenize_cpu_s": c1 - c0,
        "pack_wall_s": t2 - t1,
        "pack_cpu_s": c2 - c1,
        "checksum": checksum,
    }


def worker_hf(args) -> dict:
    from datasets import disable_progress_bars, load_dataset
    from transformers import AutoTokenizer

    disable_progress_bars()
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    block = args.seq_len
    t0, c0 = time.perf_counter(), _cpu()
    raw = load_dataset("json", data_files=args.files, split="train", cache_dir=args.cache)

    def tokenize(examples):
        return tok(examples["text"])

    tokenized = raw.map(tokenize, batched=True, num_proc=args.num_workers, remove_columns=["text"])
    t1, c1 = time.perf_counter(), _cpu()

    def group_texts(examples):  # transformers examples/pytorch/language-modeling/run_clm.py
        concatenated = {k: sum(examples[k], []) for k in examples}
        total = (len(concatenated["input_ids"]) // block) * block
        result = {
            k: [t[i : i + block] for i in range(0, total, block)] for k, t in concatenated.items()
        }
        result["labels"] = result["input_ids"].copy()
        return result

    grouped = tokenized.map(group_texts, batched=True, num_proc=args.num_workers)
    grouped = grouped.with_format("numpy", columns=["input_ids"])
    checksum = 0
    for i in range(0, len(grouped), 64):
        checksum += int(grouped[i : i + 64]["input_ids"][:, 0].sum())
    t2, c2 = time.perf_counter(), _cpu()
    import pyarrow.compute as pc  # count on the memory-mapped Arrow column, outside the timing

    n_tok = pc.sum(pc.list_value_length(tokenized.data.column("input_ids"))).as_py()
    return {
        "tokens": int(n_tok),
        "documents": len(raw),
        "sequences": len(grouped),
        "tokenize_wall_s": t1 - t0,
        "tokenize_cpu_s": c1 - c0,
        "pack_wall_s": t2 - t1,
        "pack_cpu_s": c2 - c1,
        "checksum": checksum,
    }


# --------------------------------------------------------------------------- measurement


def _tree_memory(proc) -> tuple[int, int, int]:
    """RSS, anonymous RSS and PSS summed over a process and its children (PSS shares the
    copy-on-write pages of forked workers fairly instead of counting them once per process)."""
    import psutil

    rss = anon = pss = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            m = p.memory_full_info()
        except psutil.Error:
            continue
        rss += m.rss
        anon += m.rss - getattr(m, "shared", 0)
        pss += getattr(m, "pss", m.rss)
    return rss, anon, pss


def run_route(name: str, worker_args: list[str], data_mb: float, timeout: float) -> dict:
    import psutil

    cmd = [sys.executable, __file__, "--worker", *worker_args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    print(f"[data_pipeline] {name} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    ps = psutil.Process(proc.pid)
    peak = {"rss": 0, "anon": 0, "pss": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            try:
                mem = dict(zip(("rss", "anon", "pss"), _tree_memory(ps), strict=True))
            except psutil.Error:
                break
            for k, v in mem.items():
                peak[k] = max(peak[k], v)
            stop.wait(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        stop.set()
        th.join()
        return {"name": name, "error": f"timed out after {timeout:.0f} s", "data_mib": data_mb}
    stop.set()
    th.join()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"name": name, "error": err.strip().splitlines()[-1:], "data_mib": data_mb}
    res = json.loads(out.strip().splitlines()[-1])
    res.update(
        name=name,
        data_mib=data_mb,
        process_wall_s=wall,
        peak_rss_mib=peak["rss"] / MIB,
        peak_anon_rss_mib=peak["anon"] / MIB,
        peak_pss_mib=peak["pss"] / MIB,
    )
    work_wall = res["tokenize_wall_s"] + res["pack_wall_s"]
    work_cpu = res["tokenize_cpu_s"] + res["pack_cpu_s"]
    res.update(
        wall_s=work_wall,
        cpu_s=work_cpu,
        mib_per_wall_s=data_mb / work_wall,
        mib_per_cpu_s=data_mb / work_cpu,
        tokens_per_wall_s=res["tokens"] / work_wall,
        tokens_per_cpu_s=res["tokens"] / work_cpu,
    )
    print(
        f"[data_pipeline] {name}: {work_wall:.1f} s wall, {work_cpu:.1f} s CPU, "
        f"peak PSS {res['peak_pss_mib']:.0f} MiB",
        file=sys.stderr,
        flush=True,
    )
    return res


def _mib(files: list[Path]) -> float:
    return sum(f.stat().st_size for f in files) / MIB


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=1024, help="corpus size in MiB (default 1 GiB)")
    ap.add_argument("--hf-mb", type=int, default=64, help="MiB of the corpus the HF route runs on")
    ap.add_argument("--file-mb", type=int, default=32, help="MiB per corpus file")
    ap.add_argument("--workers", type=int, default=2, help="N for num_workers / num_proc")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--vocab-size", type=int, default=2000)
    ap.add_argument("--seeds", type=int, default=24, help="corpus_gen seeds in the document pool")
    ap.add_argument("--work", default="/tmp/layerfreeze_data_bench", help="corpus and caches")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"), help="results directory")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per route")
    ap.add_argument("--worker", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker is not None:
        return _worker_main(args.worker)

    import shutil

    work = Path(args.work)
    t_start = time.time()
    files = make_corpus(work, args.size_mb, args.file_mb, args.seeds)
    hf_files = files[: max(1, -(-args.hf_mb // args.file_mb))]
    tok_dir = make_tokenizer(work, files, args.vocab_size)
    full_mb, sub_mb = _mib(files), _mib(hf_files)
    runs = work / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    common = ["--tokenizer", str(tok_dir), "--seq-len", str(args.seq_len)]

    def lf(tag, fs, n, encoder="auto"):
        return [
            "lf",
            *common,
            "--cache",
            str(runs / tag),
            "--num-workers",
            str(n),
            "--encoder",
            encoder,
            "--files",
            *map(str, fs),
        ]

    n = args.workers
    routes = [
        (f"layerfreeze 1 worker, {sub_mb:.0f} MiB", lf("lf1_sub", hf_files, 1), sub_mb),
        (f"layerfreeze {n} workers, {sub_mb:.0f} MiB", lf("lfn_sub", hf_files, n), sub_mb),
        (
            f"layerfreeze 1 worker + HF encoder, {sub_mb:.0f} MiB",
            lf("lfhf_sub", hf_files, 1, "hf"),
            sub_mb,
        ),
        (
            f"HF datasets num_proc={n}, {sub_mb:.0f} MiB",
            [
                "hf",
                *common,
                "--cache",
                str(runs / "hf_sub"),
                "--num-workers",
                str(n),
                "--files",
                *map(str, hf_files),
            ],
            sub_mb,
        ),
        (f"layerfreeze 1 worker, {full_mb:.0f} MiB", lf("lf1_full", files, 1), full_mb),
        (f"layerfreeze {n} workers, {full_mb:.0f} MiB", lf("lfn_full", files, n), full_mb),
    ]
    results = [run_route(name, wa, mb, args.timeout) for name, wa, mb in routes]
    shutil.rmtree(runs, ignore_errors=True)
    report = _report(
        args, results, full_mb, sub_mb, len(files), len(hf_files), time.time() - t_start
    )
    _write(Path(args.out), report)
    return 0


def _worker_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=["lf", "hf"])
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--seq-len", type=int, required=True)
    ap.add_argument("--cache", required=True)
    ap.add_argument("--num-workers", type=int, required=True)
    ap.add_argument("--encoder", default="auto")
    ap.add_argument("--chunk-mb", type=int, default=64)
    ap.add_argument("--files", nargs="+", required=True)
    a = ap.parse_args(argv)
    res = worker_layerfreeze(a) if a.kind == "lf" else worker_hf(a)
    print(json.dumps(res))
    return 0


# --------------------------------------------------------------------------- report


def _machine() -> dict:
    import datasets
    import psutil
    import sentencepiece
    import tokenizers
    import transformers

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "datasets": datasets.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "sentencepiece": sentencepiece.__version__,
    }


def _report(args, results, full_mb, sub_mb, n_files, n_sub, elapsed) -> dict:
    by = {r["name"]: r for r in results}
    n = args.workers
    names = {
        "lf1_sub": f"layerfreeze 1 worker, {sub_mb:.0f} MiB",
        "lfn_sub": f"layerfreeze {n} workers, {sub_mb:.0f} MiB",
        "lfhf_sub": f"layerfreeze 1 worker + HF encoder, {sub_mb:.0f} MiB",
        "hf_sub": f"HF datasets num_proc={n}, {sub_mb:.0f} MiB",
        "lf1_full": f"layerfreeze 1 worker, {full_mb:.0f} MiB",
        "lfn_full": f"layerfreeze {n} workers, {full_mb:.0f} MiB",
    }
    r = {k: by.get(v, {}) for k, v in names.items()}
    ratios, checks = {}, {}
    hf = r["hf_sub"]
    if "error" not in hf and hf:
        for k in ("lf1_sub", "lfn_sub", "lfhf_sub"):
            if r[k] and "error" not in r[k]:
                ratios[f"{k}_vs_hf_cpu"] = r[k]["mib_per_cpu_s"] / hf["mib_per_cpu_s"]
                ratios[f"{k}_vs_hf_wall"] = r[k]["mib_per_wall_s"] / hf["mib_per_wall_s"]
                ratios[f"{k}_vs_hf_peak_pss"] = r[k]["peak_pss_mib"] / hf["peak_pss_mib"]
        lf1 = r["lf1_sub"]
        if lf1 and "error" not in lf1:
            checks["hf_tokens_eq_lf_tokens_minus_documents"] = (
                hf["tokens"] == lf1["tokens"] - lf1["documents"]
            )
            checks["same_documents"] = hf["documents"] == lf1["documents"]
    for k in ("lf1_sub", "lfn_sub", "lfhf_sub"):
        if r[k] and r["lf1_sub"] and "error" not in r[k]:
            checks[f"{k}_same_tokens_as_lf1"] = r[k]["tokens"] == r["lf1_sub"]["tokens"]
            checks[f"{k}_same_checksum_as_lf1"] = r[k]["checksum"] == r["lf1_sub"]["checksum"]
    if r["lf1_full"] and r["lfn_full"] and "error" not in r["lfn_full"]:
        checks["full_workers_same_tokens"] = r["lfn_full"]["tokens"] == r["lf1_full"]["tokens"]
        checks["full_workers_same_checksum"] = (
            r["lfn_full"]["checksum"] == r["lf1_full"]["checksum"]
        )
        ratios["full_workers_speedup_wall"] = r["lf1_full"]["wall_s"] / r["lfn_full"]["wall_s"]
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": _machine(),
        "config": {
            "corpus_mib": full_mb,
            "corpus_files": n_files,
            "hf_subset_mib": sub_mb,
            "hf_subset_files": n_sub,
            "workers": n,
            "seq_len": args.seq_len,
            "vocab_size": args.vocab_size,
            "file_mib": args.file_mb,
            "seeds": args.seeds,
        },
        "results": results,
        "ratios": ratios,
        "checks": checks,
        "elapsed_s": elapsed,
    }


def _write(out: Path, report: dict) -> None:
    sys.path.insert(0, str(REPO))
    from layerfreeze.utils.io import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "data_pipeline.json", json.dumps(report, indent=2) + "\n")
    c, m = report["config"], report["machine"]
    lines = [
        "# Tokenise-and-pack: layerfreeze token cache vs HF datasets map + group-texts",
        "",
        f"Run {report['date']} on {m['platform']}, {m['cpus']} CPUs, {m['ram_gib']} GiB RAM "
        f"(shared with other jobs); datasets {m['datasets']}, transformers {m['transformers']}, "
        f"tokenizers {m['tokenizers']}, sentencepiece {m['sentencepiece']}. Whole run "
        f"{report['elapsed_s'] / 60:.1f} min.",
        "",
        f"Corpus: {c['corpus_mib']:.0f} MiB of generated JSONL in {c['corpus_files']} files; the HF "
        f"route ran on the first {c['hf_subset_files']} files ({c['hf_subset_mib']:.0f} MiB), and "
        f"every route also ran on that subset. Tokenizer: SentencePiece unigram, vocab "
        f"{c['vocab_size']}; seq_len {c['seq_len']}; N = {c['workers']}.",
        "",
        "| route | MiB | tokens | wall s | CPU s | MiB/s wall | MiB/s CPU | Mtok/s wall "
        "| Mtok/s CPU | peak PSS MiB | peak RSS MiB | peak anon RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['data_mib']:.0f} | error: {r['error']} |")
            continue
        lines.append(
            f"| {r['name']} | {r['data_mib']:.0f} | {r['tokens']:,} | {r['wall_s']:.1f} | "
            f"{r['cpu_s']:.1f} | {r['mib_per_wall_s']:.2f} | {r['mib_per_cpu_s']:.2f} | "
            f"{r['tokens_per_wall_s'] / 1e6:.2f} | {r['tokens_per_cpu_s'] / 1e6:.2f} | "
            f"{r['peak_pss_mib']:.0f} | {r['peak_rss_mib']:.0f} | {r['peak_anon_rss_mib']:.0f} |"
        )
    lines += [
        "",
        "Phases (s, wall / CPU): tokenize = build the cache or load + map(tokenize); "
        "pack = one pass over all packed sequences (HF: map(group_texts) + the pass).",
        "",
        "| route | tokenize wall | tokenize CPU | pack wall | pack CPU |",
        "|---|---|---|---|---|",
    ]
    for r in report["results"]:
        if "error" not in r:
            lines.append(
                f"| {r['name']} | {r['tokenize_wall_s']:.1f} | {r['tokenize_cpu_s']:.1f} | "
                f"{r['pack_wall_s']:.1f} | {r['pack_cpu_s']:.1f} |"
            )
    lines += [
        "",
        "Ratios (layerfreeze / HF on the same subset; > 1 means layerfreeze is faster or "
        "uses more memory):",
        "",
        "| ratio | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v:.2f} |" for k, v in report["ratios"].items()]
    lines += ["", "Checks:", "", "| check | result |", "|---|---|"]
    lines += [f"| {k} | {'pass' if v else 'FAIL'} |" for k, v in report["checks"].items()]
    atomic_write_text(out / "data_pipeline.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
