"""Contract battery run for every registered policy (and its boolean variants) on every family.

New policies are covered automatically once registered (peft ``TEST_CASES`` style): same outputs
at init, the right trainable set and nothing outside the given layers, idempotent apply, no
gradient into frozen parameters, every trainable parameter moves by the second AdamW step,
valid optimizer options, and a state-dict round trip.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from layerfreeze.apply import apply_plan
from layerfreeze.models import discover_layout
from layerfreeze.plan import LayerPlan
from layerfreeze.policies.base import PolicySpec
from layerfreeze.registry import get_policy, registered_names
from tests.helpers.tiny_models import TINY_FAMILIES, build_tiny_model, tiny_batch


def _variants() -> list[tuple[str, dict]]:
    out = []
    for name in registered_names():
        if getattr(get_policy(name), "part_only", None):  # embeddings / lm_head only (new_rows)
            continue
        out.append((name, {}))
        for f in dataclasses.fields(get_policy(name).config_cls):
            if f.default is False:
                out.append((name, {f.name: True}))
    return out


VARIANTS = _variants()
COVERED = (1, 2)


def _spec_text(name, opts):
    return name + (f"({','.join(opts)})" if opts else "")


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_builtin_policies_are_covered():
    assert {v[0] for v in VARIANTS} >= {"freeze", "full", "lora", "prefix"}
    assert ("lora", {"gated": True}) in VARIANTS and ("prefix", {"gated": True}) in VARIANTS


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("name,opts", VARIANTS, ids=lambda v: str(v))
def test_policy_contract(name, opts, family):
    policy = get_policy(name)
    spec_text = f"{COVERED[0]}-{COVERED[-1]}:{_spec_text(name, opts)}"
    plan = LayerPlan.parse(spec_text)
    spec: PolicySpec = plan.rules[0].spec

    for impl in ("eager", "sdpa"):
        model = build_tiny_model(family, attn_implementation=impl)
        layout = discover_layout(model)
        for layer in layout.layers:
            assert policy.check(layer, spec, layout) == [], (name, family, layer.index)
        ids = tiny_batch(model)
        with torch.no_grad():
            ref = model(ids).logits
        base_names = {n for n, _ in model.named_parameters()}
        applied = apply_plan(model, plan)
        with torch.no_grad():
            assert torch.equal(model(ids).logits, ref), f"{spec_text} changed outputs at init ({impl})"

    # Nothing outside the given layers: new parameters and trainable ones live in layers 1-2.
    given = tuple(f"{layout.layers[i].name}." for i in COVERED)
    new = {n for n, _ in model.named_parameters()} - base_names
    trainable = set(applied.trainable_names())
    assert all(n.startswith(given) for n in new | trainable), sorted((new | trainable) - set())[:3]
    if policy.param_prefix:
        assert all(
            any(part.startswith(policy.param_prefix) for part in n.split(".")) for n in new | trainable
        ), "adapter parameters must carry the policy's prefix"
    if name == "freeze":
        assert not trainable and not new
    if name == "full":
        assert trainable == {n for n in base_names if n.startswith(given)}

    # apply() is idempotent: same names, no new parameters.
    for i in COVERED:
        layer = layout.layers[i]
        again = policy.apply(layer, spec, layout)
        assert {f"{layer.name}.{n}" for n in again} == {n for n in trainable if n.startswith(layer.name + ".")}
    assert {n for n, _ in model.named_parameters()} == base_names | new

    # Optimizer options are well-formed for every trainable parameter.
    for n in trainable:
        layer = next(x for x in layout.layers if n.startswith(x.name + "."))
        o = policy.optim_options(n[len(layer.name) + 1:], spec)
        assert o["lr_scale"] > 0 and (o["weight_decay"] is None or o["weight_decay"] >= 0)

    # Training: frozen parameters get no gradient and stay bit-identical; every trainable one
    # receives a non-zero gradient by the second step (zero-initialised paths included).
    model.train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n not in trainable}
    opt = torch.optim.AdamW(applied.param_groups(lr=1e-2, weight_decay=0.01)) if trainable else None
    moved = dict.fromkeys(trainable, False)
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        loss = model(ids, labels=ids).loss
        if not trainable:
            assert not loss.requires_grad
            break
        loss.backward()
        for n, p in model.named_parameters():
            if n in trainable:
                moved[n] |= bool(p.grad is not None and p.grad.abs().sum() > 0)
            else:
                assert p.grad is None, n
        opt.step()
    assert all(moved.values()), [n for n, ok in moved.items() if not ok]
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n

    # State-dict round trip onto a fresh model.
    model.eval()
    sd = applied.trainable_state_dict()
    fresh = build_tiny_model(family, attn_implementation="sdpa")
    apply_plan(fresh, plan).load_trainable_state_dict(sd)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)


# ---------------------------------------------------------------------------------------------
# Import structure of layerfreeze/policies (issue #15): no cycle, any import order works


def _policy_modules(repo_root) -> dict[str, object]:
    """Module name -> file of every module under layerfreeze/policies (packages by __init__)."""
    out = {}
    for path in sorted((repo_root / "layerfreeze" / "policies").rglob("*.py")):
        parts = list(path.relative_to(repo_root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _import_edges(name: str, path, modules) -> set[str]:
    """Modules of ``modules`` that ``name`` imports anywhere (functions included; blocks under
    ``if TYPE_CHECKING:`` are skipped: they never run)."""
    import ast

    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    skip = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for n in ast.walk(node)
    }
    edges = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # ``from pkg import sub`` imports the submodule; ``from pkg import name`` the package.
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names
            ]
        else:
            continue
        edges.update(t for t in targets if t in modules and t != name)
    return edges


def test_policies_import_graph_has_no_cycle(repo_root):
    modules = _policy_modules(repo_root)
    graph = {m: _import_edges(m, p, modules) for m, p in modules.items()}
    cycles, state = [], {}

    def visit(m, stack):
        state[m] = "open"
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                cycles.append(" -> ".join(stack[stack.index(n):] + [n]))
            elif n not in state:
                visit(n, stack + [n])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles in layerfreeze/policies:\n" + "\n".join(cycles)
    # The two prefix forms sit on the shared attention module, never the other way round.
    assert "layerfreeze.policies.prefix.attention" in graph
    assert not graph["layerfreeze.policies.prefix.attention"] & {
        "layerfreeze.policies.prefix.branch", "layerfreeze.policies.prefix.paper",
        "layerfreeze.policies.prefix.policy", "layerfreeze.policies.prefix",
    }


def test_policies_modules_import_in_any_order(repo_root):
    """Each module imported first, then all others forwards and backwards, in a fresh interpreter
    (one subprocess; between rounds every ``layerfreeze`` module is dropped from sys.modules, so
    each round starts the package from nothing while torch / transformers stay loaded)."""
    import subprocess
    import sys

    names = sorted(_policy_modules(repo_root)) + [
        "layerfreeze.engines.megatron.lora",
        "layerfreeze.engines.megatron.prefix",
    ]
    script = f"""
import importlib, sys
names = {names!r}
def fresh():
    for k in [k for k in sys.modules if k == "layerfreeze" or k.startswith("layerfreeze.")]:
        del sys.modules[k]
for first in names:
    for rest in (names, names[::-1]):
        fresh()
        for n in [first] + [n for n in rest if n != first]:
            importlib.import_module(n)
        from layerfreeze.registry import get_policy
        assert get_policy("prefix") and get_policy("lora"), first
        import layerfreeze.policies.prefix.attention as attention
        assert sorted(attention.PREFIX_FORMS) == ["branch", "paper"], (first, attention.PREFIX_FORMS)
print("ok", len(names))
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=repo_root, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stderr[-3000:]
