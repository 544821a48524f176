"""Real megatron-core 0.16.1 on CPU for tests: the CUDA shim, model-parallel set-up, a tiny GPTModel.

megatron-core allocates a few buffers on the current CUDA device, forks CUDA RNG states and
synchronises CUDA streams even when the model lives on the CPU. :func:`megatron_cpu_shim`
redirects exactly those spots to the CPU for its duration (a test fixture only: the library
never patches megatron). Everything else (the layers, the collectives over gloo, the 1F1B
pipeline schedule) is megatron-core's own code.

Usage inside a ``run_distributed`` body (``tests/helpers/dist.py``; the gloo group exists)::

    from tests.helpers.megatron import (
        megatron_cpu_shim, init_model_parallel, destroy_model_parallel, build_tiny_gpt)

    def _body(rank, world_size):
        with megatron_cpu_shim():
            init_model_parallel(tp=2, pp=1)
            try:
                model = build_tiny_gpt(tp=2, seed=0)
                tokens = tiny_tokens(batch=2, seq=8)           # [b, s] ids, same on every rank
                logits = model(tokens, position_ids(tokens), None)   # [b, s, vocab / tp]
            finally:
                destroy_model_parallel()

or as a pytest fixture (in-process, one rank): ``def test_x(megatron_cpu): ...`` after
``from tests.helpers.megatron import megatron_cpu  # noqa: F401``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import pytest
import torch

__all__ = [
    "megatron_cpu_shim",
    "megatron_cpu",
    "init_model_parallel",
    "destroy_model_parallel",
    "build_tiny_gpt",
    "tiny_config",
    "tiny_tokens",
    "position_ids",
    "forward_logits",
    "gather_tp_logits",
    "full_state_dict",
    "reference_weights",
    "load_full_weights",
]


class _CpuTorch:
    """``torch`` as seen by a megatron module, with ``device="cuda"`` factory calls on the CPU."""

    _FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange", "randn", "rand")

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._real, name)
        if name in self._FACTORIES:

            def factory(*args, **kwargs):
                dev = kwargs.get("device")
                if dev is not None and str(dev).startswith("cuda"):
                    kwargs["device"] = "cpu"
                return attr(*args, **kwargs)

            return factory
        return attr


def _cpu_get_tensor(self, tensor_shape, dtype, name, mem_alloc_context=None):
    """``GlobalMemoryBuffer.get_tensor`` on the CPU (a fresh tensor of the asked shape)."""
    return torch.empty(tuple(tensor_shape), dtype=dtype, device="cpu", requires_grad=False)


_TENSOR_TYPE = torch.Tensor.type


def _cuda_type_name(self, dtype=None, non_blocking=False, **kwargs):
    """``Tensor.type()`` naming a CPU tensor as its CUDA twin (``torch.cuda.FloatTensor``), the
    strings megatron's optimizers compare against; conversions (``dtype`` given) unchanged."""
    if dtype is None and not kwargs:
        name = _TENSOR_TYPE(self)
        return name.replace("torch.", "torch.cuda.", 1) if self.device.type == "cpu" else name
    return _TENSOR_TYPE(self, dtype, non_blocking, **kwargs)


def _null_fork(self, name: str = "model-parallel-rng"):
    return contextlib.nullcontext()


@contextlib.contextmanager
def megatron_cpu_shim() -> Iterator[None]:
    """Run megatron-core's CUDA-only spots on the CPU for the duration of the ``with`` block.

    Patched (and restored on exit):
      * ``megatron.core.utils.GlobalMemoryBuffer.get_tensor`` -> a CPU tensor of the shape/dtype;
      * ``tensor_parallel.random.CudaRNGStatesTracker.fork`` -> a null context (CPU RNG is used);
      * ``torch.cuda.current_device`` -> ``"cpu"`` and ``torch.cuda.synchronize`` -> no-op
        (pipeline p2p, tensor-parallel mappings, layers);
      * the ``torch`` seen by the pipeline schedules and ``transformer.utils`` creates its
        ``device="cuda"`` tensors on the CPU;
      * ``Tensor.cuda`` -> the tensor itself (tied embeddings across pipeline stages) and the
        CUDA RNG get/set of ``tensor_parallel.random`` -> no-ops (activation recomputation).
    """
    from megatron.core import utils as mutils
    from megatron.core.pipeline_parallel import p2p_communication, schedules
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer import utils as tutils

    saved: list[tuple[Any, str, Any]] = []

    def patch(obj: Any, name: str, value: Any) -> None:
        saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    try:
        patch(mutils.GlobalMemoryBuffer, "get_tensor", _cpu_get_tensor)
        patch(mrandom.CudaRNGStatesTracker, "fork", _null_fork)
        patch(torch.cuda, "current_device", lambda: "cpu")
        patch(torch.cuda, "synchronize", lambda *a, **k: None)
        for mod in (schedules, p2p_communication, tutils):
            patch(mod, "torch", _CpuTorch(torch))
        # Optimizers, gradient clipping and DDP buffers: ``device="cuda"`` scalars and
        # ``tensor.type() == "torch.cuda.FloatTensor"`` dtype checks (the CPU type string differs).
        from megatron.core.distributed import param_and_grad_buffer
        from megatron.core.optimizer import clip_grads, distrib_optimizer
        from megatron.core.optimizer import optimizer as moptimizer

        for mod in (moptimizer, clip_grads, distrib_optimizer, param_and_grad_buffer, mutils):
            patch(mod, "torch", _CpuTorch(torch))
        patch(torch.Tensor, "type", _cuda_type_name)
        # Tied embeddings on a pipeline: GPTModel syncs the two copies with
        # `weight.data.cuda()` + all-reduce. Activation recomputation saves/restores CUDA RNG.
        patch(torch.Tensor, "cuda", lambda self, *a, **k: self)
        patch(mrandom, "_get_cuda_rng_state", lambda *a, **k: None)
        patch(mrandom, "_set_cuda_rng_state", lambda *a, **k: None)
        yield
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)


@pytest.fixture
def megatron_cpu() -> Iterator[None]:
    """Pytest fixture form of :func:`megatron_cpu_shim` (one process; pair with
    ``init_model_parallel`` inside the test when a process group is needed)."""
    with megatron_cpu_shim():
        yield


# ---------------------------------------------------------------------------------------------
# Model parallel state


_OWN_WORLD = False


def init_model_parallel(tp: int = 1, pp: int = 1, seed: int = 0, **kwargs: Any) -> None:
    """``parallel_state.initialize_model_parallel(tp, pp)`` on the existing (gloo) world group.

    A single process without a process group gets a 1-rank gloo group first (on a free port).
    The model-parallel RNG on CPU is the plain torch generator, seeded with ``seed``
    (``model_parallel_cuda_manual_seed`` needs CUDA; ``use_cpu_initialization`` draws full
    weights and splits them, so every TP rank sees the same full matrices).

    Args:
        tp: tensor-model-parallel size.
        pp: pipeline-model-parallel size.
        seed: torch seed.
        **kwargs: passed to ``initialize_model_parallel`` (e.g.
            ``virtual_pipeline_model_parallel_size``).
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    global _OWN_WORLD
    if not dist.is_initialized():
        from tests.helpers.dist import find_free_port

        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(find_free_port())
        dist.init_process_group("gloo", rank=0, world_size=1)
        _OWN_WORLD = True
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, **kwargs
    )
    torch.manual_seed(seed)


def destroy_model_parallel() -> None:
    """Tear down megatron's parallel state; the world group too when
    :func:`init_model_parallel` created it (under run_distributed the helper owns it)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    global _OWN_WORLD
    parallel_state.destroy_model_parallel()
    if _OWN_WORLD and dist.is_initialized():
        dist.destroy_process_group()
    _OWN_WORLD = False


# ---------------------------------------------------------------------------------------------
# Tiny GPT


@contextlib.contextmanager
def megatron_parallel(tp: int = 1, pp: int = 1, **kwargs: Any) -> Iterator[None]:
    """megatron-core on the CPU with this TP / PP in this process (shim, init, torn down after)."""
    with megatron_cpu_shim():
        init_model_parallel(tp=tp, pp=pp, **kwargs)
        try:
            yield
        finally:
            destroy_model_parallel()


def tiny_config(
    num_layers: int = 4,
    hidden: int = 64,
    heads: int = 4,
    query_groups: int | None = 2,
    ffn: int = 128,
    tp: int = 1,
    pp: int = 1,
    swiglu: bool = True,
    **overrides: Any,
):
    """A Llama-style ``TransformerConfig`` (RMSNorm, no biases, SwiGLU, GQA) on the CPU, fp32."""
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    kwargs: dict[str, Any] = dict(
        num_layers=num_layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=query_groups,
        ffn_hidden_size=ffn,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        use_cpu_initialization=True,
        normalization="RMSNorm",
        add_bias_linear=False,
        gated_linear_unit=swiglu,
        activation_func=F.silu,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        bias_dropout_fusion=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.02,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
        sequence_parallel=False,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def build_tiny_gpt(
    num_layers: int = 4,
    hidden: int = 64,
    heads: int = 4,
    query_groups: int | None = 2,
    ffn: int = 128,
    vocab: int = 128,
    tp: int = 1,
    pp: int = 1,
    seed: int = 0,
    swiglu: bool = True,
    tied: bool = False,
    max_seq: int = 64,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    vp_stage: int | None = None,
    **config_overrides: Any,
):
    """A megatron-core ``GPTModel`` (local spec, rotary positions) for this rank's stage.

    Call after :func:`init_model_parallel` with the same ``tp``/``pp``. With
    ``use_cpu_initialization`` the full weight matrices are drawn from the torch generator
    seeded with ``seed`` and split across TP ranks, so models built with the same ``seed`` and
    different ``tp`` hold the same (gathered) weights.

    Args:
        num_layers: decoder layers of the whole model.
        hidden: model width.
        heads: attention heads.
        query_groups: key/value heads (GQA); None means ``heads``.
        ffn: MLP width.
        vocab: vocabulary size (a multiple of ``tp``).
        tp: tensor-parallel size.
        pp: pipeline-parallel size.
        seed: weight seed.
        swiglu: gated MLP with SiLU (else plain GELU-free SiLU MLP).
        tied: share the output layer's weight with the word embeddings.
        max_seq: maximum sequence length.
        pre_process: holds the embeddings (default: first pipeline stage).
        post_process: holds final norm and output layer (default: last stage).
        vp_stage: virtual-pipeline chunk index, if any.
        **config_overrides: extra ``TransformerConfig`` fields.

    Returns:
        The model in eval mode (dropout is 0 anyway), float32, on the CPU.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(
            ignore_virtual=vp_stage is None, vp_stage=vp_stage
        )
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(
            ignore_virtual=vp_stage is None, vp_stage=vp_stage
        )
    config = tiny_config(
        num_layers, hidden, heads, query_groups, ffn, tp, pp, swiglu, **config_overrides
    )
    torch.manual_seed(seed)
    model = GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=vocab,
        max_sequence_length=max_seq,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=tied,
        position_embedding_type="rope",
        vp_stage=vp_stage,
    )
    return model.eval()


def tiny_tokens(batch: int = 2, seq: int = 8, vocab: int = 128, seed: int = 1) -> torch.Tensor:
    """Seeded ``[batch, seq]`` token ids (the same on every rank)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def position_ids(tokens: torch.Tensor) -> torch.Tensor:
    """``[batch, seq]`` positions 0..seq-1."""
    b, s = tokens.shape
    return torch.arange(s).unsqueeze(0).expand(b, s)


def forward_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """A single-stage model's logits ``[batch, seq, vocab / tp]`` (causal mask built inside)."""
    return model(tokens, position_ids(tokens), None)


def gather_tp_logits(logits: torch.Tensor) -> torch.Tensor:
    """All-gather vocab-parallel logits ``[..., vocab / tp]`` over the TP group -> ``[..., vocab]``."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return logits
    return gather_from_tensor_model_parallel_region(logits)


# ---------------------------------------------------------------------------------------------
# Moving weights between layouts (tests compare TP/PP models against a TP=1, PP=1 reference)


def _global_key(model, name: str) -> str:
    """``decoder.layers.<local>.rest`` -> ``decoder.layers.<global>.rest`` (layer_number - 1)."""
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "decoder" and parts[1] == "layers":
        layer = model.decoder.layers[int(parts[2])]
        parts[2] = str(layer.layer_number - 1)
    return ".".join(parts)


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """Parameters of a TP=1 single-stage model keyed by global name (cloned)."""
    return {_global_key(model, n): p.detach().clone() for n, p in model.named_parameters()}


def reference_weights(seed: int = 3) -> dict[str, torch.Tensor]:
    """The TP=1 tiny model's weights for ``seed`` by global name, built in a TP=1 model-parallel
    state that is torn down again (every layout then loads the same model)."""
    init_model_parallel(tp=1, pp=1)
    full = full_state_dict(build_tiny_gpt(tp=1, seed=seed))
    destroy_model_parallel()
    return full


def _shard(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This TP rank's shard of ``full``, the way megatron's CPU initialisation splits it
    (``partition_dim`` / ``partition_stride``: chunks dealt round-robin to the ranks)."""
    from megatron.core import parallel_state

    if not getattr(param, "tensor_model_parallel", False):
        return full
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    rank = parallel_state.get_tensor_model_parallel_rank()
    world = parallel_state.get_tensor_model_parallel_world_size()
    chunk = param.shape[dim] // stride
    return torch.cat(torch.split(full, chunk, dim=dim)[rank::world], dim=dim)


@torch.no_grad()
def load_full_weights(model, full: dict[str, torch.Tensor], strict: bool = True) -> list[str]:
    """Copy a TP=1, PP=1 model's parameters (:func:`full_state_dict`) into this rank's stage,
    re-keying layers by global index and taking this rank's TP shard of each split tensor.

    Returns:
        Names (in ``model``) that had no entry in ``full`` (an error when ``strict``).
    """
    missing = []
    for name, p in model.named_parameters():
        key = _global_key(model, name)
        if key not in full:
            missing.append(name)
            continue
        shard = _shard(p, full[key])
        if shard.shape != p.shape:
            raise ValueError(f"{name}: shard {tuple(shard.shape)} != parameter {tuple(p.shape)}")
        p.copy_(shard)
    if strict and missing:
        raise KeyError(f"no full weight for {missing}")
    return missing
