"""Input text: find the corpus files (files, directories, the bundled corpus) and read documents.

Formats:

- ``.txt``: documents separated by blank lines (``txt_documents="paragraph"``) or one document
  per line (``txt_documents="line"``). Surrounding whitespace of a document is stripped; empty
  documents are skipped.
- ``.jsonl``: one JSON object per line; the document is the string under ``text_key``. Blank
  lines are skipped; anything else that is not such an object is an error naming file and line.

Directories are searched recursively for ``*.txt`` / ``*.jsonl`` in sorted path order; an entry
with ``*``, ``?`` or ``[`` that is not an existing path is a glob (``**`` recurses), expanded in
sorted order. The entry ``@bundled`` stands for the small mixed Chinese/English corpus shipped
with the package.

Large files can be read in pieces: :func:`split_file` cuts a file into byte ranges at document
boundaries, and :func:`iter_documents` with ``byte_range`` yields exactly the documents of one
range, so the ranges of a file together yield the same documents, in order, as the whole file.
"""

from __future__ import annotations

import glob
import io
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
    "split_file",
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


def _special_file_kind(p: Path) -> str:
    """What a path that exists but is neither a file nor a directory is, in words."""
    import stat

    mode = p.stat().st_mode
    for test, kind in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "a special file"


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
        if not p.exists() and any(c in str(entry) for c in "*?["):
            matches = sorted(Path(m) for m in glob.glob(str(p), recursive=True))
            found = []
            for m in matches:
                if m.is_dir():
                    found += sorted(f for f in m.rglob("*") if f.is_file() and f.suffix in SUFFIXES)
                elif m.is_file() and m.suffix in SUFFIXES:
                    found.append(m)
            if not found:
                problems.append(
                    f"{where}: the pattern '{entry}' matches no {' or '.join(SUFFIXES)} files. "
                    "Check the pattern (use ** to search sub-directories)."
                )
            out.extend(found)
            continue
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
        elif p.exists():  # a FIFO, device or socket: reading it blocks or never ends
            kind = _special_file_kind(p)
            problems.append(
                f"{where}: not a regular file ({kind}), got '{entry}'. Use "
                f"{' or '.join(SUFFIXES)} files."
            )
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
    path: str | Path,
    *,
    text_key: str = "text",
    txt_documents: str = "paragraph",
    byte_range: tuple[int, int] | None = None,
) -> Iterator[str]:
    """Yield the non-empty documents of one ``.txt`` or ``.jsonl`` file, streaming.

    Args:
        path: the file.
        text_key: JSONL field with the text.
        txt_documents: ``paragraph`` or ``line`` (how ``.txt`` files split into documents).
        byte_range: ``(start, end)`` from :func:`split_file`: read only these bytes. Line numbers
            in errors then count from the range's start.

    Raises:
        ValueError: an unsupported suffix or ``txt_documents`` value, undecodable UTF-8, or a
            malformed JSONL line (the message names the file and line).
    """
    path = Path(path)
    if path.suffix == ".jsonl":
        yield from _iter_jsonl(path, text_key, byte_range)
    elif path.suffix == ".txt":
        if txt_documents not in TXT_DOCUMENTS:
            raise ValueError(
                f"data.txt_documents: must be one of {', '.join(TXT_DOCUMENTS)}, got {txt_documents!r}."
            )
        yield from _iter_txt(path, txt_documents, byte_range)
    else:
        raise ValueError(
            f"{path}: unsupported file type '{path.suffix}'. Use {' or '.join(SUFFIXES)} files."
        )


def split_file(
    path: str | Path, chunk_bytes: int, *, txt_documents: str = "paragraph"
) -> list[tuple[int, int]]:
    """Cut a file into byte ranges of about ``chunk_bytes`` at document boundaries.

    A cut is placed just after a ``\\n`` (a line end for both UTF-8 and universal newlines); for
    ``.txt`` files in ``paragraph`` mode only after a line that is blank, so no document spans
    two ranges. The ranges cover the file without gaps, in order; a file without a usable
    boundary is one range.

    Raises:
        ValueError: ``chunk_bytes`` < 1.
    """
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes: must be positive, got {chunk_bytes}.")
    path = Path(path)
    size = path.stat().st_size
    paragraph = path.suffix == ".txt" and txt_documents == "paragraph"
    ranges: list[tuple[int, int]] = []
    start = 0
    with path.open("rb") as f:
        while start < size:
            if size - start <= chunk_bytes:
                ranges.append((start, size))
                break
            f.seek(start + chunk_bytes - 1)
            f.readline()  # to just after the next b"\n" (or EOF)
            if paragraph:
                while True:
                    line = f.readline()
                    if not line or not line.decode("utf-8", errors="replace").strip():
                        break
            end = min(f.tell(), size)
            ranges.append((start, end))
            start = end
    return ranges


class _Range(io.RawIOBase):
    """Raw reader of bytes ``[start, end)`` of a binary file (for a text wrapper)."""

    def __init__(self, f: io.BufferedReader, start: int, end: int):
        self._f, self._left = f, end - start
        f.seek(start)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # noqa: ANN001 (a writable buffer)
        n = min(len(b), self._left)
        if n <= 0:
            return 0
        data = self._f.read(n)
        b[: len(data)] = data
        self._left -= len(data)
        return len(data)


def _open_text(path: Path, byte_range: tuple[int, int] | None):
    """A text reader of the file or of one byte range, and the underlying binary file (or None)."""
    if byte_range is None:
        return path.open("r", encoding="utf-8", newline=None), None
    raw = path.open("rb")
    rng = _Range(raw, *byte_range)
    text = io.TextIOWrapper(io.BufferedReader(rng, 1 << 20), encoding="utf-8", newline=None)
    return text, raw


def _lines(path: Path, byte_range: tuple[int, int] | None = None) -> Iterator[tuple[int, str]]:
    f, raw = _open_text(path, byte_range)
    with f:
        lineno = 0
        try:
            for lineno, line in enumerate(f, start=1):  # noqa: B007 (used in the error below)
                yield lineno, line
        except UnicodeDecodeError as e:
            raise ValueError(
                f"{path}:{lineno + 1}: not valid UTF-8 ({e.reason} at byte {e.start}). "
                "Convert the file to UTF-8."
            ) from None
        finally:
            if raw is not None:
                raw.close()


def _iter_txt(path: Path, mode: str, byte_range: tuple[int, int] | None) -> Iterator[str]:
    if mode == "line":
        for _, line in _lines(path, byte_range):
            doc = line.strip()
            if doc:
                yield doc
        return
    buf: list[str] = []
    for _, line in _lines(path, byte_range):
        if line.strip():
            buf.append(line.rstrip("\n"))
        elif buf:
            yield "\n".join(buf).strip()
            buf = []
    if buf:
        yield "\n".join(buf).strip()


def _iter_jsonl(path: Path, text_key: str, byte_range: tuple[int, int] | None) -> Iterator[str]:
    for lineno, line in _lines(path, byte_range):
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
