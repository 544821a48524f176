"""One checkpoint metadata schema for both engines (issue #15): checkpoints written before it
(each engine's own dict literal, format 1) read into :class:`CheckpointMeta` and write back to
the same JSON object, keys and values."""

from __future__ import annotations

import json

import pytest

from layerfreeze.checkpoint_meta import META_FORMAT, META_KEY, CheckpointMeta
from layerfreeze.resume import engine_problems

_SCHEDULE = [
    {"plan": {"preset": "full"}, "until_step": 4},
    {"plan": {"preset": "freeze_deep"}, "until_step": None},
]

#: A DeepSpeed checkpoint's "layerfreeze" metadata as DeepSpeedRunner._meta wrote it before the
#: shared schema (every key of that dict literal, in its order).
LEGACY_DEEPSPEED = {
    "format": 1,
    "engine": "deepspeed",
    "step": 6,
    "phase": 1,
    "schedule": _SCHEDULE,
    "plan": {"preset": "freeze_deep"},
    "zero_stage": 2,
    "world_size": 2,
    "trainable_only": True,
    "trained_frozen_params": ["model.layers.1.mlp.up_proj.weight"],
    "groups": [{"name": "layers/wd=0.1", "params": ["model.layers.0.mlp.up_proj.weight"],
                "lr_scale": 1.0, "weight_decay": 0.1, "step": 6}],
    "bad_micro_batches": 3,
    "skipped_steps": 1,
}

#: A Megatron checkpoint's metadata as MegatronRunner.save_checkpoint wrote it before.
LEGACY_MEGATRON = {
    "format": 1,
    "engine": "megatron",
    "step": 10,
    "phase": 0,
    "schedule": _SCHEDULE,
    "plan": {"preset": "full"},
    "layout": {"tensor_parallel": 2, "pipeline_parallel": 1, "virtual_chunks": 1,
               "data_parallel": 1, "world_size": 2, "distributed_optimizer": False},
    "num_layers": 4,
    "trainable_only": False,
    "bad_micro_batches": 0,
    "skipped_steps": 0,
    "global_step": 9,
}


@pytest.mark.parametrize("legacy", [LEGACY_DEEPSPEED, LEGACY_MEGATRON], ids=["deepspeed", "megatron"])
def test_legacy_meta_reads_and_writes_back_the_same_json(legacy):
    # through JSON, as the manifest stores it
    stored = json.loads(json.dumps(legacy))
    meta = CheckpointMeta.from_dict(stored, source="ckpt/step_00000006")
    assert (meta.engine, meta.step, meta.phase) == (legacy["engine"], legacy["step"], legacy["phase"])
    assert meta.schedule == legacy["schedule"] and meta.plan == legacy["plan"]
    assert meta.trainable_only is legacy["trainable_only"]
    assert (meta.bad_micro_batches, meta.skipped_steps) == (
        legacy["bad_micro_batches"], legacy["skipped_steps"])
    common = {"format", "engine", "step", "phase", "schedule", "plan", "trainable_only",
              "bad_micro_batches", "skipped_steps"}
    assert meta.engine_state == {k: v for k, v in legacy.items() if k not in common}
    assert meta.to_dict() == legacy
    assert sorted(meta.to_dict()) == sorted(legacy)


def test_each_engine_reads_its_legacy_meta():
    """The field checks each engine runs at load time pass on its format-1 metadata and name
    every engine field that is missing from the other engine's."""
    from layerfreeze.checkpoint import CheckpointError
    from layerfreeze.engines.deepspeed.checkpoint import _ENGINE_STATE as DEEPSPEED_STATE
    from layerfreeze.engines.megatron.checkpoint import _ENGINE_STATE as MEGATRON_STATE

    ds = CheckpointMeta.from_dict(LEGACY_DEEPSPEED, source="x")
    ds.check_engine_state(DEEPSPEED_STATE, source="x")
    assert sorted(DEEPSPEED_STATE) == sorted(ds.engine_state)
    mg = CheckpointMeta.from_dict(LEGACY_MEGATRON, source="x")
    mg.check_engine_state(MEGATRON_STATE, source="x")
    assert sorted(MEGATRON_STATE) == sorted(mg.engine_state)
    with pytest.raises(CheckpointError) as e:
        mg.check_engine_state(DEEPSPEED_STATE, source="x")
    assert all(f"layerfreeze.{k}: missing" in str(e.value) for k in DEEPSPEED_STATE), str(e.value)


def test_engine_problems_reads_the_schema_and_plain_dicts_alike():
    meta = CheckpointMeta.from_dict(LEGACY_MEGATRON, source="x")
    assert engine_problems(meta, engine="megatron", schedule=_SCHEDULE) == []
    assert engine_problems(meta, engine="deepspeed", schedule=_SCHEDULE) == engine_problems(
        LEGACY_MEGATRON, engine="deepspeed", schedule=_SCHEDULE
    )
    (wrong,) = engine_problems(meta, engine="deepspeed", schedule=_SCHEDULE)
    assert wrong.startswith("it was saved by engine 'megatron', this run uses engine: deepspeed")
    other = [dict(_SCHEDULE[0], until_step=5), _SCHEDULE[1]]
    (diff,) = engine_problems(meta, engine="megatron", schedule=other)
    assert "plan.schedule[0].until_step: 4 in the checkpoint, 5 in this run" in diff


def test_constants_are_the_format_one_names():
    assert (META_KEY, META_FORMAT) == ("layerfreeze", 1)


def test_rotating_schedule_spec_reads_and_writes_back():
    """A rotating-layer schedule records its spec mapping, not a phase list (schedule.py
    ``PlanSchedule.to_dict``); the metadata of its checkpoints reads back unchanged, and a
    mapping that is not such a spec is named."""
    from layerfreeze.checkpoint import CheckpointError
    from layerfreeze.rotation import RotationConfig, build_rotation_schedule

    schedule = build_rotation_schedule(
        RotationConfig.parse({"rotate": "lisa", "layers": 1, "interval": 2, "seed": 1}),
        num_layers=4, total_steps=8,
    )
    stored = dict(LEGACY_DEEPSPEED, schedule=schedule.to_dict(), phase=3)
    stored = json.loads(json.dumps(stored))
    meta = CheckpointMeta.from_dict(stored, source="ckpt")
    assert meta.schedule == schedule.to_dict() and meta.schedule["rotate"] == "lisa"
    assert meta.to_dict() == stored
    with pytest.raises(CheckpointError, match="schedule: a mapping must be a rotating-layer"):
        CheckpointMeta.from_dict(dict(stored, schedule={"plan": "full"}), source="ckpt")
