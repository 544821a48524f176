"""Transformer Engine (TE) linears of megatron-core's TE layer spec: LoRA and the HLPT gate source.

megatron-core's ``get_gpt_layer_with_transformer_engine_spec`` builds ``linear_qkv`` /
``linear_fc1`` as ``TELayerNormColumnParallelLinear`` (TE ``LayerNormLinear``: the layer's
``input_layernorm`` / ``pre_mlp_layernorm`` are ``IdentityOp`` and the norm is fused into the
linear, weights ``layer_norm_weight`` / ``layer_norm_bias``), ``linear_proj`` / ``linear_fc2`` as
``TERowParallelLinear`` and other column linears as ``TEColumnParallelLinear``. On the local spec
the LoRA input of ``linear_qkv`` / ``linear_fc1`` and the HLPT gate input are the *normed*
hidden states; on the TE spec the sub-block receives the un-normed ones, so both must read the
fused norm's output instead. How (read from the sources, see below):

* the norm-linear is switched to ``return_layernorm_output = True`` (NVIDIA Megatron-Bridge's
  PEFT does the same, ``peft/utils.py::get_adapter_attributes_from_linear``). TE's
  ``LayerNormLinear.forward`` (``transformer_engine/pytorch/module/layernorm_linear.py``, end of
  ``forward``) then returns ``(out, ln_out)`` without ``return_bias`` and ``(out, bias, ln_out)``
  with it; megatron's wrapper (``megatron/core/extensions/transformer_engine.py``,
  ``TELayerNormColumnParallelLinear.forward``) returns TE's tuple as is when ``te_return_bias``
  and ``(te_out, None)`` otherwise, i.e. ``((out, ln_out), None)``. One forward hook
  (:func:`_norm_linear_hook`) unpacks both forms, computes the gates that read the norm output
  (:func:`use_norm_output_for_gate`), then adds the LoRA update computed from ``ln_out``
  (:class:`TENormLoRAAdapter`), and hands the layer megatron's usual ``(out, bias)``.
* ``return_layernorm_output_gathered`` stays False: under sequence parallelism TE returns
  ``ln_out`` as this rank's sequence shard (``ln_out_return = ln_out`` before the all-gather,
  ``view(inp_shape)``), which is exactly the local spec's sub-block input, so the gate and the
  column-parallel LoRA maths of :mod:`~layerfreeze.engines.megatron.lora` (compute on the shard,
  ``gather_from_sequence_parallel_region`` before ``B``) apply unchanged. The gradient reaching
  ``ln_out`` is added to the norm's input gradient by TE's backward (``dgrad = dgrad +
  grad_outputs[1]`` when returned and not gathered).
* ``TEColumnParallelLinear`` / ``TERowParallelLinear`` (TE ``Linear`` with ``parallel_mode``
  ``column`` / ``row``) take the same input and gather / reduce-scatter exactly where the local
  linears do, so the ordinary :class:`~layerfreeze.engines.megatron.lora.ParallelLoRAAdapter`
  and the generic LoRA forward hook apply; their TP group is megatron's ``_tp_group`` (TE's own
  ``tp_group`` is None when the process group was not initialised at construction).

Refused, one line each (:func:`te_lora_problem`): FP8 / FP4 configs (``fp8``, ``fp4``,
``fp8_param``: TE then quantises the weight per step and may keep an FP8 copy / transpose in
``_fp8_workspaces`` that an in-place merge would leave stale, and ``ln_out`` can be quantised),
``tp_comm_overlap`` (userbuffers write TE's collectives into preallocated buffers; untested),
TE linears outside column / row parallel mode (``duplicated``, expert linears with explicit
communication), split weight parameters, and linears inside ``TEFusedMLP``
(``use_te_op_fuser``: its fused forward calls submodule hooks with ``(module, None, None)``
and never the linear; refused at install for gates, at the first forward for LoRA).

Without FP8, TE reads ``weight`` itself in every forward (``weightmat = weight`` unless
``fp8 or debug``; ``is_first_microbatch`` / ``disable_parameter_transpose_cache`` only select
the FP8 workspace cache), so merging into ``weight`` needs no cache invalidation;
:meth:`TENormLoRAAdapter.merge` still drops any ``_fp8_workspaces`` entry.

Honesty note: Transformer Engine needs CUDA and is not installed where this was written. Every
TE path here was written against the sources named above (TE main at the time, megatron-core
0.16.1) and is exercised only by ``tests/gpu/test_cuda_megatron_te_lora.py`` on a GPU; the CPU
tests cover the refusals and that the local spec is unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from layerfreeze.engines.megatron.lora import ParallelLoRAAdapter
from layerfreeze.policies.gate import TokenGate, has_hook

__all__ = [
    "is_te_module",
    "te_linear_kind",
    "te_lora_problem",
    "te_config_problem",
    "fp8_problem",
    "userbuffers_problem",
    "use_norm_output_for_gate",
    "reads_norm_output",
    "TENormLoRAAdapter",
    "build_te_adapter",
]

_TE_WRAPPERS = "megatron.core.extensions.transformer_engine"
#: megatron-core's TE wrapper classes this module adapts -> the LoRA parallel kind.
_KINDS = {
    "TELayerNormColumnParallelLinear": "norm_column",
    "TEColumnParallelLinear": "column",
    "TERowParallelLinear": "row",
}
_NORM_GATES = "_lf_norm_gates"  # on the norm-linear: the gates computed from its ln_out
_FIRST_LINEARS = ("linear_qkv", "linear_fc1")


def is_te_module(m: nn.Module) -> bool:
    """True when ``m`` is a Transformer Engine module or one of megatron-core's TE wrappers
    (any class in its MRO defined in ``transformer_engine`` or
    ``megatron.core.extensions.transformer_engine``)."""
    for cls in type(m).__mro__:
        mod = cls.__module__ or ""
        if mod.startswith(_TE_WRAPPERS) or mod == "transformer_engine" or mod.startswith(
            "transformer_engine."
        ):
            return True
    return False


def te_linear_kind(m: nn.Module) -> str | None:
    """``"norm_column"`` / ``"column"`` / ``"row"`` for megatron-core's
    ``TELayerNormColumnParallelLinear`` / ``TEColumnParallelLinear`` / ``TERowParallelLinear``
    (subclasses included), None for anything else (local linears included)."""
    for cls in type(m).__mro__:
        if (cls.__module__ or "").startswith(_TE_WRAPPERS) and cls.__name__ in _KINDS:
            return _KINDS[cls.__name__]
    return None


def fp8_problem(config) -> str | None:
    """Why an FP8 / FP4 ``TransformerConfig`` cannot carry LoRA or the gate on TE linears."""
    for field in ("fp8", "fp4"):
        value = getattr(config, field, None)
        if value:
            return (
                f"TransformerConfig.{field}={value!r}: layerfreeze's LoRA and HLPT gate on "
                "Transformer Engine linears support bf16/fp16/fp32 only (FP8/FP4 quantise the "
                f"weight and the layer-norm output); set {field}=None for this run"
            )
    if getattr(config, "fp8_param", False):
        return (
            "TransformerConfig.fp8_param=True: LoRA cannot merge into FP8 weights of Transformer "
            "Engine linears; set fp8_param=False and fp8=None"
        )
    return None


def userbuffers_problem(config) -> str | None:
    """Why ``tp_comm_overlap`` (TE userbuffers) is refused with LoRA / the gate on TE linears."""
    if getattr(config, "tp_comm_overlap", False):
        return (
            "TransformerConfig.tp_comm_overlap=True: layerfreeze's LoRA and HLPT gate on "
            "Transformer Engine linears are not supported with userbuffer communication "
            "overlap; set tp_comm_overlap=False (--tp-comm-overlap off) for this run"
        )
    return None


def te_config_problem(config) -> str | None:
    """The first of :func:`fp8_problem`, :func:`userbuffers_problem` (None when fine)."""
    return fp8_problem(config) or userbuffers_problem(config)


def te_lora_problem(base: nn.Module) -> str | None:
    """Why LoRA cannot wrap this TE linear (None when it can)."""
    name = type(base).__name__
    config = getattr(base, "config", None)
    problem = te_config_problem(config) if config is not None else None
    if problem:
        return f"{name}: {problem}"
    if getattr(base, "parallel_mode", None) not in ("column", "row"):
        return (
            f"{name} has parallel_mode={getattr(base, 'parallel_mode', None)!r} (duplicated or an "
            "expert linear with explicit communication); LoRA wraps column / row parallel TE "
            "linears only"
        )
    if list(getattr(base, "weight_names", ["weight"])) != ["weight"]:
        return (
            f"{name} splits its weight into {list(base.weight_names)}; LoRA needs one 'weight' "
            "parameter"
        )
    if getattr(base, "weight", None) is None:
        return f"{name} has no weight parameter"
    return None


# ---------------------------------------------------------------------------------------------
# The norm-linear: layer-norm output to the gates and the LoRA update


def reads_norm_output(gate: TokenGate) -> bool:
    """True when ``gate`` is computed from a TE norm-linear's layer-norm output (the sub-block
    pre-hook must then leave it alone)."""
    return not gate.reads_block_input


def _split_output(module: nn.Module, output):
    """``(out, bias, ln_out)`` of megatron's TELayerNormColumnParallelLinear with
    ``return_layernorm_output``: ``(out, bias, ln_out)`` when ``te_return_bias``, else
    ``((out, ln_out), None)``."""
    if getattr(module, "te_return_bias", False):
        out, bias, ln_out = output
    else:
        (out, ln_out), bias = output
    return out, bias, ln_out


def _fused_mlp_problem(module: nn.Module) -> str:
    return (
        f"{type(module).__name__} runs inside megatron's TEFusedMLP "
        "(get_gpt_layer_with_transformer_engine_spec(use_te_op_fuser=True)), whose fused "
        "forward never calls the linear, so its LoRA / HLPT gate cannot run; build the spec "
        "with use_te_op_fuser=False"
    )


def _fused_guard_hook(module: nn.Module, args, output) -> None:
    """Forward hook put first on every TE linear with an adapter: TEFusedMLP calls its
    submodules' hooks with ``(module, None, None)`` (``_make_fused_impl``); refuse clearly."""
    if output is None:
        raise RuntimeError(f"{_fused_mlp_problem(module)}.")


def _norm_linear_hook(module: nn.Module, args: tuple, output):
    """Forward hook of a TE norm-linear switched to ``return_layernorm_output``: gates first,
    then the LoRA update from ``ln_out``; returns megatron's ``(out, bias)``."""
    _fused_guard_hook(module, args, output)
    out, bias, ln_out = _split_output(module, output)
    for gate in module.__dict__.get(_NORM_GATES, ()):
        gate(ln_out)
    adapter = module._modules.get("lora_adapter")
    if isinstance(adapter, TENormLoRAAdapter) and not adapter.merged:
        out = adapter.update_from_norm_output(ln_out, out)
    return out, bias


def _enable_norm_output(linear: nn.Module) -> None:
    """Switch the norm-linear to return its (sequence-shard) layer-norm output and install
    :func:`_norm_linear_hook` (idempotent)."""
    linear.return_layernorm_output = True
    linear.return_layernorm_output_gathered = False
    if not has_hook(linear._forward_hooks, _norm_linear_hook):
        # first, so that every other hook sees megatron's ordinary (out, bias)
        linear.register_forward_hook(_norm_linear_hook, prepend=True)


def use_norm_output_for_gate(sub_block: nn.Module, gate: TokenGate) -> None:
    """When ``sub_block``'s first linear (``SelfAttention.linear_qkv`` / ``MLP.linear_fc1``) is a
    ``TELayerNormColumnParallelLinear``, make ``gate`` read that linear's layer-norm output
    (this rank's sequence shard under sequence parallelism, as on the local spec) instead of
    the sub-block input; no-op otherwise; idempotent.

    The gate is computed in the linear's forward hook before any adapter of the sub-block reads
    it (the LoRA of that linear is applied in the same hook, after the gates), and the gate is
    marked (:func:`reads_norm_output`) so the sub-block pre-hooks skip it.

    Raises:
        ValueError: the first linear is a TE norm-linear that cannot return its norm output
            (FP8 / userbuffers config).
    """
    linear = next(
        (m for n in _FIRST_LINEARS if isinstance(m := getattr(sub_block, n, None), nn.Module)),
        None,
    )
    if linear is None or te_linear_kind(linear) != "norm_column":
        return
    if type(sub_block).__name__ == "TEFusedMLP":
        raise ValueError(f"{gate.where or type(sub_block).__name__}: {_fused_mlp_problem(linear)}.")
    problem = te_config_problem(getattr(linear, "config", None))
    if problem:
        raise ValueError(f"{gate.where or type(sub_block).__name__}: {problem}.")
    _enable_norm_output(linear)
    gates = linear.__dict__.setdefault(_NORM_GATES, [])
    if not any(g is gate for g in gates):
        gates.append(gate)
    gate.reads_block_input = False


# ---------------------------------------------------------------------------------------------
# LoRA on TE linears


class TENormLoRAAdapter(ParallelLoRAAdapter):
    """Column-parallel LoRA of a ``TELayerNormColumnParallelLinear`` whose input is the fused
    norm's output (the maths of :class:`ParallelLoRAAdapter`, sequence parallelism included).

    ``forward(x, base_out)`` passes ``base_out`` through: the generic LoRA hook calls it with
    the un-normed input; the update is added by the linear's :func:`_norm_linear_hook` through
    :meth:`update_from_norm_output`.
    """

    def forward(self, x: torch.Tensor, base_out):
        """``base_out`` unchanged (see the class docstring)."""
        return base_out

    def update_from_norm_output(self, ln_out: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out + s * g * gather_seq(dropout(ln_out) A^T) B_t^T``."""
        return self._update(ln_out, out)

    @torch.no_grad()
    def merge(self, base: nn.Module) -> None:
        """Fold the update into this rank's TE ``weight`` shard (idempotent)."""
        super().merge(base)
        _drop_weight_caches(base)

    @torch.no_grad()
    def unmerge(self, base: nn.Module) -> None:
        """Take a merged update back out of the TE ``weight`` shard (idempotent)."""
        super().unmerge(base)
        _drop_weight_caches(base)


def _drop_weight_caches(base: nn.Module) -> None:
    """Forget TE's cached quantised copies of ``weight`` (only filled under FP8, which is
    refused; kept so a merge can never leave a stale copy)."""
    caches = getattr(base, "_fp8_workspaces", None)
    if isinstance(caches, dict):
        caches.clear()


def build_te_adapter(base: nn.Module, kind: str, *, r, alpha, dropout=0.0, gate=None):
    """The LoRA adapter of a TE linear (``kind`` from :func:`te_linear_kind`).

    Raises:
        ValueError: :func:`te_lora_problem` (the gate's layer named when gated).
    """
    problem = te_lora_problem(base)
    if problem is not None:
        where = gate.where if gate is not None else type(base).__name__
        raise ValueError(f"{where}: {problem}.")
    if kind == "norm_column":
        adapter = TENormLoRAAdapter(base, "column", r=r, alpha=alpha, dropout=dropout, gate=gate)
        _enable_norm_output(base)
    else:
        adapter = ParallelLoRAAdapter(base, kind, r=r, alpha=alpha, dropout=dropout, gate=gate)
        if not has_hook(base._forward_hooks, _fused_guard_hook):
            base.register_forward_hook(_fused_guard_hook, prepend=True)
    from layerfreeze.engines.megatron.sharded import install_linear_sharded_state_dict

    install_linear_sharded_state_dict(base)
    return adapter
