"""Per-layer diagnostics series of a training run: collect ``SensitivityHooks`` records, plot them.

``layerfreeze train`` with ``diagnostics.enabled: true`` logs one record per interval
(``{"diag/<measure>/layers.<i>": value, "diag/probe_loss": loss}``) to the metrics JSONL and
wandb, and at the end writes ``diagnostics.png``: one panel per measure, one line per layer
(global index) over the training steps.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from typing import Any

__all__ = ["plot_layer_series", "split_series"]

_KEY = re.compile(r"^diag/(?P<measure>[a-z_]+)/layers\.(?P<layer>\d+)$")


def split_series(
    records: Sequence[tuple[int, dict[str, Any]]],
) -> dict[str, dict[int, list[tuple[int, float]]]]:
    """``{measure: {layer: [(step, value), ...]}}`` from ``(step, record)`` pairs."""
    out: dict[str, dict[int, list[tuple[int, float]]]] = {}
    for step, record in records:
        for key, value in record.items():
            m = _KEY.match(key)
            if m is None or not isinstance(value, (int, float)):
                continue
            out.setdefault(m["measure"], {}).setdefault(int(m["layer"]), []).append(
                (step, float(value))
            )
    return out


def plot_layer_series(records: Sequence[tuple[int, dict[str, Any]]]) -> bytes:
    """PNG bytes: one panel per measure, one line per layer, x = optimizer step.

    Raises:
        ValueError: no per-layer values in ``records``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = split_series(records)
    if not series:
        raise ValueError("plot_layer_series: the records hold no diag/<measure>/layers.<i> values.")
    fig, axes = plt.subplots(
        len(series), 1, figsize=(8, 2.6 * len(series)), squeeze=False, sharex=True
    )
    cmap = plt.get_cmap("viridis")
    for ax, (measure, layers) in zip(axes[:, 0], sorted(series.items()), strict=True):
        n = max(layers) + 1
        for layer in sorted(layers):
            steps, values = zip(*layers[layer], strict=True)
            ax.plot(steps, values, marker="o", ms=2.5, lw=1.2,
                    color=cmap(layer / max(1, n - 1)), label=f"layer {layer}")
        ax.set_ylabel(measure)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("optimizer step")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", fontsize=7, ncol=1 + len(labels) // 12)
    fig.suptitle("per-layer diagnostics on the probe batch")
    fig.tight_layout(rect=(0, 0, 0.88, 0.97))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
