"""layerfreeze/utils/private_api.py: each private attribute it relies on still exists on the
installed (supported) library versions, and each function does what its docstring says."""

from __future__ import annotations

from importlib.metadata import version

import pytest
import torch

from layerfreeze.utils import private_api as P

#: The versions the functions were checked on (constraints.txt); a new version must be checked
#: against the docstrings and added here.
SUPPORTED = {"accelerate": {"1.16.0"}, "torch": {"2.13.0"}, "transformers": {"5.25.0"}}


def _instance(owner: str):
    if owner == "accelerate.Accelerator":
        from accelerate import Accelerator

        return Accelerator(cpu=True)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


@pytest.mark.parametrize("function", sorted(P.PRIVATE_ATTRIBUTES))
def test_private_attribute_exists_on_the_supported_versions(function):
    library, owner, attribute = P.PRIVATE_ATTRIBUTES[function]
    installed = version(library).split("+")[0]
    assert installed in SUPPORTED[library], (
        f"{function}: {library} {installed} is not a version private_api.py was checked on "
        f"({sorted(SUPPORTED[library])}); check {owner}.{attribute} and update SUPPORTED."
    )
    assert hasattr(_instance(owner), attribute), (
        f"layerfreeze.utils.private_api.{function}: {owner}.{attribute} is gone in {library} "
        f"{installed}; see the function's docstring for what breaks."
    )
    assert callable(getattr(P, function))


def test_replace_prepared_model_and_optimizer_swap_only_the_old_object():
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    old, other, new = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    acc._models = [other, old]
    acc._optimizers = ["o1", "o2"]
    P.replace_prepared_model(acc, old, new)
    P.replace_prepared_optimizer(acc, "o2", "o3")
    assert acc._models[0] is other and acc._models[1] is new
    assert acc._optimizers == ["o1", "o3"]


def test_scheduler_setters_are_what_get_last_lr_and_step_report():
    sched = _instance("torch.optim.lr_scheduler.LambdaLR")
    P.set_scheduler_last_lr(sched, [0.25])
    P.set_scheduler_step_count(sched, 7)
    assert sched.get_last_lr() == [0.25]
    assert sched._step_count == 7


def test_scheduler_setters_name_themselves_when_the_attribute_is_missing():
    class NotAScheduler:
        pass

    with pytest.raises(AttributeError, match="set_scheduler_step_count"):
        P.set_scheduler_step_count(NotAScheduler(), 1)
    with pytest.raises(AttributeError, match="set_scheduler_last_lr"):
        P.set_scheduler_last_lr(NotAScheduler(), [1.0])
