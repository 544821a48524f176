"""Engine-neutral questions about partitioned parameters: is it partitioned, how big is it whole,
gather it.

The only place outside ``engines/deepspeed.py`` that knows DeepSpeed's ZeRO-3 parameter
attributes (``ds_numel``, ``ds_shape``, ``ds_tensor``): code elsewhere asks these helpers, which
answer for a plain ``torch`` parameter as well. DeepSpeed is imported only inside
:func:`gathered`, and only when some parameter is partitioned.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch

__all__ = [
    "full_shape", "gathered", "is_partition_managed", "is_partitioned", "local_numel", "whole_numel",
]


def is_partitioned(p: torch.Tensor) -> bool:
    """True when ``p`` is a ZeRO-3 partition whose local tensor is not the whole parameter."""
    return whole_numel(p) != p.numel()


def is_partition_managed(p: torch.Tensor) -> bool:
    """True when ZeRO-3 manages ``p`` (``ds_id``), also when this rank happens to hold it whole
    (e.g. below ``stage3_param_persistence_threshold``)."""
    return hasattr(p, "ds_id")


def whole_numel(p: torch.Tensor) -> int:
    """Element count of the whole parameter (ZeRO-3: ``ds_numel``; otherwise ``numel()``)."""
    n = getattr(p, "ds_numel", None)
    return int(n) if n is not None else p.numel()


def full_shape(p: torch.Tensor) -> torch.Size:
    """Shape of the whole parameter (ZeRO-3: ``ds_shape``; otherwise ``shape``)."""
    shape = getattr(p, "ds_shape", None)
    return torch.Size(shape) if shape is not None else p.shape


def local_numel(p: torch.Tensor) -> int:
    """Elements this rank holds of ``p`` (ZeRO-3: its partition ``ds_tensor``)."""
    part = getattr(p, "ds_tensor", None)
    return part.numel() if part is not None else p.numel()


@contextlib.contextmanager
def gathered(params: Iterable[torch.Tensor], modifier_rank: int | None = None) -> Iterator[None]:
    """Context in which ``params`` are whole on every rank (collective when some is a ZeRO-3
    parameter: every rank must enter it with the same list); a no-op for plain parameters."""
    params = [p for p in params if is_partition_managed(p)]
    if not params:
        yield
        return
    import deepspeed  # only a ZeRO-3 parameter carries ds_id, so DeepSpeed is installed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield
