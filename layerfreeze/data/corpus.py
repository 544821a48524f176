"""Input text: find the corpus files (files, directories, the bundled corpus) and read documents.

Formats:

- ``.txt``: documents separated by blank lines (``txt_documents="paragraph"``) or one document
  per line (``txt_documents="line"``). Surrounding whitespace of a document is stripped; empty
  documents are skipped.
- ``.jsonl``: one JSON object per line; the document is the string under ``text_key``. Blank
  lines are skipped; anything else that is not such an object is an error naming file and line.

Directories are searched recursively for ``*.txt`` / ``*.jsonl`` in sorted path order. The entry
``@bundled`` stands for the small mixed Chinese/English corpus shipped with the package.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

from layerfreeze.errors import ConfigError

__all__ = [
    "BUNDLED",
    "SUFFIXES",
    "TXT_DOCUMENTS",
    "default_corpus_files",
    "resolve_files",
    "iter_documents",
]

BUNDLED = "@bundled"
SUFFIXES = (".txt", ".jsonl")
TXT_DOCUMENTS = ("paragraph", "line")
_CORPUS_DIR = Path(__file__).resolve().parent / "corpus"


def default_corpus_files() -> list[Path]:
    """The bundled demo corpus (``zh.txt``, ``en.txt``, ``mixed.jsonl``), sorted.

    Raises:
        FileNotFoundError: the package was installed without its data files.
    """
    files = sorted(p for p in _CORPUS_DIR.glob("*") if p.suffix in SUFFIXES)
    if not files:
        raise FileNotFoundError(
            f"the bundled corpus is missing from {_CORPUS_DIR}; reinstall layerfreeze with its package "
            "data or regenerate it with `python -m layerfreeze.data.corpus_gen`."
        )
    return files


def resolve_files(paths: Sequence[str | Path], key: str = "data.paths") -> list[Path]:
    """Expand files, directories (recursive, sorted) and ``@bundled`` into a list of input files.

    Duplicates (the same file reached twice) are kept once, at their first position.

    Args:
        paths: user entries, in order.
        key: config path used in error messages (``data.paths`` / ``input``).

    Raises:
        ConfigError: no entries, a missing path, a file with an unsupported suffix, or a
            directory without any ``.txt`` / ``.jsonl`` file (every problem at once).
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise ConfigError(
            f"{key}: no input files given, got []. List .txt/.jsonl files or directories "
            f"(or '{BUNDLED}' for the bundled demo corpus)."
        )
    problems: list[str] = []
    out: list[Path] = []
    for i, entry in enumerate(paths):
        where = f"{key}[{i}]"
        if str(entry) == BUNDLED:
            out.extend(default_corpus_files())
            continue
        p = Path(entry).expanduser()
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in SUFFIXES)
            if not found:
                problems.append(
                    f"{where}: directory '{entry}' holds no {' or '.join(SUFFIXES)} files. "
                    "Point it at a directory with text files."
                )
            out.extend(found)
        elif p.is_file():
            if p.suffix not in SUFFIXES:
                problems.append(
                    f"{where}: unsupported file type '{p.suffix}', got '{entry}'. "
                    f"Use {' or '.join(SUFFIXES)} files."
                )
            out.append(p)
        else:
            problems.append(f"{where}: no such file or directory, got '{entry}'. Check the path.")
    if problems:
        raise ConfigError(problems)
    seen: set[Path] = set()
    unique = []
    for f in out:
        r = f.resolve()
        if r not in seen:
            seen.add(r)
            unique.append(r)
    return unique


def iter_documents(
    path: str | Path, *, text_key: str = "text", txt_documents: str = "paragraph"
) -> Iterator[str]:
    """Yield the non-empty documents of one ``.txt`` or ``.jsonl`` file, streaming.

    Raises:
        ValueError: an unsupported suffix or ``txt_documents`` value, undecodable UTF-8, or a
            malformed JSONL line (the message names the file and line).
    """
    path = Path(path)
    if path.suffix == ".jsonl":
        yield from _iter_jsonl(path, text_key)
    elif path.suffix == ".txt":
        if txt_documents not in TXT_DOCUMENTS:
            raise ValueError(
                f"data.txt_documents: must be one of {', '.join(TXT_DOCUMENTS)}, got {txt_documents!r}."
            )
        yield from _iter_txt(path, txt_documents)
    else:
        raise ValueError(
            f"{path}: unsupported file type '{path.suffix}'. Use {' or '.join(SUFFIXES)} files."
        )


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    with path.open("r", encoding="utf-8", newline=None) as f:
        lineno = 0
        try:
            for lineno, line in enumerate(f, start=1):  # noqa: B007 (used in the error below)
                yield lineno, line
        except UnicodeDecodeError as e:
            raise ValueError(
                f"{path}:{lineno + 1}: not valid UTF-8 ({e.reason} at byte {e.start}). "
                "Convert the file to UTF-8."
            ) from None


def _iter_txt(path: Path, mode: str) -> Iterator[str]:
    if mode == "line":
        for _, line in _lines(path):
            doc = line.strip()
            if doc:
                yield doc
        return
    buf: list[str] = []
    for _, line in _lines(path):
        if line.strip():
            buf.append(line.rstrip("\n"))
        elif buf:
            yield "\n".join(buf).strip()
            buf = []
    if buf:
        yield "\n".join(buf).strip()


def _iter_jsonl(path: Path, text_key: str) -> Iterator[str]:
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path}:{lineno}: not valid JSON ({e.msg}). Each line must be one JSON object."
            ) from None
        if not isinstance(obj, dict):
            raise ValueError(
                f"{path}:{lineno}: expected a JSON object with a '{text_key}' field, "
                f"got {type(obj).__name__}."
            )
        if text_key not in obj:
            keys = ", ".join(sorted(map(str, obj))) or "none"
            raise ValueError(
                f"{path}:{lineno}: no '{text_key}' field (keys: {keys}). Set data.text_key to the field "
                "that holds the text."
            )
        text = obj[text_key]
        if not isinstance(text, str):
            raise ValueError(
                f"{path}:{lineno}: field '{text_key}' must be a string, got {type(text).__name__}."
            )
        text = text.strip()
        if text:
            yield text
