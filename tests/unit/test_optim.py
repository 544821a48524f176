"""Engine-neutral optimizer pieces: a resumed lr schedule follows the run config it was built from."""

from __future__ import annotations

import pytest
import torch

from layerfreeze.config import OptimConfig
from layerfreeze.optim import ScaledLRScheduler, WarmupDecayLR, lr_factor


def _scheduler(lr: float, optim: OptimConfig, total: int, scales=(1.0, 0.5)):
    params = [torch.nn.Parameter(torch.zeros(2)) for _ in scales]
    opt = torch.optim.AdamW(
        [{"params": [p], "lr": lr, "lr_scale": s} for p, s in zip(params, scales, strict=True)]
    )
    return ScaledLRScheduler(opt, WarmupDecayLR(opt, optim, total))


def _advance(sched: ScaledLRScheduler, n: int) -> None:
    for _ in range(n):
        sched.optimizer.step()
        sched.step()


@pytest.mark.parametrize(
    "old_lr, old_total, new_lr, new_total",
    [(1e-3, 4, 1e-5, 4), (1e-3, 4, 1e-3, 8), (1e-3, 10, 3e-4, 6)],
)
def test_loaded_state_keeps_position_but_follows_the_new_config(old_lr, old_total, new_lr, new_total):
    o = OptimConfig(warmup_steps=1, schedule="cosine", min_lr_ratio=0.1)
    old = _scheduler(old_lr, o, old_total)
    _advance(old, 3)
    new = _scheduler(new_lr, o, new_total)
    new.load_state_dict(old.state_dict())
    assert new.inner.last_epoch == 3
    expected = new_lr * lr_factor(o, new_total, 3)
    assert new.base_lr == pytest.approx(expected, rel=1e-12)
    assert new.get_last_lr() == pytest.approx([expected, 0.5 * expected], rel=1e-12)
    _advance(new, 1)
    assert new.base_lr == pytest.approx(new_lr * lr_factor(o, new_total, 4), rel=1e-12)


def test_unchanged_config_resumes_bit_for_bit():
    o = OptimConfig(warmup_steps=2, schedule="linear", min_lr_ratio=0.0)
    a = _scheduler(1e-3, o, 10)
    _advance(a, 5)
    b = _scheduler(1e-3, o, 10)
    b.load_state_dict(a.state_dict())
    assert b.get_last_lr() == a.get_last_lr()
    _advance(a, 1)
    _advance(b, 1)
    assert b.get_last_lr() == a.get_last_lr()


def test_group_count_mismatch_is_an_error():
    o = OptimConfig()
    a = _scheduler(1e-3, o, 10, scales=(1.0,))
    b = _scheduler(1e-3, o, 10, scales=(1.0, 0.5))
    with pytest.raises(ValueError, match="1 groups saved, optimizer has 2"):
        b.load_state_dict(a.state_dict())
