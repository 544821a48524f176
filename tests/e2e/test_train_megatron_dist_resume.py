"""``layerfreeze train engine=megatron checkpoint.format=dist`` resumes at another parallel layout,
end to end on 2 CPU ranks (real CLI under torchrun, real megatron-core, gloo).

A TP=2 run of 4 steps saves dist checkpoints at steps 2 and 4; a second run at PP=2 (both
layouts have one data-parallel replica, so both read the same micro-batches) resumes from the
step-2 checkpoint and trains steps 3 and 4. Its losses must be the TP=2 run's own steps 3 and 4
(an independent, uninterrupted run), to float tolerance (the layouts reduce in another order).
"""

from __future__ import annotations

import pytest

from tests.e2e.test_train_cli import _losses, _write
from tests.e2e.test_train_megatron import _mconfig, _mtrain

pytestmark = pytest.mark.slow


def test_tp2_dist_checkpoint_resumes_at_pp2(tmp_path, eval_data_dir):
    first, second = tmp_path / "tp2", tmp_path / "pp2"
    sections = dict(
        plan={"spec": "hlpt"},
        eval={"every_steps": 0, "at_end": False},
        checkpoint={"format": "dist", "export_final": False},
    )
    cfg = _mconfig(first, tmp_path / "cache", 2, 1, eval_data_dir, **sections)
    proc = _mtrain(_write(tmp_path / "tp2.yaml", cfg))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-8000:]
    step2 = first / "checkpoints" / "step_00000002"
    assert (step2 / "dist").is_dir() and not (step2 / "weights").exists()

    cfg = _mconfig(second, tmp_path / "cache", 1, 2, eval_data_dir, **sections)
    cfg["checkpoint"]["resume"] = str(step2)
    proc = _mtrain(_write(tmp_path / "pp2.yaml", cfg))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-8000:]
    straight, resumed = _losses(first), _losses(second)
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert resumed[step] == pytest.approx(straight[step], rel=0, abs=2e-5)
