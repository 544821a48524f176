"""Weight-only layer scores: per-matrix signal-to-noise against the Marchenko-Pastur edge.

Run::

    from layerfreeze.diagnostics.snr import scan_checkpoint
    section = scan_checkpoint("runs/x/export", num_layers=32)   # no probe, no model load
    section["per_layer"]            # mean SNR of each layer's weight matrices

The measure follows Spectrum (Hartford et al. 2024, "Spectrum: Targeted Training on Signal to
Noise Ratio", github.com/cognitivecomputations/spectrum, ``spectrum.py``): for a weight matrix
``W`` of shape ``m x n`` with singular values ``s_1 >= ... >= s_k`` (``k = min(m, n)``,
``beta = k / max(m, n)``), the noise part of ``W`` is modelled as i.i.d. entries, whose
singular values stay below the Marchenko-Pastur (MP) upper edge; the singular values above the
edge are signal::

    edge = sigma_hat * (1 + sqrt(beta))          (sigma_hat on the singular-value scale)
    snr  = sum(s_i > edge) / sum(s_i <= edge)

``sigma_hat`` is estimated from the singular values themselves (Spectrum's choice), but not
with Spectrum's estimator: Spectrum uses ``IQR(s) / 1.349`` (the Normal-distribution rule) and
reports ``snr / s_1``. Singular values of noise are not Normal; on a pure Gaussian matrix that
rule puts the edge inside the bulk and calls a large part of the noise "signal"
(``tests/unit/test_diagnostics_snr.py::test_spectrum_iqr_rule_calls_noise_signal``). We use the
median rule of Gavish and Donoho (2014, "The optimal hard threshold for singular values is
4/sqrt(3)"): ``sigma_hat = median(s) / sqrt(mu_beta)`` with ``mu_beta`` the median of the MP
law of ratio ``beta`` (unit variance), so that a pure noise matrix has its edge at the bulk's
edge (SNR ~ 0) and a planted low-rank signal above it gives a large SNR. Spectrum's exact
value is recorded beside it as ``spectrum_snr`` for comparison.

Per layer: the mean SNR of the layer's 2-D weight matrices; per module type (``q_proj``,
``down_proj``, ...): the SNR of that matrix in each layer. Embeddings and the LM head are not
layer matrices and are not scored (Spectrum always trains them).

Cost: one ``svdvals`` per matrix (``O(m n min(m, n))``); memory: one matrix in float32 and its
SVD workspace. :func:`estimate_seconds` turns the measured time per matrix into an estimate for
another shape set (:data:`LLAMA_7B_SHAPES`).
"""

from __future__ import annotations

import functools
import math
import re
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "LLAMA_7B_SHAPES",
    "estimate_seconds",
    "matrix_snr",
    "mp_median",
    "scan_checkpoint",
    "scan_model",
    "snr_summary",
    "spectrum_snr",
    "write_snr",
]

#: The layer matrices of Llama-2-7B: (rows, cols, count) for 32 layers.
LLAMA_7B_SHAPES: tuple[tuple[int, int, int], ...] = (
    (4096, 4096, 4 * 32),  # q, k, v, o
    (11008, 4096, 2 * 32),  # gate, up
    (4096, 11008, 32),  # down
)
#: below this smaller side the time of an SVD call is mostly fixed cost, not O(m n min(m, n))
_CALIBRATED_SIDE = 1024
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.(.+)\.weight$")
REFERENCE = (
    "Hartford et al. 2024, Spectrum: Targeted Training on Signal to Noise Ratio "
    "(github.com/cognitivecomputations/spectrum); sigma by the median rule of Gavish & "
    "Donoho 2014"
)


@functools.lru_cache(maxsize=64)
def mp_median(beta: float) -> float:
    """Median of the Marchenko-Pastur law of ratio ``0 < beta <= 1`` and unit variance.

    The law of the eigenvalues of ``X X^T / n`` for an ``m x n`` (``m <= n``) matrix of i.i.d.
    unit-variance entries as ``m / n -> beta``: density ``sqrt((b - x)(x - a)) / (2 pi beta x)``
    on ``[a, b] = [(1 - sqrt(beta))^2, (1 + sqrt(beta))^2]``; integrated numerically with
    ``x = a + (b - a) t^2`` (no singularity at ``a`` when ``beta = 1``).
    """
    if not 0 < beta <= 1:
        raise ValueError(f"beta: must be in (0, 1], got {beta}.")
    import numpy as np

    a, b = (1 - math.sqrt(beta)) ** 2, (1 + math.sqrt(beta)) ** 2
    t = np.linspace(0.0, 1.0, 200001)
    x = a + (b - a) * t * t
    with np.errstate(divide="ignore", invalid="ignore"):
        f = np.sqrt(np.clip((b - x) * (x - a), 0, None)) / (2 * math.pi * beta * x)
    g = np.nan_to_num(f * 2 * (b - a) * t)  # dx = 2 (b - a) t dt
    cdf = np.concatenate([[0.0], np.cumsum((g[1:] + g[:-1]) / 2 * np.diff(t))])
    cdf /= cdf[-1]
    return float(np.interp(0.5, cdf, x))


def _svdvals(weight: torch.Tensor) -> torch.Tensor:
    w = weight.detach().to(torch.float32)
    return torch.linalg.svdvals(w).to(torch.float64)


def matrix_snr(weight: torch.Tensor) -> dict[str, Any]:
    """SNR of one 2-D matrix (module docstring), with Spectrum's own value beside it.

    Returns:
        ``shape``, ``snr``, ``edge`` (the MP edge in singular-value units), ``sigma`` (the noise
        level per entry, ``sigma_hat / sqrt(max(m, n))``), ``signal_count`` (singular values
        above the edge), ``top`` (largest singular value), ``spectrum_snr``.

    Raises:
        ValueError: not a 2-D matrix.
    """
    if weight.ndim != 2 or min(weight.shape) < 1:
        raise ValueError(f"matrix_snr: expected a 2-D matrix, got shape {tuple(weight.shape)}.")
    s = _svdvals(weight)
    m, n = weight.shape
    beta = min(m, n) / max(m, n)
    edge = float(s.median()) * (1 + math.sqrt(beta)) / math.sqrt(mp_median(beta))
    out = _split(s, edge)
    out.update(
        shape=[int(m), int(n)],
        edge=edge,
        sigma=float(s.median()) / math.sqrt(mp_median(beta) * max(m, n)),
        top=float(s[0]),
        spectrum_snr=spectrum_snr(s, m, n),
    )
    return out


def _split(s: torch.Tensor, edge: float) -> dict[str, Any]:
    above = s > edge
    signal, noise = float(s[above].sum()), float(s[~above].sum())
    snr = signal / noise if noise > 0 else (math.inf if signal > 0 else 0.0)
    return {"snr": snr, "signal_count": int(above.sum())}


def spectrum_snr(s: torch.Tensor, m: int, n: int) -> float:
    """Spectrum's value for singular values ``s`` of an ``m x n`` matrix, as ``spectrum.py``
    computes it: ``sigma = IQR(s) / 1.349``, ``edge = sigma (1 + sqrt(beta))``, signal / noise
    (noise 1 when no value is at or below the edge), divided by ``s_1``."""
    s = s.to(torch.float64)
    sigma = float(torch.quantile(s, 0.75) - torch.quantile(s, 0.25)) / 1.349
    edge = sigma * (1 + math.sqrt(min(m, n) / max(m, n)))
    above = s > edge
    signal = float(s[above].sum()) if bool(above.any()) else 0.0
    noise = float(s[~above].sum()) if bool((~above).any()) else 1.0
    top = float(s.max())
    return (signal / noise) / top if top > 0 else 0.0


def estimate_seconds(
    measured: list[tuple[int, int, float]], shapes: tuple[tuple[int, int, int], ...]
) -> dict[str, float]:
    """Time of an SNR scan of ``shapes`` from the measured time of other matrices.

    An SVD of an ``m x n`` matrix costs ``c * m * n * min(m, n)``; ``c`` is fitted as
    ``sum(t_j) / sum(m_j n_j min(m_j, n_j))`` over the measured ``(m_j, n_j, t_j)``, and the
    estimate is ``c * sum(count * m * n * min(m, n))`` over ``shapes`` (``(m, n, count)``).
    Small matrices underestimate ``c`` on most hardware (fixed overheads aside, large SVDs
    are memory-bound), so read it as an order of magnitude.

    Returns:
        ``seconds_per_unit`` (``c``) and ``seconds`` (the estimate); NaN when nothing was
        measured.
    """
    units = sum(m * n * min(m, n) for m, n, _ in measured)
    c = sum(t for _, _, t in measured) / units if units else math.nan
    total = sum(k * m * n * min(m, n) for m, n, k in shapes)
    return {"seconds_per_unit": c, "seconds": c * total}


def _matrices_of_checkpoint(
    path: Path, opener: Callable[..., Any]
) -> Iterator[tuple[str, Callable[[], torch.Tensor], tuple[int, ...]]]:
    for f in sorted(path.glob("*.safetensors")):
        with opener(str(f), framework="pt") as handle:
            for name in sorted(handle.keys()):
                shape = tuple(handle.get_slice(name).get_shape())
                yield name, functools.partial(handle.get_tensor, name), shape


def _section(
    records: list[dict[str, Any]], num_layers: int, top_percent: float, seconds: float
) -> dict[str, Any]:
    per_layer_vals: list[list[float]] = [[] for _ in range(num_layers)]
    per_type: dict[str, list[float | None]] = {}
    for r in records:
        per_layer_vals[r["layer"]].append(r["snr"])
        per_type.setdefault(r["type"], [None] * num_layers)[r["layer"]] = r["snr"]
    per_layer = [statistics.fmean(v) if v else math.nan for v in per_layer_vals]
    k = max(1, round(num_layers * top_percent / 100))
    order = sorted(
        (i for i in range(num_layers) if not math.isnan(per_layer[i])),
        key=lambda i: (-per_layer[i], i),
    )
    measured = [(r["shape"][0], r["shape"][1], r["seconds"]) for r in records]
    est = estimate_seconds(measured, LLAMA_7B_SHAPES)
    largest = max(
        (r["shape"] for r in records), key=lambda sh: sh[0] * sh[1] * min(sh), default=[0, 0]
    )
    note = (
        f"measured on matrices no larger than {largest[0]}x{largest[1]}, where the fixed cost "
        "of a call dominates: likely an over-estimate"
        if min(largest) < _CALIBRATED_SIDE
        else "measured on matrices of realistic size"
    )
    return {
        "method": {
            "snr": "sum(s > edge) / sum(s <= edge), edge = median(s) (1 + sqrt(beta)) / "
            "sqrt(mu_beta), beta = min(m,n)/max(m,n), mu_beta the MP median",
            "spectrum_snr": "Spectrum's spectrum.py: sigma = IQR(s)/1.349, edge = sigma "
            "(1 + sqrt(beta)), (signal / noise) / s_1",
            "per_layer": "mean snr of the layer's 2-D weight matrices",
            "reference": REFERENCE,
        },
        "matrices": records,
        "per_layer": per_layer,
        "per_type": per_type,
        "top_layers": {
            "percent": top_percent,
            "layers": sorted(order[:k]),
            "plan": _top_plan(sorted(order[:k])),
        },
        "timing": {
            "seconds": seconds,
            "matrices": len(records),
            "seconds_per_unit": est["seconds_per_unit"],
            "llama7b_estimate_seconds": est["seconds"],
            "llama7b_shapes": [list(s) for s in LLAMA_7B_SHAPES],
            "largest_measured_shape": list(largest),
            "note": note,
            "rule": "t = c * sum(count * m * n * min(m, n)), c = sum(t_j) / sum(m_j n_j "
            "min(m_j, n_j)) over the matrices measured here",
        },
    }


def _top_plan(layers: list[int]) -> dict[str, Any]:
    """A plan spec training ``layers`` in full (one rule per contiguous run), the rest frozen:
    Spectrum's choice at layer granularity (Spectrum also trains embeddings and LM head; add
    ``embeddings:full`` / ``lm_head:full`` rules for that)."""
    runs: list[list[int]] = []
    for i in layers:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    rules = [{"layers": f"{r[0]}-{r[-1]}", "policy": "full"} for r in runs]
    return {"name": "snr_top_layers", "rules": rules}


def _scan(
    items: Iterator[tuple[str, int, str, Callable[[], torch.Tensor]]],
    total: int,
    num_layers: int,
    top_percent: float,
    progress: bool,
) -> dict[str, Any]:
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="snr", unit="matrix", dynamic_ncols=True)
    records: list[dict[str, Any]] = []
    start = time.perf_counter()
    try:
        for name, layer, kind, load in items:
            t0 = time.perf_counter()
            weight = load()  # one matrix at a time: released before the next is loaded
            rec = matrix_snr(weight)
            del weight
            rec.update(name=name, layer=layer, type=kind, seconds=time.perf_counter() - t0)
            records.append(rec)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return _section(records, num_layers, top_percent, time.perf_counter() - start)


def scan_checkpoint(
    path: str | Path,
    num_layers: int,
    *,
    top_percent: float = 50.0,
    progress: bool = False,
    opener: Callable[..., Any] | None = None,
) -> dict[str, Any]:
    """SNR of every layer matrix of a safetensors checkpoint, read one tensor at a time.

    Args:
        path: a Hugging Face checkpoint directory with ``*.safetensors`` files.
        num_layers: the model's layer count (``config.num_hidden_layers``).
        top_percent: share of layers listed in ``top_layers`` (highest SNR, as Spectrum).
        progress: show a tqdm bar on stderr.
        opener: ``safetensors.safe_open`` (the default) or a wrapper of it.

    Returns:
        The ``snr`` section of a trace (module docstring; ``per_layer``, ``per_type``,
        ``matrices``, ``top_layers``, ``timing``, ``method``).

    Raises:
        ValueError: no ``*.safetensors`` file, or no layer matrix in them.
    """
    if opener is None:
        from safetensors import safe_open as opener
    path = Path(path)
    if not list(path.glob("*.safetensors")):
        raise ValueError(
            f"--model {path}: no *.safetensors weight file; the snr measure reads safetensors "
            "only. Re-save the model with save_pretrained(safe_serialization=True)."
        )
    found = []
    for name, _load, shape in _matrices_of_checkpoint(path, opener):
        m = _LAYER_RE.search(name)
        if m and len(shape) == 2 and int(m.group(1)) < num_layers:
            found.append(name)
    if not found:
        raise ValueError(
            f"--model {path}: no layer weight matrix (names like model.layers.N.*.weight) in "
            "its safetensors files."
        )
    wanted = set(found)

    def items():
        for name, load, _ in _matrices_of_checkpoint(path, opener):
            if name in wanted:
                m = _LAYER_RE.search(name)
                yield name, int(m.group(1)), m.group(2).split(".")[-1], load

    return _scan(items(), len(found), num_layers, top_percent, progress)


def scan_model(
    model: nn.Module, *, top_percent: float = 50.0, progress: bool = False
) -> dict[str, Any]:
    """:func:`scan_checkpoint` for a model in memory: one matrix at a time, in float32."""
    from layerfreeze.models import discover_layout

    layout = discover_layout(model)
    mats = [
        (f"{info.name}.{pname}", i, pname.removesuffix(".weight").split(".")[-1], p)
        for i, info in enumerate(layout.layers)
        for pname, p in info.module.named_parameters()
        if p.ndim == 2 and pname.endswith("weight")
    ]
    items = ((n, i, k, functools.partial(lambda q: q.detach(), p)) for n, i, k, p in mats)
    return _scan(items, len(mats), layout.num_layers, top_percent, progress)


def snr_summary(section: dict[str, Any]) -> str:
    """Per-layer table (mean SNR, then one column per module type) and the timing lines."""
    types = list(section["per_type"])
    header = ["layer", "snr(mean)", *types]
    body = []
    for i, v in enumerate(section["per_layer"]):
        cells = [str(i), f"{v:.4f}"]
        cells += [
            "-" if section["per_type"][t][i] is None else f"{section['per_type'][t][i]:.4f}"
            for t in types
        ]
        body.append(cells)
    widths = [max(len(h), *(len(b[j]) for b in body)) for j, h in enumerate(header)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    t = section["timing"]
    top = section["top_layers"]
    return "\n".join(
        [
            "weight SNR (Marchenko-Pastur edge, no probe): signal / noise singular-value sums",
            line(header),
            "  ".join("-" * w for w in widths),
            *(line(b) for b in body),
            f"top {top['percent']:g}% layers by SNR (Spectrum's pick): {top['layers']} "
            f"(plan: {', '.join(r['layers'] + ':full' for r in top['plan']['rules'])})",
            f"snr time: {t['seconds']:.2f} s for {t['matrices']} matrices; estimated "
            f"{t['llama7b_estimate_seconds']:.0f} s for a Llama-7B-shaped model on this device "
            f"(from the measured time per matrix, O(m n min(m, n)) per SVD; {t['note']})",
        ]
    )


def write_snr(section: dict[str, Any], directory: str | Path) -> list[str]:
    """Write ``snr.json`` (the section) and ``snr.png`` (per-layer and per-type SNR)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from layerfreeze.utils.io import atomic_write_json

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_json(directory / "snr.json", section)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = list(range(len(section["per_layer"])))
    ax.plot(x, section["per_layer"], "k-o", lw=2, label="mean")
    for kind, vals in section["per_type"].items():
        pts = [(i, v) for i, v in enumerate(vals) if v is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1, alpha=0.7, label=kind)
    ax.set_xlabel("layer")
    ax.set_ylabel("SNR (signal / noise singular values)")
    ax.set_title("weight SNR against the Marchenko-Pastur edge", fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(directory / "snr.png", dpi=100)
    plt.close(fig)
    return ["snr.json", "snr.png"]
