"""FLOP model of one training step under a layer plan: what the time ratios *should* be.

Counting rules (per token; a matmul with an ``N``-element weight costs ``2·N`` FLOPs):

- **forward**: ``2·N`` for every matmul of every layer, trainable or not.
- **input gradient**: ``2·N`` for a matmul whose *input* must receive a gradient, i.e. when a
  trainable parameter lies upstream of it (the issue's "every layer above the lowest trainable
  one", applied at matmul granularity: inside the lowest trainable layer the matmuls after its
  first trainable one also pass the gradient back, and with trainable embeddings every layer does).
- **weight gradient**: ``2·N`` for trainable weights only.

What each part of a Llama-family model contributes:

- Decoder block, in dataflow order (matmuls with the same ``stage`` are parallel branches and
  are not upstream of each other): ``q,k,v`` (stage 0) -> attention scores ``QKᵀ`` and ``PV``
  (stage 1) -> ``o`` (2) -> ``gate,up`` (3) -> ``down`` (4).
- Attention scores multiply two activations: forward ``4·s_ctx·d_attn`` per token
  (``d_attn = heads·head_dim``; ``s_ctx = (s+1)/2`` keys per query on average under the causal
  mask); backward twice the forward (gradients to both operands) whenever anything upstream
  trains; no weight gradient. Kernel recomputation is not modelled.
- Embeddings: a table lookup, 0 FLOPs forward; their (trainable) gradient is a scatter-add of
  ``s·d`` values, counted as 0. Trainable embeddings only matter because they make every layer
  above them pass input gradients back.
- LM head: a ``hidden×vocab`` matmul after the last block (forward always, input gradient when
  anything below trains, weight gradient when the head trains). Tied embeddings: the head is
  trainable exactly when the embeddings are.
- Norms, activations, softmax, loss and the optimizer step are elementwise and are not counted.
- LoRA of rank ``r`` on a ``d_in×d_out`` linear adds ``A`` (``d_in·r``, same stage as the
  linear) and ``B`` (``r·d_out``, half a stage later: ``B``'s input gradient is always needed to
  reach ``A``), both trainable. The HLPT gate ``sigmoid(w·h + b)`` is one per gated sub-block
  (attention / MLP), fed by the sub-block's input and shared by its adapters: a trainable
  ``hidden`` matmul in the stage of the sub-block's earliest adapted linear.
- Prefix of ``P`` virtual tokens on attention (learned keys/values, layerfreeze's ``prefix``):
  every query also attends to ``P`` prefix keys/values: a trainable ``2·P·d_attn`` op in the
  scores' stage (forward ``QK_pᵀ`` and ``A·V_p``; its weight gradient is ``dK_p``, ``dV_p``).
  The gate is a trainable ``hidden`` op on the attention input whose output only scales the
  prefix branch, so it sits beside the scores (not upstream of them). With a
  reparameterisation MLP of width ``m`` the ``P`` keys/values are computed once per step:
  ``P·(hidden·m + m·2·d_kv)`` MACs, amortised over the step's ``batch·s`` tokens.

Everything is pure arithmetic over dataclasses, so ``tests/unit/test_bench_flops.py`` can check
it against hand computations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

#: Stages of a Llama-family decoder block (see the module docstring).
STAGE_QKV, STAGE_SCORES, STAGE_O, STAGE_GATE_UP, STAGE_DOWN = 0.0, 1.0, 2.0, 3.0, 4.0

_LLAMA_LINEAR_STAGES = {
    "q_proj": STAGE_QKV,
    "k_proj": STAGE_QKV,
    "v_proj": STAGE_QKV,
    "o_proj": STAGE_O,
    "gate_proj": STAGE_GATE_UP,
    "up_proj": STAGE_GATE_UP,
    "down_proj": STAGE_DOWN,
}
ATTN_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Op:
    """One matmul, costed per token.

    Attributes:
        name: label for breakdowns (``layers.3.q_proj``, ``layers.3.q_proj.lora_a``).
        n: multiply-accumulates per token (for a weight matmul, the weight's element count).
        stage: position in the block's dataflow; ops in a later stage are downstream.
        trainable: a weight gradient (``2·n``) is computed.
        activation: both operands are activations (attention scores): the backward costs
            ``4·n`` whenever anything upstream trains, and there is no weight gradient.
    """

    name: str
    n: float
    stage: float
    trainable: bool = False
    activation: bool = False


@dataclass(frozen=True)
class Block:
    """A decoder layer (or the LM head): its matmuls."""

    name: str
    ops: tuple[Op, ...]


@dataclass(frozen=True)
class Network:
    """What one training step computes: blocks in forward order (LM head last)."""

    blocks: tuple[Block, ...]
    embeddings_trainable: bool = False


@dataclass(frozen=True)
class FlopBreakdown:
    """FLOPs of one step, split by pass (per token unless scaled with :meth:`scaled`)."""

    forward: float
    input_grad: float
    weight_grad: float
    per_block: dict[str, float] = field(default_factory=dict, compare=False)

    @property
    def total(self) -> float:
        """Forward + both backward parts."""
        return self.forward + self.input_grad + self.weight_grad

    def scaled(self, tokens: int) -> FlopBreakdown:
        """The same breakdown for ``tokens`` tokens."""
        return FlopBreakdown(
            self.forward * tokens,
            self.input_grad * tokens,
            self.weight_grad * tokens,
            {k: v * tokens for k, v in self.per_block.items()},
        )

    def to_dict(self) -> dict[str, float]:
        """Plain dict for JSON output (without the per-block split)."""
        return {
            "forward": self.forward,
            "input_grad": self.input_grad,
            "weight_grad": self.weight_grad,
            "total": self.total,
        }


def step_flops(net: Network) -> FlopBreakdown:
    """FLOPs per token of forward + backward for ``net`` under the module's counting rules.

    Args:
        net: the blocks with their trainability.

    Returns:
        The per-token breakdown.
    """
    upstream = net.embeddings_trainable  # a trainable parameter lies before the current point
    fwd = ig = wg = 0.0
    per_block: dict[str, float] = {}
    for block in net.blocks:
        block_total = 0.0
        for stage in sorted({op.stage for op in block.ops}):
            ops = [op for op in block.ops if op.stage == stage]
            for op in ops:
                f = 2.0 * op.n
                i = (4.0 if op.activation else 2.0) * op.n if upstream else 0.0
                w = 2.0 * op.n if (op.trainable and not op.activation) else 0.0
                fwd, ig, wg = fwd + f, ig + i, wg + w
                block_total += f + i + w
            upstream = upstream or any(op.trainable for op in ops)
        per_block[block.name] = block_total
    return FlopBreakdown(fwd, ig, wg, per_block)


def time_ratio(plan: Network, reference: Network) -> float:
    """Predicted step-time ratio ``plan / reference`` (FLOPs, compute-bound assumption)."""
    return step_flops(plan).total / step_flops(reference).total


@dataclass(frozen=True)
class LlamaDims:
    """Shapes of a Llama-family decoder that the FLOP model needs."""

    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab: int
    seq_len: int
    causal: bool = True
    batch: int = 1
    """Sequences per step (only amortises once-per-step costs such as a prefix reparam MLP)."""

    def linear_shape(self, name: str) -> tuple[int, int]:
        """``(d_in, d_out)`` of a block linear by its Llama attribute name."""
        d_attn, d_kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        shapes = {
            "q_proj": (self.hidden, d_attn),
            "k_proj": (self.hidden, d_kv),
            "v_proj": (self.hidden, d_kv),
            "o_proj": (d_attn, self.hidden),
            "gate_proj": (self.hidden, self.intermediate),
            "up_proj": (self.hidden, self.intermediate),
            "down_proj": (self.intermediate, self.hidden),
        }
        if name not in shapes:
            raise ValueError(
                f"linear {name!r} is not a Llama block linear; valid: {sorted(shapes)}."
            )
        return shapes[name]

    @property
    def keys_per_query(self) -> float:
        """Average number of keys a query attends to."""
        return (self.seq_len + 1) / 2 if self.causal else float(self.seq_len)


@dataclass(frozen=True)
class LoraCost:
    """LoRA on some of a block's linears."""

    rank: int
    targets: tuple[str, ...]
    gated: bool = False


@dataclass(frozen=True)
class PrefixCost:
    """A (gated) attention prefix of ``tokens`` virtual tokens."""

    tokens: int
    gated: bool = False
    reparam: int | None = None


@dataclass(frozen=True)
class LayerCost:
    """How one decoder layer trains: which base linears, plus adapters."""

    trainable_linears: tuple[str, ...] = ()
    lora: LoraCost | None = None
    prefix: PrefixCost | None = None

    @classmethod
    def full(cls) -> LayerCost:
        """Every base linear trains."""
        return cls(trainable_linears=tuple(_LLAMA_LINEAR_STAGES))

    @classmethod
    def frozen(cls) -> LayerCost:
        """Nothing in the layer trains."""
        return cls()


def llama_block(dims: LlamaDims, layer: LayerCost, name: str = "layer") -> Block:
    """The matmuls of one Llama-family decoder block under ``layer``'s training choice."""
    unknown = set(layer.trainable_linears) - set(_LLAMA_LINEAR_STAGES)
    if layer.lora is not None:
        unknown |= set(layer.lora.targets) - set(_LLAMA_LINEAR_STAGES)
    if unknown:
        raise ValueError(
            f"{name}: unknown linear(s) {sorted(unknown)}; valid: {sorted(_LLAMA_LINEAR_STAGES)}."
        )
    ops: list[Op] = []
    for lin, stage in _LLAMA_LINEAR_STAGES.items():
        d_in, d_out = dims.linear_shape(lin)
        ops.append(Op(f"{name}.{lin}", d_in * d_out, stage, lin in layer.trainable_linears))
        if layer.lora is not None and lin in layer.lora.targets:
            r = layer.lora.rank
            ops.append(Op(f"{name}.{lin}.lora_a", d_in * r, stage, True))
            ops.append(Op(f"{name}.{lin}.lora_b", r * d_out, stage + 0.5, True))
    if layer.lora is not None and layer.lora.gated:
        # One gate per sub-block, fed by the sub-block's input and scaling its adapters'
        # updates: it is upstream of what follows its earliest adapted linear, so it sits there.
        for sub, linears in (("attn", ATTN_LINEARS), ("mlp", MLP_LINEARS)):
            stages = [_LLAMA_LINEAR_STAGES[t] for t in layer.lora.targets if t in linears]
            if stages:
                ops.append(Op(f"{name}.{sub}.lora_gate", dims.hidden, min(stages), True))
    d_attn = dims.num_heads * dims.head_dim
    ops.append(
        Op(f"{name}.scores", 2 * dims.keys_per_query * d_attn, STAGE_SCORES, activation=True)
    )
    if layer.prefix is not None:
        p = layer.prefix.tokens
        ops.append(Op(f"{name}.prefix_attn", 2 * p * d_attn, STAGE_SCORES, True))
        if layer.prefix.reparam is not None:
            m, d_kv = layer.prefix.reparam, dims.num_kv_heads * dims.head_dim
            per_step = p * (dims.hidden * m + m * 2 * d_kv)
            ops.append(
                Op(f"{name}.prefix_mlp", per_step / (dims.batch * dims.seq_len), STAGE_SCORES, True)
            )
        if layer.prefix.gated:
            # reads the attention input but only scales the prefix branch: parallel to the scores
            ops.append(Op(f"{name}.prefix_gate", dims.hidden, STAGE_SCORES, True))
    return Block(name, tuple(ops))


def lm_head_block(dims: LlamaDims, trainable: bool) -> Block:
    """The ``hidden×vocab`` output projection."""
    return Block("lm_head", (Op("lm_head", dims.hidden * dims.vocab, 0.0, trainable),))


def llama_network(
    dims: LlamaDims,
    layers: Sequence[LayerCost],
    *,
    embeddings_trainable: bool,
    lm_head_trainable: bool,
    tied_embeddings: bool = False,
) -> Network:
    """A whole Llama-family causal LM under a per-layer training choice.

    Args:
        dims: model shapes.
        layers: one :class:`LayerCost` per decoder layer, bottom first.
        embeddings_trainable: the token embedding trains.
        lm_head_trainable: the LM head trains (ignored when tied: it follows the embeddings).
        tied_embeddings: the head shares the embedding matrix.
    """
    head_trainable = embeddings_trainable if tied_embeddings else lm_head_trainable
    blocks = [llama_block(dims, layer, f"layers.{i}") for i, layer in enumerate(layers)]
    blocks.append(lm_head_block(dims, head_trainable))
    return Network(tuple(blocks), embeddings_trainable)
