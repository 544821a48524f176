"""Trace outputs: ``trace.json``, CSV files, PNG plots (matplotlib Agg) and the console table.

``write_trace(result, directory)`` writes into ``directory`` (the CLI passes a staging
directory that it renames into place only when everything succeeded):

* ``trace.json``: the whole result of :func:`~layerfreeze.diagnostics.trace.run_trace`;
* ``layers.csv``: one row per layer (:func:`~layerfreeze.diagnostics.trace.per_layer_rows`);
* ``angular_mean.csv`` / ``angular_last_token.csv``: ``d(l, n)``, rows ``l``, columns ``n``;
* ``angular_heatmap.png``, ``logit_lens.png``, ``sensitivity.png``, ``stability.png`` (each
  when its measures ran; ``stability.png`` has one panel for the whole-model drift and one for
  the per-layer stability in isolation).
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from layerfreeze.utils.io import atomic_write_json, atomic_write_text

__all__ = ["write_trace", "summary_table", "TRACE_FILES"]

TRACE_FILES = ("trace.json", "layers.csv")


def _csv(rows: list[dict[str, Any]]) -> str:
    keys: list[str] = []
    for r in rows:
        for k in r:
            if k not in keys:
                keys.append(k)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in keys})
    return buf.getvalue()


def _matrix_csv(rows: list[list[float]]) -> str:
    width = len(rows[0]) if rows else 0
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["l"] + [f"n={n}" for n in range(1, width + 1)])
    for layer, vals in enumerate(rows):
        w.writerow([layer] + vals + [""] * (width - len(vals)))
    return buf.getvalue()


def _plots(result: dict[str, Any], directory: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    def save(fig, ax, name: str) -> None:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        fig.tight_layout()
        fig.savefig(directory / name, dpi=110)
        plt.close(fig)
        written.append(name)

    written: list[str] = []
    layers = [r["layer"] for r in result["layers"]]
    ang = result.get("representation", {}).get("angular")
    if ang:
        p = ang["num_points"]
        grid = [[math.nan] * (p - 1) for _ in range(p - 1)]
        for layer, vals in enumerate(ang["mean"]):
            for n, v in enumerate(vals):
                grid[n][layer] = v
        fig, ax = plt.subplots(figsize=(6, 5))
        im = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis", vmin=0.0)
        ax.set_xlabel("layer l")
        ax.set_ylabel("block size n")
        ax.set_yticks(range(p - 1), [str(n) for n in range(1, p)])
        ax.set_title("angular distance d(l, n) (token mean)")
        fig.colorbar(im, ax=ax)
        save(fig, ax, "angular_heatmap.png")
    lens = result.get("logit_lens")
    if lens:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(layers, lens["loss"], marker="o", label="lens loss")
        ax.set_xlabel("layer (output)")
        ax.set_ylabel("loss (nats)")
        ax2 = ax.twinx()
        ax2.plot(layers, lens["accuracy"], marker="s", color="tab:orange", label="lens accuracy")
        if "gold_choice_prob" in lens:
            ax2.plot(
                layers,
                lens["gold_choice_prob"],
                marker="^",
                color="tab:green",
                label="gold prob (4 letters)",
            )
        ax2.set_ylabel("accuracy / probability")
        ax2.set_ylim(0, 1)
        mark = lens.get("decodable_layer", lens.get("converged_layer"))
        if mark is not None:
            ax.axvline(layers[mark], color="grey", linestyle="--", label="decodable/converged")
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=8)
        ax.set_title("logit lens")
        save(fig, ax, "logit_lens.png")
    sens = result.get("sensitivity")
    if sens:
        fig, ax = plt.subplots(figsize=(6, 4))
        if "skip" in sens:
            ax.plot(layers, sens["skip"], marker="o", label="skip")
        for scale, vals in sens.get("noise", {}).items():
            ax.plot(layers, vals, marker=".", label=f"noise {scale}")
        ax.set_xlabel("layer")
        ax.set_ylabel("loss increase (nats)")
        if "grad_norm" in sens:
            ax2 = ax.twinx()
            ax2.plot(layers, sens["grad_norm"], color="black", linestyle=":", label="grad norm")
            ax2.set_ylabel("gradient norm")
            h2, l2 = ax2.get_legend_handles_labels()
        else:
            h2, l2 = [], []
        h1, l1 = ax.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=8)
        ax.set_title("sensitivity")
        save(fig, ax, "sensitivity.png")
    stab, iso = result.get("stability"), result.get("layer_stability")
    if stab or iso:
        panels = [x for x in (stab, iso) if x]
        fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
        if stab:
            ax = axes[0][0]
            ax.plot(layers, stab["weight_change"], marker="o", label="relative weight change")
            ax.set_xlabel("layer")
            ax.set_ylabel("||W_k - W_0|| / ||W_0||")
            ax2 = ax.twinx()
            ax2.plot(layers, stab["drift"], marker="s", color="tab:red", label="output drift")
            ax2.set_ylabel("angular distance to untrained")
            h1, l1 = ax.get_legend_handles_labels()
            h2, l2 = ax2.get_legend_handles_labels()
            ax.legend(h1 + h2, l1 + l2, fontsize=8)
            ax.set_title(
                f"whole-model drift: all layers, {stab['steps']} AdamW steps (lr {stab['lr']:g})",
                fontsize=9,
            )
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if iso:
            ax = axes[0][-1]
            ax.plot(layers, iso["output_change"], marker="o", color="tab:purple")
            ax.set_xlabel("layer")
            ax.set_ylabel("||y' - y|| / ||y|| of the layer's own output")
            how = (
                f"perturbed by {iso['scale']:g}"
                if iso["mode"] == "perturb"
                else f"{iso['steps']} AdamW steps"
            )
            ax.set_title(f"per-layer stability in isolation: one layer {how}", fontsize=9)
        save(fig, axes[0][0], "stability.png")
    return written


def write_trace(result: dict[str, Any], directory: str | Path) -> list[str]:
    """Write every output file of ``result`` into ``directory``; returns the file names."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_json(directory / "trace.json", result)
    atomic_write_text(directory / "layers.csv", _csv(result["layers"]))
    written = list(TRACE_FILES)
    ang = result.get("representation", {}).get("angular")
    if ang:
        atomic_write_text(directory / "angular_mean.csv", _matrix_csv(ang["mean"]))
        atomic_write_text(directory / "angular_last_token.csv", _matrix_csv(ang["last_token"]))
        written += ["angular_mean.csv", "angular_last_token.csv"]
    written += _plots(result, directory)
    return written


_SHORT = {
    "angular_next": "d(l,1)",
    "cka_next": "CKA",
    "lens_loss": "lens loss",
    "lens_accuracy": "lens acc",
    "lens_gold_choice_prob": "p(gold)",
    "skip": "skip",
    "grad_norm": "grad",
    "fisher_mean": "fisher/param",
    "weight_change": "dW/W(all)",
    "drift": "drift(all)",
    "layer_stability": "dY/Y(alone)",
}


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.3g}" if abs(v) < 1e-3 and v != 0 else f"{v:.4f}"
    return str(v)


def summary_table(result: dict[str, Any]) -> str:
    """A fixed-width per-layer table of the main numbers plus a few headline lines."""
    rows = result["layers"]
    noise_keys = [k for k in (rows[0] if rows else {}) if k.startswith("noise_")]
    cols = ["layer"] + [k for k in _SHORT if rows and k in rows[0]]
    if noise_keys:
        cols.insert(cols.index("skip") + 1 if "skip" in cols else len(cols), noise_keys[-1])
    header = [_SHORT.get(c, c) for c in cols]
    body = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    out = [line(header), "  ".join("-" * w for w in widths), *(line(b) for b in body)]
    model, probe = result["model"], result["probe"]
    out.insert(
        0,
        f"model: {model['model_type']} ({model['num_layers']} layers, hidden "
        f"{model['hidden_size']}, {model['dtype']}); probe: {probe['kind']}, "
        f"{probe['num_sequences']} sequences, {probe['num_tokens']} tokens",
    )
    lens = result.get("logit_lens", {})
    if "decodable_layer" in lens:
        out.append(
            f"answer decodable from layer: {_fmt(lens['decodable_layer'])} "
            f"(final lens accuracy {lens['accuracy'][-1]:.3f})"
        )
    if "converged_layer" in lens:
        out.append(f"lens loss converged from layer: {_fmt(lens['converged_layer'])}")
    sens = result.get("sensitivity", {})
    if "base_loss" in sens:
        out.append(f"probe loss: {sens['base_loss']:.4f}")
    if "stability" in result:
        out.append("drift(all), dW/W(all): " + result["stability"]["measure"])
    if "layer_stability" in result:
        out.append("dY/Y(alone): " + result["layer_stability"]["measure"])
    return "\n".join(out)
