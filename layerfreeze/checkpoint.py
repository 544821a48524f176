"""Engine-neutral checkpoint directories: atomic commit, ``latest`` pointer, keep-last-N, validation.

Layout of a checkpoint root::

    <root>/
      latest                   text file naming the newest committed checkpoint (written atomically)
      step_00000010/           one committed checkpoint (what the engine wrote + manifest.json)
      step_00000020/
      .staging.step_00000030/  a save in progress (never read; removed by the next save)

A save writes everything into a staging directory, then :func:`commit_checkpoint` writes
``manifest.json`` (every file with its size and sha256, plus the caller's metadata), fsyncs,
renames the staging directory into place and only then rewrites ``latest``. A process killed at any point
leaves the previous checkpoint and ``latest`` intact: a staging directory is never loadable and
a directory without a valid manifest is never listed.

This module does file work only (no torch, no process groups): engine adapters call it from
global rank 0 between barriers.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from layerfreeze.utils.io import _fsync_dir, atomic_write_json, atomic_write_text, grant_umask_mode

__all__ = [
    "CheckpointError",
    "CheckpointInfo",
    "LATEST_FILE",
    "MANIFEST_FILE",
    "checkpoint_damage",
    "checkpoint_dirs",
    "checkpoint_tag",
    "cleanup_staging",
    "commit_checkpoint",
    "content_problems",
    "file_sha256",
    "list_checkpoints",
    "prepare_staging",
    "prune_checkpoints",
    "read_latest",
    "resolve_checkpoint",
    "scan_checkpoints",
    "validate_checkpoint",
]

LATEST_FILE = "latest"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
_TAG_RE = re.compile(r"^step_(\d{8,})$")
_STAGING_PREFIX = ".staging."


class CheckpointError(ValueError):
    """A checkpoint (or checkpoint root) that cannot be used, with the reason and the fix."""


@dataclass(frozen=True)
class CheckpointInfo:
    """One committed, validated checkpoint.

    Attributes:
        path: the checkpoint directory.
        tag: its name (``step_00000010``).
        step: the training step it was taken at.
        meta: the metadata the engine stored in the manifest at commit time.
        files: relative path -> size in bytes of every file the manifest lists.
        sha256: relative path -> hex sha256 of its content (empty for manifests written before
            layerfreeze recorded checksums: those are checked by size only).
    """

    path: Path
    tag: str
    step: int
    meta: dict[str, Any] = field(default_factory=dict)
    files: dict[str, int] = field(default_factory=dict)
    sha256: dict[str, str] = field(default_factory=dict)


def checkpoint_tag(step: int) -> str:
    """Directory name of the checkpoint taken at ``step`` (zero-padded so names sort by step)."""
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"checkpoint step: must be a non-negative int, got {step!r}.")
    return f"step_{step:08d}"


def _staging_path(root: Path, step: int) -> Path:
    return root / f"{_STAGING_PREFIX}{checkpoint_tag(step)}"


def cleanup_staging(root: str | os.PathLike) -> list[Path]:
    """Remove staging directories left by interrupted saves; return what was removed."""
    root = Path(root)
    removed = []
    if root.is_dir():
        for entry in sorted(root.iterdir()):
            if entry.name.startswith(_STAGING_PREFIX) or entry.name.startswith(".trash."):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    return removed


def prepare_staging(root: str | os.PathLike, step: int) -> Path:
    """Create an empty staging directory for the checkpoint of ``step`` (call on one rank only).

    Stale staging directories of interrupted saves are removed first.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    cleanup_staging(root)
    staging = _staging_path(root, step)
    staging.mkdir()
    return staging


def _walk_files(directory: Path) -> dict[str, int]:
    files = {}
    for dirpath, _dirs, names in os.walk(directory):
        for name in names:
            full = Path(dirpath) / name
            files[full.relative_to(directory).as_posix()] = full.stat().st_size
    return dict(sorted(files.items()))


_HASH_CHUNK = 1 << 20  # 1 MiB: constant memory whatever the file size


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's content, read in 1 MiB chunks (constant memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def content_problems(info: CheckpointInfo, names: list[str] | None = None) -> list[str]:
    """Files of ``info`` whose content no longer matches the sha256 recorded at save time.

    Cost: reads every byte of the checked files once; sha256 runs at about 0.57 GB/s on one core
    of our 2-core development machine (1-2 GB/s on CPUs with SHA extensions), so about 30 s per
    16 GB per process, and a network filesystem's read speed may be the slower part. Pass ``names`` to check a share of the files (the recipe splits
    them over ranks).

    Args:
        info: a checkpoint that validated by size (:func:`validate_checkpoint`).
        names: the relative paths to check (default: every file with a recorded checksum).

    Returns:
        One ``"<file>: content differs from ..."`` entry per mismatching file (empty when all
        match, or when the manifest holds no checksums).
    """
    names = sorted(info.sha256) if names is None else names
    problems = []
    for rel in names:
        want = info.sha256.get(rel)
        if want is None:
            continue
        try:
            got = file_sha256(info.path / rel)
        except OSError as e:
            problems.append(f"{rel} cannot be read ({e.strerror or e})")
            continue
        if got != want:
            problems.append(
                f"{rel} content differs from the checksum recorded at save time (same size, "
                "changed bytes)"
            )
    return problems


def _fsync_tree(directory: Path) -> None:
    for dirpath, _dirs, names in os.walk(directory):
        for name in names:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def commit_checkpoint(
    root: str | os.PathLike,
    staging: str | os.PathLike,
    step: int,
    meta: dict[str, Any] | None = None,
    keep_last: int | None = None,
    checksums: dict[str, str] | None = None,
) -> CheckpointInfo:
    """Seal ``staging`` as the checkpoint of ``step``, point ``latest`` at it and prune old ones.

    The manifest records each file's size and sha256. Cost of the checksums: every byte written
    is read back once (usually from the page cache right after the write) and hashed at about
    0.57 GB/s per core (measured on our development machine; 1-2 GB/s with SHA extensions).
    The engines hash the files on all ranks, each a share, and pass ``checksums``.

    Order (each step atomic): manifest written and every file fsynced -> staging renamed to
    ``step_<8-digit step>`` (an existing checkpoint of the same step is moved aside first) ->
    ``latest`` rewritten -> checkpoints beyond ``keep_last`` removed, oldest first.

    Args:
        root: the checkpoint root.
        staging: directory returned by :func:`prepare_staging`, fully written.
        step: training step of the checkpoint.
        meta: JSON-serialisable metadata stored in the manifest (returned as ``CheckpointInfo.meta``).
        keep_last: keep at most this many committed checkpoints (None keeps all).
        checksums: relative path -> sha256 of the staged files, already computed (e.g. shared
            over ranks); files missing from it are hashed here.

    Returns:
        The committed checkpoint.
    """
    root, staging = Path(root), Path(staging)
    if keep_last is not None and (not isinstance(keep_last, int) or keep_last < 1):
        raise ValueError(f"keep_last: must be a positive int or None, got {keep_last!r}.")
    if not staging.is_dir():
        raise CheckpointError(f"{staging}: staging directory does not exist; nothing to commit.")
    tag = checkpoint_tag(step)
    files = _walk_files(staging)
    files.pop(MANIFEST_FILE, None)
    manifest = {
        "format": MANIFEST_FORMAT,
        "tag": tag,
        "step": step,
        "files": files,
        "sha256": {
            rel: (checksums or {}).get(rel) or file_sha256(staging / rel) for rel in files
        },
        "meta": meta or {},
    }
    grant_umask_mode(staging)  # safetensors writes 0600 (see grant_umask_mode)
    _fsync_tree(staging)
    atomic_write_json(staging / MANIFEST_FILE, manifest)
    final = root / tag
    if final.exists():
        trash = root / f".trash.{tag}.{os.getpid()}"
        os.replace(final, trash)
        os.replace(staging, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, final)
    _fsync_dir(root)
    atomic_write_text(root / LATEST_FILE, tag + "\n")
    if keep_last is not None:
        prune_checkpoints(root, keep_last)
    return CheckpointInfo(
        path=final, tag=tag, step=step, meta=manifest["meta"], files=files,
        sha256=manifest["sha256"],
    )


def _read_manifest(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """The manifest of checkpoint ``path`` and None, or None and why there is no usable one."""
    if not path.is_dir():
        return None, "the checkpoint directory does not exist"
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        return None, (
            f"{MANIFEST_FILE} is missing (the save that wrote it was probably interrupted)"
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"unreadable checkpoint manifest {MANIFEST_FILE} ({e})"
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != MANIFEST_FORMAT
        or not isinstance(manifest.get("files"), dict)
        or not isinstance(manifest.get("step"), int)
    ):
        return None, (
            f"{MANIFEST_FILE} is not a layerfreeze checkpoint manifest (format "
            f"{MANIFEST_FORMAT} with 'step' and 'files' expected)"
        )
    return manifest, None


def _size_problems(path: Path, manifest: dict[str, Any]) -> list[str]:
    problems = []
    for rel, size in manifest["files"].items():
        f = path / rel
        if not f.is_file():
            problems.append(f"{rel} is missing")
        elif f.stat().st_size != size:
            problems.append(f"{rel} has {f.stat().st_size} bytes, manifest says {size}")
    return problems


def _join(problems: list[str], limit: int = 5) -> str:
    shown = "; ".join(problems[:limit])
    return shown + (f"; and {len(problems) - limit} more" if len(problems) > limit else "")


def checkpoint_damage(path: str | os.PathLike) -> str | None:
    """Why the checkpoint directory ``path`` cannot be loaded (no manifest, a listed file missing
    or of the wrong size), or None when it is complete. File sizes only, no content read."""
    path = Path(path)
    manifest, why = _read_manifest(path)
    if manifest is None:
        return why
    problems = _size_problems(path, manifest)
    return _join(problems) if problems else None


def validate_checkpoint(path: str | os.PathLike) -> CheckpointInfo:
    """Check that ``path`` is a complete committed checkpoint and return its description.

    Raises:
        CheckpointError: the directory is missing, has no readable manifest, or a listed file is
            missing or has the wrong size (the message names the file and what to do).
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory does not exist.")
    manifest, why = _read_manifest(path)
    if manifest is None:
        if not (path / MANIFEST_FILE).is_file():
            why = f"{MANIFEST_FILE} is missing; the save that wrote it was probably interrupted"
        raise CheckpointError(
            f"{path}: not a complete checkpoint ({why}). Resume from an earlier checkpoint or "
            "delete this one."
        )
    problems = _size_problems(path, manifest)
    if problems:
        raise CheckpointError(
            f"{path}: checkpoint is damaged: {_join(problems)}. Resume from an earlier checkpoint "
            "or delete this one."
        )
    return CheckpointInfo(
        path=path,
        tag=manifest.get("tag", path.name),
        step=manifest["step"],
        meta=manifest.get("meta") or {},
        files=manifest["files"],
        sha256=manifest.get("sha256") if isinstance(manifest.get("sha256"), dict) else {},
    )


def checkpoint_dirs(root: str | os.PathLike) -> list[Path]:
    """Every ``step_*`` directory under ``root`` (complete or not), oldest step first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(
        (e for e in root.iterdir() if e.is_dir() and _TAG_RE.match(e.name)),
        key=lambda e: int(_TAG_RE.match(e.name).group(1)),
    )


def scan_checkpoints(
    root: str | os.PathLike,
) -> tuple[list[CheckpointInfo], list[tuple[Path, str]]]:
    """All checkpoints under ``root``, split into the complete ones and the damaged ones.

    Returns:
        ``(intact, damaged)``: intact checkpoints oldest step first (validated by file size), and
        ``(directory, why)`` for every ``step_*`` directory that does not validate.
    """
    intact, damaged = [], []
    for entry in checkpoint_dirs(root):
        why = checkpoint_damage(entry)
        if why is None:
            intact.append(validate_checkpoint(entry))
        else:
            damaged.append((entry, why))
    return sorted(intact, key=lambda c: c.step), damaged


def list_checkpoints(root: str | os.PathLike) -> list[CheckpointInfo]:
    """Committed checkpoints under ``root`` that validate, oldest step first (damaged ones skipped)."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for entry in root.iterdir():
        if entry.is_dir() and _TAG_RE.match(entry.name):
            try:
                out.append(validate_checkpoint(entry))
            except CheckpointError:
                continue
    return sorted(out, key=lambda c: c.step)


def read_latest(root: str | os.PathLike) -> str | None:
    """The tag the ``latest`` pointer names, or None when there is no pointer."""
    p = Path(root) / LATEST_FILE
    if not p.is_file():
        return None
    tag = p.read_text(encoding="utf-8").strip()
    return tag or None


def resolve_checkpoint(path: str | os.PathLike, tag: str | None = None) -> CheckpointInfo:
    """Find the checkpoint to load.

    Args:
        path: a checkpoint root (holding ``latest`` and ``step_*`` directories) or one checkpoint
            directory (holding ``manifest.json``).
        tag: a checkpoint name under the root (``step_00000010``); None follows ``latest``.

    Returns:
        The validated checkpoint.

    Raises:
        CheckpointError: nothing loadable at ``path``/``tag``; the message says what was found.
    """
    path = Path(path)
    if tag is None and (path / MANIFEST_FILE).exists():
        return validate_checkpoint(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory does not exist.")
    if tag is not None:
        return validate_checkpoint(path / str(tag))
    latest = read_latest(path)
    if latest is not None:
        return validate_checkpoint(path / latest)
    found = list_checkpoints(path)
    if not found:
        raise CheckpointError(
            f"{path}: no checkpoint found (no '{LATEST_FILE}' file and no complete step_* "
            "directory). Pass the directory the training run saved into."
        )
    return found[-1]


def prune_checkpoints(root: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete committed checkpoints beyond the newest ``keep_last``; never the one ``latest`` names.

    Returns:
        The directories removed.
    """
    root = Path(root)
    if not isinstance(keep_last, int) or keep_last < 1:
        raise ValueError(f"keep_last: must be a positive int, got {keep_last!r}.")
    latest = read_latest(root)
    entries = sorted(
        (e for e in root.iterdir() if e.is_dir() and _TAG_RE.match(e.name)),
        key=lambda e: int(_TAG_RE.match(e.name).group(1)),
    )
    removed = []
    for entry in entries[: max(0, len(entries) - keep_last)]:
        if entry.name == latest:
            continue
        # rename first so a half-deleted directory never looks like a checkpoint
        trash = root / f".trash.{entry.name}.{os.getpid()}"
        os.replace(entry, trash)
        shutil.rmtree(trash, ignore_errors=True)
        removed.append(entry)
    return removed
