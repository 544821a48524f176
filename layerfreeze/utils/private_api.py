"""Every access to another library's private state, one documented function each.

Where a library offers no public way to do what layerfreeze needs, the private access lives
here and nowhere else, so that an upgrade breaks in one known place. Each function names the
library, the versions it was checked on and what breaks if the private attribute changes;
``tests/unit/test_private_api.py`` pins the attributes on the installed versions and fails
naming the function when one disappears.

Checked on: accelerate 1.16.0, torch 2.13.0, transformers 5.25.0 (``constraints.txt``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = [
    "PRIVATE_ATTRIBUTES",
    "replace_prepared_model",
    "replace_prepared_optimizer",
    "set_scheduler_last_lr",
    "set_scheduler_step_count",
]

#: ``function name -> (library, owner class path, private attribute)`` for the pinning test.
PRIVATE_ATTRIBUTES: dict[str, tuple[str, str, str]] = {
    "replace_prepared_model": ("accelerate", "accelerate.Accelerator", "_models"),
    "replace_prepared_optimizer": ("accelerate", "accelerate.Accelerator", "_optimizers"),
    "set_scheduler_step_count": ("torch", "torch.optim.lr_scheduler.LambdaLR", "_step_count"),
    "set_scheduler_last_lr": ("torch", "torch.optim.lr_scheduler.LambdaLR", "_last_lr"),
}


def replace_prepared_model(accelerator: Any, old: Any, new: Any) -> None:
    """Put ``new`` where ``old`` is in the models an ``accelerate.Accelerator`` has prepared.

    Library: accelerate (``Accelerator._models``, the list ``prepare()`` appends to and that
    ``save_state`` / ``load_state`` / ``free_memory`` / ``get_state_dict`` iterate); checked on
    1.16.0. There is no public API to swap a prepared model: ``prepare()`` would wrap the
    DeepSpeed engine again. Used by ``hf_trainer``'s phase switch under DeepSpeed, which builds a
    new engine. If the attribute changes, checkpoints written by ``Trainer.save_model`` /
    ``accelerator.save_state`` after a phase switch would hold the *retired* engine's weights.

    Raises:
        AttributeError: this accelerate has no ``_models`` (the pinning test names this
            function).
    """
    accelerator._models = [new if m is old else m for m in accelerator._models]


def replace_prepared_optimizer(accelerator: Any, old: Any, new: Any) -> None:
    """Put ``new`` where ``old`` is in the optimizers an ``accelerate.Accelerator`` has prepared.

    Library: accelerate (``Accelerator._optimizers``); checked on 1.16.0. No public API swaps a
    prepared optimizer. If the attribute changes, ``accelerator.save_state`` after a DeepSpeed
    phase switch would save the retired optimizer's state (a resume would restore stale Adam
    moments).

    Raises:
        AttributeError: this accelerate has no ``_optimizers``.
    """
    accelerator._optimizers = [new if o is old else o for o in accelerator._optimizers]


def set_scheduler_step_count(scheduler: Any, count: int) -> None:
    """Set how many times a torch ``LRScheduler`` believes it has stepped.

    Library: torch (``LRScheduler._step_count``); checked on 2.13.0. Positioning a fresh
    scheduler at step ``n`` through the public ``last_epoch=`` constructor argument leaves the
    count at 1, and ``step()`` then warns that it was called before ``optimizer.step()``. If the
    attribute changes, that spurious warning comes back after every DeepSpeed phase switch (the
    lr values are unaffected).
    """
    if not hasattr(scheduler, "_step_count"):
        raise AttributeError(
            f"set_scheduler_step_count: {type(scheduler).__name__} has no _step_count in this "
            "torch; see layerfreeze/utils/private_api.py."
        )
    scheduler._step_count = count


def set_scheduler_last_lr(scheduler: Any, lrs: Sequence[float]) -> None:
    """Set what a torch ``LRScheduler.get_last_lr()`` returns.

    Library: torch (``LRScheduler._last_lr``, read by the public ``get_last_lr()``); checked on
    2.13.0. No public setter exists; after a phase switch rebuilds the parameter groups (or a
    fresh scheduler is positioned mid-run), ``get_last_lr()`` must report one lr per *new* group
    so that the Trainer logs the right ``learning_rate``. If the attribute changes, the logged lr
    after a phase switch is wrong or ``get_last_lr()`` raises.

    Raises:
        AttributeError: this torch's scheduler has no ``_last_lr``.
    """
    if not hasattr(scheduler, "_last_lr"):
        raise AttributeError(
            f"set_scheduler_last_lr: {type(scheduler).__name__} has no _last_lr in this torch; "
            "see layerfreeze/utils/private_api.py."
        )
    scheduler._last_lr = list(lrs)
