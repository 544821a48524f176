"""Model discovery: find a decoder-only LM's blocks, their attention / MLP, and the non-layer parts.

Discovery is structural (no list of supported classes): the decoder blocks are the largest
``nn.ModuleList`` of same-class modules; inside a block, attention and MLP are found by common
attribute/class names with a structural fallback; embeddings, final norm and LM head come from
the standard ``get_input_embeddings`` / ``get_output_embeddings`` hooks and module types.
Works on meta-device models (only shapes are read).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from layerfreeze.engines.partition import full_shape, whole_numel

__all__ = ["LayerInfo", "ModelLayout", "discover_layout", "is_norm_module", "param_numel"]

_ATTN_NAME = re.compile(r"(^|_)(self_)?attn($|_)|attention", re.IGNORECASE)
_MLP_NAME = re.compile(r"mlp|feed_?forward|ffn|moe|ffw", re.IGNORECASE)
_NORM_CLASS = re.compile(r"norm", re.IGNORECASE)


def param_numel(p: torch.Tensor) -> int:
    """Full element count of a parameter, also when ZeRO-3 partitioned it
    (:func:`layerfreeze.engines.partition.whole_numel`)."""
    return whole_numel(p)


def is_norm_module(module: nn.Module) -> bool:
    """True for LayerNorm / RMSNorm-like modules (by type or class name, all params 1-D)."""
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or getattr(nn, "RMSNorm", None) and isinstance(
        module, nn.RMSNorm
    ):
        return True
    params = list(module.parameters(recurse=False))
    return bool(_NORM_CLASS.search(type(module).__name__)) and all(
        len(full_shape(p)) <= 1 for p in params
    )


@dataclass
class LayerInfo:
    """One decoder block.

    Attributes:
        index: 0-based global layer index.
        name: qualified module name inside the model (``model.layers.3``).
        module: the block itself.
        attn_name: attribute name of the attention submodule inside the block (``self_attn``).
        mlp_name: attribute name of the MLP submodule inside the block (``mlp``), or ``""`` when
            the MLP's linears sit directly on the block (OPT's ``fc1`` / ``fc2``).
        mlp_linears: with ``mlp_name == ""``, the names of those direct children in the order
            the block registers them (the first one takes the FFN input); empty otherwise.
    """

    index: int
    name: str
    module: nn.Module
    attn_name: str
    mlp_name: str
    mlp_linears: tuple[str, ...] = ()

    @property
    def attn(self) -> nn.Module:
        """The block's attention submodule."""
        return getattr(self.module, self.attn_name)

    @property
    def has_mlp_module(self) -> bool:
        """True when the MLP is one submodule (``mlp_name``), False when its linears are direct
        children of the block (``mlp_linears``)."""
        return bool(self.mlp_name)

    @property
    def mlp(self) -> nn.Module:
        """The module that owns the MLP's parameters: the MLP submodule, or the block itself
        when the MLP's linears are direct children (then see :attr:`mlp_linears`)."""
        return getattr(self.module, self.mlp_name) if self.mlp_name else self.module

    def mlp_modules(self) -> list[tuple[str, nn.Module]]:
        """``(path inside the block, module)`` of the MLP: the submodule, or each direct linear."""
        if self.mlp_name:
            return [(self.mlp_name, self.mlp)]
        return [(n, getattr(self.module, n)) for n in self.mlp_linears]


@dataclass
class ModelLayout:
    """What :func:`discover_layout` found.

    Attributes:
        layers: one :class:`LayerInfo` per decoder block, in order.
        model_type: ``config.model_type`` (or the class name when there is no config).
        hidden_size: model width.
        num_heads: attention (query) heads.
        num_kv_heads: key/value heads (== ``num_heads`` without GQA).
        head_dim: per-head width.
        embeddings: qualified names of the parameter-owning embedding modules (token, and
            learned positions when present, and a norm applied to the embeddings such as
            BLOOM's ``word_embeddings_layernorm``), outside the blocks.
        final_norm: qualified name of the norm after the last block, or None.
        lm_head: qualified name of the output projection, or None.
        tied_embeddings: True when the LM head's weight is the token embedding's weight.
        blocks_name: qualified name of the ``ModuleList`` holding the blocks.
        total_layers: decoder layers of the whole model. A pipeline stage holds a slice of them
            (``layers`` then carries their *global* indices); None means ``len(layers)``.
    """

    layers: list[LayerInfo]
    model_type: str
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    embeddings: list[str] = field(default_factory=list)
    final_norm: str | None = None
    lm_head: str | None = None
    tied_embeddings: bool = False
    blocks_name: str = ""
    total_layers: int | None = None

    @property
    def num_layers(self) -> int:
        """Decoder layers of the whole model (plans resolve against this count)."""
        return len(self.layers) if self.total_layers is None else self.total_layers

    @property
    def num_local_layers(self) -> int:
        """Decoder blocks held by this module (a pipeline stage holds a slice)."""
        return len(self.layers)


def _config_int(config, *names: str) -> int | None:
    for n in names:
        v = getattr(config, n, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def _find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The largest ModuleList (by parameter count) whose entries all share one class."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        kinds = {type(m) for m in mod}
        if len(kinds) != 1:
            continue
        numel = sum(param_numel(p) for p in mod.parameters())
        if numel == 0:
            continue
        if best is None or numel > best[0]:
            best = (numel, name, mod)
    if best is None:
        raise ValueError(
            f"{type(model).__name__}: could not find the decoder blocks (no nn.ModuleList of "
            "same-class modules holding parameters). layerfreeze supports decoder-only models "
            "whose blocks live in one nn.ModuleList (e.g. model.layers, transformer.h)."
        )
    return best[1], best[2]


def _children_with_params(block: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in block.named_children() if any(True for _ in m.parameters())]


def _is_leaf_with_params(module: nn.Module) -> bool:
    """A parameter-owning module with no parameter-owning children (a linear, not a container)."""
    return any(True for _ in module.parameters(recurse=False)) and not any(
        any(True for _ in c.parameters()) for c in module.children()
    )


def _find_attn_mlp(block: nn.Module, block_name: str) -> tuple[str, str, tuple[str, ...]]:
    """``(attn_name, mlp_name, mlp_linears)`` of one block (see :class:`LayerInfo`)."""
    children = _children_with_params(block)
    non_norm = [(n, m) for n, m in children if not is_norm_module(m)]
    attn = [n for n, m in non_norm if _ATTN_NAME.search(n) or "attention" in type(m).__name__.lower()]
    mlp = [
        n for n, m in non_norm
        if n not in attn and (_MLP_NAME.search(n) or _MLP_NAME.search(type(m).__name__))
    ]
    linears: tuple[str, ...] = ()
    if not attn and not mlp and len(non_norm) == 2:
        # Structural fallback: every decoder block runs attention before its MLP.
        attn, mlp = [non_norm[0][0]], [non_norm[1][0]]
    elif len(attn) == 1 and not mlp:
        # No MLP submodule: the FFN's linears may sit on the block itself (OPT fc1 / fc2).
        rest = [(n, m) for n, m in non_norm if n not in attn]
        if rest and all(_is_leaf_with_params(m) for _, m in rest):
            linears = tuple(n for n, _ in rest)
    names = ", ".join(f"{n} ({type(m).__name__})" for n, m in block.named_children()) or "none"
    problems = []
    if len(attn) != 1:
        problems.append(f"the attention submodule ({'ambiguous: ' + ', '.join(attn) if attn else 'none found'})")
    if len(mlp) != 1 and not linears:
        problems.append(
            "the MLP ("
            + ("ambiguous: " + ", ".join(mlp) if mlp else "no MLP submodule and no linears on the block")
            + ")"
        )
    if problems:
        raise ValueError(
            f"{block_name} ({type(block).__name__}): could not identify {' and '.join(problems)}; "
            f"the block's children are: {names}. layerfreeze needs one attention child and "
            "either one MLP child or the MLP's linears as direct children of each decoder block."
        )
    return attn[0], (mlp[0] if not linears else ""), linears


def _name_of(model: nn.Module, target: nn.Module | None) -> str | None:
    if target is None:
        return None
    for name, mod in model.named_modules(remove_duplicate=False):
        if mod is target:
            return name
    return None


def discover_layout(
    model: nn.Module,
    layer_indices: Sequence[int] | None = None,
    total_layers: int | None = None,
) -> ModelLayout:
    """Find the decoder blocks, their attention / MLP, embeddings, final norm and LM head.

    Args:
        model: a decoder-only causal LM (``transformers`` ``*ForCausalLM`` or similar), on any
            device including ``meta``.
        layer_indices: global 0-based index of each local block, from the engine (a pipeline
            stage holds a slice); default ``0..n-1``.
        total_layers: decoder layers of the whole model when this module holds a slice
            (default: the config's layer count, or the number of local blocks).

    Returns:
        The model's :class:`ModelLayout`.

    Raises:
        ValueError: when the blocks, a block's attention or MLP, or the head geometry cannot be
            found; the message names what is missing and what was seen instead.
    """
    blocks_name, blocks = _find_blocks(model)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    n_cfg = _config_int(config, "num_hidden_layers", "n_layer", "num_layers") if config else None
    if layer_indices is not None:
        layer_indices = [int(i) for i in layer_indices]
        if len(layer_indices) != len(blocks):
            raise ValueError(
                f"{type(model).__name__}: {len(layer_indices)} global layer indices given for "
                f"{len(blocks)} blocks in {blocks_name!r}."
            )
        total = total_layers if total_layers is not None else n_cfg
        if total is None or not all(0 <= i < total for i in layer_indices):
            raise ValueError(
                f"{type(model).__name__}: global layer indices {layer_indices} do not fit a "
                f"{total}-layer model."
            )
    elif n_cfg is not None and n_cfg != len(blocks):
        raise ValueError(
            f"{type(model).__name__}: the largest block list {blocks_name!r} has {len(blocks)} "
            f"entries but config.num_hidden_layers is {n_cfg}; could not identify the decoder blocks."
        )
    layers = []
    for i, block in enumerate(blocks):
        attn_name, mlp_name, mlp_linears = _find_attn_mlp(block, f"{blocks_name}.{i}")
        index = i if layer_indices is None else layer_indices[i]
        name = f"{blocks_name}.{i}"
        layers.append(LayerInfo(index, name, block, attn_name, mlp_name, mlp_linears))

    hidden = _config_int(config, "hidden_size", "n_embd", "d_model") if config else None
    heads = _config_int(config, "num_attention_heads", "n_head", "num_heads") if config else None
    missing = [n for n, v in (("hidden_size", hidden), ("num_attention_heads", heads)) if v is None]
    if missing:
        raise ValueError(
            f"{type(model).__name__}: could not read {', '.join(missing)} from the model config "
            f"({type(config).__name__ if config is not None else 'no config attribute'}). "
            "layerfreeze reads the head geometry from a transformers-style config."
        )
    kv = _config_int(config, "num_key_value_heads", "num_kv_heads") or heads
    if getattr(config, "multi_query", False) is True and not getattr(
        config, "new_decoder_architecture", False
    ):  # Falcon's new decoder architecture ignores multi_query and uses num_kv_heads
        kv = 1
    head_dim = _config_int(config, "head_dim") or hidden // heads

    block_ids = {id(m) for m in blocks.modules()}
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    tok_emb = get_in() if callable(get_in) else None
    head = get_out() if callable(get_out) else None
    embeddings: list[str] = []
    tok_name = _name_of(model, tok_emb)
    if tok_name is not None:
        embeddings.append(tok_name)
    for name, mod in model.named_modules():
        if id(mod) in block_ids or mod is tok_emb or mod is head:
            continue
        if isinstance(mod, nn.Embedding) and any(True for _ in mod.parameters(recurse=False)):
            embeddings.append(name)
    if not embeddings:
        raise ValueError(
            f"{type(model).__name__}: could not find the token embeddings "
            "(get_input_embeddings() returned nothing and no nn.Embedding outside the blocks)."
        )
    head_name = _name_of(model, head)
    tied = bool(
        head is not None and tok_emb is not None
        and getattr(head, "weight", None) is not None
        and head.weight is getattr(tok_emb, "weight", None)
    )
    final_norm = None
    for name, mod in model.named_modules():
        if id(mod) in block_ids or not name:
            continue
        if is_norm_module(mod) and any(True for _ in mod.parameters(recurse=False)):
            if "emb" in name.rsplit(".", 1)[-1].lower():
                embeddings.append(name)  # a norm on the embeddings (BLOOM)
            else:
                final_norm = name  # the last such module in registration order follows the blocks
    model_type = getattr(config, "model_type", None) or type(model).__name__
    return ModelLayout(
        layers=layers, model_type=model_type, hidden_size=hidden, num_heads=heads,
        num_kv_heads=kv, head_dim=head_dim, embeddings=embeddings, final_norm=final_norm,
        lm_head=head_name, tied_embeddings=tied, blocks_name=blocks_name,
        total_layers=(total_layers if total_layers is not None else n_cfg)
        if layer_indices is not None else None,
    )
