"""Per-rank memory planner: weights, gradients, optimizer state, activations, phase-switch peak.

Pure arithmetic from the model's config and an applied plan (a model on the ``meta`` device is
enough, so a 70B config plans in seconds); no engine is imported. Run::

    layerfreeze plan --model config.json --preset freeze_deep --memory --world-size 64 \
        --zero-stage 3 --micro-batch 1 --seq-len 4096 --dtype bf16 --gradient-checkpointing

Model states follow DeepSpeed's ZeRO layout (``W`` data-parallel ranks, ``N`` parameters,
``T`` trainable parameters, ``e`` bytes per element of the training dtype, per rank):

========  ====================  ==========================  ============================
stage     weights               gradients                   optimizer (master + moments)
========  ====================  ==========================  ============================
0         ``e N``               ``e T`` (+ ``4 T`` mixed)   ``8 T`` (+ ``4 T`` mixed)
1         ``e N``               ``e T + 4 T / W``           ``12 T / W``
2         ``e N``               ``(e + 4) T / W``           ``12 T / W``
3         ``e N / W``           ``(e + 4) T / W``           ``12 T / W``
========  ====================  ==========================  ============================

"Mixed" means bf16/fp16 weights with fp32 master weights. ZeRO-1/2/3 always keep a separate fp32
master partition (also when training in fp32; measured). ZeRO 2/3 keep the
reduced gradient partition in the training dtype and step on an fp32 copy of it (``e + 4``).
ZeRO-3 additionally holds the largest module's whole parameters and gradients while it runs
(``2 e`` times its parameter count). With ``offload`` the fp32 master, moments and fp32
gradients (``16 T / W``) live in host memory, the reduced gradient going straight there (ZeRO-1
still keeps whole gradients on the device); at ZeRO-3 the parameter partitions too. Communication buckets (``reduce_bucket_size``, ``allgather_bucket_size``) are
not counted: they are what the DeepSpeed config sets them to.

Activations (saved for the backward pass) are counted per token for a Llama-style block as the
Hugging Face implementation with SDPA/flash attention keeps them; see
:func:`activation_bytes_per_token`. Layers below the lowest trainable layer keep nothing (no
gradient flows through them); a frozen layer above a trainable one keeps what the gradient of
its *input* needs (``freeze_deep``'s frozen top half), not the inputs of its frozen linears.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from layerfreeze.engines.partition import full_shape
from layerfreeze.errors import ConfigError

__all__ = [
    "DTYPE_BYTES",
    "ModelDims",
    "TrainSetup",
    "LayerActivation",
    "MemoryEstimate",
    "model_state_bytes",
    "activation_profile",
    "activation_bytes_per_token",
    "head_bytes_per_token",
    "estimate_memory",
    "estimate_schedule_memory",
    "estimate_rotation_memory",
    "format_bytes",
]

#: Bytes per element of each training dtype.
DTYPE_BYTES: dict[str, int] = {"fp32": 4, "bf16": 2, "fp16": 2}
_DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}

# Last names of the linear that writes a sub-block's output (its input is the attention output
# or the FFN's inner activation); any other linear in the sub-block reads the sub-block input.
_ATTN_OUT_NAMES = {"o_proj", "out_proj", "dense", "c_proj", "wo", "proj"}
_MLP_OUT_NAMES = {"down_proj", "c_proj", "dense_4h_to_h", "fc2", "w2", "wo"}


def format_bytes(n: float) -> str:
    """``n`` bytes as a short human string in binary units (``1.5 GiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


# --------------------------------------------------------------------------------------------
# inputs


@dataclass(frozen=True)
class ModelDims:
    """Shapes of a decoder-only transformer that activations depend on.

    Attributes:
        hidden: hidden size ``h``.
        num_layers: decoder blocks.
        num_heads: query heads ``a``.
        num_kv_heads: key/value heads (GQA; equal to ``num_heads`` without it).
        head_dim: per-head width.
        ffn: FFN inner width ``f``.
        vocab: vocabulary size ``V``.
    """

    hidden: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn: int
    vocab: int

    @classmethod
    def from_config(cls, config: Any) -> ModelDims:
        """Read the dims from a transformers config (Llama, Qwen2, Mistral, GPT-2, GPT-NeoX...).

        Raises:
            ValueError: the config lacks a hidden size, layer count, head count or vocabulary.
        """

        def first(*names: str) -> Any:
            for n in names:
                v = getattr(config, n, None)
                if v is not None:
                    return v
            return None

        h = first("hidden_size", "n_embd", "d_model")
        layers = first("num_hidden_layers", "n_layer", "num_layers")
        heads = first("num_attention_heads", "n_head")
        vocab = first("vocab_size")
        missing = [
            k
            for k, v in (
                ("hidden_size", h),
                ("num_hidden_layers", layers),
                ("num_attention_heads", heads),
                ("vocab_size", vocab),
            )
            if v is None
        ]
        if missing:
            raise ValueError(
                f"memory: the model config has no {', '.join(missing)}; the planner needs a "
                "decoder-only transformer config (hidden size, layers, heads, vocabulary)."
            )
        kv = first("num_key_value_heads") or heads
        head_dim = first("head_dim") or h // heads
        ffn = first("intermediate_size", "n_inner", "ffn_dim") or 4 * h
        return cls(int(h), int(layers), int(heads), int(kv), int(head_dim), int(ffn), int(vocab))


@dataclass(frozen=True)
class TrainSetup:
    """How the job runs: data-parallel ranks, ZeRO stage, batch shape, dtype, memory options.

    Attributes:
        world_size: data-parallel ranks ``W`` (>= 1).
        zero_stage: DeepSpeed ZeRO stage 0-3.
        micro_batch: sequences per rank per forward pass.
        seq_len: tokens per sequence.
        dtype: ``bf16`` / ``fp16`` (mixed precision, fp32 master weights) or ``fp32``.
        gradient_checkpointing: recompute each block's activations in the backward pass.
        offload: optimizer state (master, moments, fp32 gradients) in host memory; at ZeRO-3 the
            parameter partitions too (DeepSpeed ``offload_optimizer`` / ``offload_param``).
    """

    world_size: int = 1
    zero_stage: int = 0
    micro_batch: int = 1
    seq_len: int = 2048
    dtype: Literal["fp32", "bf16", "fp16"] = "bf16"
    gradient_checkpointing: bool = False
    offload: bool = False

    def __post_init__(self) -> None:
        problems = []
        for name in ("world_size", "micro_batch", "seq_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                problems.append(f"--{name.replace('_', '-')}: must be an integer >= 1, got {v!r}.")
        if self.zero_stage not in (0, 1, 2, 3):
            problems.append(f"--zero-stage: must be 0, 1, 2 or 3, got {self.zero_stage!r}.")
        dtype = _DTYPE_ALIASES.get(self.dtype, self.dtype)
        if dtype not in DTYPE_BYTES:
            problems.append(f"--dtype: must be one of fp32, bf16, fp16, got {self.dtype!r}.")
        else:
            object.__setattr__(self, "dtype", dtype)
        if self.offload and self.zero_stage == 0:
            problems.append(
                "--offload: DeepSpeed offloads only under ZeRO 1-3, got --zero-stage 0. "
                "Use --zero-stage 2 or 3 with --offload."
            )
        if problems:
            raise ConfigError(problems)

    @property
    def elem(self) -> int:
        """Bytes per element of the training dtype."""
        return DTYPE_BYTES[self.dtype]

    @property
    def mixed(self) -> bool:
        """bf16/fp16 weights with fp32 master weights."""
        return self.dtype != "fp32"


# --------------------------------------------------------------------------------------------
# model states


@dataclass(frozen=True)
class Split:
    """Bytes on the accelerator (``device``) and in host memory (``cpu``)."""

    device: float = 0.0
    cpu: float = 0.0

    def __add__(self, other: Split) -> Split:
        return Split(self.device + other.device, self.cpu + other.cpu)

    def to_dict(self) -> dict[str, int]:
        """``{"device": int, "cpu": int}`` (bytes, rounded up)."""
        return {"device": _ceil(self.device), "cpu": _ceil(self.cpu)}


def _ceil(x: float) -> int:
    return int(-(-x // 1))


def _place(nbytes: float, on_cpu: bool) -> Split:
    return Split(0.0, nbytes) if on_cpu else Split(nbytes, 0.0)


def model_state_bytes(
    total_params: int, trainable_params: int, setup: TrainSetup, largest_module_params: int = 0
) -> dict[str, Split]:
    """Per-rank bytes of weights, gradients and optimizer state under ``setup`` (see module doc).

    Args:
        total_params: every parameter element (adapters included, tied weights once).
        trainable_params: trainable elements.
        setup: world size, ZeRO stage, dtype, offload.
        largest_module_params: parameters of the largest module (ZeRO-3 gathers one module's
            whole parameters, and its whole gradient, at a time).

    Returns:
        ``weights``, ``zero3_gather``, ``gradients``, ``optimizer`` (fp32 master + two Adam
        moments), each a :class:`Split`.
    """
    n, t, w, e, s = total_params, trainable_params, setup.world_size, setup.elem, setup.zero_stage
    off = setup.offload
    if s == 0:
        weights = Split(e * n)
        grads = Split(e * t + (4 * t if setup.mixed else 0))
        optim = Split(8 * t + (4 * t if setup.mixed else 0))
    elif s in (1, 2):
        weights = Split(e * n)
        full_grads = e * t if s == 1 else 0.0  # ZeRO-1 keeps whole gradients, ZeRO-2 partitions
        # Offloaded, the reduced partition goes straight into the fp32 host buffer.
        part = (e if s == 2 and not off else 0) * t / w
        grads = Split(full_grads + part) + _place(4 * t / w, off)
        optim = _place(12 * t / w, off)
    else:
        weights = _place(e * n / w, off)
        grads = Split(cpu=4 * t / w) if off else Split((e + 4) * t / w)
        optim = _place(12 * t / w, off)
    gather = Split(2 * e * largest_module_params if s == 3 else 0)
    return {"weights": weights, "zero3_gather": gather, "gradients": grads, "optimizer": optim}


# --------------------------------------------------------------------------------------------
# activations


@dataclass
class LayerActivation:
    """What one decoder block keeps for the backward pass (derived from its trainable names).

    Attributes:
        index: global layer index.
        in_path: a gradient flows through the block (it is at or above the lowest trainable
            layer, or the embeddings train).
        trainable_norms: norms with a trainable weight.
        input_groups: inputs of trainable linears: ``attn_in`` (normed block input, h wide),
            ``attn_out`` (attention output, already kept by attention), ``mlp_in`` (h),
            ``mlp_act`` (FFN inner activation, f).
        lora: one ``(rank, gated)`` per LoRA adapter.
        gated_subblocks: sub-blocks with an HLPT token gate.
        prefix_tokens: prefix tokens of a prefix branch (0 without one).
        prefix_gated: the prefix branch is gated.
    """

    index: int
    in_path: bool = False
    trainable_norms: int = 0
    input_groups: set[str] = field(default_factory=set)
    lora: list[tuple[int, bool]] = field(default_factory=list)
    gated_subblocks: set[str] = field(default_factory=set)
    prefix_tokens: int = 0
    prefix_gated: bool = False

    @property
    def trainable(self) -> bool:
        """The block has any trainable parameter."""
        return bool(self.trainable_norms or self.input_groups or self.lora or self.prefix_tokens)


def _classify_linear(path: Sequence[str]) -> str:
    """Input group of the linear at ``path`` (module names inside the block)."""
    in_attn = any("attn" in p or "attention" in p for p in path[:-1])
    last = path[-1]
    if in_attn:
        return "attn_out" if last in _ATTN_OUT_NAMES else "attn_in"
    return "mlp_act" if last in _MLP_OUT_NAMES else "mlp_in"


def activation_profile(applied: Any) -> tuple[list[LayerActivation], dict[str, bool]]:
    """Per-layer activation profile of an applied plan, and which non-layer parts train.

    Args:
        applied: an :class:`~layerfreeze.apply.AppliedPlan` (a meta-device model is enough).

    Returns:
        ``(layers, parts)``: one :class:`LayerActivation` per layer in global index order, and
        ``{"embeddings": bool, "final_norm": bool, "lm_head": bool}`` (trainable).
    """
    from layerfreeze.models import is_norm_module

    groups = applied.layer_groups()
    params = dict(applied.model.named_parameters())
    parts = {p: bool(groups.get(p)) for p in ("embeddings", "final_norm", "lm_head")}
    if applied.layout.tied_embeddings:
        parts["lm_head"] = parts["embeddings"]
    out = []
    for layer in applied.layout.layers:
        prof = LayerActivation(layer.index)
        spec = applied.resolved.layers[layer.index]
        if spec.name == "prefix":
            prof.prefix_tokens = int(getattr(spec.options, "tokens", 0) or 0)
            prof.prefix_gated = bool(getattr(spec.options, "gated", False))
        modules = dict(layer.module.named_modules())
        for name in groups.get(f"layers.{layer.index}", []):
            rel = name[len(layer.name) + 1 :].split(".")
            if any(p.startswith("prefix_") for p in rel):
                prof.prefix_tokens = prof.prefix_tokens or 1
                continue
            if any(p.startswith("lora_gate") for p in rel):
                prof.gated_subblocks.add("attn" if any("attn" in p for p in rel) else "mlp")
                continue
            if "lora_adapter" in rel:
                base = rel[: rel.index("lora_adapter")]
                prof.input_groups.add(_classify_linear(base))
                if rel[-1] == "lora_a":
                    rank = int(full_shape(params[name])[0])
                    prof.lora.append((rank, bool(getattr(spec.options, "gated", False))))
                continue
            owner = modules.get(".".join(rel[:-1]))
            if owner is not None and is_norm_module(owner):
                if rel[-1] == "weight":
                    prof.trainable_norms += 1
                continue
            prof.input_groups.add(_classify_linear(rel[:-1]))
        out.append(prof)
    lowest = next((p.index for p in out if p.trainable), None)
    for p in out:
        p.in_path = parts["embeddings"] or (lowest is not None and p.index >= lowest)
    return out, parts


def activation_bytes_per_token(layer: LayerActivation, dims: ModelDims, setup: TrainSetup) -> int:
    """Bytes one block keeps per token for the backward pass (no gradient checkpointing).

    Counted as the Hugging Face Llama block keeps them with SDPA / flash attention (``e`` =
    dtype bytes, ``h`` hidden, ``q = heads * head_dim``, ``k = kv_heads * head_dim``, ``f``
    FFN width, ``a`` heads); a block with no gradient through it keeps nothing. Every block in
    the gradient path keeps:

    * each RMSNorm's input upcast to fp32 plus its fp32 ``rstd``: ``2 (4h + 4)``;
    * attention's ``q, k, v`` and output plus fp32 log-sum-exp: ``e (2q + 2k) + 4a``;
    * SwiGLU's ``gate``, ``silu(gate)`` and ``up``: ``3 e f``.

    Trainable parts add what their weight gradients read: a norm weight ``e h``; the normed
    input of trainable attention / FFN input linears ``e h`` each (shared by q/k/v and by
    gate/up); the FFN activation read by a trainable down projection ``e f`` (the attention
    output read by ``o_proj`` is already kept). A LoRA adapter adds its rank-``r`` intermediate
    ``e r`` (gated: ``+ 4r + 4``, the fp32 copy and the gate), a gated sub-block its fp32 gate
    input ``4h`` (when ``e < 4``); a prefix branch (fp32) ``4 (2 a P + 2q)`` (+ ``4q`` for the
    upcast query when ``e < 4``, + ``4 (a + 2)`` gated).
    """
    if not layer.in_path:
        return 0
    e, h, a = setup.elem, dims.hidden, dims.num_heads
    q, k, f = a * dims.head_dim, dims.num_kv_heads * dims.head_dim, dims.ffn
    total = 2 * (4 * h + 4) + e * (2 * q + 2 * k) + 4 * a + 3 * e * f
    total += e * h * layer.trainable_norms
    widths = {"attn_in": h, "attn_out": 0, "mlp_in": h, "mlp_act": f}
    total += sum(e * widths[g] for g in layer.input_groups)
    for r, gated in layer.lora:
        total += e * r + ((4 * r + 4) if gated else 0)
    if e < 4:
        total += 4 * h * len(layer.gated_subblocks)
    if layer.prefix_tokens:
        total += 4 * (2 * a * layer.prefix_tokens + 2 * q) + (4 * q if e < 4 else 0)
        total += 4 * (a + 2) if layer.prefix_gated else 0
    return total


def head_bytes_per_token(
    layers: Sequence[LayerActivation], parts: dict[str, bool], dims: ModelDims, setup: TrainSetup
) -> int:
    """Bytes per token kept by the final norm, LM head and loss (0 when nothing trains).

    The loss keeps the fp32 log-softmax (``4 V``) and the labels (8); the final norm its fp32
    input and ``rstd`` when a gradient flows through it (``4h + 4``), plus ``e h`` per
    trainable final-norm weight and LM head (their weight gradients read their inputs).
    """
    anything = any(parts.values()) or any(p.trainable for p in layers)
    if not anything:
        return 0
    e, h = setup.elem, dims.hidden
    total = 4 * dims.vocab + 8
    if parts["final_norm"] or parts["embeddings"] or any(p.in_path for p in layers):
        total += 4 * h + 4
    total += e * h * (int(parts["final_norm"]) + int(parts["lm_head"]))
    return total


# --------------------------------------------------------------------------------------------
# the estimate


@dataclass
class MemoryEstimate:
    """Per-rank memory of one plan (one schedule phase) under a :class:`TrainSetup`.

    Attributes:
        setup: the job's shape.
        total_params / trainable_params: parameter elements.
        carried_params: trainable parameters carried from the previous phase at the switch
            into this one (0 for the first phase).
        largest_module_params: the largest module's parameters (ZeRO-3 working set).
        parts: ``weights``, ``zero3_gather``, ``gradients``, ``optimizer``, ``activations``.
        phase_switch: extra memory while switching into this phase: each rank's own partition
            of the fp32 master and both Adam moments of the carried parameters (12 bytes per
            carried parameter / W under ZeRO 1-3, every rank a whole copy under ZeRO-0), staged
            in host memory as the DeepSpeed adapter does.
        activation_per_token: bytes per token by layer index, plus ``head``.
    """

    setup: TrainSetup
    total_params: int
    trainable_params: int
    carried_params: int
    largest_module_params: int
    parts: dict[str, Split]
    phase_switch: Split
    activation_per_token: dict[str, int]

    @property
    def model_states(self) -> Split:
        """Weights + ZeRO-3 gathered module + gradients + optimizer state."""
        return (
            self.parts["weights"]
            + self.parts["zero3_gather"]
            + self.parts["gradients"]
            + self.parts["optimizer"]
        )

    @property
    def steady(self) -> Split:
        """Model states + activations: the peak of a training step."""
        return self.model_states + self.parts["activations"]

    @property
    def switch_peak(self) -> Split:
        """During the switch into this phase: the new engine's weights and optimizer state plus
        the carried copies (no step is running, so no gradients or activations)."""
        return self.parts["weights"] + self.parts["optimizer"] + self.phase_switch

    @property
    def peak(self) -> Split:
        """Larger of the step peak and the switch peak, per memory kind."""
        a, b = self.steady, self.switch_peak
        return Split(max(a.device, b.device), max(a.cpu, b.cpu))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: inputs, every part, totals (bytes)."""
        s = self.setup
        return {
            "setup": {
                "world_size": s.world_size,
                "zero_stage": s.zero_stage,
                "micro_batch": s.micro_batch,
                "seq_len": s.seq_len,
                "dtype": s.dtype,
                "gradient_checkpointing": s.gradient_checkpointing,
                "offload": s.offload,
            },
            "total_params": self.total_params,
            "trainable_params": self.trainable_params,
            "carried_params": self.carried_params,
            "largest_module_params": self.largest_module_params,
            **{k: v.to_dict() for k, v in self.parts.items()},
            "model_states": self.model_states.to_dict(),
            "step_total": self.steady.to_dict(),
            "phase_switch": self.phase_switch.to_dict(),
            "switch_peak": self.switch_peak.to_dict(),
            "peak": self.peak.to_dict(),
            "activation_bytes_per_token": self.activation_per_token,
        }

    def table(self) -> str:
        """A small fixed-width table (device and host memory per rank)."""
        s = self.setup
        rows = [
            ("weights", self.parts["weights"]),
            ("zero-3 gathered module", self.parts["zero3_gather"]),
            ("gradients", self.parts["gradients"]),
            ("optimizer (fp32 master + Adam)", self.parts["optimizer"]),
            ("activations", self.parts["activations"]),
            ("step total", self.steady),
            ("phase switch carry", self.phase_switch),
            ("peak", self.peak),
        ]
        if s.zero_stage != 3:
            rows.pop(1)
        width = max(len(r[0]) for r in rows)
        lines = [
            f"memory per rank: {s.world_size} rank(s), ZeRO-{s.zero_stage}, {s.dtype}, micro-batch "
            f"{s.micro_batch} x {s.seq_len} tokens"
            + (", gradient checkpointing" if s.gradient_checkpointing else "")
            + (", offload" if s.offload else ""),
            f"{'':<{width}}  {'device':>10}  {'cpu':>10}",
        ]
        for name, v in rows:
            lines.append(
                f"{name:<{width}}  {format_bytes(v.device):>10}  {format_bytes(v.cpu):>10}"
            )
        return "\n".join(lines)


def _largest_module_params(model: Any) -> int:
    from layerfreeze.models import param_numel

    best = 0
    for m in model.modules():
        n = sum(param_numel(p) for p in m.parameters(recurse=False))
        best = max(best, n)
    return best


def estimate_memory(
    applied: Any,
    setup: TrainSetup,
    dims: ModelDims | None = None,
    previous_trainable: Iterable[str] | None = None,
) -> MemoryEstimate:
    """Per-rank memory of ``applied`` (its current plan) under ``setup``.

    Args:
        applied: an :class:`~layerfreeze.apply.AppliedPlan`; a model on ``meta`` is enough.
        setup: world size, ZeRO stage, batch shape, dtype, checkpointing, offload.
        dims: the model's dims (default: read from ``applied.model.config``).
        previous_trainable: names trained by the previous schedule phase; parameters in both
            are carried over at the switch into this phase.

    Returns:
        The :class:`MemoryEstimate`.
    """
    from layerfreeze.models import param_numel

    dims = dims or ModelDims.from_config(applied.model.config)
    total, trainable = applied.num_total_params(), applied.num_trainable_params()
    largest = _largest_module_params(applied.model)
    parts: dict[str, Split] = dict(model_state_bytes(total, trainable, setup, largest))

    layers, non_layer = activation_profile(applied)
    per_layer = {str(p.index): activation_bytes_per_token(p, dims, setup) for p in layers}
    head = head_bytes_per_token(layers, non_layer, dims, setup)
    tokens = setup.micro_batch * setup.seq_len
    if setup.gradient_checkpointing:
        # Each checkpointed block keeps its input; the block being recomputed in the backward
        # pass holds its whole set once.
        kept = setup.elem * dims.hidden * len(layers) + max(per_layer.values(), default=0)
        act_per_token = {
            "checkpointed_inputs": setup.elem * dims.hidden * len(layers),
            "recomputed_block": max(per_layer.values(), default=0),
            "head": head,
        }
        per_token = kept + head
    else:
        act_per_token = {**per_layer, "head": head}
        per_token = sum(per_layer.values()) + head
    parts["activations"] = Split(per_token * tokens)

    carried = 0
    if previous_trainable is not None:
        params = dict(applied.model.named_parameters())
        now = set(applied.trainable_names())
        carried = sum(param_numel(params[n]) for n in set(previous_trainable) & now)
    w = 1 if setup.zero_stage == 0 else setup.world_size
    switch = Split(0.0, 12 * carried / w)
    return MemoryEstimate(setup, total, trainable, carried, largest, parts, switch, act_per_token)


def estimate_schedule_memory(
    build_model: Any, plans: Sequence[Any], setup: TrainSetup, carry: bool = True
) -> list[MemoryEstimate]:
    """One :class:`MemoryEstimate` per phase of a plan schedule.

    Args:
        build_model: callable returning a fresh model (``meta`` device is enough).
        plans: each phase's plan spec, in order.
        setup: the job's shape.
        carry: the schedule's ``optimizer_state`` is ``carry`` (parameters trainable on both
            sides of a switch keep their state); False for ``reset`` (nothing is carried, so
            every phase's ``phase_switch`` is 0).
    """
    from layerfreeze.apply import apply_plan

    applied = apply_plan(build_model(), plans[0], install=tuple(plans[1:]))
    out, previous = [], None
    for plan in plans:
        applied.switch_plan(plan)
        out.append(estimate_memory(applied, setup, previous_trainable=previous))
        previous = applied.trainable_names() if carry else None
    return out


def estimate_rotation_memory(
    build_model: Any, rotation: Any, setup: TrainSetup, total_steps: int
) -> list[tuple[tuple[int, ...], MemoryEstimate]]:
    """Per-rank memory of each phase of a rotating-layer (LISA / BAdam) run.

    The run's phases are those of :func:`~layerfreeze.rotation.build_rotation_schedule` (one
    per interval; consecutive intervals with the same layers are one phase), estimated as the
    engines run them: a switch rebuilds the engine over the new trainable set, so each phase
    holds gradients and optimizer state for its own layers and ``always`` parts only. The layers
    sampled in earlier intervals hold nothing, with ``optimizer_state: carry`` too: ``carry``
    keeps the state of the parameters trainable on both sides of a switch (the ``always`` parts
    and layers sampled twice in a row), staged in host memory during the switch
    (``phase_switch``); ``reset`` carries nothing. The steady per-step memory is therefore the
    same for ``carry`` and ``reset``; only the switch peak differs. The run's peak is
    ``max(e.peak for _, e in result)``.

    Args:
        build_model: callable returning a fresh model (``meta`` device is enough).
        rotation: a :class:`~layerfreeze.rotation.RotationConfig`.
        setup: the job's shape.
        total_steps: optimizer steps of the run (how many intervals are sampled).

    Returns:
        ``(layers, estimate)`` per phase, in order.

    Raises:
        ConfigError: ``layers``/``block`` larger than the model.
    """
    from layerfreeze.rotation import build_rotation_schedule, interval_layers

    model = build_model()
    num_layers = ModelDims.from_config(model.config).num_layers
    schedule = build_rotation_schedule(rotation, num_layers, total_steps)
    models = iter([model])
    estimates = estimate_schedule_memory(
        lambda: next(models, None) or build_model(), schedule.plans, setup,
        carry=schedule.carry_state,
    )
    starts = [0] + [ph.until_step // rotation.interval for ph in schedule.phases[:-1]]
    layers = [interval_layers(rotation, i, num_layers) for i in starts]
    return list(zip(layers, estimates, strict=True))
