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


_LR, _SCALED = 1e-3, "0-1:full(lr_scale=0.25),embeddings:full(lr_scale=3)"


def _decay(step: int) -> float:
    return 1.0 / (step + 1)


def _instance_lrs(rank, world_size):
    """docs/deepspeed.md: an optimizer instance built from applied.param_groups, with a torch
    scheduler bound to it, passed to initialize. Returns the group lrs after each step."""
    import layerfreeze.deepspeed as lfds
    from layerfreeze.apply import apply_plan
    from tests.helpers.tiny_models import build_tiny_model

    model = build_tiny_model("llama", num_layers=2).train()
    applied = apply_plan(model, _SCALED)
    opt = torch.optim.AdamW(applied.param_groups(lr=_LR, weight_decay=0.0))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _decay)
    cfg = {k: v for k, v in _CFG.items() if k != "optimizer"}
    engine, ds_opt, _, _ = lfds.initialize(
        model=model, optimizer=opt, lr_scheduler=sched, applied=applied, config=cfg
    )
    seen = []
    for step in range(3):
        ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(step))
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
        seen.append({g["name"]: (g["lr"], g["lr_scale"]) for g in ds_opt.param_groups})
    engine.destroy()
    return seen


def test_optimizer_instance_from_param_groups_keeps_each_scale_once():
    """The documented instance path once trained every group at lr * lr_scale ** 2."""
    (seen,) = run_distributed(_instance_lrs, world_size=1)
    for step, groups in enumerate(seen):
        assert {s for _, s in groups.values()} == {0.25, 3.0}
        for lr, scale in groups.values():
            # After step k the torch scheduler has stepped k + 1 times: lr = LR * decay(k + 1).
            assert lr == pytest.approx(_LR * _decay(step + 1) * scale, rel=1e-12)
