"""What ``layerfreeze train`` / ``validate`` call for ``engine: deepspeed`` (the EngineModule side).

Owns :func:`check_run_config`, :func:`describe_run_config` and :func:`runner_from_run_config`;
the process group comes from :func:`~layerfreeze.engines.deepspeed.engine.init_distributed`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from layerfreeze.engines.deepspeed.runner import DeepSpeedRunner
from layerfreeze.utils.dist import get_world_size


def check_run_config(cfg: Any, world_size: int) -> list[str]:
    """Validate the run config's DeepSpeed side before anything is written.

    Returns:
        One warning line per DeepSpeed value the run config replaces.

    Raises:
        ConfigError: a missing or malformed DeepSpeed JSON file.
    """
    from layerfreeze.engines.deepspeed_config import build_deepspeed_config

    return build_deepspeed_config(cfg, world_size)[1]


def describe_run_config(cfg: Any) -> list[str]:
    """What ``layerfreeze validate`` prints for ``engine: deepspeed``: the DeepSpeed config the
    run would use for ``WORLD_SIZE`` ranks (default 1), then one ``note:`` per value the run
    config replaces.

    Raises:
        ConfigError: a missing or malformed DeepSpeed JSON file.
    """
    import json

    from layerfreeze.engines.deepspeed_config import build_deepspeed_config

    world = get_world_size()
    ds, replaced = build_deepspeed_config(cfg, world)
    return [f"DeepSpeed config for {world} rank(s):\n{json.dumps(ds, indent=2)}"] + [
        f"note: {line}" for line in replaced
    ]


def runner_from_run_config(
    cfg: Any,
    *,
    schedule: Any,
    vocab_size: int,
    lr_scheduler: Callable | None = None,
    special_ids: dict[str, int] | None = None,
) -> DeepSpeedRunner:
    """Build the Hugging Face model of ``cfg.model``, apply every phase of ``schedule`` and
    return the :class:`DeepSpeedRunner` that trains it (what ``layerfreeze train`` calls).

    Args:
        cfg: the validated ``RunConfig``.
        schedule: the run's ``PlanSchedule`` (adapters of every phase installed up front).
        vocab_size: the tokenizer's size (a built model gets at least this vocabulary).
        lr_scheduler: callable ``optimizer -> scheduler``.
        special_ids: the tokenizer's pad / bos / eos ids for a model built from
            ``model.architecture`` (:func:`layerfreeze.modeling.special_token_ids`).
    """
    from layerfreeze.apply import apply_plan, enable_gradient_checkpointing
    from layerfreeze.engines.deepspeed_config import build_deepspeed_config
    from layerfreeze.modeling import VocabResize, build_model

    ds_config, _ = build_deepspeed_config(cfg, get_world_size())
    model = build_model(
        cfg.model, vocab_size, cfg.train.seed, special_ids,
        resize=VocabResize.from_run_config(cfg),
    )
    plans = schedule.plans
    applied = apply_plan(model, plans[0], install=plans[1:])
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(model, applied.layout)
    return DeepSpeedRunner(
        model, ds_config, applied=applied, schedule=schedule, lr=cfg.optim.lr,
        weight_decay=cfg.optim.weight_decay, lr_scheduler=lr_scheduler,
    )
