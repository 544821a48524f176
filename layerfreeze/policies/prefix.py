"""The ``prefix`` policy: a per-layer, zero-initialised attention branch over learned prefix K/V.

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
with it. The branch here is computed inside the layer's attention call instead, so it covers
any subset of layers, leaves the cache untouched (prefix keys are parameters, not cache
entries) and is recomputed like any other op under gradient checkpointing.

How it hooks in: transformers' attention modules call
``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager_attention_forward)``
with the rotary query. Installing the policy registers a wrapper implementation named
``layerfreeze_prefix:<original>`` (with the original's mask function in
``ALL_MASK_ATTENTION_FUNCTIONS``, so masks are built exactly as before) and points the config at
it; the wrapper runs the original implementation and adds the branch for modules that carry a
``prefix_adapter``. The name is not serialised by ``save_pretrained`` (transformers drops
``_attn_implementation_internal``), so saved configs keep the original. A forward hook checks
that the branch really ran and fails loudly otherwise (e.g. after ``set_attn_implementation``).
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from layerfreeze.errors import ConfigError
from layerfreeze.models import LayerInfo, ModelLayout
from layerfreeze.policies.base import PolicySpec
from layerfreeze.policies.lora import TokenGate, _block_input, _has_hook
from layerfreeze.registry import register_policy

__all__ = [
    "PrefixConfig",
    "PrefixAdapter",
    "PrefixPolicy",
    "WRAPPER_PREFIX",
    "wrapped_attn_implementation",
    "base_attn_implementation",
    "remove_prefix_adapters",
]

#: Name prefix of the wrapper attention implementations this module registers.
WRAPPER_PREFIX = "layerfreeze_prefix:"
_ADAPTER_ATTR = "prefix_adapter"


@dataclass(frozen=True)
class PrefixConfig:
    """Options of ``prefix``."""

    tokens: int = 10
    """Number of learned prefix (virtual) tokens per layer (>= 1)."""
    reparam: int | None = None
    """Hidden width of the prefix-tuning reparameterisation MLP (embedding -> Linear -> tanh ->
    Linear -> keys/values); null learns the keys/values directly."""
    gated: bool = False
    """Also scale the branch by the HLPT gate ``sigmoid(w . h + b)`` per token (h: attn input)."""
    lr_scale: float = 1.0
    """Multiplier on the run's learning rate for the prefix keys/values (or embedding and MLP)."""
    weight_decay: float | None = None
    """Weight decay for the prefix matrices (None: the run's default); biases and gates get none."""
    gate_lr_scale: float = 1.0
    """Multiplier on the run's learning rate for the zero-init factor and the gate (no decay)."""

    def __post_init__(self):
        problems = []
        if isinstance(self.tokens, bool) or not isinstance(self.tokens, int) or self.tokens < 1:
            problems.append(
                f"tokens: must be an integer >= 1, got {self.tokens!r}. Use e.g. tokens=16."
            )
        if self.reparam is not None and (
            isinstance(self.reparam, bool) or not isinstance(self.reparam, int) or self.reparam < 1
        ):
            problems.append(
                f"reparam: must be a hidden width >= 1 or null, got {self.reparam!r}. "
                "Use e.g. reparam=512."
            )
        if not self.lr_scale > 0:
            problems.append(f"lr_scale: must be > 0, got {self.lr_scale!r}. Use e.g. lr_scale=1.0.")
        if self.weight_decay is not None and not self.weight_decay >= 0:
            problems.append(f"weight_decay: must be >= 0, got {self.weight_decay!r}.")
        if not self.gate_lr_scale > 0:
            problems.append(f"gate_lr_scale: must be > 0, got {self.gate_lr_scale!r}.")
        if problems:
            raise ConfigError(problems)


class PrefixAdapter(nn.Module):
    """Learned prefix keys/values of one attention layer and its zero-initialised output scale.

    Parameters (all names start with ``prefix_``): ``prefix_key`` / ``prefix_value``
    ``(num_kv_heads, tokens, head_dim)`` ~ N(0, 1), or with ``reparam`` ``prefix_embedding``
    ``(tokens, hidden)`` ~ N(0, 1) and ``prefix_mlp`` (default ``nn.Linear`` init);
    ``prefix_gating_factor`` ``(num_heads,)`` zeros, fp32; with ``gated`` a ``prefix_gate``
    (:class:`~layerfreeze.policies.lora.TokenGate`, ``w = 0, b = 0`` -> 0.5), fp32. Prefix
    matrices take the device and dtype of the attention's weights.

    Args:
        num_heads: query heads of the layer.
        num_kv_heads: key/value heads (< ``num_heads`` under grouped-query attention).
        head_dim: per-head width.
        hidden_size: model width (input of the gate and of the reparameterisation).
        tokens: number of prefix tokens.
        reparam: reparameterisation MLP width, or None.
        gated: add the input-dependent gate.
        device: parameter device.
        dtype: dtype of the prefix matrices (factor and gate stay fp32).
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
    ):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.tokens, self.reparam = tokens, reparam
        kw = dict(device=device, dtype=dtype)
        if reparam is None:
            self.prefix_key = nn.Parameter(torch.randn(num_kv_heads, tokens, head_dim, **kw))
            self.prefix_value = nn.Parameter(torch.randn(num_kv_heads, tokens, head_dim, **kw))
        else:
            self.prefix_embedding = nn.Parameter(torch.randn(tokens, hidden_size, **kw))
            self.prefix_mlp = nn.Sequential(
                nn.Linear(hidden_size, reparam, **kw),
                nn.Tanh(),
                nn.Linear(reparam, 2 * num_kv_heads * head_dim, **kw),
            )
        self.prefix_gating_factor = nn.Parameter(
            torch.zeros(num_heads, device=device, dtype=torch.float32)
        )
        self.prefix_gate = TokenGate(hidden_size, device=device) if gated else None
        self.where = ""
        self.pending = False

    @property
    def gated(self) -> bool:
        """True when the input-dependent gate is present."""
        return self.prefix_gate is not None

    def keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefix keys and values, each ``(num_kv_heads, tokens, head_dim)``."""
        if self.reparam is None:
            return self.prefix_key, self.prefix_value
        kv = self.prefix_mlp(self.prefix_embedding)  # (tokens, 2 * kv_heads * head_dim)
        kv = kv.view(self.tokens, 2, self.num_kv_heads, self.head_dim).permute(1, 2, 0, 3)
        return kv[0], kv[1]

    def forward(self, query: torch.Tensor, scaling: float | None = None) -> torch.Tensor:
        """The branch for ``query`` ``(batch, num_heads, q_len, head_dim)``, already scaled by
        the factor (and gate); returned as ``(batch, q_len, num_heads, head_dim)`` in fp32."""
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
            f"tokens={self.tokens}, reparam={self.reparam}"
        )


# ---------------------------------------------------------------------------------------------
# The wrapper attention implementation


def wrapped_attn_implementation(base: str) -> str:
    """The wrapper implementation name for ``base`` (registering it on first use)."""
    if base.startswith(WRAPPER_PREFIX):
        return base
    name = WRAPPER_PREFIX + base
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if name not in ALL_ATTENTION_FUNCTIONS._global_mapping:
        ALL_ATTENTION_FUNCTIONS.register(name, _make_wrapper(base))
        masks = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping
        if base in masks:  # no entry for base -> no entry for us: masks are skipped alike
            ALL_MASK_ATTENTION_FUNCTIONS.register(name, masks[base])
    return name


def base_attn_implementation(name: str | None) -> str | None:
    """The original implementation behind a (possibly) wrapped name."""
    if name is not None and name.startswith(WRAPPER_PREFIX):
        return name[len(WRAPPER_PREFIX):]
    return name


def _module_eager(module: nn.Module) -> Callable | None:
    """The ``eager_attention_forward`` of the modeling file that defines ``module``'s class."""
    return getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)


def _make_wrapper(base: str) -> Callable:
    def attention(module, query, key, value, attention_mask, **kwargs):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        if base == "eager":
            fn = _module_eager(module)
            if fn is None:
                raise RuntimeError(
                    f"{type(module).__name__}: layerfreeze's prefix attention wraps 'eager' but "
                    f"{type(module).__module__} defines no eager_attention_forward; use sdpa."
                )
        else:
            fn = ALL_ATTENTION_FUNCTIONS.get_interface(base, _module_eager(module))
        out, weights = fn(module, query, key, value, attention_mask, **kwargs)
        adapter = module._modules.get(_ADAPTER_ATTR)
        if adapter is not None:
            out = out + adapter(query, kwargs.get("scaling")).to(out.dtype)
            adapter.pending = False
        return out, weights

    attention.__name__ = f"layerfreeze_prefix_{base.replace('|', '_')}"
    return attention


def _prefix_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    adapter = module._modules[_ADAPTER_ATTR]
    adapter.pending = True
    if adapter.prefix_gate is not None:
        adapter.prefix_gate(_block_input(module, args, kwargs, adapter.where))


def _prefix_post_hook(module: nn.Module, args: tuple, output) -> None:
    adapter = module._modules[_ADAPTER_ATTR]
    if adapter.prefix_gate is not None:
        adapter.prefix_gate.clear()
    if adapter.pending:
        adapter.pending = False
        impl = getattr(getattr(module, "config", None), "_attn_implementation", None)
        raise RuntimeError(
            f"{adapter.where}: the prefix branch did not run: the attention implementation "
            f"{impl!r} bypassed layerfreeze's wrapper (was set_attn_implementation called after "
            "apply_plan, or does this module skip ALL_ATTENTION_FUNCTIONS?). Re-apply the plan "
            "after choosing the attention implementation."
        )


def remove_prefix_adapters(root: nn.Module) -> int:
    """Remove every prefix adapter and its hooks under ``root`` (the whole model) and restore
    the original ``config._attn_implementation`` of the modules that carried one.

    Returns:
        The number of adapters removed.
    """
    configs, count = [], 0
    for mod in list(root.modules()):
        if _ADAPTER_ATTR not in mod._modules:
            continue
        del mod._modules[_ADAPTER_ATTR]
        count += 1
        for key in [k for k, h in mod._forward_pre_hooks.items() if h is _prefix_pre_hook]:
            del mod._forward_pre_hooks[key]
            mod._forward_pre_hooks_with_kwargs.pop(key, None)
        for key in [k for k, h in mod._forward_hooks.items() if h is _prefix_post_hook]:
            del mod._forward_hooks[key]
        config = getattr(mod, "config", None)
        if config is not None and all(config is not c for c in configs):
            configs.append(config)
    for config in configs:
        config._attn_implementation = base_attn_implementation(config._attn_implementation)
    return count


# ---------------------------------------------------------------------------------------------
# The policy


def _options(spec: PolicySpec) -> PrefixConfig:
    return spec.options if spec.options is not None else PrefixConfig()


def _uses_attention_interface(attn: nn.Module) -> bool:
    try:
        src = inspect.getsource(type(attn).forward)
    except (OSError, TypeError):
        return False
    return "ALL_ATTENTION_FUNCTIONS" in src


@register_policy("prefix")
class PrefixPolicy:
    """Zero-initialised prefix attention branch (optionally HLPT-gated) on a layer's attention."""

    config_cls = PrefixConfig
    param_prefix = "prefix_"

    def check(self, layer: LayerInfo, spec: PolicySpec, layout: ModelLayout) -> list[str]:
        """Problems that stop the branch from being added to ``layer``'s attention."""
        opts = _options(spec)
        attn = layer.attn
        where = f"layer {layer.index} ({layer.name}.{layer.attn_name}, {type(attn).__name__})"
        problems = []
        config = getattr(attn, "config", None)
        impl = getattr(config, "_attn_implementation", None)
        if config is None or not isinstance(impl, str):
            problems.append(
                f"{where}: prefix needs a transformers attention module with a config carrying "
                f"_attn_implementation; found config="
                f"{type(config).__name__ if config is not None else None}, "
                f"_attn_implementation={impl!r}. Use lora or full on this layer."
            )
        if not _uses_attention_interface(attn):
            problems.append(
                f"{where}: prefix needs an attention module whose forward dispatches through "
                "transformers' ALL_ATTENTION_FUNCTIONS (the rotary query is taken there); this "
                "one does not. Use lora or full on this layer."
            )
        if getattr(attn, "is_cross_attention", False):
            problems.append(f"{where}: prefix supports self-attention only, not cross-attention.")
        if getattr(attn, "reorder_and_upcast_attn", False):
            problems.append(
                f"{where}: reorder_and_upcast_attn=True computes eager attention outside "
                "ALL_ATTENTION_FUNCTIONS, so the prefix branch cannot run; set "
                "config.reorder_and_upcast_attn=False."
            )
        if base_attn_implementation(impl) == "eager" and _module_eager(attn) is None:
            problems.append(
                f"{where}: attn_implementation 'eager' but {type(attn).__module__} defines no "
                "eager_attention_forward to delegate to; load the model with "
                "attn_implementation='sdpa'."
            )
        if layout.num_kv_heads < 1 or layout.num_heads % layout.num_kv_heads:
            problems.append(
                f"{where}: {layout.num_heads} query heads are not a multiple of "
                f"{layout.num_kv_heads} key/value heads."
            )
        existing = attn._modules.get(_ADAPTER_ATTR)
        if existing is not None and (existing.tokens, existing.reparam, existing.gated) != (
            opts.tokens, opts.reparam, opts.gated
        ):
            problems.append(
                f"{where}: already carries a prefix adapter ({existing.extra_repr()}, "
                f"gated={existing.gated}) that differs from {spec.describe()}; use the same "
                "prefix options in every plan that covers this layer."
            )
        return problems

    def apply(self, layer: LayerInfo, spec: PolicySpec, layout: ModelLayout) -> set[str]:
        """Install the adapter, hooks and wrapper implementation once; return the names."""
        problems = self.check(layer, spec, layout)
        if problems:
            raise ValueError("\n".join(problems))
        opts = _options(spec)
        attn = layer.attn
        adapter = attn._modules.get(_ADAPTER_ATTR)
        if adapter is None:
            w = next(attn.parameters())
            adapter = PrefixAdapter(
                layout.num_heads, layout.num_kv_heads, layout.head_dim, layout.hidden_size,
                tokens=opts.tokens, reparam=opts.reparam, gated=opts.gated,
                device=w.device, dtype=w.dtype,
            )
            adapter.where = f"layer {layer.index} ({layer.name}.{layer.attn_name})"
            if adapter.prefix_gate is not None:
                adapter.prefix_gate.where = adapter.where
            attn.add_module(_ADAPTER_ATTR, adapter)
        if not _has_hook(attn._forward_pre_hooks, _prefix_pre_hook):
            attn.register_forward_pre_hook(_prefix_pre_hook, with_kwargs=True)
            attn.register_forward_hook(_prefix_post_hook)
        config = attn.config
        config._attn_implementation = wrapped_attn_implementation(config._attn_implementation)
        return {f"{layer.attn_name}.{_ADAPTER_ATTR}.{n}" for n, _ in adapter.named_parameters()}

    def optim_options(self, param_name: str, spec: PolicySpec) -> dict[str, float | None]:
        """Factor and gate: ``gate_lr_scale``, no decay; MLP biases: no decay; rest: lr_scale."""
        opts = _options(spec)
        parts = param_name.split(".")
        if "prefix_gate" in parts or parts[-1] == "prefix_gating_factor":
            return {"lr_scale": opts.gate_lr_scale, "weight_decay": 0.0}
        if "prefix_mlp" in parts and parts[-1] == "bias":
            return {"lr_scale": opts.lr_scale, "weight_decay": 0.0}
        return {"lr_scale": opts.lr_scale, "weight_decay": opts.weight_decay}
