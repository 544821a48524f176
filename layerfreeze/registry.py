"""The policy registry: ``POLICIES``, ``@register_policy(name)`` and ``get_policy(name)``.

Policies register themselves when ``layerfreeze.policies`` imports their module::

    @register_policy("lora")
    class LoRAPolicy:
        config_cls = LoRAConfig          # a dataclass of options
        param_prefix = "lora_"           # every parameter it creates starts with this
        def check(self, layer, spec, layout) -> list[str]: ...
        def apply(self, layer, spec, layout) -> set[str]: ...
        def optim_options(self, param_name, spec) -> dict: ...

The registry stores one instance per policy (built with no arguments).
"""

from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # importing policies.base at runtime would import every policy (a cycle)
    from layerfreeze.policies.base import Policy

__all__ = [
    "POLICIES",
    "register_policy",
    "get_policy",
    "unregister_policy",
    "registered_names",
    "load_builtin_policies",
]

#: name -> policy instance, in registration order.
POLICIES: dict[str, "Policy"] = {}

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_REQUIRED_METHODS = ("check", "apply", "optim_options")


def load_builtin_policies() -> None:
    """Register the built-in policies (imports their modules; a no-op after the first call)."""
    from layerfreeze.policies import load_builtin_policies as _load

    _load()


_ensure_builtin = load_builtin_policies


def register_policy(name: str):
    """Class decorator registering a policy under ``name``.

    Args:
        name: lowercase registry key used as-is in plans (``[a-z][a-z0-9_]*``).

    Returns:
        The decorator; it returns the class unchanged (with ``name`` set).

    Raises:
        ValueError: non-lowercase or duplicate name, duplicate non-empty ``param_prefix``.
        TypeError: ``config_cls`` is not a dataclass, or a Protocol method is missing.
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(
            f"register_policy: policy name must be lowercase letters, digits and '_' starting "
            f"with a letter, got {name!r}. Use e.g. 'lora' or 'my_policy'."
        )

    def decorator(cls: type) -> type:
        if name in POLICIES:
            raise ValueError(
                f"register_policy: a policy named {name!r} is already registered "
                f"({type(POLICIES[name]).__qualname__}). Choose another name."
            )
        config_cls = getattr(cls, "config_cls", None)
        if not (isinstance(config_cls, type) and dataclasses.is_dataclass(config_cls)):
            raise TypeError(
                f"register_policy({name!r}): {cls.__qualname__}.config_cls must be a dataclass "
                f"type, got {config_cls!r}. Declare the options as a @dataclass."
            )
        prefix = getattr(cls, "param_prefix", None)
        if not isinstance(prefix, str):
            raise TypeError(
                f"register_policy({name!r}): {cls.__qualname__}.param_prefix must be a string "
                f"(empty when the policy creates no parameters), got {prefix!r}."
            )
        if prefix:
            for other_name, other in POLICIES.items():
                op = other.param_prefix
                if op and (op.startswith(prefix) or prefix.startswith(op)):
                    raise ValueError(
                        f"register_policy({name!r}): param_prefix {prefix!r} clashes with "
                        f"{op!r} of policy {other_name!r}; state-dict filtering needs unique, "
                        "non-nested prefixes. Choose another prefix."
                    )
        missing = [m for m in _REQUIRED_METHODS if not callable(getattr(cls, m, None))]
        if missing:
            raise TypeError(
                f"register_policy({name!r}): {cls.__qualname__} lacks {', '.join(missing)}; "
                "a policy implements check, apply and optim_options (see policies/base.py)."
            )
        cls.name = name
        POLICIES[name] = cls()
        return cls

    return decorator


def unregister_policy(name: str) -> None:
    """Remove ``name`` from the registry (for tests and plugins that replace a policy)."""
    POLICIES.pop(name, None)


def registered_names() -> list[str]:
    """Registered policy names, in registration order (built-ins included)."""
    _ensure_builtin()
    return list(POLICIES)


def get_policy(name: str) -> Policy:
    """The registered policy instance called ``name``.

    Raises:
        ValueError: unknown name; the message lists the registered names.
    """
    _ensure_builtin()
    try:
        return POLICIES[name]
    except (KeyError, TypeError):
        from layerfreeze.utils.schema import suggest

        hint = suggest(str(name), POLICIES)
        hint = hint if "Did you mean" in hint else ""
        raise ValueError(
            f"unknown policy {name!r}.{hint} Registered policies: {', '.join(POLICIES)}."
        ) from None
