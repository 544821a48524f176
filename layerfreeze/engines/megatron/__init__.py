"""Megatron-core engine: layer plans on megatron-core ``GPTModel`` s (tensor and pipeline parallel).

This package is the only place besides ``engines/deepspeed.py`` that imports ``megatron``; its
modules import it lazily, so ``import layerfreeze.engines.megatron`` works without megatron-core
installed. Modules:

* ``layout``   ``megatron_layout(model_or_chunks)``: the :class:`~layerfreeze.models.ModelLayout`
  of a stage (layers by global index), so ``apply_plan(model, plan, layout=...)`` works on it;
* ``lora``     tensor-parallel LoRA on ``ColumnParallelLinear`` / ``RowParallelLinear``
  (registered as a LoRA dispatcher);
* ``prefix``   the prefix branch on megatron ``SelfAttention`` (registered as a prefix installer);
* ``recompute`` ``prepare_recompute(model)``: with activation recomputation, let gradients reach
  adapters in layers above frozen embeddings (call it after ``apply_plan``);
* ``vocab``    ``mask_padded_vocab(model, vocab_size)``: megatron's padded vocabulary rows kept
  out of the softmax (loss and logits equal the Hugging Face model's);
* ``provider`` ``plan_model_provider`` / ``optimizer_overrides`` / ``load_base_checkpoint`` for
  existing Megatron-LM scripts (``docs/megatron.md``).

The training engine:

* ``runner``     :class:`MegatronRunner`, the training loop (DDP, optimizer, NaN-guarded steps);
* ``optim_state`` where a parameter's master weight / Adam moments live (read / write whole);
* ``switch``     the plan-schedule phase switch (optimizer state carried);
* ``checkpoint`` the runner's atomic checkpoints (weights by global key, resume);
* ``dist_checkpoint`` the ``checkpoint.format: dist`` payload (megatron-core distributed
  checkpointing: full resume at another TP / PP layout);
* ``evaluation`` loss and whole logits without training;
* ``convert``    HF config -> ``TransformerConfig`` / ``GPTModel`` (re-exports the two below);
* ``hf_weights`` HF <-> megatron tensor mapping, loading HF checkpoints;
* ``hf_export``  the merged HF export and its sidecar;
* ``sharded``    megatron-core distributed-checkpoint state dicts of the adapters.

``register_megatron_policies()`` registers both (``megatron_layout`` calls it).

Example::

    from layerfreeze import apply_plan
    from layerfreeze.engines.megatron import megatron_layout

    layout = megatron_layout(model)                 # GPTModel of this rank's stage
    applied = apply_plan(model, "freeze_deep", layout=layout)   # before DDP / the optimizer
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "megatron_layout",
    "chunks_module",
    "register_megatron_policies",
    "ParallelLoRAAdapter",
    "MegatronPrefix",
    "prepare_recompute",
    "mask_padded_vocab",
    "load_base_checkpoint",
    "check_run_config",
    "describe_run_config",
    "init_distributed",
    "runner_from_run_config",
]

_LAZY = {
    "megatron_layout": "layerfreeze.engines.megatron.layout",
    "chunks_module": "layerfreeze.engines.megatron.layout",
    "register_megatron_policies": "layerfreeze.engines.megatron.layout",
    "ParallelLoRAAdapter": "layerfreeze.engines.megatron.lora",
    "MegatronPrefix": "layerfreeze.engines.megatron.prefix",
    "prepare_recompute": "layerfreeze.engines.megatron.recompute",
    "mask_padded_vocab": "layerfreeze.engines.megatron.vocab",
    "load_base_checkpoint": "layerfreeze.engines.megatron.provider",
    # the recipe's entry points (layerfreeze train engine=megatron)
    "check_run_config": "layerfreeze.engines.megatron.recipe",
    "describe_run_config": "layerfreeze.engines.megatron.recipe",
    "init_distributed": "layerfreeze.engines.megatron.recipe",
    "runner_from_run_config": "layerfreeze.engines.megatron.recipe",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
