"""Only the engine adapters may import DeepSpeed / Megatron (STYLE.md section 6), and only an
allowlist may import the engine modules ``layerfreeze.engines.deepspeed`` /
``layerfreeze.engines.megatron``: everything else gets an engine through
``layerfreeze.engines.get_engine`` and the Protocols of ``layerfreeze.engines.base`` (issue #15)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ALLOWED = {
    # imports deepspeed lazily, for the ZeRO-3 gather, only when a parameter carries ds_id
    "layerfreeze/engines/partition.py",
}
#: Engine packages: every module inside may import its engine (lazily, inside functions or not).
ALLOWED_PACKAGES = ("layerfreeze/engines/deepspeed/", "layerfreeze/engines/megatron/")
ENGINES = {"deepspeed", "megatron"}
_DYNAMIC = re.compile(r"""(import_module|__import__)\(\s*["'](deepspeed|megatron)[."']""")

#: Who may import the engine modules layerfreeze.engines.deepspeed / .megatron(.*): the engine
#: packages themselves, the public alias modules, and get_engine's registry (by name, lazily).
MODULE_ALLOWED = {
    "layerfreeze/engines/__init__.py",
    "layerfreeze/deepspeed.py",
    "layerfreeze/megatron.py",
}
_ENGINE_MODULE = re.compile(r"^layerfreeze\.engines\.(deepspeed|megatron)(\.|$)")
_ENGINE_MODULE_TEXT = re.compile(r"""["']layerfreeze\.engines\.(deepspeed|megatron)(\.[\w.]*)?["']""")


def _engine_module_imports(path: Path) -> list[str]:
    """Imports of layerfreeze.engines.deepspeed / .megatron (static, relative or by string)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"line {node.lineno}: import {a.name}" for a in node.names
                      if _ENGINE_MODULE.match(a.name)]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: resolve against the file's package
                parts = path.with_suffix("").parts
                pkg = parts[parts.index("layerfreeze"):-1]
                base = list(pkg[: len(pkg) - (node.level - 1)]) if node.level > 1 else list(pkg)
                module = ".".join(base + ([module] if module else []))
            names = [module] + [f"{module}.{a.name}" for a in node.names]
            if any(_ENGINE_MODULE.match(n) for n in names):
                found.append(f"line {node.lineno}: from {'.' * node.level}{node.module or ''} import ...")
    text = path.read_text(encoding="utf-8")
    found += [f"by name: {m.group(0)}" for m in _ENGINE_MODULE_TEXT.finditer(text)]
    return found


def _engine_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):  # includes imports nested in functions (lazy imports count too)
        if isinstance(node, ast.Import):
            found += [f"line {node.lineno}: import {a.name}" for a in node.names
                      if a.name.split(".")[0] in ENGINES]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] in ENGINES:
                found.append(f"line {node.lineno}: from {node.module} import ...")
    text = path.read_text(encoding="utf-8")
    found += [f"dynamic import of {m.group(2)}" for m in _DYNAMIC.finditer(text)]
    return found


def test_checker_detects_engine_imports(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("def f():\n    import deepspeed.comm as c\n    from megatron.core import x\n"
                 "import importlib\nimportlib.import_module('deepspeed')\nfrom layerfreeze.deepspeed import y\n")
    assert len(_engine_imports(f)) == 3


def test_checker_detects_engine_module_imports(tmp_path):
    pkg = tmp_path / "layerfreeze" / "commands"
    pkg.mkdir(parents=True)
    f = pkg / "x.py"
    f.write_text(
        "def f():\n    from layerfreeze.engines.deepspeed import gathered_parameters\n"
        "    from layerfreeze.engines import megatron\n"
        "    from ..engines.megatron.diagnostics import MegatronLayers\n"
        "    import layerfreeze.engines.megatron.runner\n"
        "    importlib.import_module('layerfreeze.engines.deepspeed')\n"
        "from layerfreeze.engines import get_engine\n"
        "from layerfreeze.engines.deepspeed_config import build_deepspeed_config\n"
        "from layerfreeze.engines.partition import gathered\n"
    )
    assert len(_engine_module_imports(f)) == 5, _engine_module_imports(f)


def test_only_allowlisted_modules_import_engine_modules(repo_root):
    offenders = {}
    for path in sorted((repo_root / "layerfreeze").rglob("*.py")):
        rel = path.relative_to(repo_root).as_posix()
        if rel in MODULE_ALLOWED or rel.startswith(ALLOWED_PACKAGES):
            continue
        hits = _engine_module_imports(path)
        if hits:
            offenders[rel] = hits
    assert not offenders, (
        "get the engine through layerfreeze.engines.get_engine(cfg.engine) and the Protocols "
        f"in layerfreeze.engines.base instead of importing its module: {offenders}"
    )


def _allowed(rel: str) -> bool:
    return rel in ALLOWED or rel.startswith(ALLOWED_PACKAGES)


def test_allowed_locations_are_exact():
    assert _allowed("layerfreeze/engines/deepspeed/runner.py")
    assert _allowed("layerfreeze/engines/deepspeed/__init__.py")
    assert _allowed("layerfreeze/engines/megatron/layout.py")
    assert _allowed("layerfreeze/engines/megatron/__init__.py")
    assert _allowed("layerfreeze/engines/partition.py")
    for rel in ("layerfreeze/engines/megatron.py", "layerfreeze/engines/megatron_extra.py",
                "layerfreeze/engines/common.py", "layerfreeze/policies/lora.py",
                "layerfreeze/engines/partition_extra.py",
                "layerfreeze/engines/deepspeed_utils.py", "layerfreeze/megatron/x.py",
                # run config -> DeepSpeed JSON: `layerfreeze validate` imports it without DeepSpeed
                "layerfreeze/engines/deepspeed_config.py", "layerfreeze/engines/deepspeed.py"):
        assert not _allowed(rel), rel


def test_only_engine_adapters_import_engines(repo_root):
    offenders = {}
    for path in sorted((repo_root / "layerfreeze").rglob("*.py")):
        rel = path.relative_to(repo_root).as_posix()
        if _allowed(rel):
            continue
        hits = _engine_imports(path)
        if hits:
            offenders[rel] = hits
    assert not offenders, (
        f"only {sorted(ALLOWED)} and {list(ALLOWED_PACKAGES)} may import deepspeed / megatron; move these behind the engine "
        f"adapter: {offenders}"
    )


#: Engine-neutral code: it reads runner.capabilities / the engine module, never an engine's name.
NEUTRAL = ("layerfreeze/train.py", "layerfreeze/hf_trainer.py", "layerfreeze/commands/")


def _engine_name_checks(path: Path) -> list[str]:
    """Comparisons with the literal "deepspeed" / "megatron" (``cfg.engine == "megatron"``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            for o in operands:
                consts = o.elts if isinstance(o, (ast.Tuple, ast.List, ast.Set)) else [o]
                if any(isinstance(c, ast.Constant) and c.value in ENGINES for c in consts):
                    found.append(f"line {node.lineno}: {ast.unparse(node)}")
                    break
    return found


def test_checker_detects_engine_name_checks(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("if cfg.engine == 'megatron': pass\nif e not in ('deepspeed', 'x'): pass\n"
                 "get_engine('deepspeed')\nif cfg.engine == other: pass\n")
    assert len(_engine_name_checks(f)) == 2


def test_engine_neutral_code_names_no_engine(repo_root):
    offenders = {}
    for path in sorted((repo_root / "layerfreeze").rglob("*.py")):
        rel = path.relative_to(repo_root).as_posix()
        if rel.startswith(NEUTRAL) and (hits := _engine_name_checks(path)):
            offenders[rel] = hits
    assert not offenders, (
        "read runner.capabilities (layerfreeze.engines.base.EngineCapabilities) or call the "
        f"engine module instead of comparing engine names: {offenders}"
    )


#: DeepSpeed's ZeRO-3 parameter attributes; only these files read them (the rest asks
#: layerfreeze.engines.partition).
DS_ATTRS = re.compile(r"\bds_(id|status|numel|shape|tensor)\b")
DS_ATTR_ALLOWED = {"layerfreeze/engines/partition.py"}
DS_ATTR_ALLOWED_PACKAGE = "layerfreeze/engines/deepspeed/"


def test_only_the_partition_helper_reads_zero3_attributes(repo_root):
    offenders = {}
    for path in sorted((repo_root / "layerfreeze").rglob("*.py")):
        rel = path.relative_to(repo_root).as_posix()
        if rel in DS_ATTR_ALLOWED or rel.startswith(DS_ATTR_ALLOWED_PACKAGE):
            continue
        lines = path.read_text(encoding="utf-8").splitlines()
        hits = [f"line {i}: {line.strip()}" for i, line in enumerate(lines, 1) if DS_ATTRS.search(line)]
        if hits:
            offenders[rel] = hits
    assert not offenders, (
        "ask layerfreeze.engines.partition (is_partitioned, whole_numel, full_shape, gathered) "
        f"instead of reading DeepSpeed's ds_* attributes: {offenders}"
    )
