"""Engine-neutral checkpoint checks shared by the recipe and both engine adapters.

Content checksums over all ranks: at save time every rank hashes a share of the staged files
(:func:`staged_checksums`), at load time every rank verifies a share (:func:`verify_content`), so
the cost of reading a checkpoint once more is split over the job instead of landing on rank 0.
Collective when a process group is initialized; plain function calls otherwise.
"""

from __future__ import annotations

import os
from pathlib import Path

from layerfreeze import checkpoint as ckpt
from layerfreeze.utils import dist

__all__ = ["staged_checksums", "verify_content"]


def _share(names: list[str]) -> list[str]:
    return names[dist.get_rank() :: dist.get_world_size()]


def staged_checksums(staging: str | os.PathLike) -> dict[str, str]:
    """sha256 of every file in a staging directory, each rank hashing a share (collective).

    Call after the barrier that ends the writes. Global rank 0 lists the files; a file a rank
    cannot see (no shared filesystem) is left to :func:`~layerfreeze.checkpoint.commit_checkpoint`
    on rank 0. Returns the same mapping on every rank.
    """
    staging = Path(staging)
    names = None
    if dist.get_rank() == 0:
        names = sorted(
            Path(root, f).relative_to(staging).as_posix()
            for root, _dirs, files in os.walk(staging)
            for f in files
            if f != ckpt.MANIFEST_FILE
        )
    names = dist.broadcast_object(names)
    mine = {}
    for rel in _share(names):
        if (staging / rel).is_file():
            mine[rel] = ckpt.file_sha256(staging / rel)
    merged: dict[str, str] = {}
    for part in dist.all_gather_objects(mine):
        merged.update(part)
    return merged


def verify_content(info: ckpt.CheckpointInfo) -> list[str]:
    """Files of ``info`` whose content differs from the checksums in its manifest (collective).

    Each rank reads a share of the files; every rank gets the whole list (empty when intact or
    when the manifest predates checksums). Cost: see
    :func:`~layerfreeze.checkpoint.content_problems`, divided by the number of ranks.
    """
    problems = ckpt.content_problems(info, _share(sorted(info.sha256)))
    return sorted(p for part in dist.all_gather_objects(problems) for p in part)


def check_content(info: ckpt.CheckpointInfo) -> None:
    """Raise when :func:`verify_content` finds a changed file (collective).

    Raises:
        CheckpointError: naming the checkpoint and each changed file.
    """
    problems = verify_content(info)
    if problems:
        raise ckpt.CheckpointError(
            f"{info.path}: checkpoint is damaged: {'; '.join(problems[:5])}"
            f"{f'; and {len(problems) - 5} more' if len(problems) > 5 else ''}. Resume from an "
            "earlier checkpoint or delete this one."
        )
