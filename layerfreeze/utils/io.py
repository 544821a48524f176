"""Atomic file and directory writes (readers see the old content or the new, never a half),
and the one rule every command applies before writing an output (:func:`check_output_path`)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening directories; rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def grant_umask_mode(path: str | os.PathLike) -> None:
    """Give a file, or every file under a directory, at least the mode a plain ``open()`` gives.

    safetensors 0.8 writes its files 0600 (through a private temp file) whatever the umask, so
    weights would be unreadable to the group that shares a cluster's checkpoints. Bits are only
    added (``mode | (0o666 & ~umask)``): an executable script keeps its ``x`` bits.
    """
    path = Path(path)
    want = 0o666 & ~_umask()
    files = [path] if not path.is_dir() else [
        Path(root) / name for root, _dirs, names in os.walk(path) for name in names
    ]
    for f in files:
        if f.is_symlink():
            continue
        mode = f.stat().st_mode & 0o7777
        if mode & want != want:
            os.chmod(f, mode | want)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same directory + ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file 0600: give it the mode a plain open() would (others in a
        # shared cluster read exports and results)
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """UTF-8 text version of :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
    """Write ``obj`` as JSON atomically (UTF-8, non-ASCII kept readable)."""
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False, sort_keys=False) + "\n")


#: ``--overwrite``'s help, the same in every command that writes an output.
OVERWRITE_HELP = (
    "replace a non-empty --out (a directory holding a training run's checkpoints is never replaced)"
)

#: The lock file a training run holds in its output directory (see layerfreeze.runlock).
RUN_LOCK_FILE = ".layerfreeze.lock"
_STEP_DIR = re.compile(r"^step_\d{8,}$")


def training_state_in(path: str | os.PathLike) -> str | None:
    """What makes ``path`` (a directory) hold a training run's state, or None.

    A run lock, a checkpoint ``latest`` pointer next to ``step_*`` directories, or a ``step_*``
    directory with a ``manifest.json``, anywhere in the tree (a run directory keeps its
    checkpoints in ``checkpoints/``). Such a directory is never replaced by an output.
    """
    root = Path(path)
    if not root.is_dir() or root.is_symlink():
        return None
    for dirpath, dirs, files in os.walk(root):
        here = Path(dirpath)
        if RUN_LOCK_FILE in files:
            return f"a run lock, {here / RUN_LOCK_FILE}"
        for d in dirs:
            if _STEP_DIR.match(d) and (here / d / "manifest.json").is_file():
                return f"checkpoint {here / d}"
        if "latest" in files and any(_STEP_DIR.match(d) for d in dirs):
            return f"checkpoints in {here} ('latest' file)"
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # staging, trash: not a checkpoint
    return None


def check_output_path(
    path: str | os.PathLike, *, overwrite: bool, flag: str = "--out", kind: str = "directory"
) -> None:
    """The output rule of every command that writes: call it before any work.

    A missing path or an empty one is written; a non-empty one only with ``--overwrite``; a
    directory that holds a training run's checkpoints or run lock never (not even with
    ``--overwrite``); a file where a directory is expected (or the reverse) never.

    Args:
        path: the output path the user gave.
        overwrite: the command's ``--overwrite`` flag.
        flag: the option that named the path (for the message).
        kind: ``"directory"`` or ``"file"``: what the command writes there.

    Raises:
        ValueError: the path may not be written (one line naming the flag, the path and the fix).
    """
    p = Path(path)
    if not p.exists() and not p.is_symlink():
        return
    if kind == "directory" and not p.is_dir():
        raise ValueError(
            f"{flag}: {str(path)!r} exists and is a file; the output is a directory. Choose "
            "another path."
        )
    if kind == "file" and p.is_dir():
        raise ValueError(f"{flag}: {str(path)!r} is a directory; give a file path.")
    held = training_state_in(p)
    if held is not None:
        raise ValueError(
            f"{flag}: {str(path)!r} holds a training run ({held}); it is never replaced, not "
            "even with --overwrite. Choose another path."
        )
    empty = not any(p.iterdir()) if p.is_dir() else p.stat().st_size == 0
    if not empty and not overwrite:
        raise ValueError(
            f"{flag}: {str(path)!r} already exists and is not empty. Choose a new path or pass "
            "--overwrite to replace it."
        )


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Build a directory under a temp name and move it into place only if the block succeeds.

    Yields the temporary directory to write into. On success the old ``path`` (if any) is
    replaced; on any exception the temporary directory is removed and ``path`` is untouched.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False, or it holds a training run
            (checkpoints or a run lock: never replaced).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: already exists; pass overwrite=True or choose another path.")
    held = training_state_in(path)
    if held is not None:
        raise FileExistsError(
            f"{path}: holds a training run ({held}); it is never replaced. Choose another path."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700; a plain mkdir would not
        yield tmp
        grant_umask_mode(tmp)
        for root, _dirs, files in os.walk(tmp):
            for name in files:
                with open(os.path.join(root, name), "rb") as f:
                    os.fsync(f.fileno())
        if path.exists():
            trash = path.parent / f".{path.name}.old.{os.getpid()}"
            os.replace(path, trash)
            os.replace(tmp, path)
            if trash.is_dir() and not trash.is_symlink():
                shutil.rmtree(trash, ignore_errors=True)
            else:  # a file (or link) replaced by the directory: rmtree would leave it behind
                trash.unlink(missing_ok=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
