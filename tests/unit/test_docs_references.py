"""What the user docs cite exists, and what they say about their own tests matches those tests.

Covers docs/plans.md, policies.md, deepspeed.md, interop.md, memory.md and training.md: every
repository path they name (tests, modules, configs, launch scripts) exists, and every
``layerfreeze.<dotted.name>`` in backquotes imports or resolves as an attribute.
"""

from __future__ import annotations

import importlib
import re

import pytest

DOCS = ["plans", "policies", "deepspeed", "interop", "memory", "training"]
_PATH = re.compile(r"\b(?:tests|layerfreeze|configs|bench|launch)/[\w./-]*\.(?:py|json|yaml|sh|md)")
_DOTTED = re.compile(r"`(layerfreeze(?:\.\w+)+)`")


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


@pytest.mark.parametrize("name", DOCS)
def test_cited_paths_and_names_exist(repo_root, name):
    text = (repo_root / "docs" / f"{name}.md").read_text(encoding="utf-8")
    paths = sorted(set(_PATH.findall(text)))
    assert [p for p in paths if not (repo_root / p).exists()] == []
    names = sorted(set(_DOTTED.findall(text)))
    assert [n for n in names if not _resolves(n)] == []


def test_interop_weak_points_match_the_vllm_loader_test(repo_root):
    """interop.md once said vLLM was never loaded, next to a paragraph on the test that loads it."""
    doc = (repo_root / "docs" / "interop.md").read_text(encoding="utf-8")
    test = (repo_root / "tests" / "unit" / "test_vllm_lora_load.py").read_text(encoding="utf-8")
    weak = " ".join(doc.split("## Weak points", 1)[1].split())
    # The test drives vLLM's own loader: the weak points must not deny it.
    assert "LoRAModel.from_local_checkpoint" in test and "WorkerLoRAManager" in test
    assert "not from loading the export in vLLM" not in weak
    assert "test_vllm_lora_load.py" in weak
    # With LAYERFREEZE_WITH_VLLM=1 (tests/run.sh's default) a missing vLLM fails, not skips.
    assert 'os.environ.get("LAYERFREEZE_WITH_VLLM") == "1"' in test and "pytest.fail(" in test
    run_sh = (repo_root / "tests" / "run.sh").read_text(encoding="utf-8")
    assert "LAYERFREEZE_WITH_VLLM:-1" in run_sh
    assert "a missing or broken vLLM fails the test" in " ".join(doc.split())
