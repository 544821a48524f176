"""ZeRO-3 partitioned loading of a Hugging Face model for forwards only (``trace --zero3``).

Owns :func:`load_zero3_for_inference`; whole weights inside it come from
:func:`~layerfreeze.engines.deepspeed.zero_state.gathered_parameters`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from layerfreeze.engines.deepspeed.engine import _deepspeed_initialize, init_distributed


def load_zero3_for_inference(
    load: Callable[[], nn.Module], dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, Any]:
    """A model partitioned over the ranks from the moment it is loaded (ZeRO-3), for forwards.

    While ``load`` runs (e.g. ``from_pretrained``), a ZeRO-3 ``HfDeepSpeedConfig`` is alive, so
    transformers builds the model under ``deepspeed.zero.Init`` and each rank keeps only its
    1/world of every weight; DeepSpeed's engine (no optimizer: parameter fetching only) then
    gathers one module's weights at a time inside each forward. Every rank must run the same
    forwards. Use :func:`gathered_parameters` for code that needs whole weights.

    Returns:
        ``(model, engine)``: the Hugging Face module (partitioned) and the engine that keeps its
        hooks alive.
    """
    from transformers.integrations import HfDeepSpeedConfig

    init_distributed()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "steps_per_print": 10**9,
    }
    if dtype == torch.bfloat16:
        config["bf16"] = {"enabled": True}
    elif dtype == torch.float16:
        config["fp16"] = {"enabled": True}
    hf_config = HfDeepSpeedConfig(config)  # transformers reads it (a weak reference) while alive
    model = load()
    engine, _opt, _loader, _sched = _deepspeed_initialize(model=model, config=config)
    engine.layerfreeze_hf_config = hf_config  # ZeRO-3 stays visible to transformers meanwhile
    engine.eval()
    return engine.module, engine
