"""Megatron runner evaluation: the loss of a batch without training, and whole logits for the
scorer and diagnostics, run through megatron's schedule with ``forward_only``.

The functions take the :class:`~layerfreeze.engines.megatron.runner.MegatronRunner` whose
methods of the same name call them; both are collective over the model-parallel group.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from layerfreeze.engines.common import unwrap_module

if TYPE_CHECKING:
    from layerfreeze.engines.megatron.runner import MegatronRunner

__all__ = ["evaluate_loss", "eval_copies", "eval_model"]


@torch.no_grad()
def evaluate_loss(runner: MegatronRunner, micro_batch: Mapping[str, Any]) -> float:
    """Loss of one batch without training: mean over data-parallel ranks, on every rank
    (collective)."""
    out: list[float] = []

    def loss_func(output: torch.Tensor, loss_mask: torch.Tensor):
        loss = runner._loss_fn(output.float(), loss_mask)
        out.append(float(loss))
        return loss, {"loss": loss.detach()}

    for c in runner.ddp_chunks:
        c.eval()
    try:
        runner._run([micro_batch] * eval_copies(runner), forward_only=True, loss_func=loss_func)
    finally:
        for c in runner.ddp_chunks:
            c.train()
    t = torch.tensor([out[0] if out else 0.0], dtype=torch.float64)
    t = runner._from_last_stage(t)
    dist.all_reduce(t, group=ps.get_data_parallel_group())
    return float(t[0]) / ps.get_data_parallel_world_size()


def eval_copies(runner: MegatronRunner) -> int:
    """Micro-batches one evaluation forward needs: the interleaved (virtual-pipeline)
    schedule wants at least as many as pipeline stages, so the batch is repeated and the
    first result used."""
    return ps.get_pipeline_model_parallel_world_size() if len(runner.chunks) > 1 else 1


def eval_model(runner: MegatronRunner) -> Callable[[torch.Tensor], torch.Tensor]:
    """A callable ``input_ids [B, T] -> logits [B, T, V]`` (float32, CPU) for the scorer and
    diagnostics (``V``: the Hugging Face vocabulary when ``hf_config`` is known, else the
    model's padded one). Every rank of the model-parallel group must call it in lockstep with the
    same ``input_ids``; each gets the whole logits (gathered across TP, run through the
    pipeline with ``forward_only`` and broadcast from the last stage)."""
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    vocab = int(unwrap_module(runner.chunks[-1]).vocab_size)  # padded to a multiple of TP
    if runner.hf_config is not None:
        vocab = min(vocab, int(runner.hf_config.vocab_size))

    @torch.no_grad()
    def logits_of(input_ids: torch.Tensor) -> torch.Tensor:
        got: list[torch.Tensor] = []

        def loss_func(output: torch.Tensor, loss_mask: Any):
            whole = gather_from_tensor_model_parallel_region(output)
            got.append(whole.float())
            return output.sum() * 0.0, {}

        ids = input_ids.to(runner.device)
        b, t = ids.shape
        tp = ps.get_tensor_model_parallel_world_size()
        if getattr(runner.chunks[0].config, "sequence_parallel", False) and t % tp:
            # sequence parallelism splits the sequence over TP: pad on the right (the causal
            # model's logits of the real positions do not see it) and cut the logits back
            ids = torch.cat([ids, ids[:, -1:].expand(b, tp - t % tp)], dim=1)
        for c in runner.ddp_chunks:
            c.eval()
        try:
            runner._run(
                [{"input_ids": ids}] * eval_copies(runner), forward_only=True, loss_func=loss_func
            )
        finally:
            for c in runner.ddp_chunks:
                c.train()
        out = (
            got[0][:, :t, :vocab].contiguous()
            if got
            else torch.empty(b, t, vocab, dtype=torch.float32, device=ids.device)
        )
        return runner._from_last_stage(out).cpu()

    return logits_of
