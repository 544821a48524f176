"""``EvalConfig``: the ``eval`` section of the run config (checkpoint evaluation during training).

No torch here: the config layer must import quickly and without the model stack.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from layerfreeze.errors import ConfigError

__all__ = ["EvalConfig"]

_BENCHMARKS = ("ceval", "cmmlu")
_SPLITS = {"ceval": ("val", "dev"), "cmmlu": ("test", "dev")}
_PROMPTS = ("lm-eval", "official")


@dataclass
class EvalConfig:
    """C-Eval / CMMLU scoring at training checkpoints (``layerfreeze.evaluation.EvalCallback``)."""

    every_steps: int = 0
    """Evaluate every N optimizer steps (0: only when forced, e.g. at the end of training)."""
    benchmarks: list[str] = field(default_factory=lambda: ["ceval"])
    """Benchmarks to score: any of ceval, cmmlu."""
    data_dir: str | None = None
    """Folder with the released files (ceval/, cmmlu/ or one of them); null loads from the hub."""
    splits: dict[str, str] = field(default_factory=dict)
    """Scored split per benchmark (default ceval: val, cmmlu: test; dev is also allowed)."""
    subjects: dict[str, list[str]] = field(default_factory=dict)
    """Subject subset per benchmark, e.g. {ceval: [accountant, law]} (default: all)."""
    shots: int = 5
    """Few-shot examples from dev, in file order (0-5)."""
    prompt: str = "lm-eval"
    """Prompt format: lm-eval (lm-evaluation-harness 0.4.x, leaderboard-comparable) or official."""
    batch_size: int = 16
    """Forward rows per batch."""
    max_questions: int | None = None
    """Score only the first N questions of each subject (quick checkpoint evals); null: all."""
    max_length: int | None = None
    """Context length; longer prompts are cut from the left (default: the model's)."""
    at_end: bool = True
    """Also evaluate after the last step."""

    def __post_init__(self) -> None:
        problems: list[str] = []
        if self.every_steps < 0:
            problems.append(
                f"eval.every_steps: must be >= 0, got {self.every_steps}. Use 0 to disable."
            )
        if not self.benchmarks:
            problems.append("eval.benchmarks: is empty. List at least one of ceval, cmmlu.")
        for b in self.benchmarks:
            if b not in _BENCHMARKS:
                problems.append(f"eval.benchmarks: unknown benchmark, got {b!r}. Use ceval or cmmlu.")
        if len(set(self.benchmarks)) != len(self.benchmarks):
            problems.append(f"eval.benchmarks: lists a benchmark twice, got {self.benchmarks}.")
        for b, split in self.splits.items():
            if b not in self.benchmarks:
                problems.append(
                    f"eval.splits.{b}: not in eval.benchmarks {self.benchmarks}. Remove it or "
                    "add the benchmark."
                )
            elif split not in _SPLITS[b]:
                hint = " (C-Eval test has no answers: score it with `layerfreeze eval`)" if (
                    b == "ceval" and split == "test"
                ) else ""
                problems.append(
                    f"eval.splits.{b}: must be one of {', '.join(_SPLITS[b])}, got "
                    f"{split!r}{hint}."
                )
        for b, subs in self.subjects.items():
            if b not in self.benchmarks:
                problems.append(
                    f"eval.subjects.{b}: not in eval.benchmarks {self.benchmarks}. Remove it or "
                    "add the benchmark."
                )
            elif not subs:
                problems.append(f"eval.subjects.{b}: is empty. Omit it to score every subject.")
        if not 0 <= self.shots <= 5:
            problems.append(f"eval.shots: must be 0-5 (dev has 5 examples), got {self.shots}.")
        if self.prompt not in _PROMPTS:
            problems.append(
                f"eval.prompt: unknown prompt format, got {self.prompt!r}. Use lm-eval or official."
            )
        if self.batch_size < 1:
            problems.append(f"eval.batch_size: must be >= 1, got {self.batch_size}.")
        if self.max_questions is not None and self.max_questions < 1:
            problems.append(
                f"eval.max_questions: must be >= 1 or null, got {self.max_questions}."
            )
        if self.max_length is not None and self.max_length < 2:
            problems.append(f"eval.max_length: must be >= 2 or null, got {self.max_length}.")
        if problems:
            raise ConfigError(problems)

    def split_for(self, benchmark: str) -> str:
        """The scored split of ``benchmark``."""
        return self.splits.get(benchmark, "val" if benchmark == "ceval" else "test")

    @property
    def enabled(self) -> bool:
        """True when the callback has anything to do."""
        return self.every_steps > 0 or self.at_end
