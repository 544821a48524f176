"""The run config's DeepSpeed section, resolved: what ``layerfreeze train`` hands DeepSpeed.

Engine-specific but import-free (plain dicts; no ``deepspeed`` import), so ``layerfreeze
validate`` can print the effective DeepSpeed config on a machine without DeepSpeed.
"""

from __future__ import annotations

from typing import Any

from layerfreeze.config import RunConfig, load_deepspeed_config

__all__ = ["build_deepspeed_config"]


def build_deepspeed_config(cfg: RunConfig, world_size: int) -> tuple[dict[str, Any], list[str]]:
    """The DeepSpeed config handed to the engine: the user's (file or inline) with batch sizes,
    clipping and AdamW hyper-parameters taken from ``train`` / ``optim``.

    The run config is the single source of these values, so a shared DeepSpeed file (e.g.
    ``configs/deepspeed/zero2.json``, which also serves users' own scripts) can be reused as-is:
    a different value there is replaced, and a ``scheduler`` section is dropped (the recipe sets
    the learning rate so per-policy lr scales hold). Each replacement is reported.

    Returns:
        ``(config, replaced)``: the config, and one line per value the run config replaced.

    Raises:
        ConfigError: the file is missing or not a JSON object.
    """
    ds = load_deepspeed_config(cfg.deepspeed)
    t, o = cfg.train, cfg.optim
    replaced: list[str] = []

    def take(section: dict[str, Any], prefix: str, key: str, source: str, value: Any) -> None:
        old = section.get(key, "auto")
        if old != "auto" and old != value:
            replaced.append(f"deepspeed.{prefix}{key}: {old!r} replaced by {source} = {value!r}")
        section[key] = value

    take(ds, "", "train_micro_batch_size_per_gpu", "train.micro_batch_size", t.micro_batch_size)
    take(ds, "", "gradient_accumulation_steps", "train.grad_accum_steps", t.grad_accum_steps)
    take(ds, "", "train_batch_size", f"micro batch x accumulation x {world_size} ranks",
         t.micro_batch_size * t.grad_accum_steps * world_size)
    take(ds, "", "gradient_clipping", "optim.max_grad_norm", o.max_grad_norm)
    optimizer = ds.setdefault("optimizer", {"type": "AdamW", "params": {"torch_adam": True}})
    params = optimizer.setdefault("params", {})
    for key, value in (("lr", o.lr), ("betas", list(o.betas)), ("eps", o.eps),
                       ("weight_decay", o.weight_decay)):
        take(params, "optimizer.params.", key, f"optim.{key}", value)
    if "scheduler" in ds:
        replaced.append(
            f"deepspeed.scheduler: {ds.pop('scheduler')!r} dropped; the learning rate follows "
            f"optim.schedule={o.schedule!r}, optim.warmup_steps={o.warmup_steps}, "
            f"optim.min_lr_ratio={o.min_lr_ratio}"
        )
    return ds, replaced
