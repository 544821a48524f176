"""``EvalCallback``: C-Eval / CMMLU scores at training checkpoints, one JSON each, plus a summary.

The training loop calls, on every rank::

    cb = EvalCallback(cfg.eval, tokenizer, run_dir / "eval")
    metrics = cb.maybe_run(step, model)          # None when this step is not an eval step
    if metrics: writer.log(metrics, step)        # {"eval/ceval/acc_macro": ..., ...}
    ...
    cb.maybe_run(last_step, model, force=True)   # when cfg.eval.at_end
    cb.finalize()                                # summary.md / summary.json / accuracy.png

Files (rank 0): ``step_<step>.json`` per checkpoint (results of every benchmark, without
per-question records), ``summary.json``, ``summary.md`` and ``accuracy.png``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from layerfreeze.evaluation.config import EvalConfig
from layerfreeze.evaluation.data import Benchmark, load_benchmark
from layerfreeze.evaluation.report import flat_metrics
from layerfreeze.evaluation.runner import evaluate
from layerfreeze.utils.dist import is_main_process
from layerfreeze.utils.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from layerfreeze.utils.logging import get_logger, log_rank0

__all__ = ["EvalCallback"]

logger = get_logger(__name__)


class EvalCallback:
    """Runs the configured benchmarks every ``cfg.every_steps`` steps.

    Args:
        cfg: The ``eval`` section.
        tokenizer: The run's tokenizer (``encode(str) -> list[int]``).
        out_dir: Where the per-checkpoint JSONs, summary and plot go.
        benchmarks: The benchmarks of ``cfg`` already loaded (the training recipe loads them
            before training, so a bad subject fails early); default: loaded at the first
            evaluation.
    """

    def __init__(
        self,
        cfg: EvalConfig,
        tokenizer: Any,
        out_dir: str | Path,
        benchmarks: dict[str, Benchmark] | None = None,
    ):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.out_dir = Path(out_dir)
        self.history: list[dict[str, Any]] = []
        self._benchmarks: dict[str, Benchmark] | None = benchmarks

    def _load(self) -> dict[str, Benchmark]:
        if self._benchmarks is None:
            self._benchmarks = {
                b: load_benchmark(
                    b, self.cfg.data_dir, self.cfg.split_for(b), self.cfg.subjects.get(b) or None
                )
                for b in self.cfg.benchmarks
            }
        return self._benchmarks

    def should_run(self, step: int) -> bool:
        """True when ``step`` is an evaluation step and has not been evaluated yet."""
        if any(h["step"] == step for h in self.history):
            return False
        return self.cfg.every_steps > 0 and step > 0 and step % self.cfg.every_steps == 0

    def maybe_run(
        self, step: int, model: Any, force: bool = False, shard: tuple[int, int] | None = None
    ) -> dict[str, float] | None:
        """Evaluate at ``step`` if due (or ``force``); call on every rank.

        ``shard`` is ``(data-parallel rank, data-parallel size)`` under model parallelism (see
        :func:`~layerfreeze.evaluation.runner.evaluate`); ``model`` is what the engine's
        ``eval_model()`` returns.

        The model is put in eval mode and restored to its previous mode; scoring runs under
        ``torch.no_grad``.

        Returns:
            Flat metrics (``eval/<benchmark>/acc_macro``, ``…/acc_micro``, one per category,
            ``…/num_questions``, ``eval/seconds``) on every rank, or None when nothing ran.
        """
        if any(h["step"] == step for h in self.history):
            return None
        if not (force or self.should_run(step)):
            return None
        benchmarks = self._load()
        metrics: dict[str, float] = {}
        results: dict[str, Any] = {}
        questions: dict[str, Any] = {}
        seconds = 0.0
        for name, bench in benchmarks.items():
            result, records = evaluate(
                model, self.tokenizer, bench, shots=self.cfg.shots, prompt=self.cfg.prompt,
                batch_size=self.cfg.batch_size, max_questions=self.cfg.max_questions,
                max_length=self.cfg.max_length, shard=shard,
            )
            results[name] = result
            questions[name] = records
            metrics.update(flat_metrics(result))
            seconds += result["seconds"]
        metrics["eval/seconds"] = seconds
        self.history.append({"step": step, "metrics": metrics})
        if is_main_process():
            atomic_write_json(  # per question: prediction, gold and each choice's loglik
                self.out_dir / f"step_{step:08d}.json",
                {"step": step, "results": results, "questions": questions},
            )
        summary = ", ".join(
            f"{b} {100 * metrics[f'eval/{b}/acc_macro']:.2f}"
            for b in benchmarks if f"eval/{b}/acc_macro" in metrics
        )
        log_rank0(logger, "eval at step %d (macro acc): %s (%.1fs)", step, summary, seconds)
        return metrics

    def summary_table(self) -> str:
        """Markdown table: one row per evaluated step, macro and micro accuracy per benchmark."""
        cols = [f"eval/{b}/{k}" for b in self.cfg.benchmarks for k in ("acc_macro", "acc_micro")]
        head = "| step | " + " | ".join(c.removeprefix("eval/") for c in cols) + " |"
        lines = [head, "|" + "---|" * (len(cols) + 1)]
        for h in sorted(self.history, key=lambda h: h["step"]):
            vals = [h["metrics"].get(c) for c in cols]
            cells = ["-" if v is None else f"{100 * v:.2f}" for v in vals]
            lines.append(f"| {h['step']} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def finalize(self) -> None:
        """Write ``summary.json``, ``summary.md`` and ``accuracy.png`` (rank 0; no-op if empty)."""
        if not self.history or not is_main_process():
            return
        table = self.summary_table()
        atomic_write_json(self.out_dir / "summary.json", {"history": self.history})
        atomic_write_text(
            self.out_dir / "summary.md",
            "# Evaluation across checkpoints (accuracy, %)\n\n" + table
            + "\nmacro = mean over subjects (leaderboard convention); micro = over questions.\n",
        )
        atomic_write_bytes(self.out_dir / "accuracy.png", self._plot())
        log_rank0(logger, "evaluation summary:\n%s", table)

    def _plot(self) -> bytes:
        import io

        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        hist = sorted(self.history, key=lambda h: h["step"])
        fig, ax = plt.subplots(figsize=(6, 4))
        for b in self.cfg.benchmarks:
            for key, style in (("acc_macro", "-o"), ("acc_micro", "--s")):
                pts = [(h["step"], h["metrics"][f"eval/{b}/{key}"]) for h in hist
                       if f"eval/{b}/{key}" in h["metrics"]]
                if pts:
                    xs, ys = zip(*pts, strict=False)
                    ax.plot(xs, [100 * y for y in ys], style, label=f"{b} {key}")
        ax.set_xlabel("step")
        ax.set_ylabel("accuracy (%)")
        ax.set_title("C-Eval / CMMLU accuracy vs step")
        ax.grid(True, alpha=0.3)
        ax.legend()
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        return buf.getvalue()
