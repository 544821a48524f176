"""A plain DeepSpeed training script, written the way DeepSpeed's tutorials write one.

It knows nothing about layerfreeze: it calls ``deepspeed.initialize(args=..., model=...,
model_parameters=model.parameters())`` (or with ``optimizer=`` a callable when run with
``--client-optimizer``). Tests run it unchanged with ``deepspeed.initialize`` swapped for
``layerfreeze.deepspeed.initialize`` (with a plan bound) and compare its losses with the
plain-torch reference. Run directly: ``deepspeed --num_gpus 2 tests/helpers/ds_user_script.py
--deepspeed_config ds.json``.
"""

from __future__ import annotations

import argparse

import deepspeed
import torch
import torch.distributed as dist

STEPS = 2
GAS = 2
LR = 1e-3
WD = 0.1
EPS = 1e-6


def micro_batch(step: int, micro: int, rank: int) -> dict:
    """Rank ``rank``'s micro-batch ``micro`` of optimizer step ``step`` (seeded)."""
    g = torch.Generator().manual_seed(100_000 + 1000 * step + 10 * micro + rank)
    ids = torch.randint(0, 128, (2, 8), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def main(argv: list[str] | None = None) -> list[float]:
    """Train ``STEPS`` optimizer steps; return the mean loss per step over ranks and micro-batches."""
    from tests.helpers.tiny_models import build_tiny_model

    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int, default=-1)
    parser.add_argument("--client-optimizer", action="store_true")
    parser = deepspeed.add_config_arguments(parser)
    args = parser.parse_args(argv)

    model = build_tiny_model("llama", num_layers=4).train()
    extra = {}
    if args.client_optimizer:
        extra["optimizer"] = lambda params: torch.optim.AdamW(
            params, lr=LR, weight_decay=WD, eps=EPS
        )
    engine, _, _, _ = deepspeed.initialize(
        args=args, model=model, model_parameters=model.parameters(), **extra
    )
    rank, world = dist.get_rank(), dist.get_world_size()
    losses = []
    for step in range(STEPS):
        total = 0.0
        for m in range(GAS):
            loss = engine(**micro_batch(step, m, rank)).loss
            engine.backward(loss)
            engine.step()
            t = loss.detach().clone()
            dist.all_reduce(t)
            total += float(t) / world
        losses.append(total / GAS)
    engine.destroy()
    return losses


if __name__ == "__main__":
    main()
