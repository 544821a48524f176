"""Weight-only SNR (Marchenko-Pastur edge): theory on random matrices, an independent numpy/scipy
implementation, one-tensor-at-a-time streaming, the time estimate formula."""

from __future__ import annotations

import math
import weakref

import numpy as np
import pytest
import torch
from scipy import integrate, optimize

from layerfreeze.diagnostics.snr import (
    LLAMA_7B_SHAPES,
    estimate_seconds,
    matrix_snr,
    mp_median,
    scan_checkpoint,
    scan_model,
)
from tests.helpers.tiny_models import build_tiny_model


def _mp_median_scipy(beta: float) -> float:
    a, b = (1 - math.sqrt(beta)) ** 2, (1 + math.sqrt(beta)) ** 2

    def dens(x):
        return math.sqrt(max((b - x) * (x - a), 0.0)) / (2 * math.pi * beta * x)

    def cdf(x):
        return integrate.quad(dens, a, x, limit=200)[0]

    return optimize.brentq(lambda x: cdf(x) - 0.5, a + 1e-12, b)


def _snr_numpy(w: np.ndarray) -> float:
    s = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    m, n = w.shape
    beta = min(m, n) / max(m, n)
    sigma = np.median(s) / math.sqrt(_mp_median_scipy(beta) * max(m, n))  # per-entry noise
    edge = sigma * (math.sqrt(m) + math.sqrt(n))  # MP upper edge of the singular values
    return s[s > edge].sum() / s[s <= edge].sum()


def _planted(m: int, n: int, strength: float, rank: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(m, n, generator=g)
    u = torch.linalg.qr(torch.randn(m, rank, generator=g))[0]
    v = torch.linalg.qr(torch.randn(n, rank, generator=g))[0]
    # singular values strength * (sqrt(m) + sqrt(n)): strength times the noise edge
    return noise + strength * (math.sqrt(m) + math.sqrt(n)) * (u @ v.T)


@pytest.mark.parametrize("beta", [1.0, 0.5, 0.25, 0.1])
def test_mp_median_matches_scipy_quadrature(beta):
    assert mp_median(beta) == pytest.approx(_mp_median_scipy(beta), rel=1e-4)
    if beta == 1.0:
        assert mp_median(1.0) == pytest.approx(0.6528, abs=1e-4)  # Gavish & Donoho's value


@pytest.mark.parametrize("shape", [(256, 256), (128, 512), (512, 128)])
def test_pure_gaussian_matrix_has_snr_near_zero(shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    got = matrix_snr(w)
    # theory: every singular value inside the MP bulk; finite size lets the largest one or two
    # poke out by the Tracy-Widom fluctuation, worth a few percent of the noise sum at most
    assert got["snr"] < 0.03
    assert got["signal_count"] <= 3
    assert got["sigma"] == pytest.approx(1.0, rel=0.05)  # the per-entry noise level is found


@pytest.mark.parametrize("shape", [(256, 256), (128, 512)])
def test_planted_signal_gives_large_snr_growing_with_strength(shape):
    values = []
    for strength in (2.0, 4.0, 8.0):
        w = _planted(*shape, strength)
        got = matrix_snr(w)
        assert got["snr"] == pytest.approx(_snr_numpy(w.numpy()), rel=1e-3)
        assert got["signal_count"] >= 3
        values.append(got["snr"])
    noise = matrix_snr(torch.randn(*shape, generator=torch.Generator().manual_seed(0)))["snr"]
    assert values[0] > 2 * noise + 0.02
    assert values[0] < values[1] < values[2]


def test_spectrum_iqr_rule_calls_noise_signal():
    """Spectrum's IQR/1.349 sigma on a rectangular noise matrix puts the edge inside the bulk:
    most singular values count as signal (why the median rule is used; docs/diagnostics.md)."""
    w = torch.randn(128, 512, generator=torch.Generator().manual_seed(1))
    s = torch.linalg.svdvals(w).double()
    iqr_sigma = float(torch.quantile(s, 0.75) - torch.quantile(s, 0.25)) / 1.349
    assert (s > iqr_sigma * 1.5).float().mean() > 0.9
    got = matrix_snr(w)
    sig = s[s > iqr_sigma * 1.5].sum()
    noi = s[s <= iqr_sigma * 1.5].sum() if bool((s <= iqr_sigma * 1.5).any()) else 1.0
    assert got["spectrum_snr"] == pytest.approx(float(sig / noi / s[0]), rel=1e-9)
    assert got["snr"] < 0.03


def test_estimate_formula():
    measured = [(64, 32, 2.0), (128, 128, 6.0)]
    c = 8.0 / (64 * 32 * 32 + 128 * 128 * 128)
    got = estimate_seconds(measured, ((10, 20, 3), (4096, 11008, 2)))
    assert got["seconds_per_unit"] == pytest.approx(c)
    assert got["seconds"] == pytest.approx(c * (3 * 10 * 20 * 10 + 2 * 4096 * 11008 * 4096))
    assert math.isnan(estimate_seconds([], LLAMA_7B_SHAPES)["seconds"])
    units = sum(k * m * n * min(m, n) for m, n, k in LLAMA_7B_SHAPES)
    assert units == 32 * (4 * 4096**3 + 3 * 11008 * 4096 * 4096)


class _Counting:
    """Wraps the real ``safe_open``: counts ``get_tensor`` calls and checks that the previous
    tensor was released before the next one is read."""

    def __init__(self):
        from safetensors import safe_open

        self.safe_open, self.calls, self.held_max, self.last = safe_open, 0, 0, None

    def __call__(self, *a, **k):
        outer = self

        class Handle:
            def __enter__(self):
                self.h = outer.safe_open(*a, **k).__enter__()
                return self

            def __exit__(self, *e):
                return self.h.__exit__(*e)

            def keys(self):
                return self.h.keys()

            def get_slice(self, name):
                return self.h.get_slice(name)

            def get_tensor(self, name):
                held = int(outer.last is not None and outer.last() is not None)
                outer.held_max = max(outer.held_max, held)
                outer.calls += 1
                t = self.h.get_tensor(name)
                outer.last = weakref.ref(t)
                return t

        return Handle()


def test_checkpoint_scan_reads_one_tensor_at_a_time(tmp_path):
    model = build_tiny_model("llama", num_layers=2, hidden=32)
    model.save_pretrained(tmp_path)
    opener = _Counting()
    got = scan_checkpoint(tmp_path, 2, opener=opener)
    layer_mats = [n for n, p in model.named_parameters() if ".layers." in n and p.ndim == 2]
    assert opener.calls == len(layer_mats) == len(got["matrices"])
    assert opener.held_max == 0  # no earlier matrix alive when the next one is read
    assert sorted(got["per_type"]) == sorted({n.split(".")[-2] for n in layer_mats})
    # the same numbers as the in-memory scan, per layer = mean over the layer's matrices
    mem = scan_model(model)
    assert got["per_layer"] == pytest.approx(mem["per_layer"], rel=1e-6)
    for i in range(2):
        vals = [r["snr"] for r in got["matrices"] if r["layer"] == i]
        assert got["per_layer"][i] == pytest.approx(sum(vals) / len(vals))
    t = got["timing"]
    units = sum(r["shape"][0] * r["shape"][1] * min(r["shape"]) for r in got["matrices"])
    assert t["seconds_per_unit"] == pytest.approx(
        sum(r["seconds"] for r in got["matrices"]) / units
    )
    assert t["llama7b_estimate_seconds"] > 0


def test_checkpoint_without_safetensors_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"no \*\.safetensors weight file"):
        scan_checkpoint(tmp_path, 2)


# ------------------------------------------------------------------------------ CLI


from layerfreeze.cli import main as cli_main  # noqa: E402
from tests.unit.test_diagnostics_trace_cli import saved  # noqa: E402, F401 - tiny saved model


def _relative(values):
    ref = float(np.median(values))
    return [min(v / (2 * ref), 1.0) for v in values]


def test_cli_snr_alone_needs_no_probe_and_recommends(saved, tmp_path, capsys):  # noqa: F811
    import json

    out = tmp_path / "out"
    args = ["trace", "--model", str(saved / "model"), "--measures", "snr", "--out", str(out)]
    rc = cli_main([*args, "--recommend", "--budget", "0.5"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert {"trace.json", "snr.json", "snr.png", "plan.yaml", "recommendation.json"} == {
        p.name for p in out.iterdir()
    }
    data = json.loads((out / "trace.json").read_text())
    snr = data["snr"]["per_layer"]
    assert len(snr) == 3 and [r["snr"] for r in data["layers"]] == snr
    assert (out / "snr.png").read_bytes()[:4] == b"\x89PNG"
    assert data["snr"]["timing"]["llama7b_estimate_seconds"] > 0
    assert "Llama-7B" in cap.out and "weight SNR" in cap.out and "recommended plan" in cap.out
    assert "snr" in cap.err  # the progress bar
    score = data["recommendation"]["score"]
    assert score["weights_used"] == {"snr": 1.0}
    assert score["score"] == pytest.approx([1 - x for x in _relative(snr)])
    # the per-matrix numbers equal an in-memory scan of the same weights
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(saved / "model")
    assert snr == pytest.approx(scan_model(model)["per_layer"], rel=1e-6)


def test_cli_snr_with_probe_measures_adds_the_component(saved, tmp_path, capsys):  # noqa: F811
    import json

    out = tmp_path / "out"
    rc = cli_main(
        [
            "trace",
            "--model",
            str(saved / "model"),
            "--probe",
            str(saved / "probe.txt"),
            "--max-tokens",
            "64",
            "--measures",
            "logit_lens,skip,snr",
            "--out",
            str(out),
            "--recommend",
            "--budget",
            "0.5",
        ]
    )
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    data = json.loads((out / "trace.json").read_text())
    assert data["settings"]["measures"] == ["logit_lens", "skip", "snr"]
    assert len(data["snr"]["per_layer"]) == 3 and "snr" in data["layers"][0]
    assert data["recommendation"]["score"]["weights"] == {
        "lens": 0.4,
        "sensitivity": 0.3,
        "stability": 0.3,
        "snr": 0.25,
    }
    assert "snr" in data["recommendation"]["score"]["weights_used"]
    assert {"snr.json", "snr.png", "layers.csv"} <= {p.name for p in out.iterdir()}


def test_top_layers_plan_is_a_valid_plan_of_exactly_those_layers():
    from layerfreeze.apply import apply_plan
    from layerfreeze.plan import LayerPlan

    model = build_tiny_model("llama", num_layers=4, hidden=32)
    with torch.no_grad():  # plant a strong low-rank signal in layers 0 and 2
        for i in (0, 2):
            w = model.model.layers[i].mlp.up_proj.weight
            w += _planted(*w.shape, 20.0, seed=i) * w.std()
    got = scan_model(model, top_percent=50)
    assert got["top_layers"]["layers"] == [0, 2]
    plan = LayerPlan.parse(got["top_layers"]["plan"])
    apply_plan(model, plan)
    trained = {
        int(n.split(".")[2])
        for n, p in model.named_parameters()
        if p.requires_grad and ".layers." in n
    }
    assert trained == {0, 2}
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".layers." not in n)


def test_layer_scores_snr_component_and_default_weights():
    from layerfreeze.diagnostics.recommend import DEFAULT_WEIGHTS, layer_scores, parse_weights

    snr = [0.1, 0.4, 0.2, 0.0]
    rows = [{"skip": s} for s in (1.0, 2.0, 3.0, 4.0)]
    trace = {"layers": rows, "snr": {"per_layer": snr}}
    got = layer_scores(trace, 4)
    x_snr = [1 - min(v / (2 * 0.15), 1.0) for v in snr]  # median 0.15
    x_sens = [min(v / (2 * 2.5), 1.0) for v in (1.0, 2.0, 3.0, 4.0)]
    assert got["weights"] == {**DEFAULT_WEIGHTS, "snr": 0.25}
    assert got["weights_used"] == pytest.approx({"sensitivity": 0.3 / 0.55, "snr": 0.25 / 0.55})
    want = [(0.3 * a + 0.25 * b) / 0.55 for a, b in zip(x_sens, x_snr, strict=True)]
    assert got["score"] == pytest.approx(want)
    # a trace without snr keeps the old defaults; named weights are as given
    assert layer_scores({"layers": rows}, 4)["weights"] == DEFAULT_WEIGHTS
    assert parse_weights("snr=1") == {**dict.fromkeys(DEFAULT_WEIGHTS, 0.0), "snr": 1.0}
    assert layer_scores(trace, 4, "snr=1")["score"] == pytest.approx(x_snr)
