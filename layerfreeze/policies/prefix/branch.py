"""The branch form of the ``prefix`` policy (the default, ``form=branch``).

In the spirit of LLaMA-Adapter (and litgpt ``adapter.py``), each covered layer's queries attend,
with their own softmax, to ``tokens`` learned prefix key/value pairs; the result is scaled per
head by a zero-initialised ``prefix_gating_factor`` (times, with ``gated``, the HLPT
input-dependent gate ``sigmoid(w . h + b)`` per token, ``h`` = the attention input) and added to
the attention output before the output projection::

    out = Attn(q, K, V) + f_head * g(h) * softmax(q P_k^T * scaling) P_v

``q`` is the layer's own query (rotary already applied), ``P_k`` / ``P_v`` carry no position
(prefix tokens have none) and one pair per key/value head serves its query group under
grouped-query attention. ``f = 0`` at init, so the logits equal the base model's exactly; ``f``
gets gradient at the first step, the prefix keys/values (and the gate) from the second.

Why not ``past_key_values`` (PEFT's prefix tuning): that route feeds virtual tokens through the
cache, so positions and masks are derived from layer 0's cache length (it cannot cover only some
layers), it interferes with real KV-cache generation, and PEFT refuses gradient checkpointing
with it. The branch here is computed inside the layer's attention call instead
(:mod:`~layerfreeze.policies.prefix.attention`), so it covers any subset of layers, leaves the
cache untouched (prefix keys are parameters, not cache entries) and is recomputed like any other
op under gradient checkpointing. :class:`PrefixAdapter` also holds the paper form's keys, values
and gate (:mod:`~layerfreeze.policies.prefix.paper` drops its factor).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from layerfreeze.policies.gate import TokenGate
from layerfreeze.policies.prefix.attention import PREFIX_FORMS

__all__ = ["PrefixAdapter", "branch_attention"]


class PrefixAdapter(nn.Module):
    """Learned prefix keys/values of one attention layer and its zero-initialised output scale.

    Parameters (all names start with ``prefix_``): ``prefix_key`` ``(num_kv_heads, tokens,
    head_dim)`` / ``prefix_value`` ``(num_kv_heads, tokens, value_dim)`` ~ N(0, 1), or with
    ``reparam`` ``prefix_embedding``
    ``(tokens, hidden)`` ~ N(0, 1) and ``prefix_mlp`` (default ``nn.Linear`` init);
    ``prefix_gating_factor`` ``(num_heads,)`` zeros, fp32; with ``gated`` a ``prefix_gate``
    (:class:`~layerfreeze.policies.gate.TokenGate`, ``w = 0, b = 0`` -> 0.5), fp32. Prefix
    matrices take the device and dtype of the attention's weights.

    Args:
        num_heads: query heads of the layer.
        num_kv_heads: key/value heads (< ``num_heads`` under grouped-query attention).
        head_dim: per-head width of the queries and keys.
        hidden_size: model width (input of the gate and of the reparameterisation).
        tokens: number of prefix tokens.
        reparam: reparameterisation MLP width, or None.
        gated: add the input-dependent gate.
        device: parameter device.
        dtype: dtype of the prefix matrices (factor and gate stay fp32).
        value_dim: per-head width of the values (default ``head_dim``; differs under
            DeepSeek's multi-head latent attention).
    """

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        hidden_size: int,
        tokens: int,
        reparam: int | None = None,
        gated: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        value_dim: int | None = None,
    ):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.value_dim = head_dim if value_dim is None else value_dim
        self.tokens, self.reparam = tokens, reparam
        kw = dict(device=device, dtype=dtype)
        if reparam is None:
            self.prefix_key = nn.Parameter(torch.randn(num_kv_heads, tokens, head_dim, **kw))
            self.prefix_value = nn.Parameter(
                torch.randn(num_kv_heads, tokens, self.value_dim, **kw)
            )
        else:
            self.prefix_embedding = nn.Parameter(torch.randn(tokens, hidden_size, **kw))
            self.prefix_mlp = nn.Sequential(
                nn.Linear(hidden_size, reparam, **kw),
                nn.Tanh(),
                nn.Linear(reparam, num_kv_heads * (head_dim + self.value_dim), **kw),
            )
        self.prefix_gating_factor = nn.Parameter(
            torch.zeros(num_heads, device=device, dtype=torch.float32)
        )
        self.prefix_gate = TokenGate(hidden_size, device=device) if gated else None
        self.where = ""
        self.pending = False
        # Projection route only (see QueryRoute): its name, and the running call's arguments
        # and query, kept from the attention's pre-hook to its output projection.
        self.route: str | None = None
        self.call: dict | None = None
        self.query: torch.Tensor | None = None

    @property
    def gated(self) -> bool:
        """True when the input-dependent gate is present."""
        return self.prefix_gate is not None

    def keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefix keys ``(num_kv_heads, tokens, head_dim)`` and values ``(..., value_dim)``."""
        if self.reparam is None:
            return self.prefix_key, self.prefix_value
        kv = self.prefix_mlp(self.prefix_embedding)  # (tokens, kv_heads * (head_dim + value_dim))
        if self.value_dim == self.head_dim:
            kv = kv.view(self.tokens, 2, self.num_kv_heads, self.head_dim).permute(1, 2, 0, 3)
            return kv[0], kv[1]
        k, v = kv.split([self.num_kv_heads * self.head_dim, self.num_kv_heads * self.value_dim], -1)
        k = k.reshape(self.tokens, self.num_kv_heads, self.head_dim).transpose(0, 1)
        return k, v.reshape(self.tokens, self.num_kv_heads, self.value_dim).transpose(0, 1)

    def forward(self, query: torch.Tensor, scaling: float | None = None) -> torch.Tensor:
        """The branch for ``query`` ``(batch, num_heads, q_len, head_dim)``, already scaled by
        the factor (and gate); returned as ``(batch, q_len, num_heads, value_dim)`` in fp32."""
        if query.dim() != 4 or query.shape[1] != self.num_heads or query.shape[-1] != self.head_dim:
            raise RuntimeError(
                f"{self.where}: prefix branch expected the query as (batch, {self.num_heads} "
                f"heads, q_len, {self.head_dim}), got {tuple(query.shape)}; this attention "
                "module's layout "
                "is not supported by the prefix policy."
            )
        scaling = self.head_dim**-0.5 if scaling is None else scaling
        k, v = self.keys_values()
        groups = self.num_heads // self.num_kv_heads
        # Query head i uses key/value head i // groups (transformers' repeat_kv order).
        k = k.float().repeat_interleave(groups, dim=0)
        v = v.float().repeat_interleave(groups, dim=0)
        scores = torch.einsum("bhtd,hpd->bhtp", query.float(), k) * scaling
        out = torch.einsum("bhtp,hpd->bthd", torch.softmax(scores, dim=-1), v)
        scale = self.prefix_gating_factor.float().view(1, 1, -1, 1)
        if self.prefix_gate is not None:
            scale = scale * self.prefix_gate.current(query[:, 0, :, :1]).unsqueeze(-1)
        return out * scale

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            + (f"value_dim={self.value_dim}, " if self.value_dim != self.head_dim else "")
            + f"tokens={self.tokens}, reparam={self.reparam}"
        )


def branch_attention(
    fn: Any,
    base: str,
    module: nn.Module,
    adapter: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, Any]:
    """Run the base attention ``fn`` and add ``adapter``'s branch for ``query`` to its output
    (the ``branch`` entry of :data:`~layerfreeze.policies.prefix.attention.PREFIX_FORMS`)."""
    out, weights = fn(module, query, key, value, attention_mask, **kwargs)
    branch = adapter(query, kwargs.get("scaling")).to(out.dtype)
    if branch.shape[-1] < out.shape[-1]:
        # MLA under flash attention pads the values to the query width and slices the
        # output back afterwards: pad the branch alike (the padding is dropped).
        branch = F.pad(branch, (0, out.shape[-1] - branch.shape[-1]))
    out = out + branch
    adapter.pending = False
    return out, weights


PREFIX_FORMS["branch"] = branch_attention
