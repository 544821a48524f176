"""The ``prefix`` policy on megatron-core ``SelfAttention``, per tensor-parallel rank: the branch form.

Same maths as on Hugging Face models (``layerfreeze/policies/prefix/branch.py``)::

    out = Attn(q, K, V) + f_head * g(h) * softmax(q P_k^T * scaling) P_v

Megatron's ``SelfAttention`` calls its ``core_attention`` with the rotary-embedded query
``[s, b, heads_local, head_dim]`` and gets ``[s, b, heads_local * head_dim]`` back, which goes
into the row-parallel ``linear_proj``. A forward hook on ``core_attention`` adds the branch
there, so each TP rank computes it for its own heads: rank ``t`` holds the prefix keys/values
of its query groups ``[groups_local, tokens, head_dim]`` and the factors of its heads
(megatron gives rank ``t`` the contiguous heads ``t*np .. (t+1)*np - 1`` and groups
``t*ng ..``; query head ``i`` reads group ``i // (np / ng)``, as ``repeat_interleave`` in
megatron's ``DotProductAttention``). ``linear_proj`` then sums the heads over the ranks.

The gate ``g`` is computed in fp32 from the attention input (the normed hidden states,
replicated over TP without sequence parallelism) and passed through
``copy_to_tensor_model_parallel_region`` (identity forward, all-reduce backward): each rank's
heads contribute to its gradient, so the gate's parameters get the full gradient on every rank.

Under sequence parallelism the attention input, and so the gate, is this rank's sequence shard
``[s/T, b, h]`` while ``core_attention`` sees whole sequences (the QKV column-parallel linear
gathered them). The gate is all-gathered along the sequence where that linear gathers its input
(``gather_from_sequence_parallel_region``: all-gather forward, reduce-scatter backward, which
sums the heads' gradients over the ranks and keeps this rank's tokens); the branch output goes
to ``linear_proj``, which reduce-scatters it back to sequence shards. The gate's parameters then
get the gradient of this rank's tokens only and carry ``sequence_parallel = True``, as
megatron-core marks its layer-norm weights, so ``finalize_model_grads`` sums them over TP.
The prefix keys/values see whole sequences and need nothing more.
Prefix keys/values are drawn full-size from the default torch generator (in step on every TP
rank) and sliced, so a TP=T model starts with the TP=1 prefix's shards.

Transformer Engine spec (``get_gpt_layer_with_transformer_engine_spec``): ``core_attention`` is
``TEDotProductAttention``, called with the same ``[sq, b, heads_local, d]`` query (``sbhd``) and
returning ``[sq, b, heads_local * d]`` like the local one, so the branch is added the same way.
With packed sequences (``packed_seq_params.qkv_format == "thd"``) megatron squeezes the batch
axis: TE gets the query ``[t, heads_local, d]`` and returns ``[t, heads_local * d]``; the branch
is per token (each token's softmax runs over the prefix only), so it is exact on packed
sequences and is computed on ``[t, 1, heads_local, d]`` and reshaped to TE's output. On that spec
the layer's norm is fused into ``linear_qkv`` (``TELayerNormColumnParallelLinear``) and the
attention's input is the un-normed hidden state, so the gate reads the norm's output instead:
the installer calls ``use_norm_output_for_gate(attn, gate)`` of
:mod:`layerfreeze.engines.megatron.te` (imported only on that spec), which makes ``linear_qkv``'s
forward set the gate from its layer-norm output (this rank's sequence shard under sequence
parallelism, as the local spec's attention input), and the attention pre-hook then leaves the
gate alone. ``MegatronPrefix.sequence_gate`` is unchanged under SP: TE's norm-linear gathers the
sequence inside, as megatron's column-parallel linear does. The TE paths were written against
megatron-core 0.16.1's ``extensions/transformer_engine.py`` and ``transformer/attention.py``
(``SelfAttention.forward`` l.1066-1193) and Transformer Engine's source, and have not been
executed here (no GPU, no TE): ``tests/gpu/test_cuda_megatron_te_prefix.py`` checks them.

Refused with a clear error: TP sizes that do not divide the heads / query groups,
``reparam`` with TP > 1, context parallelism, selective recomputation of
``core_attn`` (its reentrant checkpoint gives the prefix no gradient when the inputs need none),
a ``SelfAttention`` without a ``core_attention`` child, TE's FP8 multi-head attention
(``fp8_multi_head_attention``: ``core_attention`` would return FP8 tensors the branch cannot be
added to).

``form=paper`` (HLPT's prefix inside the layer's own softmax) shares this installer, the adapter
(without the factor) and the gate hooks; its attention and its own refusals are in
:mod:`layerfreeze.engines.megatron.prefix_paper`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from layerfreeze.models import LayerInfo, ModelLayout
from layerfreeze.policies.base import PolicySpec
from layerfreeze.policies.gate import block_input, has_hook
from layerfreeze.policies.prefix import (
    PrefixAdapter,
    PrefixConfig,
    PrefixInstaller,
    register_prefix_installer,
)
from layerfreeze.policies.prefix.paper import configure_adapter

__all__ = ["MegatronPrefix", "register", "split_heads"]

_ADAPTER_ATTR = "prefix_adapter"
_REF = "_layerfreeze_prefix_attn"  # plain reference from core_attention to its attention


def split_heads(heads: int, groups: int, tp: int, where: str) -> tuple[int, int]:
    """``(heads, groups)`` per tensor-parallel rank.

    Raises:
        ValueError: ``tp`` does not divide ``heads`` or ``groups`` (the message names ``where``).
    """
    bad = [f"{n} {k}" for n, k in ((heads, "attention heads"), (groups, "query groups")) if n % tp]
    if tp < 1 or bad:
        raise ValueError(
            f"{where}: prefix splits its keys/values by attention head and query group across "
            f"the {tp} tensor-parallel ranks, but {tp} does not divide {' and '.join(bad)}. "
            "Use a tensor-parallel size that divides both."
        )
    return heads // tp, groups // tp


class MegatronPrefix(PrefixAdapter):
    """:class:`~layerfreeze.policies.prefix.PrefixAdapter` holding one TP rank's heads.

    ``prefix_key`` / ``prefix_value`` are ``(groups_local, tokens, head_dim)``,
    ``prefix_gating_factor`` ``(heads_local,)``; they carry megatron's tensor-parallel
    attributes (split along dim 0). :meth:`branch` takes megatron's query layout.

    Args:
        heads: attention heads of the whole layer.
        groups: query groups (key/value heads) of the whole layer.
        head_dim: per-head width.
        hidden_size: model width (gate input).
        tokens: prefix tokens.
        gated: add the input-dependent gate.
        tp_group: the tensor-parallel process group (None: TP size 1).
        reparam: reparameterisation width (TP size 1 only).
        sequence_parallel: the attention input is sequence-sharded (megatron's
            ``sequence_parallel`` with TP > 1): the gate is gathered along the sequence.
        where: layer description for errors.
        device: parameter device.
        dtype: dtype of the prefix matrices (factor and gate stay fp32).
    """

    def __init__(
        self,
        heads: int,
        groups: int,
        head_dim: int,
        hidden_size: int,
        tokens: int,
        gated: bool = False,
        tp_group=None,
        reparam: int | None = None,
        sequence_parallel: bool = False,
        where: str = "",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        tp = tp_group.size() if tp_group is not None else 1
        rank = tp_group.rank() if tp_group is not None else 0
        np_, ng = split_heads(heads, groups, tp, where)
        if reparam is not None and tp > 1:
            raise ValueError(
                f"{where}: prefix reparam={reparam} is not supported with tensor parallelism "
                f"(TP={tp}); use reparam=null (the default) or TP=1."
            )
        state = torch.get_rng_state()
        super().__init__(
            np_,
            ng,
            head_dim,
            hidden_size,
            tokens,
            reparam=reparam,
            gated=gated,
            device=device,
            dtype=dtype,
        )
        self.__dict__["_tp_group"] = tp_group
        self.tp_size = tp
        self.where = where
        self.sequence_parallel = bool(sequence_parallel) and tp > 1
        if self.prefix_gate is not None:
            self.prefix_gate.where = where
            if self.sequence_parallel:  # gradient from this rank's tokens: summed over TP
                for p in self.prefix_gate.parameters():
                    p.sequence_parallel = True
        if reparam is None:
            # Redraw full-size (same draws as an unsplit adapter) and keep this rank's groups.
            torch.set_rng_state(state)
            full_k = torch.randn(groups, tokens, head_dim, dtype=torch.float32)
            full_v = torch.randn(groups, tokens, head_dim, dtype=torch.float32)
            with torch.no_grad():
                self.prefix_key.copy_(full_k[rank * ng : (rank + 1) * ng])
                self.prefix_value.copy_(full_v[rank * ng : (rank + 1) * ng])
        from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

        split = [self.prefix_gating_factor]
        if reparam is None:
            split += [self.prefix_key, self.prefix_value]
        for p in split:
            set_tensor_model_parallel_attributes(p, is_parallel=True, dim=0, stride=1)

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None
    ) -> dict:
        """megatron-core's distributed-checkpoint view: ``prefix_key`` / ``prefix_value`` /
        ``prefix_gating_factor`` split along their head / group axis with their global shape,
        the gate (and any reparameterisation) replicated over TP; keys per layer with the global
        layer index (see :mod:`layerfreeze.engines.megatron.sharded`)."""
        from layerfreeze.engines.megatron.sharded import adapter_sharded_state_dict

        return adapter_sharded_state_dict(
            self, prefix, sharded_offsets, metadata, tp_group=self.__dict__["_tp_group"]
        )

    def sequence_gate(self, query: torch.Tensor) -> torch.Tensor:
        """Under sequence parallelism: the gate of this rank's sequence shard gathered to the
        whole sequence of ``query`` ``[s, b, ...]``, ``(s, b, 1)`` fp32 (reduce-scatter in
        backward)."""
        from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

        g = self.prefix_gate.current(query[: query.shape[0] // self.tp_size, :, 0, :1])
        return gather_from_sequence_parallel_region(g, group=self.__dict__["_tp_group"])

    def branch(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """The scaled branch for megatron's query ``[s, b, heads_local, head_dim]``, returned as
        ``[s, b, heads_local * head_dim]`` in fp32."""
        if query.dim() != 4 or query.shape[2] != self.num_heads or query.shape[3] != self.head_dim:
            raise RuntimeError(
                f"{self.where}: prefix branch expected megatron's query as [s, b, "
                f"{self.num_heads} heads, {self.head_dim}], got {tuple(query.shape)}."
            )
        k, v = self.keys_values()
        groups = self.num_heads // self.num_kv_heads
        k = k.float().repeat_interleave(groups, dim=0)  # (heads_local, tokens, head_dim)
        v = v.float().repeat_interleave(groups, dim=0)
        scores = torch.einsum("sbhd,hpd->sbhp", query.float(), k) * scaling
        out = torch.einsum("sbhp,hpd->sbhd", torch.softmax(scores, dim=-1), v)
        scale = self.prefix_gating_factor.float().view(1, 1, -1, 1)
        if self.prefix_gate is not None and self.sequence_parallel:
            scale = scale * self.sequence_gate(query).unsqueeze(-1)
        elif self.prefix_gate is not None:
            g = self.prefix_gate.current(query[:, :, 0, :1])  # (s, b, 1), fp32
            if self.tp_size > 1:
                from megatron.core.tensor_parallel.mappings import (
                    copy_to_tensor_model_parallel_region,
                )

                g = copy_to_tensor_model_parallel_region(g, group=self.__dict__["_tp_group"])
            scale = scale * g.unsqueeze(-1)
        out = out * scale
        return out.reshape(out.shape[0], out.shape[1], -1)


# ---------------------------------------------------------------------------------------------
# Hooks (module-level functions: deepcopy / pickling of the model stay correct)


def _attn_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    adapter = module._modules.get(_ADAPTER_ATTR)
    if adapter is None:
        return
    adapter.pending = True
    if adapter.prefix_gate is not None and adapter.prefix_gate.reads_block_input:
        adapter.prefix_gate(block_input(module, args, kwargs, adapter.where))


def _attn_post_hook(module: nn.Module, args: tuple, output) -> None:
    adapter = module._modules.get(_ADAPTER_ATTR)
    if adapter is None:
        return
    if adapter.prefix_gate is not None:
        adapter.prefix_gate.clear()
    if adapter.pending:
        adapter.pending = False
        raise RuntimeError(
            f"{adapter.where}: the prefix branch did not run: this SelfAttention forward did not "
            "call its core_attention module (dynamic-batching inference or flash decoding "
            "bypass it); run the model through the static core_attention path."
        )


def _paper_adapter(module: nn.Module):
    attn = module.__dict__.get(_REF)
    adapter = attn._modules.get(_ADAPTER_ATTR) if attn is not None else None
    return adapter if getattr(adapter, "form", "branch") == "paper" else None


def _core_attention_pre_hook(module: nn.Module, args: tuple, kwargs: dict):
    adapter = _paper_adapter(module)
    if adapter is None:
        return None
    from layerfreeze.engines.megatron.prefix_paper import stash_inputs

    return stash_inputs(module, args, kwargs, adapter.where)


def _core_attention_hook(module: nn.Module, args: tuple, kwargs: dict, output):
    attn = module.__dict__.get(_REF)
    adapter = attn._modules.get(_ADAPTER_ATTR) if attn is not None else None
    if adapter is None:
        return output
    adapter.pending = False
    if getattr(adapter, "form", "branch") == "paper":
        from megatron.core.transformer.enums import AttnMaskType

        from layerfreeze.engines.megatron.prefix_paper import (
            is_te_core_attention,
            paper_attention,
            take_inputs,
            te_mask,
        )

        query, key, value, mask, mask_type = take_inputs(module)
        top_left = False
        if is_te_core_attention(module):  # TE's mask semantics: the type decides
            causal, top_left = te_mask(mask_type or module.attn_mask_type, adapter.where)
            mask = None
        else:  # the local DotProductAttention uses its own type and the mask it is given
            causal = getattr(module, "attn_mask_type", None) == AttnMaskType.causal
        scaling = module.__dict__["_layerfreeze_prefix_scaling"]
        out = paper_attention(adapter, query, key, value, mask, causal, scaling, top_left)
        return (out, *output[1:]) if isinstance(output, tuple) else out
    query = args[0] if args else kwargs["query"]
    packed = query.dim() == 3  # THD: megatron squeezed the batch axis, [t, heads_local, d]
    branch = adapter.branch(
        query.unsqueeze(1) if packed else query, module.__dict__["_layerfreeze_prefix_scaling"]
    )
    out = output[0] if isinstance(output, tuple) else output
    if packed:  # TE's THD output is [t, heads_local * d]
        branch = branch.reshape(out.shape)
    out = out + branch.to(out.dtype)
    return (out, *output[1:]) if isinstance(output, tuple) else out


# ---------------------------------------------------------------------------------------------
# The installer


def _is_megatron_attention(attn: nn.Module) -> bool:
    try:
        from megatron.core.transformer.attention import SelfAttention
    except ImportError:
        return False
    return isinstance(attn, SelfAttention)


def _where(layer: LayerInfo) -> str:
    return f"layer {layer.index} ({layer.name}.{layer.attn_name})"


def _tp_group(attn: nn.Module):
    pgs = getattr(attn, "pg_collection", None)
    group = getattr(pgs, "tp", None)
    if group is None:
        from megatron.core import parallel_state

        group = parallel_state.get_tensor_model_parallel_group()
    return group


def _check(layer: LayerInfo, spec: PolicySpec, layout: ModelLayout) -> list[str]:
    opts: PrefixConfig = spec.options if spec.options is not None else PrefixConfig()
    attn, where = layer.attn, _where(layer)
    config = attn.config
    problems = []
    core = getattr(attn, "core_attention", None)
    if not isinstance(core, nn.Module):
        problems.append(f"{where}: megatron attention without a core_attention module.")
    tp = _tp_group(attn).size()
    groups = config.num_query_groups or config.num_attention_heads
    try:
        split_heads(config.num_attention_heads, groups, tp, where)
    except ValueError as e:
        problems.append(str(e))
    if opts.reparam is not None and tp > 1:
        problems.append(
            f"{where}: prefix reparam={opts.reparam} is not supported with tensor parallelism "
            f"(TP={tp}); use reparam=null (the default) or TP=1."
        )
    if getattr(attn, "checkpoint_core_attention", False):
        problems.append(
            f"{where}: prefix cannot run under selective recomputation of core attention "
            "(recompute_granularity=selective with core_attn in recompute_modules): megatron's "
            "checkpoint sees only the query/key/value inputs, so the prefix parameters inside "
            "it get no gradient when those inputs need none (frozen layers below). Use full "
            "recomputation or drop core_attn from recompute_modules."
        )
    if getattr(opts, "form", "branch") == "paper":
        from layerfreeze.engines.megatron.prefix_paper import paper_problems

        problems += paper_problems(attn, where, opts.gate_at)
    if getattr(config, "context_parallel_size", 1) > 1:
        problems.append(f"{where}: prefix does not support context parallelism.")
    if getattr(config, "fp8_multi_head_attention", False):
        problems.append(
            f"{where}: prefix cannot run with fp8_multi_head_attention=True: Transformer "
            "Engine's core attention then returns FP8 tensors that the prefix cannot add to or "
            "replace; set fp8_multi_head_attention=False."
        )
    existing = attn._modules.get(_ADAPTER_ATTR)
    if existing is not None and (existing.tokens, existing.reparam, existing.gated) != (
        opts.tokens,
        opts.reparam,
        opts.gated,
    ):
        problems.append(
            f"{where}: already carries a prefix adapter ({existing.extra_repr()}, "
            f"gated={existing.gated}) that differs from {spec.describe()}; use the same "
            "prefix options in every plan that covers this layer."
        )
    return problems


def _gate_from_norm(attn: nn.Module, adapter: MegatronPrefix) -> None:
    """TE spec (``linear_qkv`` is ``TELayerNormColumnParallelLinear``, the attention input is not
    normed): make the gate read ``linear_qkv``'s fused layer-norm output
    (:func:`layerfreeze.engines.megatron.te.use_norm_output_for_gate`, which marks the gate so
    the attention pre-hook leaves it alone; a no-op on the local spec).

    Raises:
        ValueError: from ``use_norm_output_for_gate`` (a TE config it cannot serve).
    """
    if adapter.prefix_gate is None:
        return
    from layerfreeze.engines.megatron.te import use_norm_output_for_gate

    use_norm_output_for_gate(attn, adapter.prefix_gate)


def _install(layer: LayerInfo, spec: PolicySpec, layout: ModelLayout) -> nn.Module:
    opts: PrefixConfig = spec.options if spec.options is not None else PrefixConfig()
    attn = layer.attn
    adapter = attn._modules.get(_ADAPTER_ATTR)
    if adapter is None:
        config = attn.config
        w = attn.linear_qkv.weight
        adapter = MegatronPrefix(
            config.num_attention_heads,
            config.num_query_groups or config.num_attention_heads,
            config.kv_channels,
            config.hidden_size,
            tokens=opts.tokens,
            gated=opts.gated,
            tp_group=_tp_group(attn),
            reparam=opts.reparam,
            sequence_parallel=bool(getattr(config, "sequence_parallel", False)),
            where=_where(layer),
            device=w.device,
            dtype=w.dtype,
        )
        # form, gate_at, the gate's initial bias g = sigmoid(gate_bias); form=paper drops the
        # zero-initialised factor (as on Hugging Face models).
        configure_adapter(adapter, opts.form, opts.gate_bias, opts.gate_at)
        _gate_from_norm(attn, adapter)  # may refuse (TE config): before the adapter is attached
        attn.add_module(_ADAPTER_ATTR, adapter)
    _gate_from_norm(attn, adapter)  # idempotent
    core = attn.core_attention
    core.__dict__[_REF] = attn  # plain reference: the hook reads the attention's adapter
    core.__dict__["_layerfreeze_prefix_scaling"] = (
        attn.config.softmax_scale or attn.config.kv_channels**-0.5
    )
    if not has_hook(core._forward_hooks, _core_attention_hook):
        core.register_forward_pre_hook(_core_attention_pre_hook, with_kwargs=True)
        core.register_forward_hook(_core_attention_hook, with_kwargs=True)
    if not has_hook(attn._forward_pre_hooks, _attn_pre_hook):
        attn.register_forward_pre_hook(_attn_pre_hook, with_kwargs=True)
        attn.register_forward_hook(_attn_post_hook)
    return adapter


@dataclass(frozen=True)
class _MegatronInstaller(PrefixInstaller):
    """The installer, serving both prefix forms (``forms``: read by the paper form's check)."""

    forms: tuple[str, ...] = ("branch", "paper")


INSTALLER = _MegatronInstaller("megatron.SelfAttention", _is_megatron_attention, _check, _install)


def register() -> None:
    """Register the megatron ``SelfAttention`` prefix installer (idempotent)."""
    register_prefix_installer(INSTALLER)
