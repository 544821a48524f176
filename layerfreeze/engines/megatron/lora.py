"""Tensor-parallel LoRA on megatron-core ``ColumnParallelLinear`` / ``RowParallelLinear``.

The ``lora`` policy (``layerfreeze/policies/lora.py``) installs adapters through its dispatcher
list; :func:`register` puts the two dispatchers here before the built-ins. The maths per TP rank
(``t`` of ``T``; ``x`` the linear's input, ``g`` the optional HLPT gate, ``s = alpha / r``):

* column-parallel (``linear_fc1``, ``linear_qkv``; weight split by output rows): ``A`` (r x in)
  is replicated, ``B_t`` holds this rank's output rows of ``B``::

      h = copy_to_tp(g * dropout(x) A^T)            # identity forward, all-reduce backward
      y_t = base_t(x) + s * h B_t^T

  The all-reduce in backward sums the rank-r gradient over the output shards, so ``A`` and the
  gate get the full gradient, identical on every rank.
* row-parallel (``linear_fc2``, ``linear_proj``; weight split by input columns): ``A_t`` holds
  this rank's input columns of ``A``, ``B`` (out x r) is replicated::

      h = g * reduce_from_tp(dropout(x_t) A_t^T)       # all-reduce forward, identity backward
      y = base(x) + s * h B^T                           # base output is already all-reduced

The arithmetic (delta weight, merge / unmerge, gate, ``addmm`` output) is
:mod:`layerfreeze.policies.lora_math`, shared with the Hugging Face adapters: this module only
adds the collectives and passes its local shards. Gated, ``g * s`` multiplies ``h`` in fp32;
ungated, ``s`` is the ``alpha`` of the output ``addmm``.

The rank ``r`` is never split, so every TP size works with every rank; ``B`` shards follow the
base weight's ``partition_stride`` (SwiGLU ``linear_fc1`` interleaves gate and up rows per rank).
Adapter parameters carry megatron's ``tensor_model_parallel`` / ``partition_dim`` /
``partition_stride`` attributes, so gradient-norm clipping and checkpoint code treat them like
the base weights. ``A`` is drawn full-size from the default torch generator (in step on every TP
rank, as megatron's CPU initialisation needs) and sliced, so a TP=T model starts with the TP=1
adapter's shards. The gate reads the sub-block input (the normed hidden states, replicated across
TP without sequence parallelism), so it is identical on every rank.

Under sequence parallelism (``base.sequence_parallel``) the sub-block input, and so the gate,
is this rank's sequence shard ``[s/T, b, h]``; the update is gathered or scattered along the
sequence where megatron-core's linear gathers its input or reduce-scatters its output:

* column-parallel: ``x_t`` is the sequence shard that the linear all-gathers. The low-rank
  ``h_t = g_t * s * dropout(x_t) A^T`` is computed on the shard (per token, so it equals the
  rows of the gathered input's ``h``) and all-gathered along the sequence before ``B_t``
  (``gather_from_sequence_parallel_region``: all-gather forward, reduce-scatter backward, the
  same op pair as the linear's own input; ``r`` wide instead of ``h``)::

      y_t = base_t(x) + gather_seq(h_t) B_t^T

* row-parallel: the base output is reduce-scattered to sequence shards, and so is the rank-r
  partial product (``reduce_scatter_to_sequence_parallel_region``) before the gate of this
  rank's tokens and the replicated ``B``::

      y_t = base(x)_t + g_t * s * reduce_scatter_seq(dropout(x) A_t^T) B^T

The replicated parameters whose gradient then comes from this rank's tokens only (``A`` of a
column-parallel linear, ``B`` of a row-parallel one, the gate) carry ``sequence_parallel = True``,
as megatron-core marks its layer-norm weights, so ``finalize_model_grads`` sums them over TP.

Refused: column-parallel linears with ``gather_output``, row-parallel linears without
``input_is_parallel`` and expert (MoE) linears. Transformer Engine linears of megatron-core's TE
spec (``TELayerNormColumnParallelLinear`` with its fused norm, ``TEColumnParallelLinear``,
``TERowParallelLinear``) are dispatched to :mod:`layerfreeze.engines.megatron.te` (same maths,
the fused norm's output as input; written against TE's source, run only by the GPU tests);
other TE linears are refused.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from layerfreeze.policies.lora import LoRADispatcher, TokenGate, register_lora_dispatcher
from layerfreeze.policies.lora_math import (
    add_low_rank,
    delta_weight,
    merge_delta,
    scale_low_rank,
    unmerge_delta,
)

__all__ = ["ParallelLoRAAdapter", "register", "parallel_lora_problem"]


def _tp(base: nn.Module) -> tuple[object, int, int]:
    """``(group, rank, size)`` of the base linear's tensor-parallel group.

    megatron-core's TE wrappers keep megatron's group as ``_tp_group``
    (``get_tensor_model_parallel_group_if_none``); TE's own ``tp_group`` is None when the
    process group did not exist at construction. Local linears keep it as ``tp_group``.
    """
    group = base.__dict__.get("_tp_group")
    if group is None:
        group = getattr(base, "tp_group", None)
    if group is None:
        from megatron.core import parallel_state

        group = parallel_state.get_tensor_model_parallel_group()
    return group, group.rank(), group.size()


def _set_tp_attrs(p: nn.Parameter, is_parallel: bool, dim: int, stride: int) -> None:
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    set_tensor_model_parallel_attributes(p, is_parallel=is_parallel, dim=dim, stride=stride)


def _local_slice(full: torch.Tensor, dim: int, local: int, stride: int, rank: int, size: int):
    """This rank's part of ``full`` the way megatron splits weights (``stride`` chunks of
    ``local / stride`` dealt round-robin to the ranks)."""
    chunks = torch.split(full, local // stride, dim=dim)
    return torch.cat(chunks[rank::size], dim=dim)


class ParallelLoRAAdapter(nn.Module):
    """LoRA update of one megatron tensor-parallel linear (see the module docstring).

    Same interface as :class:`~layerfreeze.policies.lora.LoRAAdapter`: ``forward(x, base_out)``
    (``base_out`` is megatron's ``(output, bias)`` tuple and a tuple is returned),
    ``merge(base)`` / ``unmerge(base)`` on this rank's weight shard, ``merged``, ``mergeable``,
    ``gate``; parameters ``lora_a`` / ``lora_b``.

    Args:
        base: the ``ColumnParallelLinear`` or ``RowParallelLinear``.
        parallel: ``"column"`` or ``"row"``.
        r: rank.
        alpha: scale numerator (update scale ``alpha / r``).
        dropout: dropout probability on the adapter input.
        gate: the sub-block's :class:`TokenGate` when gated, else None.
    """

    def __init__(
        self,
        base: nn.Module,
        parallel: str,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        gate: TokenGate | None = None,
    ):
        super().__init__()
        if parallel not in ("column", "row"):
            raise ValueError(f"parallel must be 'column' or 'row', got {parallel!r}")
        w = base.weight
        group, rank, size = _tp(base)
        stride = int(getattr(w, "partition_stride", 1))
        out_local, in_local = w.shape
        self.parallel, self.tp_size = parallel, size
        self.__dict__["_tp_group"] = group  # not a module / parameter: keep it out of state
        self.in_features, self.out_features = in_local, out_local  # this rank's weight shape
        self.r, self.alpha, self.scaling = r, float(alpha), float(alpha) / r
        in_full = in_local * size if parallel == "row" else in_local
        a_full = torch.empty(r, in_full, dtype=torch.float32)
        nn.init.kaiming_uniform_(a_full, a=math.sqrt(5))  # fan_in = the full input width
        if parallel == "row":
            a_full = _local_slice(a_full, 1, in_local, stride, rank, size)
        kw = dict(device=w.device, dtype=w.dtype)
        self.lora_a = nn.Parameter(a_full.to(**kw))
        self.lora_b = nn.Parameter(torch.zeros(out_local, r, **kw))
        if parallel == "column":
            _set_tp_attrs(self.lora_a, False, -1, 1)
            _set_tp_attrs(self.lora_b, True, 0, stride)
        else:
            _set_tp_attrs(self.lora_a, True, 1, stride)
            _set_tp_attrs(self.lora_b, False, -1, 1)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.__dict__["_gate"] = gate  # owned by the sub-block (see LoRAAdapter)
        self.sequence_parallel = bool(getattr(base, "sequence_parallel", False)) and size > 1
        if self.sequence_parallel:
            # gradients from this rank's sequence shard only: finalize_model_grads sums them
            replicated = self.lora_a if parallel == "column" else self.lora_b
            for p in (replicated, *(gate.parameters() if gate is not None else ())):
                p.sequence_parallel = True

    @property
    def gate(self) -> TokenGate | None:
        """The sub-block's gate (None when ungated)."""
        return self.__dict__["_gate"]

    @property
    def mergeable(self) -> bool:
        """True when the update can be folded exactly into the weight shard (ungated only)."""
        return self.gate is None

    def _update(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        from megatron.core.tensor_parallel.mappings import (
            copy_to_tensor_model_parallel_region,
            gather_from_sequence_parallel_region,
            reduce_from_tensor_model_parallel_region,
            reduce_scatter_to_sequence_parallel_region,
        )

        group = self.__dict__["_tp_group"]
        if isinstance(self.lora_dropout, nn.Dropout):
            x = self.lora_dropout(x)
        if x.dtype != self.lora_a.dtype:
            x = x.to(self.lora_a.dtype)
        h = F.linear(x, self.lora_a)  # [s, b, r]: partial sums on row-parallel ranks
        if self.parallel == "row" and self.tp_size > 1:
            if self.sequence_parallel:  # -> [s/T, b, r], where the base output is scattered
                h = reduce_scatter_to_sequence_parallel_region(h, group=group)
            else:
                h = reduce_from_tensor_model_parallel_region(h, group=group)
        gate = self.gate
        h, scale = scale_low_rank(h, self.scaling, gate.current(h) if gate is not None else None)
        if self.parallel == "column" and self.tp_size > 1:
            if self.sequence_parallel:  # [s/T, b, r] -> [s, b, r], where the input is gathered
                h = gather_from_sequence_parallel_region(h, group=group)
            else:
                h = copy_to_tensor_model_parallel_region(h, group=group)
        return add_low_rank(out, h, self.lora_b, scale)

    def forward(self, x: torch.Tensor, base_out):
        """``base_out`` (megatron's ``(output, bias)``) with the update added to ``output``."""
        if self.merged:
            return base_out
        if isinstance(base_out, tuple):
            out, *rest = base_out
            return (self._update(x, out), *rest)
        return self._update(x, base_out)

    def delta_weight(self) -> torch.Tensor:
        """``(alpha / r) B A`` shaped like this rank's weight shard."""
        return delta_weight(self.lora_a, self.lora_b, self.scaling)

    @torch.no_grad()
    def merge(self, base: nn.Module) -> None:
        """Fold the update into this rank's ``base.weight`` shard (idempotent).

        Raises:
            ValueError: the adapter is gated (input-dependent, cannot be folded exactly).
        """
        if not self.mergeable:
            raise ValueError(
                f"{self.gate.where}: a gated LoRA update depends on the input and cannot be merged "
                "into the base weight; export keeps it in the sidecar instead."
            )
        if not self.merged:
            merge_delta(base.weight, self.delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self, base: nn.Module) -> None:
        """Take a merged update back out of ``base.weight`` (idempotent)."""
        if self.merged:
            unmerge_delta(base.weight, self.delta_weight())
            self.merged = False

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None
    ) -> dict:
        """megatron-core's distributed-checkpoint view of ``lora_a`` / ``lora_b``: the split one
        with its global shape and this rank's offset (``B`` along its output rows with the base
        weight's stride, or ``A`` along its input columns), the other replicated over TP; keys
        per layer with the global layer index (see :mod:`layerfreeze.engines.megatron.sharded`).
        """
        from layerfreeze.engines.megatron.sharded import adapter_sharded_state_dict

        return adapter_sharded_state_dict(
            self, prefix, sharded_offsets, metadata, tp_group=self.__dict__["_tp_group"]
        )

    def extra_repr(self) -> str:
        return (
            f"{self.parallel}-parallel, in={self.in_features}, out={self.out_features}, "
            f"r={self.r}, alpha={self.alpha}, tp={self.tp_size}, gated={self.gate is not None}"
            + (", sequence_parallel=True" if self.sequence_parallel else "")
        )


# ---------------------------------------------------------------------------------------------
# Dispatchers


@functools.cache
def _classes() -> tuple[type, type] | None:
    try:
        from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    except ImportError:  # megatron-core not installed: nothing here can match
        return None
    return ColumnParallelLinear, RowParallelLinear


def _kind(base: nn.Module) -> str | None:
    classes = _classes()
    if classes is None:
        return None
    if isinstance(base, classes[0]):
        return "column"
    if isinstance(base, classes[1]):
        return "row"
    return None


def parallel_lora_problem(base: nn.Module) -> str | None:
    """Why LoRA cannot wrap this megatron linear (None when it can)."""
    kind = _kind(base)
    name = type(base).__name__
    if getattr(base, "weight", None) is None:
        return f"{name} has no weight of its own (skip_weight_param_allocation)"
    if getattr(base, "is_expert", False):
        return f"{name} is an expert (MoE) linear; LoRA on experts is not supported"
    if kind == "column" and getattr(base, "gather_output", False):
        return f"{name} has gather_output=True; only split outputs are supported"
    if kind == "row" and not getattr(base, "input_is_parallel", True):
        return f"{name} has input_is_parallel=False; only split inputs are supported"
    return None


def _build(parallel: str):
    def build(
        base: nn.Module,
        *,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        gate: TokenGate | None = None,
    ) -> ParallelLoRAAdapter:
        problem = parallel_lora_problem(base)
        if problem is not None:
            where = gate.where if gate is not None else type(base).__name__
            raise ValueError(f"{where}: {problem}.")
        adapter = ParallelLoRAAdapter(base, parallel, r=r, alpha=alpha, dropout=dropout, gate=gate)
        # the linear's own sharded_state_dict would declare the adapter's shards as replicated
        from layerfreeze.engines.megatron.sharded import install_linear_sharded_state_dict

        install_linear_sharded_state_dict(base)
        return adapter

    return build


COLUMN = LoRADispatcher(
    "megatron.ColumnParallelLinear",
    lambda m: _kind(m) == "column",
    _build("column"),
    check=parallel_lora_problem,
)
ROW = LoRADispatcher(
    "megatron.RowParallelLinear",
    lambda m: _kind(m) == "row",
    _build("row"),
    check=parallel_lora_problem,
)


def _is_te_linear(base: nn.Module) -> bool:
    return type(base).__module__.startswith("megatron.core.extensions.transformer_engine") and (
        "Linear" in type(base).__name__
    )


def _te_kind(base: nn.Module) -> str | None:
    from layerfreeze.engines.megatron.te import te_linear_kind

    return te_linear_kind(base)


def _te_check(base: nn.Module) -> str | None:
    from layerfreeze.engines.megatron.te import te_lora_problem

    return te_lora_problem(base)


def _build_te_linear(base: nn.Module, **kwargs) -> nn.Module:
    from layerfreeze.engines.megatron.te import build_te_adapter

    return build_te_adapter(base, _te_kind(base), **kwargs)


#: megatron-core's TE linears of the TE layer spec (see :mod:`layerfreeze.engines.megatron.te`).
TE_LINEAR = LoRADispatcher(
    "megatron.TransformerEngine (TELayerNormColumnParallelLinear, TEColumnParallelLinear, "
    "TERowParallelLinear)",
    lambda m: _te_kind(m) is not None,
    _build_te_linear,
    check=_te_check,
)


def _te_problem(base: nn.Module) -> str:
    return (
        f"{type(base).__name__} is a Transformer Engine linear that layerfreeze's "
        "tensor-parallel LoRA does not wrap (grouped / expert / duplicated linears); LoRA wraps "
        "TELayerNormColumnParallelLinear, TEColumnParallelLinear and TERowParallelLinear, so "
        "target those or use freeze/full on this layer"
    )


def _build_te(base: nn.Module, **kwargs) -> nn.Module:
    raise ValueError(f"{_te_problem(base)}.")


#: Matches the other Transformer Engine linears only to refuse them with a clear reason.
TRANSFORMER_ENGINE = LoRADispatcher(
    "megatron.TransformerEngine other linears (refused)",
    lambda m: _is_te_linear(m) and _te_kind(m) is None,
    _build_te,
    check=_te_problem,
)


def register() -> None:
    """Put the column- and row-parallel dispatchers first in the LoRA dispatcher list (the
    Transformer Engine ones included, and one that refuses other TE linears with a reason),
    and make gates of TE sub-blocks read the fused layer norm's output."""
    from layerfreeze.engines.megatron.te import use_norm_output_for_gate
    from layerfreeze.policies.lora import register_gate_source

    register_gate_source(use_norm_output_for_gate)
    register_lora_dispatcher(TRANSFORMER_ENGINE)
    register_lora_dispatcher(TE_LINEAR)
    register_lora_dispatcher(ROW)
    register_lora_dispatcher(COLUMN)
