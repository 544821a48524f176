"""Where the ``prefix`` policy meets an attention module: the wrapper, the routes, the installers.

Both forms of the policy (:mod:`~layerfreeze.policies.prefix.branch`, the zero-initialised
branch, and :mod:`~layerfreeze.policies.prefix.paper`, HLPT's prepended virtual tokens) sit on
top of this module; it imports neither. A form registers in :data:`PREFIX_FORMS` how it joins
the attention call, and the wrapper picks the adapter's form there.

How it hooks in: transformers' attention modules call
``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager_attention_forward)``
with the rotary query. Installing the policy registers a wrapper implementation named
``layerfreeze_prefix:<original>`` (with the original's mask function in
``ALL_MASK_ATTENTION_FUNCTIONS``, so masks are built exactly as before) and points the config at
it; the wrapper runs the original implementation through the form of modules that carry a
``prefix_adapter``. The name is not serialised by ``save_pretrained`` (transformers drops
``_attn_implementation_internal``), so saved configs keep the original. A forward hook checks
that the prefix really ran and fails loudly otherwise (e.g. after ``set_attn_implementation``).

Attention modules that compute attention inline instead (BLOOM; Falcon before transformers
5.25) take the projection route (:class:`QueryRoute`): a forward hook on the module's own query
projection rebuilds the query exactly as its forward does (rotary included), and a pre-hook on
its output projection adds the branch to the merged heads. Which route applies is decided from
the class (a route in :data:`QUERY_ROUTES`) or from the compiled forward loading the registry,
never from source text; a module with neither is refused with the reason.

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
from torch import nn

from layerfreeze.models import LayerInfo, ModelLayout
from layerfreeze.policies.base import PolicySpec
from layerfreeze.policies.gate import block_input, has_hook

__all__ = [
    "WRAPPER_PREFIX",
    "ADAPTER_ATTR",
    "PREFIX_FORMS",
    "wrapped_attn_implementation",
    "base_attn_implementation",
    "dispatches_through_registry",
    "attention_problems",
    "install_attention",
    "remove_prefix_adapters",
    "QueryRoute",
    "QUERY_ROUTES",
    "find_route",
    "PrefixInstaller",
    "PREFIX_INSTALLERS",
    "register_prefix_installer",
    "find_installer",
]

#: Name prefix of the wrapper attention implementations this module registers.
WRAPPER_PREFIX = "layerfreeze_prefix:"
#: Name of the adapter child module on the attention module (its parameters: ``prefix_*``).
ADAPTER_ATTR = "prefix_adapter"

#: How each form joins the attention call, by the adapter's ``form``:
#: ``form(fn, base, module, adapter, query, key, value, attention_mask, **kwargs) -> (out,
#: weights)`` with ``fn`` the original implementation named ``base``. ``branch`` and ``paper``
#: register themselves when their module is imported (``layerfreeze.policies.prefix`` imports
#: both); the form sets ``adapter.pending = False`` once the prefix entered the call.
PREFIX_FORMS: dict[str, Callable] = {}


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
        adapter = module._modules.get(ADAPTER_ATTR)
        if adapter is None:
            return fn(module, query, key, value, attention_mask, **kwargs)
        form = PREFIX_FORMS.get(getattr(adapter, "form", "branch"), PREFIX_FORMS["branch"])
        return form(fn, base, module, adapter, query, key, value, attention_mask, **kwargs)

    attention.__name__ = f"layerfreeze_prefix_{base.replace('|', '_')}"
    return attention


def _prefix_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    adapter = module._modules[ADAPTER_ATTR]
    adapter.pending = True
    if adapter.prefix_gate is not None:
        adapter.prefix_gate(block_input(module, args, kwargs, adapter.where))


def _prefix_post_hook(module: nn.Module, args: tuple, output) -> None:
    adapter = module._modules[ADAPTER_ATTR]
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


def find_route(attn: nn.Module) -> QueryRoute | None:
    """The projection route for ``attn``, or None when its forward dispatches through
    ``ALL_ATTENTION_FUNCTIONS`` (then the wrapper implementation serves it, whatever the class:
    transformers 5.25 moved ``FalconAttention`` onto the registry, 5.24 computes it inline)."""
    if dispatches_through_registry(attn):
        return None
    return next((r for r in QUERY_ROUTES if r.matches(attn)), None)


def _projection_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    adapter = module._modules[ADAPTER_ATTR]
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
    adapter = attn._modules[ADAPTER_ATTR]
    if adapter.pending and adapter.call is not None:
        adapter.query = _ROUTES[adapter.route].query(attn, output, adapter.call)


def _projection_out_pre_hook(module: nn.Module, args: tuple):
    attn = module.__dict__[_OWNER_KEY]
    adapter = attn._modules[ADAPTER_ATTR]
    if not adapter.pending or adapter.query is None:
        return None
    x = args[0]
    branch = adapter(adapter.query, _ROUTES[adapter.route].scaling(attn))  # (b, t, heads, v)
    adapter.pending, adapter.query = False, None
    return (x + branch.reshape(x.shape).to(x.dtype), *args[1:])


def _install_projection_route(attn: nn.Module, adapter: nn.Module, route: QueryRoute) -> None:
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
        if ADAPTER_ATTR not in mod._modules:
            continue
        route = _ROUTES.get(mod._modules[ADAPTER_ATTR].route)
        del mod._modules[ADAPTER_ATTR]
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


def find_installer(attn: nn.Module) -> PrefixInstaller | None:
    return next((i for i in PREFIX_INSTALLERS if i.matches(attn)), None)


# ---------------------------------------------------------------------------------------------
# Transformers attention: what the prefix needs, and installing it


_HOOKS = (
    _prefix_pre_hook, _prefix_post_hook, _projection_pre_hook, _projection_query_hook,
    _projection_out_pre_hook,
)


def dispatches_through_registry(attn: nn.Module) -> bool:
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


def attention_problems(attn: nn.Module, where: str) -> list[str]:
    """What stops the prefix from entering transformers attention module ``attn`` (its route's
    limits, or: no config / registry dispatch, ``reorder_and_upcast_attn``, no eager function);
    each problem starts with ``where``. Empty when :func:`install_attention` can serve it."""
    route = find_route(attn)
    if route is not None:  # computes attention inline: the projection route
        return [f"{where}: {p}" for p in route.check(attn)]
    problems: list[str] = []
    config = getattr(attn, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if config is None or not isinstance(impl, str):
        problems.append(
            f"{where}: prefix needs a transformers attention module with a config carrying "
            f"_attn_implementation; found config="
            f"{type(config).__name__ if config is not None else None}, "
            f"_attn_implementation={impl!r}. Use lora or full on this layer."
        )
    if not dispatches_through_registry(attn):
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


def install_attention(attn: nn.Module, adapter: nn.Module) -> None:
    """Hook ``attn`` (carrying ``adapter`` as its ``prefix_adapter`` child) once: the projection
    route when the module computes attention inline, else the pre/post hooks and the wrapper
    implementation on its config."""
    route = find_route(attn)
    if route is not None:
        _install_projection_route(attn, adapter, route)
        return
    if not has_hook(attn._forward_pre_hooks, _prefix_pre_hook):
        attn.register_forward_pre_hook(_prefix_pre_hook, with_kwargs=True)
        attn.register_forward_hook(_prefix_post_hook)
    config = attn.config
    config._attn_implementation = wrapped_attn_implementation(config._attn_implementation)
