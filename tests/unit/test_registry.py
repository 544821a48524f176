"""Policy registry: registration checks (peft register_peft_method style) and lookups."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from layerfreeze.registry import POLICIES, get_policy, register_policy, registered_names, unregister_policy


@dataclass
class _Opts:
    x: int = 1


def _policy_cls(prefix="tst_", config=_Opts, methods=("check", "apply", "optim_options")):
    ns = {"config_cls": config, "param_prefix": prefix}
    for m in methods:
        ns[m] = lambda self, *a: None
    return type("TstPolicy", (), ns)


@pytest.fixture
def cleanup():
    names = []
    yield names
    for n in names:
        unregister_policy(n)


def test_builtins_registered():
    assert {"freeze", "full", "lora", "prefix"} <= set(registered_names())
    assert get_policy("lora").param_prefix == "lora_" and get_policy("freeze").name == "freeze"


def test_register_and_lookup(cleanup):
    cleanup.append("tst_ok")
    cls = register_policy("tst_ok")(_policy_cls())
    assert cls.name == "tst_ok" and isinstance(POLICIES["tst_ok"], cls) and get_policy("tst_ok") is POLICIES["tst_ok"]


@pytest.mark.parametrize("name", ["Lora", "my-policy", "1x", "", "has space"])
def test_rejects_bad_names(name):
    with pytest.raises(ValueError, match="lowercase"):
        register_policy(name)


def test_rejects_duplicate_name():
    with pytest.raises(ValueError, match="already registered"):
        register_policy("lora")(_policy_cls(prefix="zzz_"))


@pytest.mark.parametrize("prefix", ["lora_", "lora_x", "lo"])
def test_rejects_duplicate_or_nested_prefix(prefix):
    with pytest.raises(ValueError, match="clashes with 'lora_'"):
        register_policy("tst_prefix")(_policy_cls(prefix=prefix))
    assert "tst_prefix" not in POLICIES


def test_rejects_non_dataclass_config():
    with pytest.raises(TypeError, match="must be a dataclass"):
        register_policy("tst_cfg")(_policy_cls(config=dict))


def test_rejects_missing_methods():
    with pytest.raises(TypeError, match="lacks apply, optim_options"):
        register_policy("tst_methods")(_policy_cls(methods=("check",)))


def test_unknown_policy_lists_registered():
    with pytest.raises(ValueError) as e:
        get_policy("lorra")
    msg = str(e.value)
    assert "Did you mean 'lora'?" in msg and "freeze, full, lora, prefix" in msg
