"""The ``prefix`` policy: learned prefix keys/values on a layer's attention, in two forms.

* ``form=branch`` (default, :mod:`.branch`): a zero-initialised attention branch over the
  prefix added to the attention output, ``Attn(q, K, V) + f_head * g(h) * softmax(q P_k^T *
  scaling) P_v`` (LLaMA-Adapter style; the base model exactly at init).
* ``form=paper`` (:mod:`.paper`): HLPT's form, the prefix prepended to the layer's own
  keys/values under one softmax, the gate scaling the prefix's attention weights.

Both sit on :mod:`.attention` (the wrapper attention implementation, the projection routes for
inline attention, the installer registry for other engines' attention modules), which imports
neither; :mod:`.policy` holds the options and the registered policy. The public names stay
importable from ``layerfreeze.policies.prefix``.
"""

from __future__ import annotations

from layerfreeze.policies.prefix.attention import (
    PREFIX_INSTALLERS,
    QUERY_ROUTES,
    WRAPPER_PREFIX,
    PrefixInstaller,
    QueryRoute,
    base_attn_implementation,
    register_prefix_installer,
    remove_prefix_adapters,
    wrapped_attn_implementation,
)
from layerfreeze.policies.prefix.branch import PrefixAdapter
from layerfreeze.policies.prefix.policy import PrefixConfig, PrefixPolicy

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
