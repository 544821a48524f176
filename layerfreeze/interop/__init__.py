"""Adapters that load in other tools: PEFT's LoRA adapter format (and vLLM's LoRA loading)."""

from layerfreeze.interop.peft import (
    VLLM_MAX_LORA_RANKS,
    export_peft,
    load_peft_adapter,
    peft_export_problems,
    peft_plan,
    vllm_compatibility,
)

__all__ = [
    "VLLM_MAX_LORA_RANKS",
    "export_peft",
    "load_peft_adapter",
    "peft_export_problems",
    "peft_plan",
    "vllm_compatibility",
]
