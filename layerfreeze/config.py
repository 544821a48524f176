"""The run configuration: ``RunConfig`` composed of section dataclasses, and ``load_config``.

Flow (``layerfreeze train --config run.yaml train.steps=10``): ``yaml.safe_load`` -> dotted
overrides checked against this schema -> strict :func:`~layerfreeze.utils.schema.from_dict` ->
each section's ``__post_init__`` checks. Every problem is collected and raised once as a
:class:`~layerfreeze.errors.ConfigError`. Checks that need the model (layer ranges) happen when
the plan is resolved in :mod:`layerfreeze.train`. No torch import here.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from layerfreeze.data.config import DataConfig, TokenizerConfig
from layerfreeze.errors import ConfigError
from layerfreeze.evaluation.config import EvalConfig
from layerfreeze.utils.schema import apply_overrides, from_dict

__all__ = [
    "ModelConfig",
    "PlanConfig",
    "OptimConfig",
    "TrainConfig",
    "LoggingConfig",
    "CheckpointConfig",
    "MegatronConfig",
    "DiagnosticsConfig",
    "RunConfig",
    "load_config",
    "load_deepspeed_config",
]


@dataclass
class ModelConfig:
    """Which model to train: a Hugging Face checkpoint, or an architecture built from scratch."""

    path: str | None = None
    """Directory of a Hugging Face checkpoint (``config.json`` + weights) loaded with
    ``AutoModelForCausalLM.from_pretrained``. Set exactly one of ``path`` and ``architecture``."""
    architecture: dict[str, Any] | None = None
    """Architecture to build with random weights (seeded by ``train.seed``): a mapping with
    ``model_type`` (e.g. ``llama``, ``qwen2``, ``gpt2``) plus that config class's fields
    (``hidden_size``, ``num_hidden_layers``, ...). ``vocab_size`` defaults to the tokenizer's
    size."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype the weights are loaded or built in. Mixed precision itself is the DeepSpeed config's
    ``bf16`` / ``fp16`` section."""
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] = "sdpa"
    """Attention kernel passed to transformers (``flash_attention_2`` needs CUDA and flash-attn)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, about 30% more compute)."""

    def __post_init__(self) -> None:
        problems = []
        if (self.path is None) == (self.architecture is None):
            problems.append(
                "model: set exactly one of model.path (a Hugging Face checkpoint directory) and "
                f"model.architecture (a config mapping with model_type), got path={self.path!r} "
                f"and architecture={self.architecture!r}."
            )
        if self.architecture is not None and not self.architecture.get("model_type"):
            problems.append(
                "model.architecture.model_type: required to build a model from scratch, got "
                f"keys {sorted(self.architecture)}. Add e.g. model_type: llama."
            )
        if problems:
            raise ConfigError(problems)


@dataclass
class PlanConfig:
    """The layer plan: one plan for the whole run, or a schedule of phases."""

    spec: str | dict[str, Any] | None = None
    """A plan for the whole run, as accepted by ``LayerPlan.parse``: a preset name
    (``freeze_deep``), a compact string, or a mapping; or a YAML/JSON file holding one (a name
    ending in ``.yaml``/``.yml``/``.json``, as ``layerfreeze plan --plan`` takes), or holding a
    list of phases (then the run's schedule). The file is read when the config is loaded, and
    the run records its content. Set exactly one of ``spec`` and ``schedule``."""
    schedule: list[dict[str, Any]] | dict[str, Any] | None = None
    """Phases, each ``{plan: <plan spec>, until_step: <int>}`` (the last phase has
    ``until_step: null``): e.g. a short ``full`` warm phase, then ``freeze_deep``. Or a
    rotating-layer schedule: ``{rotate: lisa, layers: 2, interval: 50, seed: 0}`` (k layers
    sampled per interval, embeddings and lm_head always trained) or ``{rotate: badam, block: 2,
    interval: 50}`` (blocks in order); both take ``optimizer_state: carry | reset`` and
    ``always: [<non-layer parts>]`` (see ``layerfreeze.rotation``)."""

    def __post_init__(self) -> None:
        if (self.spec is None) == (self.schedule is None):
            raise ConfigError(
                "plan: set exactly one of plan.spec (e.g. freeze_deep) and plan.schedule (a list "
                f"of {{plan, until_step}} phases), got spec={self.spec!r} and "
                f"schedule={self.schedule!r}."
            )
        from layerfreeze.plan import is_plan_file, read_plan_file

        if is_plan_file(self.spec):
            content = read_plan_file(self.spec, "plan.spec")
            if isinstance(content, list):  # phases, as `layerfreeze plan --plan FILE` takes
                self.spec, self.schedule = None, content
            else:
                self.spec = content
        # Syntax only; layer ranges are checked against the model in train.setup().
        if self.spec is not None:
            from layerfreeze.plan import LayerPlan

            LayerPlan.parse(self.spec, path="plan.spec")
        else:
            from layerfreeze.rotation import RotationConfig, is_rotation
            from layerfreeze.schedule import PlanSchedule

            if is_rotation(self.schedule):
                RotationConfig.parse(self.schedule, path="plan.schedule")
            else:
                PlanSchedule.parse(self.schedule, path="plan.schedule")


@dataclass
class OptimConfig:
    """AdamW hyper-parameters and the learning-rate schedule (per-policy lr scales apply on top)."""

    lr: float = 3e-4
    """Peak learning rate; each parameter group gets ``lr * lr_scale`` from its layer's policy."""
    weight_decay: float = 0.1
    """Decoupled weight decay (not applied to norms, biases and gates)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW ``(beta1, beta2)``."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_steps: int = 0
    """Linear warm-up from 0 to ``lr`` over this many optimizer steps."""
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    """Decay after warm-up, down to ``lr * min_lr_ratio`` at ``train.steps``."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of ``lr`` (``linear`` and ``cosine``)."""
    max_grad_norm: float = 1.0
    """Global gradient-norm clip (DeepSpeed ``gradient_clipping``); 0 disables clipping."""

    def __post_init__(self) -> None:
        problems = []
        if not (math.isfinite(self.lr) and self.lr > 0):
            problems.append(f"optim.lr: must be a finite number > 0, got {self.lr!r}.")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            problems.append(f"optim.weight_decay: must be >= 0, got {self.weight_decay!r}.")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            problems.append(f"optim.betas: must be two numbers in [0, 1), got {self.betas!r}.")
        if self.eps <= 0:
            problems.append(f"optim.eps: must be > 0, got {self.eps!r}.")
        if self.warmup_steps < 0:
            problems.append(f"optim.warmup_steps: must be >= 0, got {self.warmup_steps!r}.")
        if not 0 <= self.min_lr_ratio <= 1:
            problems.append(f"optim.min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio!r}.")
        if self.max_grad_norm < 0:
            problems.append(f"optim.max_grad_norm: must be >= 0, got {self.max_grad_norm!r}.")
        if problems:
            raise ConfigError(problems)


@dataclass
class TrainConfig:
    """Length of the run and how each optimizer step is batched."""

    steps: int = 1000
    """Number of optimizer steps (the run's length; schedules' ``until_step`` count these)."""
    micro_batch_size: int = 1
    """Sequences per rank per forward/backward pass."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step. Global batch = micro_batch_size x
    grad_accum_steps x data-parallel ranks."""
    seed: int = 1234
    """Seed for model initialisation, data order and every RNG (restored on resume)."""
    nan_tolerance: int = 5
    """A step whose loss is NaN/Inf on any rank is skipped (no update) and counted; after this
    many consecutive bad steps the run stops and names the last checkpoint saved before them."""
    num_threads: int | None = None
    """``torch.set_num_threads`` per rank (CPU runs: cores / ranks); null leaves torch's default."""

    def __post_init__(self) -> None:
        problems = []
        for name in ("steps", "micro_batch_size", "grad_accum_steps", "nan_tolerance"):
            value = getattr(self, name)
            if value < 1:
                problems.append(f"train.{name}: must be >= 1, got {value!r}.")
        if self.num_threads is not None and self.num_threads < 1:
            problems.append(f"train.num_threads: must be >= 1 or null, got {self.num_threads!r}.")
        if problems:
            raise ConfigError(problems)


@dataclass
class LoggingConfig:
    """Where the run writes its outputs and how it reports progress."""

    out_dir: str = "runs/default"
    """Output directory of the run: metrics, wandb files, checkpoints, evaluation, export."""
    log_every: int = 1
    """Write a metrics record (JSONL, wandb, progress bar) every this many optimizer steps."""
    jsonl: str = "metrics.jsonl"
    """Metrics file (one JSON object per line), relative to ``out_dir``; always written."""
    progress: Literal["tqdm", "rich", "none"] = "tqdm"
    """Console progress on rank 0 (loss, lr, tokens/s, ETA): a ``tqdm`` or ``rich`` bar in a
    terminal, log lines every ``log_every`` steps otherwise (batch jobs, CI); ``none``: silent."""
    per_layer_every: int = 10
    """Log per-layer-group gradient norms every this many steps (0 = never)."""
    wandb_project: str | None = None
    """Weights & Biases project; null disables wandb."""
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    """wandb mode. ``offline`` writes under ``<out_dir>/wandb`` (sync later with ``wandb sync``);
    ``online`` needs a login. The API key is never read or logged by layerfreeze."""
    wandb_run_name: str | None = None
    """wandb run name; null uses the out_dir's name."""

    def __post_init__(self) -> None:
        problems = []
        if not self.out_dir:
            problems.append("logging.out_dir: must be a directory path, got ''.")
        elif os.path.exists(self.out_dir) and not os.path.isdir(self.out_dir):
            problems.append(
                f"logging.out_dir: {self.out_dir!r} exists and is not a directory. Choose "
                "another path for the run's outputs."
            )
        if self.log_every < 1:
            problems.append(f"logging.log_every: must be >= 1, got {self.log_every!r}.")
        if self.per_layer_every < 0:
            problems.append(f"logging.per_layer_every: must be >= 0, got {self.per_layer_every!r}.")
        if os.path.isabs(self.jsonl) or not self.jsonl:
            problems.append(
                "logging.jsonl: must be a file name relative to logging.out_dir, got "
                f"{self.jsonl!r}."
            )
        if problems:
            raise ConfigError(problems)


#: Model config fields that change what the same weights compute without changing their
#: shapes: the only ones ``checkpoint.allow_model_change`` may name.
CHANGEABLE_MODEL_FIELDS = (
    "hidden_act", "rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "rope_theta",
)


@dataclass
class CheckpointConfig:
    """Periodic checkpoints, resuming and the final export."""

    dir: str | None = None
    """Checkpoint directory; null means ``<logging.out_dir>/checkpoints``."""
    every_steps: int = 0
    """Save every this many optimizer steps (0 = only at the end of the run)."""
    keep_last: int = 3
    """Keep the newest this many checkpoints; older ones are deleted after a successful save."""
    trainable_only: bool = False
    """Store only trainable parameters (plus optimizer state): smaller, but resuming needs the
    same base model (``model.path`` or ``model.architecture`` + ``train.seed``)."""
    resume: str = "auto"
    """``auto``: resume from the newest checkpoint in ``dir`` if there is one; ``none``: start
    fresh (error if ``dir`` already holds checkpoints); or a path to one checkpoint."""
    format: Literal["safetensors", "dist"] = "safetensors"
    """How ``engine: megatron`` stores weights and optimizer state: ``safetensors`` (whole
    tensors by global key, optimizer state per rank; a full resume needs the same parallel
    layout) or ``dist`` (megatron-core distributed checkpointing: a full resume may change
    tensor / pipeline / virtual-pipeline sizes; needs ``megatron.use_distributed_optimizer:
    false``). A resume reads either. The DeepSpeed engine has its own format (``safetensors``
    only)."""
    save_final: bool = True
    """Save a checkpoint after the last step."""
    on_signal: bool = True
    """On SIGTERM or SIGINT (Slurm's preemption / time-limit notice, ``scancel``, Ctrl-C), every
    rank stops at the next step boundary, a checkpoint of the last finished step is saved when
    this is true, and ``layerfreeze train`` exits with status 75 (resubmit the same job:
    ``resume: auto`` continues from that checkpoint). false: stop the same way without saving
    (the newest earlier checkpoint is where a resubmitted job continues)."""
    export_final: bool = True
    """Export the final model as a standard Hugging Face checkpoint (adapters merged)."""
    export_dir: str | None = None
    """Export directory; null means ``<logging.out_dir>/export``."""
    allow_model_change: list[str] = field(default_factory=list)
    """Model config fields a resume may change on purpose, e.g. ``[rope_theta]`` when raising
    the RoPE base for longer context (one of: hidden_act, rms_norm_eps, layer_norm_eps,
    layer_norm_epsilon, rope_theta). A resume with any other difference from the checkpoint's
    model config (or in a field not listed here) exits 2 naming the field; fields that fix
    parameter shapes can never change."""
    export_adapter: bool | None = None
    """Also write the trained tensors and the plan (layerfreeze's adapter format,
    ``<logging.out_dir>/adapter``; ``layerfreeze export --adapter-dir`` turns plain-LoRA ones into
    a PEFT / vLLM adapter). null: when the final plan trains adapters only (LoRA, prefixes,
    gates: nothing trained whole); true: always; false: never. DeepSpeed engine only."""

    def __post_init__(self) -> None:
        problems = []
        if self.every_steps < 0:
            problems.append(f"checkpoint.every_steps: must be >= 0, got {self.every_steps!r}.")
        if self.keep_last < 1:
            problems.append(f"checkpoint.keep_last: must be >= 1, got {self.keep_last!r}.")
        if not self.resume:
            problems.append("checkpoint.resume: must be auto, none or a checkpoint path, got ''.")
        for name in self.allow_model_change:
            if name not in CHANGEABLE_MODEL_FIELDS:
                problems.append(
                    f"checkpoint.allow_model_change: {name!r} cannot change on resume (valid: "
                    f"{', '.join(CHANGEABLE_MODEL_FIELDS)}; fields that fix parameter shapes "
                    "never can)."
                )
        for key in ("dir", "export_dir"):
            value = getattr(self, key)
            if value and os.path.exists(value) and not os.path.isdir(value):
                problems.append(
                    f"checkpoint.{key}: {value!r} exists and is not a directory. Choose another "
                    "path."
                )
        if problems:
            raise ConfigError(problems)


@dataclass
class MegatronConfig:
    """Megatron-core parallel layout (used when ``engine: megatron``)."""

    tensor_model_parallel_size: int = 1
    """Tensor-parallel ranks per model replica (must divide the attention heads, query groups
    and the LoRA ranks / prefix heads the plan splits)."""
    pipeline_model_parallel_size: int = 1
    """Pipeline stages; each holds a slice of the layers (plans address global layer indices)."""
    virtual_pipeline_model_parallel_size: int | None = None
    """Model chunks per pipeline stage (interleaved schedule); null for one chunk."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (needs tensor_model_parallel_size > 1 dividing
    ``data.seq_len``): norms, dropout and the residual stream hold sequence shards; LoRA and
    prefix adapters gather/scatter where megatron's linears do. Verified on CPU only (local
    spec, no Transformer Engine)."""
    use_distributed_optimizer: bool = False
    """Shard optimizer state over data-parallel ranks (Megatron's distributed optimizer)."""
    transformer_impl: Literal["local", "transformer_engine"] = "local"
    """Megatron-core layer spec, as Megatron-LM's ``--transformer-impl``: ``local`` (megatron-core's
    own torch modules; runs on CPU and CUDA) or ``transformer_engine`` (the Transformer Engine
    spec: norms fused into ``linear_qkv`` / ``linear_fc1``, TE attention; needs CUDA and an
    importable ``transformer_engine``, checked by ``layerfreeze validate``). Written against
    megatron-core 0.16.1 and Transformer Engine's source; never executed on this project's CPU
    machines (see docs/megatron.md, "Transformer Engine")."""
    mask_padded_vocab: bool = True
    """Keep megatron's padded vocabulary rows (the vocabulary is padded to a multiple of the
    tensor-parallel size) out of the softmax: the loss and the evaluation logits are the
    Hugging Face model's. false keeps megatron-core's behaviour (padded rows at logit 0 enter
    the softmax, as in Megatron-LM)."""

    def __post_init__(self) -> None:
        problems = []
        for key in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
            v = getattr(self, key)
            if not isinstance(v, int) or v < 1:
                problems.append(f"megatron.{key}: must be an integer >= 1, got {v!r}.")
        vp = self.virtual_pipeline_model_parallel_size
        if vp is not None and (vp < 1 or self.pipeline_model_parallel_size < 2):
            problems.append(
                f"megatron.virtual_pipeline_model_parallel_size: needs >= 1 and "
                f"pipeline_model_parallel_size >= 2, got {vp!r} with "
                f"{self.pipeline_model_parallel_size} stages. Set it to null."
            )
        if self.sequence_parallel and self.tensor_model_parallel_size < 2:
            problems.append(
                "megatron.sequence_parallel: needs tensor_model_parallel_size >= 2, got "
                f"{self.tensor_model_parallel_size}. Set sequence_parallel: false."
            )
        if problems:
            raise ConfigError(problems)


@dataclass
class DiagnosticsConfig:
    """Sensitivity hooks during training (LayerTracer measures on a fixed probe batch)."""

    enabled: bool = False
    """Compute per-layer diagnostics every ``every_steps`` optimizer steps."""
    every_steps: int = 100
    """Interval in optimizer steps (one call costs a few training steps, so the default keeps
    the overhead under 3% of training time; see bench/results/diagnostics_overhead.md)."""
    measures: list[str] = field(
        default_factory=lambda: ["grad_norm", "update_ratio", "drift", "angular"]
    )
    """Per-layer series: ``grad_norm`` (probe-loss gradient norm), ``update_ratio``
    (||dW|| / ||W|| since the last call), ``drift`` (angular distance of the layer's output to
    the step-0 model's), ``angular`` (angular distance between the layer's input and output)."""
    probe_sequences: int = 2
    """Sequences per rank in the fixed probe batch (taken from the training data, in order)."""

    def __post_init__(self) -> None:
        known = ("grad_norm", "update_ratio", "drift", "angular")
        problems = []
        if self.every_steps < 1:
            problems.append(f"diagnostics.every_steps: must be >= 1, got {self.every_steps!r}.")
        if self.probe_sequences < 1:
            problems.append(
                f"diagnostics.probe_sequences: must be >= 1, got {self.probe_sequences!r}."
            )
        bad = [m for m in self.measures if m not in known]
        if bad or not self.measures:
            problems.append(
                f"diagnostics.measures: unknown or empty, got {self.measures!r}. Choose from "
                f"{', '.join(known)}."
            )
        if problems:
            raise ConfigError(problems)


@dataclass
class RunConfig:
    """A continued pre-training run (``layerfreeze train --config FILE``)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The model to train."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """The tokenizer: a Hugging Face tokenizer directory, or a SentencePiece model to train/load."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training text, its token cache and packing."""
    plan: PlanConfig = field(default_factory=PlanConfig)
    """Per-layer training plan or plan schedule."""
    engine: Literal["deepspeed", "megatron"] = "deepspeed"
    """Training engine: DeepSpeed (ZeRO 0-3, Hugging Face models) or Megatron-core (tensor and
    pipeline parallel; Llama-style Hugging Face checkpoints are converted in and out)."""
    megatron: MegatronConfig = field(default_factory=MegatronConfig)
    """Megatron-core parallel layout (``engine: megatron`` only)."""
    deepspeed: dict[str, Any] | str = field(default_factory=dict)
    """DeepSpeed config: an inline mapping or a path to a JSON file (e.g.
    ``configs/deepspeed/zero2.json``). Passed to DeepSpeed as-is, except that the batch keys
    (``train_micro_batch_size_per_gpu``, ``gradient_accumulation_steps``, ``train_batch_size``),
    ``gradient_clipping`` and the optimizer's ``lr``/``betas``/``eps``/``weight_decay`` come
    from ``train`` and ``optim``, and a ``scheduler`` section is dropped (the lr follows
    ``optim``); each replaced value is logged as a warning."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and learning-rate schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Run length, batching, seed, NaN tolerance."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Outputs, progress bar, metrics JSONL, wandb."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing, resume and final export."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """C-Eval / CMMLU evaluation during training."""
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    """Per-layer sensitivity hooks during training (logged to the metrics JSONL and wandb)."""

    def __post_init__(self) -> None:
        extend = self.tokenizer.extend_from
        if extend is not None and self.model.path is None:
            raise ConfigError(
                f"tokenizer.extend_from: resizes the pretrained model of model.path, got "
                f"extend_from={extend!r} and model.architecture. Set model.path to the checkpoint "
                "the base tokenizer belongs to, or remove tokenizer.extend_from."
            )
        if self.checkpoint.format == "dist" and self.engine != "megatron":
            raise ConfigError(
                f"checkpoint.format: dist is megatron-core's distributed checkpoint, got engine "
                f"{self.engine!r}. Use checkpoint.format: safetensors or engine: megatron."
            )
        if self.checkpoint.format == "dist" and self.megatron.use_distributed_optimizer:
            raise ConfigError(
                "checkpoint.format: dist does not support megatron.use_distributed_optimizer: "
                "true (megatron-core 0.16.1 cannot reshard the distributed optimizer's state). "
                "Set use_distributed_optimizer: false or checkpoint.format: safetensors."
            )
        if isinstance(self.deepspeed, str) and not self.deepspeed.endswith(".json"):
            raise ConfigError(
                f"deepspeed: expected an inline mapping or a path to a .json file, got "
                f"{self.deepspeed!r}. Use e.g. deepspeed: configs/deepspeed/zero2.json."
            )

    @property
    def checkpoint_dir(self) -> Path:
        """``checkpoint.dir`` or ``<out_dir>/checkpoints``."""
        return Path(self.checkpoint.dir or Path(self.logging.out_dir) / "checkpoints")

    @property
    def export_dir(self) -> Path:
        """``checkpoint.export_dir`` or ``<out_dir>/export``."""
        return Path(self.checkpoint.export_dir or Path(self.logging.out_dir) / "export")

    @property
    def adapter_dir(self) -> Path:
        """Where ``checkpoint.export_adapter`` writes: ``<out_dir>/adapter``."""
        return Path(self.logging.out_dir) / "adapter"


def load_config(
    path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()
) -> RunConfig:
    """Read a YAML run config, apply ``key.sub=value`` overrides and validate strictly.

    Args:
        path: YAML file (``None`` starts from the defaults; overrides then carry everything).
        overrides: dotted overrides such as ``train.steps=10`` (checked against the schema).

    Returns:
        The validated :class:`RunConfig`.

    Raises:
        ConfigError: unreadable file, invalid YAML, unknown keys (with a did-you-mean), type
            mismatches and failed checks, all at once.
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if p.is_dir():
            raise ConfigError(
                f"--config: {str(path)!r} is a directory. Pass a YAML run config file."
            )
        if not p.is_file():
            raise ConfigError(
                f"--config: file not found, got {str(path)!r}. Pass a YAML run config."
            )
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ConfigError(
                f"--config: {str(path)!r} is not a UTF-8 text file. Pass a YAML run config."
            ) from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:  # one line: where, and what the parser expected
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            what = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"{path}: not valid YAML{at}: {what}. Fix the file's syntax.") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(
                f"{path}: expected a mapping of sections (model, data, plan, ...) at the top "
                "level, "
                f"got {type(loaded).__name__}."
            )
        data = loaded or {}
    if isinstance(data.get("deepspeed"), str) and any(
        o.split("=", 1)[0].strip().startswith("deepspeed.") for o in overrides
    ):
        # deepspeed.zero_optimization.stage=3 on top of a shared JSON file: read the file so
        # the override changes one key of it (instead of replacing the whole config).
        data["deepspeed"] = load_deepspeed_config(data["deepspeed"])
    apply_overrides(data, overrides, schema=RunConfig)
    return from_dict(RunConfig, data)


def load_deepspeed_config(spec: dict[str, Any] | str) -> dict[str, Any]:
    """Return the DeepSpeed config as a fresh dict (reading the JSON file when ``spec`` is a path).

    Raises:
        ConfigError: the file is missing or is not a JSON object.
    """
    if isinstance(spec, dict):
        return json.loads(json.dumps(spec))  # deep copy; also proves it is JSON-serialisable
    p = Path(spec)
    if not p.is_file():
        raise ConfigError(
            f"deepspeed: file not found, got {spec!r} (relative paths are resolved against the "
            f"current directory {os.getcwd()!r}). Launch from the repository root or give an "
            "absolute path."
        )
    try:
        loaded = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"deepspeed: {spec} is not valid JSON: {e}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(
            f"deepspeed: {spec} must hold a JSON object, got {type(loaded).__name__}."
        )
    return loaded
