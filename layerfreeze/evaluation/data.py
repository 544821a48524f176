"""C-Eval and CMMLU question loading: the official released layouts on disk, or the hub.

On disk (the layouts as released; nothing is vendored in this repository)::

    ceval/  dev/<subject>_dev.csv  val/<subject>_val.csv  test/<subject>_test.csv
            subject_mapping.json   (subject -> [English name, Chinese name, category])
            columns id,question,A,B,C,D[,answer][,explanation]
    cmmlu/  dev/<subject>.csv  test/<subject>.csv
            categories.json        (name_en2zh, subcategories, categories)
            header ,Question,A,B,C,D,Answer (first column: unnamed row index)

``data_dir`` may point at the benchmark folder itself or at its parent (holding ``ceval/`` and
``cmmlu/``). Every cell is read as a string (CMMLU has all-numeric options such as ``0.50``
that a type-guessing reader would turn into ``0.5``). Bad files raise ``ValueError`` naming
the file and the row.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from layerfreeze.utils.schema import suggest

__all__ = [
    "BENCHMARKS",
    "LETTERS",
    "Question",
    "Subject",
    "Benchmark",
    "load_benchmark",
    "list_subjects",
    "resolve_data_dir",
]

BENCHMARKS = ("ceval", "cmmlu")
LETTERS = ("A", "B", "C", "D")
# Split names per benchmark; "dev" holds the few-shot examples.
SPLITS = {"ceval": ("dev", "val", "test"), "cmmlu": ("dev", "test")}
HUB_REPOS = {"ceval": "ceval/ceval-exam", "cmmlu": "haonan-li/cmmlu"}
CEVAL_CATEGORIES = ("STEM", "Social Science", "Humanities", "Other")


@dataclass(frozen=True)
class Question:
    """One multiple-choice question.

    Attributes:
        subject: Subject key, e.g. ``accountant``.
        index: 0-based data row in its subject file (the ``index`` of the predictions file).
        id: The file's own id column (C-Eval ``id``, CMMLU unnamed first column) as a string.
        question: Question text, verbatim.
        choices: The four options A-D, verbatim (edge whitespace and newlines kept).
        answer: ``"A"``-``"D"``, or None where the split has no answers (C-Eval test).
    """

    subject: str
    index: int
    id: str
    question: str
    choices: tuple[str, str, str, str]
    answer: str | None


@dataclass
class Subject:
    """One subject: its questions of the scored split and its few-shot ``dev`` examples."""

    name: str
    name_zh: str
    categories: tuple[str, ...]
    questions: list[Question]
    dev: list[Question] = field(default_factory=list)


@dataclass
class Benchmark:
    """A loaded benchmark split: subjects in sorted order."""

    name: str
    split: str
    subjects: list[Subject]
    source: str

    @property
    def num_questions(self) -> int:
        return sum(len(s.questions) for s in self.subjects)

    def subject(self, name: str) -> Subject:
        for s in self.subjects:
            if s.name == name:
                return s
        raise KeyError(name)


def _check_benchmark(benchmark: str) -> None:
    if benchmark not in BENCHMARKS:
        raise ValueError(
            f"benchmark: unknown benchmark, got {benchmark!r}. Use one of {', '.join(BENCHMARKS)}."
        )


def default_split(benchmark: str) -> str:
    """The split lm-eval scores: C-Eval ``val``, CMMLU ``test``."""
    _check_benchmark(benchmark)
    return "val" if benchmark == "ceval" else "test"


def resolve_data_dir(benchmark: str, data_dir: str | Path) -> Path:
    """Return the benchmark's own folder given it or its parent.

    Raises:
        ValueError: neither ``data_dir`` nor ``data_dir/<benchmark>`` has the expected layout.
    """
    _check_benchmark(benchmark)
    root = Path(data_dir).expanduser()
    marker = "subject_mapping.json" if benchmark == "ceval" else "categories.json"
    for cand in (root / benchmark, root):
        if (cand / marker).is_file() or (cand / "dev").is_dir():
            return cand
    raise ValueError(
        f"data_dir: no {benchmark} data found at {root}, got neither {root / benchmark} nor "
        f"{root} holding dev/ and {marker}. Point --data-dir at the released {benchmark} folder "
        "(or its parent)."
    )


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ValueError(f"{path}: file is missing. It ships with the released data; restore it.")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}).") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}.")
    return data


def _open_csv(path: Path) -> io.StringIO:
    """The file's text (UTF-8, BOM dropped) as a stream for ``csv``; a file that is not UTF-8
    (a download cut inside a character) is named instead of a bare codec error."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            return io.StringIO(f.read(), newline="")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); the file is truncated or "
            "corrupt. Restore it from the released data."
        ) from None


def _metadata_from_dir(benchmark: str, root: Path) -> dict[str, tuple[str, tuple[str, ...]]]:
    """subject -> (Chinese name, categories) from the released mapping file."""
    out: dict[str, tuple[str, tuple[str, ...]]] = {}
    if benchmark == "ceval":
        path = root / "subject_mapping.json"
        for subject, entry in _read_json(path).items():
            if not isinstance(entry, list) or len(entry) < 2:
                raise ValueError(
                    f"{path}: entry {subject!r} must be [English name, Chinese name, category], "
                    f"got {entry!r}."
                )
            # The official mapping gives clinical_medicine no category: count it as Other.
            category = entry[2] if len(entry) > 2 and entry[2] else "Other"
            if category not in CEVAL_CATEGORIES:
                raise ValueError(
                    f"{path}: entry {subject!r} has category {category!r}; expected one of "
                    f"{', '.join(CEVAL_CATEGORIES)}."
                )
            out[subject] = (str(entry[1]), (category,))
        return out
    path = root / "categories.json"
    data = _read_json(path)
    for key in ("name_en2zh", "subcategories", "categories"):
        if not isinstance(data.get(key), dict):
            raise ValueError(f"{path}: missing the {key!r} mapping; got keys {sorted(data)}.")
    cat_of_sub = {sub: cat for cat, subs in data["categories"].items() for sub in subs}
    for subject, name_zh in data["name_en2zh"].items():
        subs = data["subcategories"].get(subject)
        if not subs:
            raise ValueError(f"{path}: subject {subject!r} has no entry in 'subcategories'.")
        cats: list[str] = []
        for sub in subs:
            if sub not in cat_of_sub:
                raise ValueError(
                    f"{path}: subcategory {sub!r} of {subject!r} belongs to no category in "
                    f"'categories' (known: {', '.join(sorted(cat_of_sub))})."
                )
            if cat_of_sub[sub] not in cats:
                cats.append(cat_of_sub[sub])
        out[subject] = (str(name_zh), tuple(cats))
    return out


def _metadata_builtin(benchmark: str) -> dict[str, tuple[str, tuple[str, ...]]]:
    from layerfreeze.evaluation.subjects import CEVAL_SUBJECTS, CMMLU_SUBJECTS

    if benchmark == "ceval":
        return {k: (zh, (cat,)) for k, (zh, cat) in CEVAL_SUBJECTS.items()}
    return {k: (zh, tuple(cats)) for k, (zh, cats) in CMMLU_SUBJECTS.items()}


def _select_subjects(benchmark: str, known: list[str], subjects: list[str] | None) -> list[str]:
    if not subjects:
        return sorted(known)
    unknown = [s for s in subjects if s not in known]
    if unknown:
        raise ValueError(
            f"subjects: {benchmark} has no subject {unknown[0]!r}.{suggest(unknown[0], known)} "
            f"Run `layerfreeze eval --benchmark {benchmark} --list-subjects` for all "
            f"{len(known)} names."
        )
    seen: list[str] = []
    for s in subjects:
        if s not in seen:
            seen.append(s)
    return seen


def _subject_file(benchmark: str, root: Path, split: str, subject: str) -> Path:
    if benchmark == "ceval":
        return root / split / f"{subject}_{split}.csv"
    return root / split / f"{subject}.csv"


def _required_columns(benchmark: str, split: str) -> tuple[str, ...]:
    if benchmark == "ceval":
        base = ("id", "question", "A", "B", "C", "D")
        return base if split == "test" else (*base, "answer")
    return ("", "Question", "A", "B", "C", "D", "Answer")


def _build_question(
    benchmark: str, subject: str, index: int, row: dict[str, str], where: str, has_answer: bool
) -> Question:
    q_key, a_key, id_key = (
        ("question", "answer", "id") if benchmark == "ceval" else ("Question", "Answer", "")
    )
    answer = None
    if has_answer:
        answer = row[a_key].strip()
        if answer not in LETTERS:
            raise ValueError(
                f"{where}: answer must be one of A, B, C, D, got {row[a_key]!r}. "
                "Fix the row or remove it."
            )
    return Question(
        subject=subject,
        index=index,
        id=str(row[id_key]),
        question=row[q_key],
        choices=(row["A"], row["B"], row["C"], row["D"]),
        answer=answer,
    )


def read_subject_csv(benchmark: str, path: Path, subject: str, split: str) -> list[Question]:
    """Read one released CSV file, every cell as a string.

    Raises:
        ValueError: missing file or columns, a short or empty row set, a bad answer letter;
            the message names the file and the 0-based data row (and its line number).
    """
    if not path.is_file():
        raise ValueError(
            f"{path}: subject file is missing for {benchmark} subject {subject!r} "
            f"(split {split!r}). Restore it from the released data or drop the subject."
        )
    required = _required_columns(benchmark, split)
    has_answer = not (benchmark == "ceval" and split == "test")
    questions: list[Question] = []
    with _open_csv(path) as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: file is empty (no header, no rows).")
        missing = [c for c in required if c not in header]
        if missing:
            shown = ", ".join(repr(c) for c in missing)
            raise ValueError(
                f"{path}: missing column(s) {shown}; header is {header}. Expected columns "
                f"{list(required)}."
            )
        col = {name: header.index(name) for name in required}
        for index, cells in enumerate(reader):
            where = f"{path} row {index} (line {reader.line_num})"
            if not cells or all(not c.strip() for c in cells):
                raise ValueError(f"{where}: empty row. Remove it.")
            if len(cells) != len(header):
                raise ValueError(
                    f"{where}: has {len(cells)} cells but the header has {len(header)}. "
                    "Check the quoting of cells with commas or newlines."
                )
            row = {name: cells[i] for name, i in col.items()}
            questions.append(_build_question(benchmark, subject, index, row, where, has_answer))
    if not questions:
        raise ValueError(f"{path}: has a header but no questions. Restore the released file.")
    return questions


def _load_from_dir(
    benchmark: str, data_dir: str | Path, split: str, subjects: list[str] | None
) -> Benchmark:
    root = resolve_data_dir(benchmark, data_dir)
    meta = _metadata_from_dir(benchmark, root)
    names = _select_subjects(benchmark, list(meta), subjects)
    out = []
    for name in names:
        questions = read_subject_csv(
            benchmark, _subject_file(benchmark, root, split, name), name, split
        )
        dev = read_subject_csv(benchmark, _subject_file(benchmark, root, "dev", name), name, "dev")
        zh, cats = meta[name]
        out.append(Subject(name=name, name_zh=zh, categories=cats, questions=questions, dev=dev))
    return Benchmark(name=benchmark, split=split, subjects=out, source=str(root))


def _hub_rows(benchmark: str, subject: str, split: str) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise ValueError(
            "data_dir: no directory given and the `datasets` package is not installed. Pass "
            "--data-dir with the released files, or `pip install datasets` to load from the hub."
        ) from None
    repo = HUB_REPOS[benchmark]
    try:
        ds = datasets.load_dataset(repo, subject, split=split)
    except Exception as e:  # network, auth and missing-config errors all end here
        raise ValueError(
            f"data_dir: no directory given and loading {repo!r} (config {subject!r}, split "
            f"{split!r}) from the Hugging Face hub failed: {type(e).__name__}: {e}. Download the "
            f"released {benchmark} files and pass --data-dir."
        ) from e
    rows = []
    for r in ds:
        rows.append({k: "" if v is None else str(v) for k, v in r.items()})
    return rows


def _load_from_hub(benchmark: str, split: str, subjects: list[str] | None) -> Benchmark:
    meta = _metadata_builtin(benchmark)
    names = _select_subjects(benchmark, list(meta), subjects)
    out = []
    for name in names:
        parts = {}
        for sp in (split, "dev"):
            rows = _hub_rows(benchmark, name, sp)
            where0 = f"{HUB_REPOS[benchmark]}/{name}/{sp}"
            if not rows:
                raise ValueError(f"{where0}: no questions.")
            if benchmark == "cmmlu":  # the hub copy has no unnamed index column
                rows = [{"": str(i), **r} for i, r in enumerate(rows)]
            required = _required_columns(benchmark, sp)
            missing = [c for c in required if c not in rows[0]]
            if missing:
                raise ValueError(f"{where0}: missing column(s) {missing}; got {sorted(rows[0])}.")
            has_answer = not (benchmark == "ceval" and sp == "test")
            parts[sp] = [
                _build_question(benchmark, name, i, r, f"{where0} row {i}", has_answer)
                for i, r in enumerate(rows)
            ]
        zh, cats = meta[name]
        out.append(
            Subject(name=name, name_zh=zh, categories=cats, questions=parts[split], dev=parts["dev"])
        )
    return Benchmark(name=benchmark, split=split, subjects=out, source=HUB_REPOS[benchmark])


def load_benchmark(
    benchmark: str,
    data_dir: str | Path | None = None,
    split: str | None = None,
    subjects: list[str] | None = None,
) -> Benchmark:
    """Load a benchmark split with its few-shot ``dev`` examples.

    Args:
        benchmark: ``"ceval"`` or ``"cmmlu"``.
        data_dir: The released folder (or its parent). None loads from the Hugging Face hub
            through ``datasets`` (needs network access).
        split: C-Eval ``val`` (default) / ``test`` / ``dev``; CMMLU ``test`` (default) / ``dev``.
        subjects: Subject keys to load (default: all, sorted).

    Returns:
        The :class:`Benchmark`.

    Raises:
        ValueError: unknown benchmark, split or subject; missing or malformed files (the
            message names the file and row).
    """
    _check_benchmark(benchmark)
    split = split or default_split(benchmark)
    if split not in SPLITS[benchmark]:
        raise ValueError(
            f"split: {benchmark} has no split {split!r}. Use one of "
            f"{', '.join(SPLITS[benchmark])}."
        )
    if data_dir is None:
        return _load_from_hub(benchmark, split, subjects)
    return _load_from_dir(benchmark, data_dir, split, subjects)


def list_subjects(benchmark: str, data_dir: str | Path | None = None) -> dict[str, tuple]:
    """subject -> (Chinese name, categories), from ``data_dir``'s mapping or the built-in table."""
    _check_benchmark(benchmark)
    if data_dir is None:
        return _metadata_builtin(benchmark)
    return _metadata_from_dir(benchmark, resolve_data_dir(benchmark, data_dir))
