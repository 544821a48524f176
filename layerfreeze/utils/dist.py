"""Distributed facts (rank, world size, local rank) that work with or without an init'd group."""

from __future__ import annotations

import errno
import os
import socket

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


def _port_in_use(addr: str, port: int) -> bool:
    """True when something listens on ``addr:port`` (what the rank-0 TCPStore would bind)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not "in use"
        try:
            s.bind((addr, port))
        except OSError as e:
            return e.errno == errno.EADDRINUSE
    return False


def free_port(addr: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on at ``addr`` (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


def single_process_rendezvous() -> None:
    """Set up the environment of a world of one when no launcher started this process.

    Under ``torchrun`` / the ``deepspeed`` launcher (``RANK`` set) nothing changes. Otherwise
    ``RANK``/``LOCAL_RANK``/``WORLD_SIZE`` become 0/0/1, ``MASTER_ADDR`` defaults to
    ``127.0.0.1`` and ``MASTER_PORT``, when unset, to a free port (a fixed default such as
    29500 makes two runs on one machine collide).

    Raises:
        ValueError: ``MASTER_PORT`` is not a port number, or something already listens on it.
    """
    if "RANK" in os.environ:
        return
    addr = os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    given = os.environ.get("MASTER_PORT")
    if given is None:
        os.environ["MASTER_PORT"] = str(free_port())
    else:
        try:
            port = int(given)
            if not 0 < port < 65536:
                raise ValueError
        except ValueError:
            raise ValueError(
                f"MASTER_PORT: not a TCP port number, got {given!r}. Unset it (a free port is "
                "picked) or give a number in 1-65535."
            ) from None
        if _port_in_use(addr, port):
            raise ValueError(
                f"MASTER_PORT: port {port} is in use on {addr} (another run?), got "
                f"MASTER_PORT={given}. Unset MASTER_PORT to let layerfreeze pick a free port, or "
                "choose another."
            )
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"})
