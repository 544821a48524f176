"""docs/deepspeed.md describes what a real DeepSpeed checkpoint holds (2 gloo ranks, ZeRO-2).

The section 4 tree once left out ``elastic/`` (the layout-independent part every save writes)
and DeepSpeed's ``zero_to_*.py`` scripts, and said another world size or ZeRO stage is refused,
although ``load_checkpoint`` resumes from ``elastic/`` there.
"""

from __future__ import annotations

import re

import pytest
import torch

from tests.helpers.dist import run_distributed

pytestmark = pytest.mark.slow

_CFG = {
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 1,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
    "zero_optimization": {"stage": 2},
    "steps_per_print": 10**6,
}


def _save_after_phase_switch(rank, world_size, root):
    from layerfreeze.engines.deepspeed import DeepSpeedRunner
    from tests.helpers.tiny_models import build_tiny_model

    schedule = [{"plan": "full", "until_step": 1}, {"plan": "freeze_deep", "until_step": None}]
    runner = DeepSpeedRunner(build_tiny_model("llama", num_layers=2), _CFG, schedule=schedule)
    for step in range(2):
        g = torch.Generator().manual_seed(10 * step + rank)
        ids = torch.randint(0, 128, (2, 8), generator=g)
        runner.train_step([{"input_ids": ids, "labels": ids}])
    # trainable_only after the switch: layer 1 trained in phase 0 and is frozen now, so the
    # save also writes trained_frozen.safetensors.
    runner.save_checkpoint(root, client_state={"rank": rank}, trainable_only=True)
    return runner.phase


def _doc_tree(repo_root) -> str:
    doc = (repo_root / "docs" / "deepspeed.md").read_text(encoding="utf-8")
    section = doc.split("## 4. Checkpoints", 1)[1]
    return re.search(r"```\n(<ckpt_dir>/.*?)```", section, re.S).group(1)


def test_checkpoint_tree_in_docs_names_every_file_a_save_writes(tmp_path, repo_root):
    root = tmp_path / "ckpt"
    assert run_distributed(_save_after_phase_switch, world_size=2, args=(str(root),)) == [1, 1]
    step_dir = root / "step_00000002"
    written = sorted(p.relative_to(step_dir).as_posix() for p in step_dir.rglob("*") if p.is_file())
    # One entry per kind: per-rank files collapse onto rank 0's name, DeepSpeed's own files
    # onto "ds/...", as the doc writes them.
    kinds = sorted(
        {re.sub(r"rank_\d{5}", "rank_00000", w) for w in written if not w.startswith("ds/")}
        | {"ds/..."}
    )
    assert "elastic/index.json" in kinds and "trained_frozen.safetensors" in kinds
    tree = _doc_tree(repo_root)
    named = set(re.findall(r"[\w./]+\.(?:json|safetensors|py)|ds/\.\.\.", tree))
    assert [k for k in kinds if k not in named] == []
    assert (root / "latest").read_text().strip() == "step_00000002"


def test_docs_do_not_claim_another_layout_is_refused(repo_root):
    doc = (repo_root / "docs" / "deepspeed.md").read_text(encoding="utf-8")
    loading = doc.split("Loading validates", 1)[1].split("```", 1)[0]
    assert "elastic/" in loading and "another world size or ZeRO" in loading
    assert "ZeRO stage and world size" not in " ".join(loading.split())
