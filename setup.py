"""layerfreeze: per-layer training plans (freeze / full / gated LoRA / gated prefix) for CPT.

Install: ``pip install -e .[dev] -c constraints.txt`` (``launch/setup_env.sh`` does it, CPU torch
first; see README.md). ``dev`` holds everything the tests import, both engines and bitsandbytes
(``quant``) included.
"""

from setuptools import find_packages, setup

_ENGINE_DEEPSPEED = ["deepspeed>=0.15"]
_ENGINE_MEGATRON = ["megatron-core>=0.12"]
_WANDB = ["wandb>=0.17"]
_EVAL_REF = ["lm-eval>=0.4.5", "datasets>=2.19"]
# NF4 frozen base for healing (prune --heal-quantize nf4); Linear4bit forward and backward on
# CPU checked on 0.50.2.
_QUANT = ["bitsandbytes>=0.50"]
_DEV = [
    "pytest>=8",
    "pytest-timeout>=2.3",
    "peft>=0.12",
    "ruff>=0.5",
    *_ENGINE_DEEPSPEED,
    *_ENGINE_MEGATRON,
    *_WANDB,
    *_EVAL_REF,
    *_QUANT,
]

setup(
    name="layerfreeze",
    version="0.1.0",
    description=(
        "Per-layer training plans (freeze deep / train shallow, gated LoRA, gated prefix) "
        "for continued pre-training on DeepSpeed and Megatron-core, with C-Eval/CMMLU scoring."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["layerfreeze", "layerfreeze.*"]),
    package_data={"layerfreeze": ["data/corpus/*.txt", "data/corpus/*.jsonl", "presets/*.yaml"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.4",
        "transformers>=4.56",
        "safetensors>=0.4",
        "sentencepiece>=0.2",
        "pyyaml>=6",
        "numpy>=1.24",
        "tqdm>=4.66",
        "rich>=13",
        "matplotlib>=3.8",
    ],
    extras_require={
        "deepspeed": _ENGINE_DEEPSPEED,
        "megatron": _ENGINE_MEGATRON,
        "wandb": _WANDB,
        "eval": _EVAL_REF,
        "quant": _QUANT,
        "dev": _DEV,
    },
    entry_points={"console_scripts": ["layerfreeze=layerfreeze.cli:main"]},
)
