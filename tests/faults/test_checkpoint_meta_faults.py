"""Damaged or foreign checkpoint metadata (the manifest's ``"layerfreeze"`` object) is refused
with one error naming the field and the value found, never a KeyError / IndexError from deep in
a resume (issue #15: one metadata schema for both engines)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from layerfreeze.checkpoint import CheckpointError
from layerfreeze.checkpoint_meta import CheckpointMeta

_SCHEDULE = [
    {"plan": {"preset": "full"}, "until_step": 4},
    {"plan": {"preset": "freeze_deep"}, "until_step": None},
]
_GOOD = {
    "format": 1, "engine": "deepspeed", "step": 6, "phase": 1, "schedule": _SCHEDULE,
    "plan": {"preset": "freeze_deep"}, "zero_stage": 2, "world_size": 2, "trainable_only": False,
    "trained_frozen_params": [], "groups": [], "bad_micro_batches": 0, "skipped_steps": 0,
}
_DS_STATE = {"zero_stage": int, "world_size": int, "trained_frozen_params": list, "groups": list}
_FIX = "The checkpoint's metadata is damaged or was not written by layerfreeze"


def _read(**changes) -> CheckpointMeta:
    data = {k: v for k, v in {**_GOOD, **changes}.items() if v is not _DROP}
    return CheckpointMeta.from_dict(data, source="/ck/step_00000006")


_DROP = object()


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"step": _DROP}, "layerfreeze.step: missing"),
        ({"step": "6"}, "layerfreeze.step: must be a non-negative int, got '6'"),
        ({"skipped_steps": -1}, "layerfreeze.skipped_steps: must be a non-negative int, got -1"),
        ({"bad_micro_batches": True},
         "layerfreeze.bad_micro_batches: must be a non-negative int, got True"),
        ({"trainable_only": 1}, "layerfreeze.trainable_only: must be true or false, got 1"),
        ({"engine": None}, "layerfreeze.engine: must be a string, got None"),
        ({"plan": "freeze_deep"}, "layerfreeze.plan: must be an object, got 'freeze_deep'"),
        ({"schedule": []}, "layerfreeze.schedule: must be a non-empty list of phase objects, got []"),
        ({"schedule": ["full"]},
         "layerfreeze.schedule: must be a non-empty list of phase objects, got ['full']"),
        ({"phase": 2}, "layerfreeze.phase: 2 is out of range for a 2-phase schedule"),
        ({"format": 2}, "layerfreeze.format: unknown metadata format, got 2 (this layerfreeze reads 1)"),
    ],
    ids=["missing", "str-int", "negative", "bool-int", "int-bool", "engine", "plan",
         "empty-schedule", "schedule-items", "phase-range", "format"],
)
def test_invalid_common_field_is_named_with_its_value(changes, expected):
    with pytest.raises(CheckpointError) as e:
        _read(**changes)
    msg = str(e.value)
    assert msg.startswith("/ck/step_00000006: manifest.json "), msg
    assert expected in msg and _FIX in msg, msg
    assert "\n" not in msg


def test_every_problem_is_named_at_once():
    with pytest.raises(CheckpointError) as e:
        _read(step=_DROP, phase="1", trainable_only=None)
    msg = str(e.value)
    for part in ("layerfreeze.step: missing", "layerfreeze.phase: must be a non-negative int, got '1'",
                 "layerfreeze.trainable_only: must be true or false, got None"):
        assert part in msg, msg


def test_not_an_object_is_refused():
    with pytest.raises(CheckpointError, match=r"^/ck: manifest.json layerfreeze: must be an object, got list\."):
        CheckpointMeta.from_dict([1, 2], source="/ck")


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"groups": _DROP}, "layerfreeze.groups: missing"),
        ({"zero_stage": "2"}, "layerfreeze.zero_stage: must be a non-negative int, got '2'"),
        ({"trained_frozen_params": "a.weight"},
         "layerfreeze.trained_frozen_params: must be a list, got 'a.weight'"),
    ],
    ids=["missing", "str-int", "list"],
)
def test_invalid_engine_field_is_named_with_its_value(changes, expected):
    meta = _read(**changes)  # the common fields are fine
    with pytest.raises(CheckpointError) as e:
        meta.check_engine_state(_DS_STATE, source="/ck/step_00000006")
    assert expected in str(e.value) and _FIX in str(e.value), str(e.value)


def test_engine_state_cannot_shadow_a_common_field():
    with pytest.raises(ValueError, match=r"engine_state: \['step'\] are common fields"):
        CheckpointMeta(engine="deepspeed", step=1, phase=0, schedule=_SCHEDULE, plan={},
                       trainable_only=False, bad_micro_batches=0, skipped_steps=0,
                       engine_state={"step": 2})


# ---------------------------------------------------------------------------------------------
# a real DeepSpeed checkpoint (one process) whose metadata is damaged on disk
# ---------------------------------------------------------------------------------------------

# Saves one checkpoint of a 2-phase run, then for each case copies it, edits the manifest's
# "layerfreeze" object and loads it into the same runner, recording what was raised.
_CHILD = textwrap.dedent(
    """
    import json, shutil, sys
    from pathlib import Path
    import torch
    sys.path.insert(0, sys.argv[2])
    from layerfreeze.engines.deepspeed import DeepSpeedRunner, init_distributed
    from tests.helpers.tiny_models import build_tiny_model

    root, cases = Path(sys.argv[1]), json.loads(sys.argv[3])
    torch.set_num_threads(1)
    torch.manual_seed(0)
    init_distributed("gloo")
    cfg = {
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
        "zero_optimization": {"stage": 0}, "steps_per_print": 10**6,
    }
    schedule = [{"plan": "full", "until_step": 4}, {"plan": "freeze_deep", "until_step": None}]
    runner = DeepSpeedRunner(build_tiny_model("llama", num_layers=2), cfg, schedule=schedule)
    saved = runner.save_checkpoint(root / "good")
    out = {"saved_keys": list(json.loads((saved / "manifest.json").read_text())["meta"]["layerfreeze"])}
    for name, case in cases.items():
        ck = root / name
        shutil.copytree(saved, ck)
        manifest = json.loads((ck / "manifest.json").read_text())
        meta = manifest["meta"]["layerfreeze"]
        for key in case.get("drop", []):
            meta.pop(key)
        meta.update(case.get("set", {}))
        (ck / "manifest.json").write_text(json.dumps(manifest))
        try:
            runner.load_checkpoint(ck)
            out[name] = {"type": None}
        except Exception as e:
            out[name] = {"type": type(e).__name__, "msg": str(e), "path": str(ck)}
    runner.close()
    print("RESULT " + json.dumps(out))
    """
)

_CASES = {
    "no_groups": {"drop": ["groups"]},
    "stage_str": {"set": {"zero_stage": "0"}},
    "phase_range": {"set": {"phase": 2}},
    "step_str": {"set": {"step": "0"}},
    "bad_group": {"set": {"groups": [{"name": "layers"}]}},
    # a Megatron checkpoint: the engine is named first, not DeepSpeed's missing fields
    "megatron": {"drop": ["zero_stage", "world_size", "trained_frozen_params", "groups"],
                 "set": {"engine": "megatron", "layout": {}, "num_layers": 2, "global_step": 0}},
}


@pytest.mark.slow
def test_damaged_metadata_of_a_deepspeed_checkpoint_is_named(tmp_path):
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(tmp_path), str(repo), json.dumps(_CASES)],
        capture_output=True, text=True, timeout=1200, cwd=repo,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))[7:])
    # what this layerfreeze writes is today's format-1 key set
    assert sorted(out.pop("saved_keys")) == sorted(
        ["format", "engine", "step", "phase", "schedule", "plan", "zero_stage", "world_size",
         "trainable_only", "trained_frozen_params", "groups", "bad_micro_batches", "skipped_steps"]
    )
    expected = {
        "no_groups": "layerfreeze.groups: missing",
        "stage_str": "layerfreeze.zero_stage: must be a non-negative int, got '0'",
        "phase_range": "layerfreeze.phase: 2 is out of range for a 2-phase schedule",
        "step_str": "layerfreeze.step: must be a non-negative int, got '0'",
        "bad_group": "layerfreeze.groups[0]: not an optimizer group",
        "megatron": "cannot resume this run from it: it was saved by engine 'megatron', this "
                    "run uses engine: deepspeed",
    }
    for name, want in expected.items():
        got = out[name]
        assert got["type"] == "CheckpointError", (name, got)
        assert got["msg"].startswith(got["path"] + ": "), (name, got["msg"])
        assert want in got["msg"], (name, got["msg"])
