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

Attention modules that compute attention inline instead (BLOOM; Falcon before transformers 5.25) take the projection
route (:class:`QueryRoute`): a forward hook on the module's own query projection rebuilds the
query exactly as its forward does (rotary included), and a pre-hook on its output projection
adds the branch to the merged heads. Which route applies is decided from the class (a route
in :data:`QUERY_ROUTES`) or from the compiled forward loading the registry, never from source
text; a module with neither is refused with the reason.

Other attention modules (e.g. megatron-core's ``SelfAttention``) get the same branch through a
:class:`PrefixInstaller` registered with :func:`register_prefix_installer` by their engine
package; the first installer whose ``matches`` accepts the attention module is used, and
transformers attention is the built-in fallback (the LoRA dispatcher list works the same way).
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from layerfreeze.errors import ConfigError
from layerfreeze.models import LayerInfo, ModelLayout
from layerfreeze.policies.base import PolicySpec
from layerfreeze.policies.lora import TokenGate, block_input, has_hook
from layerfreeze.policies.prefix_paper import configure_adapter, form_mismatch
from layerfreeze.registry import register_policy

__all__ = [
    "PrefixConfig",
    "PrefixAdapter",
    "PrefixPolicy",
    "WRAPPER_PREFIX",
    "wrapped_attn_implementation",
    "base_attn_implementation",
    "remove_prefix_adapters",
    "QueryRoute",
    "QUERY_ROUTES",
    "PrefixInstaller",
    "PREFIX_INSTALLERS",
    "register_prefix_installer",
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
    form: str = "branch"
    """``branch``: a separate zero-initialised attention branch over the prefix (identity at
    init); ``paper``: HLPT's form, the prefix prepended to the layer's own keys/values (one
    softmax), the gate scaling the prefix's attention weights (see ``prefix_paper.py``)."""
    gate_bias: float = 0.0
    """Initial bias ``b`` of the gate (``w = 0``): ``g = sigmoid(b)`` at init. With form=paper a
    very negative value (e.g. -30) starts the gate closed, i.e. the base model."""

    def __post_init__(self):
        problems = []
        if self.form not in ("branch", "paper"):
            problems.append(f"form: must be branch or paper, got {self.form!r}.")
        if isinstance(self.gate_bias, bool) or not isinstance(self.gate_bias, (int, float)):
            problems.append(f"gate_bias: must be a number, got {self.gate_bias!r}.")
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

    Parameters (all names start with ``prefix_``): ``prefix_key`` ``(num_kv_heads, tokens,
    head_dim)`` / ``prefix_value`` ``(num_kv_heads, tokens, value_dim)`` ~ N(0, 1), or with
    ``reparam`` ``prefix_embedding``
    ``(tokens, hidden)`` ~ N(0, 1) and ``prefix_mlp`` (default ``nn.Linear`` init);
    ``prefix_gating_factor`` ``(num_heads,)`` zeros, fp32; with ``gated`` a ``prefix_gate``
    (:class:`~layerfreeze.policies.lora.TokenGate`, ``w = 0, b = 0`` -> 0.5), fp32. Prefix
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
        paper = module._modules.get(_ADAPTER_ATTR)
        if getattr(paper, "form", "branch") == "paper":  # one softmax: see prefix_paper.py
            from layerfreeze.policies.prefix_paper import paper_attention

            paper.pending = False
            return paper_attention(
                fn, base, module, paper, query, key, value, attention_mask, **kwargs
            )
        out, weights = fn(module, query, key, value, attention_mask, **kwargs)
        adapter = module._modules.get(_ADAPTER_ATTR)
        if adapter is not None:
            branch = adapter(query, kwargs.get("scaling")).to(out.dtype)
            if branch.shape[-1] < out.shape[-1]:
                # MLA under flash attention pads the values to the query width and slices the
                # output back afterwards: pad the branch alike (the padding is dropped).
                branch = F.pad(branch, (0, out.shape[-1] - branch.shape[-1]))
            out = out + branch
            adapter.pending = False
        return out, weights

    attention.__name__ = f"layerfreeze_prefix_{base.replace('|', '_')}"
    return attention


def _prefix_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    adapter = module._modules[_ADAPTER_ATTR]
    adapter.pending = True
    if adapter.prefix_gate is not None:
        adapter.prefix_gate(block_input(module, args, kwargs, adapter.where))


def _prefix_post_hook(module: nn.Module, args: tuple, output) -> None:
    adapter = module._modules[_ADAPTER_ATTR]
    if adapter.prefix_gate is not None:
        adapter.prefix_gate.clear()
    adapter.call = adapter.query = None
    if adapter.pending:
        adapter.pending = False
        route = _ROUTES.get(adapter.route)
        if route is not None:
            raise RuntimeError(
                f"{adapter.where}: the prefix branch did not run: {type(module).__name__} did not "
                f"call its output projection {route.out_proj!r} as a module after its query "
                f"projection {route.query_proj!r}, so the branch had no place to be added."
            )
        impl = getattr(getattr(module, "config", None), "_attn_implementation", None)
        raise RuntimeError(
            f"{adapter.where}: the prefix branch did not run: the attention implementation "
            f"{impl!r} bypassed layerfreeze's wrapper (was set_attn_implementation called after "
            "apply_plan, or does this module skip ALL_ATTENTION_FUNCTIONS?). Re-apply the plan "
            "after choosing the attention implementation."
        )


# ---------------------------------------------------------------------------------------------
# The projection route: attention modules that compute attention themselves


@dataclass(frozen=True)
class QueryRoute:
    """How to add the branch to a transformers attention module that does not dispatch through
    ``ALL_ATTENTION_FUNCTIONS`` (it computes attention inline): the query is rebuilt from the
    output of the module's own query projection, exactly as its forward builds it, and the
    branch is added to the input of its output projection.

    Attributes:
        name: short label (the key in :data:`QUERY_ROUTES`).
        matches: ``matches(attn) -> bool``.
        query_proj: attribute of ``attn`` whose output holds the query (a fused QKV is fine).
        out_proj: attribute of ``attn`` whose input is the merged heads ``(b, t, heads * v)``.
        query: ``query(attn, proj_out, call) -> (batch, heads, q_len, head_dim)``; ``call`` maps
            the names of ``attn.forward``'s parameters to this call's arguments.
        check: ``check(attn) -> list[str]``: configurations the route cannot serve.
        scaling: ``scaling(attn) -> float``: the softmax scale the module uses.
    """

    name: str
    matches: Callable[[nn.Module], bool]
    query_proj: str
    out_proj: str
    query: Callable[[nn.Module, torch.Tensor, dict], torch.Tensor]
    check: Callable[[nn.Module], list[str]]
    scaling: Callable[[nn.Module], float]


def _instance_of(module_name: str, class_name: str) -> Callable[[nn.Module], bool]:
    # A class that was never imported has no instances: no import needed to test for one.
    def matches(attn: nn.Module) -> bool:
        cls = getattr(sys.modules.get(module_name), class_name, None)
        return cls is not None and isinstance(attn, cls)

    return matches


def _falcon_query(attn: nn.Module, fused: torch.Tensor, call: dict) -> torch.Tensor:
    # The fused projection's layout is fixed by the checkpoints Falcon loads, so it is written
    # out here from the module's public attributes (no private method of the model class).
    b, t = fused.shape[:2]
    heads, dim = attn.num_heads, attn.head_dim
    if attn.new_decoder_architecture:  # per key/value group: its queries, then its key and value
        grouped = fused.view(b, t, attn.num_kv_heads, -1, dim)
        query = grouped[..., :-2, :].reshape(b, t, heads, dim)
    elif attn.multi_query:  # all query heads, then one key head and one value head
        query = fused.view(b, t, heads + 2, dim)[:, :, :heads]
    else:  # query, key and value interleaved per head
        query = fused.view(b, t, heads, 3, dim)[..., 0, :]
    query = query.transpose(1, 2)  # (b, heads, t, head_dim)
    if call.get("alibi") is None:  # rotary positions, as FalconAttention.forward applies them
        cos, sin = call["position_embeddings"]
        rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        query, _ = rotary(query, query, cos, sin)
    return query


def _bloom_query(attn: nn.Module, fused: torch.Tensor, call: dict) -> torch.Tensor:
    # Query, key and value interleaved per head (BloomAttention's fused layout); ALiBi adds no
    # query position. Written out from public attributes, not the class's private ``_reshape``.
    b, t = fused.shape[:2]
    return fused.view(b, t, attn.num_heads, 3, attn.head_dim)[..., 0, :].transpose(1, 2)


def _bloom_check(attn: nn.Module) -> list[str]:
    if getattr(attn, "pretraining_tp", 1) > 1 and getattr(attn, "slow_but_exact", False):
        return [
            "pretraining_tp > 1 with slow_but_exact=True applies the output projection slice "
            "by slice (F.linear on dense.weight), never calling it as a module; set "
            "config.slow_but_exact=False."
        ]
    return []


#: Built-in routes for transformers attention that computes attention inline.
QUERY_ROUTES: list[QueryRoute] = [
    QueryRoute(
        "falcon", _instance_of("transformers.models.falcon.modeling_falcon", "FalconAttention"),
        "query_key_value", "dense", _falcon_query, lambda attn: [],
        lambda attn: attn.inv_norm_factor,
    ),
    QueryRoute(
        "bloom", _instance_of("transformers.models.bloom.modeling_bloom", "BloomAttention"),
        "query_key_value", "dense", _bloom_query, _bloom_check,
        lambda attn: attn.inv_norm_factor,
    ),
]
_ROUTES = {r.name: r for r in QUERY_ROUTES}
_OWNER_KEY = "_layerfreeze_prefix_attn"  # plain reference from the projections to the attention


def _find_route(attn: nn.Module) -> QueryRoute | None:
    """The projection route for ``attn``, or None when its forward dispatches through
    ``ALL_ATTENTION_FUNCTIONS`` (then the wrapper implementation serves it, whatever the class:
    transformers 5.25 moved ``FalconAttention`` onto the registry, 5.24 computes it inline)."""
    if _dispatches_through_registry(attn):
        return None
    return next((r for r in QUERY_ROUTES if r.matches(attn)), None)


def _projection_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    adapter = module._modules[_ADAPTER_ATTR]
    route = _ROUTES[adapter.route]
    adapter.pending = True
    adapter.query = None
    bound = inspect.signature(type(module).forward).bind_partial(module, *args, **kwargs)
    adapter.call = bound.arguments
    if adapter.prefix_gate is not None:
        adapter.prefix_gate(block_input(module, args, kwargs, adapter.where))
    # The query hook must see the projection's final output, after any hook registered later
    # (a LoRA on the same projection installed by another plan phase): keep it last.
    hooks = getattr(module, route.query_proj)._forward_hooks
    key = next(k for k, h in hooks.items() if h is _projection_query_hook)
    if next(reversed(hooks)) != key:
        hooks.move_to_end(key)


def _projection_query_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
    attn = module.__dict__[_OWNER_KEY]
    adapter = attn._modules[_ADAPTER_ATTR]
    if adapter.pending and adapter.call is not None:
        adapter.query = _ROUTES[adapter.route].query(attn, output, adapter.call)


def _projection_out_pre_hook(module: nn.Module, args: tuple):
    attn = module.__dict__[_OWNER_KEY]
    adapter = attn._modules[_ADAPTER_ATTR]
    if not adapter.pending or adapter.query is None:
        return None
    x = args[0]
    branch = adapter(adapter.query, _ROUTES[adapter.route].scaling(attn))  # (b, t, heads, v)
    adapter.pending, adapter.query = False, None
    return (x + branch.reshape(x.shape).to(x.dtype), *args[1:])


def _install_projection_route(attn: nn.Module, adapter: PrefixAdapter, route: QueryRoute) -> None:
    adapter.route = route.name
    if has_hook(attn._forward_pre_hooks, _projection_pre_hook):
        return
    qproj, oproj = getattr(attn, route.query_proj), getattr(attn, route.out_proj)
    qproj.__dict__[_OWNER_KEY] = attn
    oproj.__dict__[_OWNER_KEY] = attn
    qproj.register_forward_hook(_projection_query_hook)
    oproj.register_forward_pre_hook(_projection_out_pre_hook)
    attn.register_forward_pre_hook(_projection_pre_hook, with_kwargs=True)
    attn.register_forward_hook(_prefix_post_hook)


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
        route = _ROUTES.get(mod._modules[_ADAPTER_ATTR].route)
        del mod._modules[_ADAPTER_ATTR]
        count += 1
        owned = [mod]
        if route is not None:
            owned += [getattr(mod, route.query_proj), getattr(mod, route.out_proj)]
        for m in owned:
            m.__dict__.pop(_OWNER_KEY, None)
            for key in [k for k, h in m._forward_pre_hooks.items() if h in _HOOKS]:
                del m._forward_pre_hooks[key]
                m._forward_pre_hooks_with_kwargs.pop(key, None)
            for key in [k for k, h in m._forward_hooks.items() if h in _HOOKS]:
                del m._forward_hooks[key]
        if route is not None:
            continue  # the projection route never touched the config
        config = getattr(mod, "config", None)
        if config is not None and all(config is not c for c in configs):
            configs.append(config)
    for config in configs:
        config._attn_implementation = base_attn_implementation(config._attn_implementation)
    return count


# ---------------------------------------------------------------------------------------------
# Installers for attention modules other than transformers' (registered by engine packages)


@dataclass(frozen=True)
class PrefixInstaller:
    """How to put the prefix branch on one kind of attention module.

    Attributes:
        name: short label (for errors and docs).
        matches: ``matches(attn) -> bool``; True when this installer handles ``attn``.
        check: ``check(layer, spec, layout) -> list[str]``: problems (empty when it applies).
        install: ``install(layer, spec, layout) -> nn.Module``: add (once) and return the
            adapter, a child ``prefix_adapter`` of ``layer.attn`` whose parameters all start
            with ``prefix_``, with the hooks that run the branch.
    """

    name: str
    matches: Callable[[nn.Module], bool]
    check: Callable[[LayerInfo, PolicySpec, ModelLayout], list[str]]
    install: Callable[[LayerInfo, PolicySpec, ModelLayout], nn.Module]


#: Ordered installers; the first whose ``matches`` accepts the attention module is used.
PREFIX_INSTALLERS: list[PrefixInstaller] = []


def register_prefix_installer(installer: PrefixInstaller, *, index: int = 0) -> None:
    """Insert ``installer`` (by default first) unless one of the same name exists."""
    if all(i.name != installer.name for i in PREFIX_INSTALLERS):
        PREFIX_INSTALLERS.insert(index, installer)


def _find_installer(attn: nn.Module) -> PrefixInstaller | None:
    return next((i for i in PREFIX_INSTALLERS if i.matches(attn)), None)


# ---------------------------------------------------------------------------------------------
# The policy


def _options(spec: PolicySpec) -> PrefixConfig:
    return spec.options if spec.options is not None else PrefixConfig()


_HOOKS = (
    _prefix_pre_hook, _prefix_post_hook, _projection_pre_hook, _projection_query_hook,
    _projection_out_pre_hook,
)


def _dispatches_through_registry(attn: nn.Module) -> bool:
    """True when ``type(attn).forward`` loads transformers' ``ALL_ATTENTION_FUNCTIONS`` global.

    Read from the compiled code (the names it loads, resolved in its module's globals to the
    registry object itself), not from source text: comments, strings and look-alike names do
    not count, and no source file is needed. A forward that loads the registry on a path it may
    skip (GPT-2's ``reorder_and_upcast_attn``) is checked separately, and the forward hook still
    fails loudly if the branch did not run.
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    fn = inspect.unwrap(type(attn).forward)
    code = getattr(fn, "__code__", None)
    return (
        code is not None
        and "ALL_ATTENTION_FUNCTIONS" in code.co_names
        and getattr(fn, "__globals__", {}).get("ALL_ATTENTION_FUNCTIONS") is ALL_ATTENTION_FUNCTIONS
    )


def _attn_dims(attn: nn.Module, layout: ModelLayout) -> tuple[int, int]:
    """Per-head widths ``(query/key, value)``: the module's own (MLA's ``qk_head_dim`` /
    ``v_head_dim``, else ``head_dim``), falling back to the layout's."""
    qk = getattr(attn, "qk_head_dim", None)
    qk = qk if isinstance(qk, int) else getattr(attn, "head_dim", None)
    qk = qk if isinstance(qk, int) else layout.head_dim
    v = getattr(attn, "v_head_dim", None)
    return qk, (v if isinstance(v, int) else qk)


@register_policy("prefix")
class PrefixPolicy:
    """Zero-initialised prefix attention branch (optionally HLPT-gated) on a layer's attention."""

    config_cls = PrefixConfig
    param_prefix = "prefix_"

    def check(self, layer: LayerInfo, spec: PolicySpec, layout: ModelLayout) -> list[str]:
        """Problems that stop the branch from being added to ``layer``'s attention."""
        if _options(spec).form == "paper":
            from layerfreeze.policies.prefix_paper import paper_form_problems

            return paper_form_problems(self, layer, spec, layout)
        if form_mismatch(layer, "branch"):
            return form_mismatch(layer, "branch")
        installer = _find_installer(layer.attn)
        if installer is not None:
            return installer.check(layer, spec, layout)
        opts = _options(spec)
        attn = layer.attn
        where = f"layer {layer.index} ({layer.name}.{layer.attn_name}, {type(attn).__name__})"
        problems = []
        if getattr(attn, "is_cross_attention", False):
            problems.append(f"{where}: prefix supports self-attention only, not cross-attention.")
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
        route = _find_route(attn)
        if route is not None:  # computes attention inline: the projection route
            return problems + [f"{where}: {p}" for p in route.check(attn)]
        config = getattr(attn, "config", None)
        impl = getattr(config, "_attn_implementation", None)
        if config is None or not isinstance(impl, str):
            problems.append(
                f"{where}: prefix needs a transformers attention module with a config carrying "
                f"_attn_implementation; found config="
                f"{type(config).__name__ if config is not None else None}, "
                f"_attn_implementation={impl!r}. Use lora or full on this layer."
            )
        if not _dispatches_through_registry(attn):
            routes = ", ".join(r.name for r in QUERY_ROUTES)
            problems.append(
                f"{where}: prefix needs an attention module whose forward dispatches through "
                "transformers' ALL_ATTENTION_FUNCTIONS (the rotary query is taken there), or one "
                f"with a query route (built in: {routes}; add one to QUERY_ROUTES); this one has "
                "neither. Use lora or full on this layer."
            )
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
        return problems

    def apply(self, layer: LayerInfo, spec: PolicySpec, layout: ModelLayout) -> set[str]:
        """Install the adapter, hooks and wrapper implementation once; return the names."""
        problems = self.check(layer, spec, layout)
        if problems:
            raise ValueError("\n".join(problems))
        installer = _find_installer(layer.attn)
        if installer is not None:
            adapter = installer.install(layer, spec, layout)
            return {f"{layer.attn_name}.{_ADAPTER_ATTR}.{n}" for n, _ in adapter.named_parameters()}
        opts = _options(spec)
        attn = layer.attn
        adapter = attn._modules.get(_ADAPTER_ATTR)
        if adapter is None:
            w = next(attn.parameters())
            head_dim, value_dim = _attn_dims(attn, layout)
            adapter = PrefixAdapter(
                layout.num_heads, layout.num_kv_heads, head_dim, layout.hidden_size,
                tokens=opts.tokens, reparam=opts.reparam, gated=opts.gated,
                device=w.device, dtype=w.dtype, value_dim=value_dim,
            )
            adapter.where = f"layer {layer.index} ({layer.name}.{layer.attn_name})"
            if adapter.prefix_gate is not None:
                adapter.prefix_gate.where = adapter.where
            configure_adapter(adapter, opts.form, opts.gate_bias)
            attn.add_module(_ADAPTER_ATTR, adapter)
        route = _find_route(attn)
        if route is not None:
            _install_projection_route(attn, adapter, route)
            return {f"{layer.attn_name}.{_ADAPTER_ATTR}.{n}" for n, _ in adapter.named_parameters()}
        if not has_hook(attn._forward_pre_hooks, _prefix_pre_hook):
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
