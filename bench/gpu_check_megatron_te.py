"""GPU check, Transformer Engine part: run the megatron TE test files under a time box and write
their results as JUnit XML and a JSON summary (``bench/gpu_check.sh`` calls it).

    python bench/gpu_check_megatron_te.py --out-dir OUT [--budget-s 140]

Runs ``tests/gpu/test_cuda_megatron_te_*.py`` (engine / spec, LoRA on TE linears, gated prefix
on TE attention; whichever exist) in one pytest process, killed at ``--budget-s`` minus a margin
so the summary is always written. Writes ``OUT/megatron_te_junit.xml`` (pytest's) and
``OUT/megatron_te.json``: date, hardware, torch / megatron-core / Transformer Engine versions,
per-test outcome and seconds, totals, whether the time box cut the run. Exit status: 0 when
every collected test passed or skipped, 1 otherwise (failures, errors, time box, no tests).
Never run on a GPU when written (no device machine was available).
"""

from __future__ import annotations

import argparse
import datetime as dt
import glob
import json
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PATTERN = "tests/gpu/test_cuda_megatron_te_*.py"
MARGIN_S = 10


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name, mod in (("torch", "torch"), ("megatron_core", "megatron.core"),
                      ("transformer_engine", "transformer_engine")):
        code = f"import {mod} as m; print(getattr(m, '__version__', '?'))"
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              cwd=REPO, timeout=120)
        out[name] = proc.stdout.strip().splitlines()[-1] if proc.returncode == 0 else None
    return out


def _gpu() -> str | None:
    try:
        proc = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() or None


def _cases(junit: Path) -> list[dict]:
    if not junit.is_file():
        return []
    cases = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        outcome = "passed"
        message = ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (node.get("message") or "")[:500]
                break
        cases.append({
            "test": f"{case.get('classname')}::{case.get('name')}",
            "outcome": outcome,
            "seconds": round(float(case.get("time") or 0.0), 2),
            "message": message,
        })
    return cases


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", required=True, type=Path)
    ap.add_argument("--budget-s", type=int, default=140)
    args = ap.parse_args()
    start = time.monotonic()  # the box covers the version probes too
    args.out_dir.mkdir(parents=True, exist_ok=True)
    junit = args.out_dir / "megatron_te_junit.xml"
    files = sorted(glob.glob(str(REPO / PATTERN)))
    summary: dict = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "gpu": _gpu(),
        "versions": _versions(),
        "files": [str(Path(f).relative_to(REPO)) for f in files],
        "budget_s": args.budget_s,
    }
    timed_out = False
    tail = ""
    if files:
        left = max(args.budget_s - MARGIN_S - int(time.monotonic() - start), 30)
        cmd = [sys.executable, "-m", "pytest", *files, "-q", "-rA", "-p", "no:cacheprovider",
               "--junitxml", str(junit), "--timeout", str(left)]
        try:
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=left)
            tail = (proc.stdout + proc.stderr)[-6000:]
        except subprocess.TimeoutExpired as e:
            timed_out = True
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            tail = out[-6000:]
    cases = _cases(junit)
    totals = {k: sum(c["outcome"] == k for c in cases)
              for k in ("passed", "failed", "error", "skipped")}
    summary.update(seconds=round(time.monotonic() - start, 1), timed_out=timed_out,
                   totals=totals, cases=cases, output_tail=tail)
    (args.out_dir / "megatron_te.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: summary[k] for k in ("files", "totals", "timed_out", "seconds")}))
    ok = bool(cases) and not timed_out and totals["failed"] == totals["error"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
