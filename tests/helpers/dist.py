"""Run a function on N CPU processes with a real gloo process group (spawn + free port).

Usage::

    def _body(rank, world_size, tmp):   # must be a module-level function (spawn pickles it)
        ...
        return result                     # picklable; collected per rank

    results = run_distributed(_body, world_size=2, args=(tmp,))

Every rank seeds ``random``, NumPy and torch's global generator with ``RANK_SEED + rank`` before
``fn`` runs. torch seeds its default generator from the OS in each new process, so anything
drawn from it (LoRA ``A`` at ``apply_plan``, dropout) would otherwise change from run to run;
with the seed, two runs of the same test are bit-identical (ranks still draw different streams).
"""

from __future__ import annotations

import os
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp

#: Base of each rank's global seed (rank r seeds ``RANK_SEED + r``).
RANK_SEED = 1234


def find_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(
    rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue, env: dict, received
) -> None:
    os.environ.update(env)
    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size),
            "DS_ACCELERATOR": "cpu",
        }
    )
    import random

    import numpy as np
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    random.seed(RANK_SEED + rank)
    np.random.seed(RANK_SEED + rank)
    torch.manual_seed(RANK_SEED + rank)
    try:
        if not dist.is_initialized():
            dist.init_process_group("gloo", rank=rank, world_size=world_size)
        out = fn(rank, world_size, *args)
        queue.put((rank, "ok", out))
        # Tensors in the result cross by shared-memory handle, fetched from this process while
        # the parent unpickles them: stay alive until the parent has them.
        received.wait(timeout=120)
    except BaseException:  # report to the parent with the full traceback, then re-raise
        queue.put((rank, "error", traceback.format_exc()))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(
    fn: Callable[..., Any],
    world_size: int = 2,
    args: tuple = (),
    env: dict[str, str] | None = None,
    timeout: float = 600.0,
) -> list[Any]:
    """Spawn ``world_size`` gloo ranks running ``fn(rank, world_size, *args)``; return per-rank results.

    Raises:
        RuntimeError: any rank failed (its traceback is included) or timed out.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = find_free_port()
    received = ctx.Event()
    procs = [
        ctx.Process(
            target=_worker,
            args=(r, world_size, port, fn, args, queue, dict(env or {}), received),
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    import queue as _q

    try:
        for _ in range(world_size):
            try:
                rank, status, payload = queue.get(timeout=timeout)
            except _q.Empty:
                errors.append(f"timed out after {timeout}s waiting for ranks")
                break
            if status == "ok":
                results[rank] = payload
            else:
                errors.append(f"rank {rank} failed:\n{payload}")
                break
    finally:
        received.set()
        for p in procs:
            p.join(timeout=30 if not errors else 5)
            if p.is_alive():
                p.terminate()
                p.join(5)
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world_size)]
