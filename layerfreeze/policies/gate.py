"""The HLPT token gate and the hook helpers that the ``lora`` and ``prefix`` policies share.

``TokenGate`` computes ``g = sigmoid(w . h + b)`` per token from a sub-block's input ``h`` (a
forward pre-hook calls it with :func:`block_input`), keeps it for the rest of that forward
pass, and is cleared by the owner's forward hook. The megatron engine uses the same pieces for
its tensor-parallel adapters.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TokenGate", "block_input", "has_hook"]


#: ``fn(gate, prefix, sharded_offsets, metadata) -> dict``: how an engine whose checkpointing
#: asks every child module for ``sharded_state_dict`` (megatron-core's dist_checkpointing)
#: describes a gate; set by that engine package (:func:`register_sharded_state_dict`), so this
#: engine-neutral module imports no engine.
_SHARDED_STATE_DICT: Callable[..., dict] | None = None


def register_sharded_state_dict(fn: Callable[..., dict]) -> None:
    """Make ``TokenGate.sharded_state_dict`` call ``fn`` (idempotent for the same ``fn``)."""
    global _SHARDED_STATE_DICT
    _SHARDED_STATE_DICT = fn


class TokenGate(nn.Module):
    """The HLPT input-dependent gate ``g = sigmoid(w . h + b)``, one value per token, in fp32.

    Calling the gate with ``h`` of shape ``(..., hidden)`` computes ``g`` of shape ``(..., 1)``,
    keeps it for the rest of the current forward pass of the owning sub-block (the adapters of
    that sub-block read it with :meth:`current`) and returns it. The owner's forward hook
    :meth:`clear` s it afterwards. Parameters are created in fp32 and the math runs in fp32 even
    when the model is cast to bf16/fp16.

    Args:
        hidden_size: width of ``h``.
        device: where to create the parameters.
    """

    def __init__(self, hidden_size: int, device: torch.device | str | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden_size, device=device, dtype=torch.float32))
        self.bias = nn.Parameter(torch.zeros(1, device=device, dtype=torch.float32))
        self.value: torch.Tensor | None = None
        self.where = ""
        #: False when an engine computes the gate from another tensor than the sub-block's input
        #: (megatron's Transformer Engine spec: the fused layer norm's output, inside the first
        #: linear); the sub-block pre-hooks then leave it alone.
        self.reads_block_input = True

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Compute, remember and return ``sigmoid(h . w + b)`` (fp32, trailing dim 1)."""
        g = torch.sigmoid(F.linear(h.float(), self.weight.float().unsqueeze(0), self.bias.float()))
        self.value = g
        return g

    def current(self, x: torch.Tensor) -> torch.Tensor:
        """The gate of the running forward pass, checked against an adapter input ``x`` (one
        value per token: the same tokens, or the same number of them flattened)."""
        g = self.value
        if g is None:
            raise RuntimeError(
                f"{self.where}: a gated adapter ran outside its sub-block's forward, so its gate "
                "input h is unknown. Call the sub-block (attention / MLP) module, not the "
                "linear alone."
            )
        if g.shape[:-1] != x.shape[:-1] and g.shape[:-1].numel() == x.shape[:-1].numel():
            # The sub-block flattened its tokens (MoE blocks run a shared expert on a
            # (batch * seq, hidden) view, row-major like every .view(-1, hidden)).
            g = g.reshape(*x.shape[:-1], 1)
        if g.shape[:-1] != x.shape[:-1]:
            raise RuntimeError(
                f"{self.where}: gate computed for tokens of shape {tuple(g.shape[:-1])} but the "
                f"adapter's input has leading shape {tuple(x.shape[:-1])}; the HLPT gate needs "
                "one value per token of the sub-block's input."
            )
        return g

    def clear(self) -> None:
        """Forget the gate of the finished forward pass (frees the activation)."""
        self.value = None

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None
    ) -> dict:
        """megatron-core's distributed-checkpoint view of the gate (megatron models only; the
        ``MLP`` / attention calls it on every child): both tensors replicated over tensor
        parallelism, keyed per layer (:mod:`layerfreeze.engines.megatron.sharded`)."""
        if _SHARDED_STATE_DICT is None:
            raise RuntimeError(
                f"{getattr(self, 'where', 'TokenGate')}: sharded_state_dict is megatron-core's "
                "distributed-checkpoint view; no engine registered it (the Megatron engine does "
                "when it installs a plan: layerfreeze.engines.megatron.megatron_layout)."
            )
        return _SHARDED_STATE_DICT(self, prefix, sharded_offsets, metadata)

    def extra_repr(self) -> str:
        return f"hidden_size={self.weight.shape[0]}"


def block_input(module: nn.Module, args: tuple, kwargs: dict, where: str) -> torch.Tensor:
    """The hidden states a sub-block (attention / MLP) was called with."""
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    raise RuntimeError(
        f"{where}: {type(module).__name__} was called without hidden states as its first "
        "argument or as hidden_states=..., so the HLPT gate has no input h."
    )


def has_hook(hooks: dict, fn: Callable) -> bool:
    """True when ``fn`` itself is one of ``hooks`` (a module's forward (pre-)hook dict)."""
    return any(h is fn for h in hooks.values())
