"""``layerfreeze train engine=megatron``: the recipe's entry points into the Megatron-core engine.

The recipe (:mod:`layerfreeze.train`) calls the same three functions on every engine module:

* :func:`check_run_config` -- before anything is written: the parallel layout fits the world
  size and the model (a Llama-style architecture with a Hugging Face <-> Megatron mapping,
  heads and query groups divisible by the tensor-parallel size), and
  ``megatron.transformer_impl: transformer_engine`` has CUDA and Transformer Engine;
* :func:`init_distributed` -- the default process group (gloo on CPU, NCCL on CUDA);
* :func:`runner_from_run_config` -- Megatron's model-parallel groups, this rank's ``GPTModel``
  chunk(s) shaped like the Hugging Face config, the weights (``model.path``: the checkpoint,
  converted shard by shard; ``model.architecture``: the same seeded initialisation the
  DeepSpeed engine uses, converted), every schedule phase's adapters installed by global layer
  index, and the :class:`~layerfreeze.engines.megatron.runner.MegatronRunner`.

The run ends with a merged Hugging Face export (``MegatronRunner.export_merged``), so a Hugging
Face checkpoint goes in and a Hugging Face checkpoint comes out.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import megatron.core  # noqa: F401  (get_engine reports a missing megatron-core here)
import torch

from layerfreeze.errors import ConfigError
from layerfreeze.utils.logging import get_logger, log_rank0

__all__ = [
    "check_run_config",
    "cuda_problem",
    "describe_layout",
    "describe_run_config",
    "init_distributed",
    "runner_from_run_config",
]

logger = get_logger(__name__)


def _hf_config(
    cfg: Any, vocab_size: int | None = None, special_ids: dict[str, int] | None = None
) -> Any:
    from layerfreeze.modeling import hf_model_config

    return hf_model_config(cfg.model, vocab_size=vocab_size, special_ids=special_ids)


def cuda_problem() -> str | None:
    """Why megatron-core cannot train here, or None.

    megatron-core allocates its DDP gradient buffers on ``torch.cuda.current_device()``
    (``_ParamAndGradBuffer``), which fails deep inside the run without CUDA (after the model is
    built, with ``Torch not compiled with CUDA enabled``). The test suite's CPU shim
    (``tests/helpers/megatron.py``) redirects that call, so asking it is the check.
    """
    if torch.cuda.is_available():
        return None
    try:
        torch.cuda.current_device()
    except (AssertionError, RuntimeError) as e:  # no CUDA build / no device
        return (
            f"engine: megatron needs CUDA (megatron-core allocates its gradient buffers on "
            f"torch.cuda.current_device()), and this machine has none ({str(e).splitlines()[0]}). "
            "Run on a CUDA machine, or use engine: deepspeed (runs on CPU); the CPU shim in "
            "tests/helpers/megatron.py is for the test suite only."
        )
    return None


def check_run_config(cfg: Any, world_size: int, *, check_device: bool = True) -> list[str]:
    """Validate the Megatron side of a run config before anything is written.

    Args:
        cfg: the validated ``RunConfig``.
        world_size: ranks the launcher started.
        check_device: also require CUDA (:func:`cuda_problem`); ``layerfreeze validate`` checks
            a config on any machine and passes False.

    Returns:
        Warning lines (settings that do not apply to this engine).

    Raises:
        ConfigError: every problem at once (layout vs world size, an architecture without a
            Hugging Face <-> Megatron mapping, heads / query groups not divisible by the
            tensor-parallel size, a pipeline deeper than the model, sequence parallelism with
            a sequence length the tensor-parallel size does not divide, the Transformer Engine
            spec without CUDA or Transformer Engine).
    """
    from layerfreeze.engines.megatron.convert import megatron_config_kwargs

    m = cfg.megatron
    tp, pp = m.tensor_model_parallel_size, m.pipeline_model_parallel_size
    problems: list[str] = []
    warnings: list[str] = []
    te_problem = None
    if m.transformer_impl == "transformer_engine":
        from layerfreeze.engines.megatron.convert import transformer_engine_problem

        te_problem = transformer_engine_problem()
    if te_problem:  # also says when CUDA is missing: one line for the one choice to change
        problems.append(te_problem)
    elif check_device and (no_cuda := cuda_problem()):
        problems.append(no_cuda)
    if m.sequence_parallel and cfg.data.seq_len % tp:
        problems.append(
            f"megatron.sequence_parallel: splits each sequence over the {tp} tensor-parallel "
            f"ranks, but {tp} does not divide data.seq_len={cfg.data.seq_len}. Use a data.seq_len "
            f"that is a multiple of {tp}, or set megatron.sequence_parallel: false."
        )
    if cfg.checkpoint.export_adapter:
        problems.append(
            "checkpoint.export_adapter: not available with engine: megatron (the merged Hugging "
            "Face export, checkpoint.export_final, holds the trained weights and a sidecar for "
            "gated adapters); set it to null or false."
        )
    if world_size % (tp * pp):
        problems.append(
            f"megatron: tensor_model_parallel_size x pipeline_model_parallel_size = {tp} x {pp} "
            f"does not divide the {world_size} ranks started. Launch a multiple of {tp * pp} ranks."
        )
    try:
        kw = megatron_config_kwargs(_hf_config(cfg), seq_length=cfg.data.seq_len)
    except ValueError as e:
        problems.append(f"model: {e}")
        kw = None
    if kw is not None:
        heads, groups, layers = kw["num_attention_heads"], kw["num_query_groups"], kw["num_layers"]
        if heads % tp or (groups or heads) % tp:
            problems.append(
                f"megatron.tensor_model_parallel_size: {tp} must divide the model's "
                f"{heads} attention heads and {groups or heads} query groups."
            )
        chunks = pp * (m.virtual_pipeline_model_parallel_size or 1)
        if layers % chunks:
            problems.append(
                f"megatron.pipeline_model_parallel_size: {layers} layers do not split evenly over "
                f"{pp} stages x {m.virtual_pipeline_model_parallel_size or 1} virtual chunks."
            )
    if cfg.model.attn_implementation != "sdpa":
        warnings.append(
            f"model.attn_implementation={cfg.model.attn_implementation!r} applies to Hugging Face "
            "models only; Megatron-core uses its own attention (ignored)."
        )
    if problems:
        raise ConfigError(problems)
    return warnings


def describe_layout(cfg: Any, world_size: int) -> list[str]:
    """The parallel layout of a run config, printable (``layerfreeze validate``): TP / PP / VP
    and data-parallel sizes, the padded-vocabulary masking, and which global layers each
    pipeline stage holds. Pure: call it
    after :func:`check_run_config` (which rejects layouts that do not divide)."""
    from layerfreeze.modeling import model_num_layers

    m = cfg.megatron
    tp, pp = m.tensor_model_parallel_size, m.pipeline_model_parallel_size
    vp = m.virtual_pipeline_model_parallel_size or 1
    layers = model_num_layers(cfg.model)
    per_chunk = layers // (pp * vp)
    lines = [
        f"Megatron layout for {world_size} rank(s): tensor parallel {tp} x pipeline parallel "
        f"{pp} (virtual chunks per stage: {vp}) x data parallel {world_size // (tp * pp)}; "
        f"{layers} layers, {per_chunk} per model chunk"
        + ("; distributed optimizer" if m.use_distributed_optimizer else "")
        + ("; Transformer Engine layer spec" if m.transformer_impl == "transformer_engine" else "")
        + (
            "; padded vocabulary rows masked out of the softmax"
            if m.mask_padded_vocab
            else "; padded vocabulary rows in the softmax (megatron.mask_padded_vocab: false)"
        )
    ]
    for stage in range(pp):
        chunks = [stage + i * pp for i in range(vp)]  # interleaved: chunk c sits on stage c % pp
        held = ", ".join(
            str(c * per_chunk) if per_chunk == 1 else f"{c * per_chunk}-{(c + 1) * per_chunk - 1}"
            for c in chunks
        )
        extra = [x for x, on in (("embeddings", stage == 0), ("final norm + output layer",
                                                              stage == pp - 1)) if on]
        lines.append(
            f"  stage {stage}: layers {held}" + (f" + {', '.join(extra)}" if extra else "")
        )
    return lines


def describe_run_config(cfg: Any) -> list[str]:
    """What ``layerfreeze validate`` prints for ``engine: megatron``: Megatron's config checks
    (:func:`check_run_config` without the CUDA requirement) and :func:`describe_layout`, for
    ``WORLD_SIZE`` ranks or, unset, the smallest world (TP x PP), then one ``note:`` per warning.

    Raises:
        ConfigError: a layout or setting Megatron cannot run.
    """
    m = cfg.megatron
    world = int(os.environ.get("WORLD_SIZE", "0")) or (
        m.tensor_model_parallel_size * m.pipeline_model_parallel_size
    )
    notes = check_run_config(cfg, world, check_device=False)
    return describe_layout(cfg, world) + [f"note: {n}" for n in notes]


def init_distributed(backend: str | None = None) -> None:
    """Initialise the default process group (no-op when up): NCCL with CUDA, gloo on CPU.

    Works under ``torchrun`` and as a single plain process (a world of one).
    """
    import torch.distributed as dist

    if dist.is_initialized():
        return
    from layerfreeze.utils.dist import single_process_rendezvous

    single_process_rendezvous()  # no launcher: a world of one on a free port
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)


def _init_model_parallel(cfg: Any) -> None:
    from megatron.core import parallel_state as ps

    m = cfg.megatron
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=m.tensor_model_parallel_size,
        pipeline_model_parallel_size=m.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=m.virtual_pipeline_model_parallel_size,
    )
    if torch.cuda.is_available():
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(cfg.train.seed)


def _build_chunks(cfg: Any, hf_config: Any) -> list[torch.nn.Module]:
    from megatron.core import parallel_state as ps

    from layerfreeze.engines.megatron.convert import build_gpt_from_hf_config
    from layerfreeze.modeling import DTYPES

    dtype = DTYPES[cfg.model.dtype]
    overrides: dict[str, Any] = {
        "params_dtype": dtype,
        "bf16": dtype == torch.bfloat16,
        "fp16": dtype == torch.float16,
        "sequence_parallel": cfg.megatron.sequence_parallel,
        "use_cpu_initialization": not torch.cuda.is_available(),
    }
    if cfg.model.gradient_checkpointing:
        overrides.update(
            recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1
        )
    vp = cfg.megatron.virtual_pipeline_model_parallel_size
    chunks = []
    for i in range(vp or 1):
        stage = i if vp else None
        pre = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage)
        post = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage)
        chunks.append(
            build_gpt_from_hf_config(
                hf_config, pre, post, stage, config_overrides=overrides,
                seq_length=cfg.data.seq_len,
                # pad the vocabulary only to a multiple of the TP size (the fewest padded
                # rows; megatron.mask_padded_vocab keeps them out of the softmax)
                make_vocab_size_divisible_by=1,
                # this module's build (a Megatron-Bridge build chooses its own TE layers), with
                # the layer spec megatron.transformer_impl names (checked by check_run_config)
                backend="layerfreeze",
                transformer_impl=cfg.megatron.transformer_impl,
            )
        )
    if torch.cuda.is_available():  # TE modules are built on the current CUDA device already
        chunks = [c.cuda() for c in chunks]
    return chunks


def runner_from_run_config(
    cfg: Any,
    *,
    schedule: Any,
    vocab_size: int,
    lr_scheduler: Callable | None = None,
    special_ids: dict[str, int] | None = None,
):
    """Build this rank's Megatron model from the run config, load its weights, apply every
    phase of ``schedule`` and return the :class:`MegatronRunner` (what ``layerfreeze train``
    calls).

    Args:
        cfg: the validated ``RunConfig`` (``engine: megatron``).
        schedule: the run's ``PlanSchedule``.
        vocab_size: the tokenizer's size (a built model gets at least this vocabulary).
        lr_scheduler: callable ``optimizer -> scheduler`` driving the unscaled base lr.
        special_ids: the tokenizer's pad / bos / eos ids for a model built from
            ``model.architecture`` (they also go into the merged export's config).

    Raises:
        ConfigError: a checkpoint whose vocabulary is smaller than the tokenizer's, or a plan
            that does not fit the model (layers it does not have, a TP size that does not
            divide a LoRA rank or the prefix's heads).
    """
    from layerfreeze.engines.megatron.convert import load_hf_weights
    from layerfreeze.engines.megatron.new_rows import record_vocab_size
    from layerfreeze.engines.megatron.provider import apply_megatron_plan
    from layerfreeze.engines.megatron.runner import MegatronRunner
    from layerfreeze.modeling import VocabResize, build_model

    _init_model_parallel(cfg)
    hf_config = _hf_config(cfg, vocab_size=vocab_size, special_ids=special_ids)
    resized = None
    resize = VocabResize.from_run_config(cfg)
    if resize is not None:
        # tokenizer.extend_from: grow the Hugging Face model to the extended tokenizer (the same
        # rows as the DeepSpeed engine), then convert it; megatron pads past the new size.
        resized = build_model(cfg.model, vocab_size, cfg.train.seed, special_ids, resize=resize)
        hf_config.vocab_size = int(resized.get_input_embeddings().weight.shape[0])
    if hf_config.vocab_size < vocab_size:
        raise ConfigError(
            f"model: the model's vocab_size ({hf_config.vocab_size}) is smaller than the "
            f"tokenizer's ({vocab_size}). Use the tokenizer that came with the checkpoint."
        )
    chunks = _build_chunks(cfg, hf_config)
    record_vocab_size(chunks, int(hf_config.vocab_size))  # new_rows never trains padded rows
    if cfg.megatron.mask_padded_vocab:
        # the padded rows (vocabulary padded to a multiple of TP) stay out of the softmax:
        # per-token losses and evaluation logits are the Hugging Face model's on every TP size
        from layerfreeze.engines.megatron.vocab import mask_padded_vocab

        mask_padded_vocab(chunks, int(hf_config.vocab_size))
    if resized is not None:
        load_hf_weights(chunks, resized.state_dict(), hf_config, backend="layerfreeze")
        del resized
        source = f"{cfg.model.path} resized to {hf_config.vocab_size} rows ({resize.init})"
    elif cfg.model.path is not None:
        load_hf_weights(chunks, cfg.model.path, hf_config, backend="layerfreeze")
        source = cfg.model.path
    else:
        # The seeded Hugging Face initialisation the DeepSpeed engine trains from, converted:
        # the same run config starts from the same weights on either engine.
        hf = build_model(cfg.model, vocab_size, cfg.train.seed, special_ids)
        load_hf_weights(chunks, hf.state_dict(), hf_config, backend="layerfreeze")
        del hf
        source = f"seeded {hf_config.model_type} architecture (train.seed={cfg.train.seed})"
    plans = schedule.plans
    try:
        applied = apply_megatron_plan(chunks, plans[0], install=tuple(plans[1:]))
    except ValueError as e:  # policy checks (TP divisibility, unsupported options) name the layer
        raise ConfigError(str(e)) from None
    if cfg.model.gradient_checkpointing:
        from layerfreeze.engines.megatron.recompute import prepare_recompute

        prepare_recompute(chunks)
    log_rank0(logger, "megatron: weights from %s", source)
    runner = MegatronRunner(
        chunks if len(chunks) > 1 else chunks[0],
        schedule=schedule,
        applied=applied,
        lr=cfg.optim.lr,
        weight_decay=cfg.optim.weight_decay,
        gradient_accumulation_steps=cfg.train.grad_accum_steps,
        clip_grad=cfg.optim.max_grad_norm,
        adam_beta1=cfg.optim.betas[0],
        adam_beta2=cfg.optim.betas[1],
        adam_eps=cfg.optim.eps,
        use_distributed_optimizer=cfg.megatron.use_distributed_optimizer,
        lr_scheduler=lr_scheduler,
        hf_config=hf_config,
        shift_labels=True,  # the recipe's micro-batches follow the HF convention (train.model_batch)
        checkpoint_format=cfg.checkpoint.format,
    )
    return runner
