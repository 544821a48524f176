"""Distributed facts (rank, world size, local rank) that work with or without an init'd group."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_dist() -> bool:
    """True when a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Global rank (0 when not distributed)."""
    return dist.get_rank() if is_dist() else int(os.environ.get("RANK", "0"))


def get_world_size() -> int:
    """World size (1 when not distributed)."""
    return dist.get_world_size() if is_dist() else int(os.environ.get("WORLD_SIZE", "1"))


def get_local_rank() -> int:
    """Local rank from ``LOCAL_RANK`` (torchrun and the deepspeed launcher both set it)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    """True on global rank 0."""
    return get_rank() == 0


def barrier() -> None:
    """Barrier when distributed, no-op otherwise."""
    if is_dist():
        dist.barrier()


def broadcast_object(obj, src: int = 0, group=None):
    """Broadcast a picklable object from global rank ``src`` over ``group`` (default: the
    world); identity when not distributed."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over all ranks in place (identity when not distributed); a CPU tensor goes
    through the GPU when the backend is NCCL."""
    if is_dist() and get_world_size() > 1:
        if dist.get_backend() == "nccl" and t.device.type != "cuda":
            moved = t.cuda()
            dist.all_reduce(moved)
            t.copy_(moved.to(t.device))
        else:
            dist.all_reduce(t)
    return t


def all_gather_objects(obj) -> list:
    """Gather one picklable object per rank onto every rank (``[obj]`` when not distributed)."""
    if not is_dist():
        return [obj]
    out: list = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def default_device() -> torch.device:
    """The device this rank computes on: ``cuda:LOCAL_RANK`` when CUDA is present, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", get_local_rank())
    return torch.device("cpu")
