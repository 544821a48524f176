"""``layerfreeze trace --zero3`` under torchrun (2 CPU ranks, gloo): the weights are partitioned
from the moment they load, and the trace equals the single-process trace of the same model."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.test_trace_recommend_train import _env
from tests.helpers.dist import find_free_port
from tests.helpers.eval_fixtures import save_eval_checkpoint

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "layerfreeze" / "data" / "corpus" / "zh.txt"
MEASURES = "angular,cka,logit_lens,skip,noise"


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)


def _trace_args(model: Path, out: Path, *extra: str) -> list[str]:
    return [
        "trace",
        "--model",
        str(model),
        "--probe",
        str(CORPUS),
        "--max-tokens",
        "256",
        "--seq-len",
        "64",
        "--batch-size",
        "2",
        "--out",
        str(out),
        *extra,
    ]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_eval_checkpoint(tmp_path_factory.mktemp("zero3_trace") / "model")


def _close(a, b, path: str = "") -> list[str]:
    """Paths where two JSON trees differ (floats to rel 1e-4)."""
    if isinstance(a, dict):
        out = [f"{path}/{k}: missing" for k in a if k not in b]
        return out + [d for k in a if k in b for d in _close(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, list):
        if len(a) != len(b):
            return [f"{path}: length {len(a)} != {len(b)}"]
        return [
            d
            for i, (u, v) in enumerate(zip(a, b, strict=True))
            for d in _close(u, v, f"{path}[{i}]")
        ]
    if isinstance(a, float) and isinstance(b, float):
        ok = math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6) or (math.isnan(a) and math.isnan(b))
        return [] if ok else [f"{path}: {a} != {b}"]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def test_zero3_trace_under_torchrun_equals_the_single_process_trace(model_dir, tmp_path):
    single = _run(
        [
            sys.executable,
            "-m",
            "layerfreeze",
            *_trace_args(model_dir, tmp_path / "single", "--measures", MEASURES),
        ]
    )
    assert single.returncode == 0, single.stderr[-3000:]
    launch = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(find_free_port()),
        "-m",
        "layerfreeze",
    ]
    sharded = _run(
        [*launch, *_trace_args(model_dir, tmp_path / "zero3", "--measures", MEASURES, "--zero3")]
    )
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    # each rank held only its partition of the weights
    held = re.findall(r"zero3: rank (\d) of 2 holds (\d+) of (\d+) weight elements", sharded.stderr)
    assert sorted(r for r, _, _ in held) == ["0", "1"], sharded.stderr[-2000:]
    for _rank, mine, whole in held:
        assert 0 < int(mine) <= int(whole) // 2 + 64, (mine, whole)
    a = json.loads((tmp_path / "single" / "trace.json").read_text())
    b = json.loads((tmp_path / "zero3" / "trace.json").read_text())
    assert b["model"]["zero3_world_size"] == 2
    assert a["model"]["num_params"] == b["model"]["num_params"]
    diffs = [
        d
        for k in ("layers", "representation", "logit_lens", "sensitivity")
        for d in _close(a[k], b[k], k)
    ]
    assert not diffs, diffs[:10]
    # the summary table once (rank 0), on stdout
    assert sharded.stdout.count("wrote ") == 1


def test_zero3_default_measures_and_refusals(model_dir, tmp_path):
    # gradient / stability need whole parameters: refused by name, before anything loads
    r = _run(
        [
            sys.executable,
            "-m",
            "layerfreeze",
            *_trace_args(model_dir, tmp_path / "t", "--zero3", "--measures", "angular,gradient"),
        ]
    )
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "--measures: gradient need whole parameters" in errors[0], r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "t").exists()
    r = _run(
        [
            sys.executable,
            "-m",
            "layerfreeze",
            *_trace_args(model_dir, tmp_path / "t", "--zero3", "--device", "cpu"),
        ]
    )
    assert r.returncode == 2 and "--device: not used with --zero3" in r.stderr
    # without --measures, --zero3 traces everything else (one plain process is a world of one)
    r = _run(
        [
            sys.executable,
            "-m",
            "layerfreeze",
            *_trace_args(model_dir, tmp_path / "all", "--zero3", "--noise-scales", "0.1"),
        ]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    settings = json.loads((tmp_path / "all" / "trace.json").read_text())["settings"]
    assert "gradient" not in settings["measures"] and "stability" not in settings["measures"]
    assert {"angular", "logit_lens", "skip", "noise"} <= set(settings["measures"])
