"""Atomic file and directory writes: readers see the old content or the new, never a half."""

from __future__ import annotations

import contextlib
import json
import os
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


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Build a directory under a temp name and move it into place only if the block succeeds.

    Yields the temporary directory to write into. On success the old ``path`` (if any) is
    replaced; on any exception the temporary directory is removed and ``path`` is untouched.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: already exists; pass overwrite=True or choose another path.")
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
