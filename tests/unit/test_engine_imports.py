"""Only the engine adapters may import DeepSpeed / Megatron (STYLE.md section 6)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ALLOWED = {"layerfreeze/engines/deepspeed.py"}
#: Engine packages: every module inside may import its engine (lazily, inside functions or not).
ALLOWED_PACKAGES = ("layerfreeze/engines/megatron/",)
ENGINES = {"deepspeed", "megatron"}
_DYNAMIC = re.compile(r"""(import_module|__import__)\(\s*["'](deepspeed|megatron)[."']""")


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


def _allowed(rel: str) -> bool:
    return rel in ALLOWED or rel.startswith(ALLOWED_PACKAGES)


def test_allowed_locations_are_exact():
    assert _allowed("layerfreeze/engines/deepspeed.py")
    assert _allowed("layerfreeze/engines/megatron/layout.py")
    assert _allowed("layerfreeze/engines/megatron/__init__.py")
    for rel in ("layerfreeze/engines/megatron.py", "layerfreeze/engines/megatron_extra.py",
                "layerfreeze/engines/common.py", "layerfreeze/policies/lora.py",
                "layerfreeze/engines/deepspeed_utils.py", "layerfreeze/megatron/x.py"):
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
