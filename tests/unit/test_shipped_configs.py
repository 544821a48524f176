"""Every shipped ``configs/**/*.yaml`` loads strictly and its plans apply to a fake model of the
right depth (litgpt ``tests/test_config_hub.py``): a config that drifts from the schema, names a
plan the model cannot take, or lacks its launch-command header fails here."""

from __future__ import annotations

from pathlib import Path

import pytest

from layerfreeze.config import load_config
from layerfreeze.engines.deepspeed_config import build_deepspeed_config
from layerfreeze.train import build_schedule
from tests.helpers.tiny_models import build_tiny_model

REPO = Path(__file__).resolve().parents[2]
RUN_CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml"))

#: Depth and family of the real checkpoints the path-based configs point at (from their
#: published config.json), so their plans are resolved against the right layer count.
REAL_MODELS = {
    "checkpoints/Meta-Llama-3-8B": ("llama", 32),
    "checkpoints/Qwen2-7B": ("qwen2", 28),
}


def _family_and_depth(cfg) -> tuple[str, int]:
    if cfg.model.architecture is not None:
        return cfg.model.architecture["model_type"], int(cfg.model.architecture["num_hidden_layers"])
    assert cfg.model.path in REAL_MODELS, (
        f"add {cfg.model.path!r} (family, num_hidden_layers) to REAL_MODELS in this test"
    )
    return REAL_MODELS[cfg.model.path]


def test_configs_exist():
    names = {p.relative_to(REPO / "configs").as_posix() for p in RUN_CONFIGS}
    assert "tiny_llama/cpt_freeze_deep_deepspeed.yaml" in names  # the README main job
    assert len(names) >= 4


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.relative_to(REPO / "configs").as_posix())
def test_shipped_config_resolves_on_fake_model(path, monkeypatch):
    monkeypatch.chdir(REPO)  # configs use paths relative to the repository root
    head = path.read_text(encoding="utf-8").splitlines()
    assert head[0].startswith("# "), f"{path.name}: must open with a comment giving its purpose"
    header = "\n".join(line for line in head if line.startswith("#"))
    assert "layerfreeze train" in header or "launch/" in header, (
        f"{path.name}: the opening comment must give the exact launch command"
    )

    cfg = load_config(path)
    ds, _replaced = build_deepspeed_config(cfg, world_size=8)
    assert ds["train_batch_size"] == cfg.train.micro_batch_size * cfg.train.grad_accum_steps * 8

    family, depth = _family_and_depth(cfg)
    schedule = build_schedule(cfg)
    for phase in schedule.phases:
        resolved = phase.plan.resolve(depth)
        assert len(resolved.layers) == depth

    # Apply every phase to a fake model of that depth: adapters install, something trains and
    # (for plans that freeze anything) something stays frozen.
    from layerfreeze.apply import apply_plan

    model = build_tiny_model(family, num_layers=depth)
    applied = apply_plan(model, schedule.plans[0], install=schedule.plans[1:])
    for plan in schedule.plans:
        applied = applied.switch_plan(plan)
        trainable = applied.num_trainable_params()
        assert 0 < trainable <= applied.num_total_params()
        if str(plan) != "full" and plan.name != "full":
            assert trainable < applied.num_total_params(), f"{plan} froze nothing"


def test_quickstart_plan_comment_matches_the_resolved_plan():
    """The README main job's plan comment once said the embeddings were frozen; freeze_deep
    trains them (docs/plans.md: embeddings follow the bottom, norm and head the top)."""
    path = REPO / "configs" / "tiny_llama" / "cpt_freeze_deep_deepspeed.yaml"
    spec_line = next(x for x in path.read_text(encoding="utf-8").splitlines()
                     if x.strip().startswith("spec:"))
    comment = spec_line.split("#", 1)[1].strip()
    assert comment == "layers 0-1 and the embeddings train; 2-3, final norm, LM head frozen"
    cfg = load_config(path)
    resolved = build_schedule(cfg).plans[0].resolve(cfg.model.architecture["num_hidden_layers"])
    assert [s.name for s in resolved.layers] == ["full", "full", "freeze", "freeze"]
    assert (resolved.embeddings.name, resolved.final_norm.name, resolved.lm_head.name) == (
        "full", "freeze", "freeze")
