"""The Python examples of docs/diagnostics.md run (on a tiny model; the ZeRO-3 one is covered by
tests/distributed/test_diagnostics_trace_zero3.py)."""

from __future__ import annotations

import re

from layerfreeze.models import discover_layout
from tests.helpers.eval_fixtures import build_eval_model, cached_tokenizer


def test_docs_examples_run(repo_root, tmp_path, monkeypatch, capsys):
    blocks = re.findall(
        r"```python\n(.*?)```", (repo_root / "docs" / "diagnostics.md").read_text(), re.S
    )
    runnable = [b for b in blocks if "DeepSpeedRunner" not in b]
    assert len(runnable) == 2
    tokenizer = cached_tokenizer("merged")
    model = build_eval_model(len(tokenizer), num_layers=2, hidden=32, max_positions=512)
    (tmp_path / "corpus.txt").write_text(
        (repo_root / "layerfreeze" / "data" / "corpus" / "en.txt").read_text()[:3000]
    )
    monkeypatch.chdir(tmp_path)
    ids = tokenizer("a probe batch for the hooks", return_tensors="pt")
    namespace = {
        "model": model,
        "tokenizer": tokenizer,
        "layout": discover_layout(model),
        "probe_batch": dict(ids),
        "step": 0,
    }
    for block in runnable:
        exec(compile(block, "docs/diagnostics.md", "exec"), namespace)
    assert "recommended_hlpt" in str(namespace["rec"].plan.name)
    assert any(k.startswith("diag/grad_norm/layers.") for k in namespace["stats"])
