"""The :class:`~layerfreeze.models.ModelLayout` of a megatron-core ``GPTModel`` pipeline stage.

Megatron numbers each ``TransformerLayer`` with ``layer_number``: 1-based and global across
pipeline stages and virtual-pipeline chunks. The layout addresses layers by the 0-based global
index ``layer_number - 1``, so a plan resolved for the whole model lands on the right layers of
every stage. Embeddings live on the first stage (``pre_process``), the final norm and the
output layer on the last (``post_process``). With tied embeddings on a multi-stage pipeline the
last stage holds its own copy of the shared weight in ``output_layer.weight`` (kept equal through
Megatron's embedding group); the layout lists it among the embeddings, so the copy follows the
plan's ``embeddings`` policy just like the word embeddings on the first stage.

Usage (before DDP wrapping and before the optimizer is built)::

    layout = megatron_layout(model)                  # one GPTModel
    applied = apply_plan(model, plan, layout=layout)

    chunks = [...]                                   # virtual-pipeline chunks of this rank
    applied = apply_plan(chunks_module(chunks), plan, layout=megatron_layout(chunks))
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from layerfreeze.models import LayerInfo, ModelLayout

__all__ = ["megatron_layout", "chunks_module", "register_megatron_policies"]

_ATTN = "self_attention"
_MLP = "mlp"


def register_megatron_policies() -> None:
    """Register the tensor-parallel LoRA dispatchers, the megatron prefix installer and the
    vocabulary-parallel ``new_rows`` handler (idempotent)."""
    from layerfreeze.engines.megatron import lora, new_rows, prefix
    from layerfreeze.engines.megatron.sharded import adapter_sharded_state_dict
    from layerfreeze.policies.gate import register_sharded_state_dict

    lora.register()
    prefix.register()
    new_rows.register()
    register_sharded_state_dict(adapter_sharded_state_dict)  # gates in megatron checkpoints


def chunks_module(chunks: Sequence[nn.Module]) -> nn.ModuleList:
    """One module over the virtual-pipeline chunks, whose parameter names (``<chunk>.<name>``)
    are the names :func:`megatron_layout` gives for a list of chunks."""
    return nn.ModuleList(list(chunks))


def _unwrap(model: nn.Module) -> tuple[nn.Module, str]:
    """The ``GPTModel`` inside DDP / Float16Module wrappers and the name prefix they add.

    Not :func:`layerfreeze.engines.common.unwrap_module` (the one wrapper peeler) because the
    layout names parameters as the *wrapped* model does: it needs the ``module.`` prefix each
    wrapper adds, and checks that what is inside is a ``GPTModel``.
    """
    prefix = ""
    while not hasattr(model, "decoder") and isinstance(getattr(model, "module", None), nn.Module):
        model, prefix = model.module, prefix + "module."
    if not hasattr(model, "decoder") or not hasattr(model.decoder, "layers"):
        raise ValueError(
            f"{type(model).__name__}: not a megatron-core GPTModel (expected a .decoder with "
            ".layers, as GPTModel has); megatron_layout takes the model a Megatron model "
            "provider returns, or the list of its virtual-pipeline chunks."
        )
    if getattr(model, "config", None) is None:
        raise ValueError(f"{type(model).__name__}: has no TransformerConfig (.config).")
    return model, prefix


def _chunk_parts(model: nn.Module, prefix: str) -> dict:
    """Layers, embeddings, final norm, lm head of one GPTModel (names with ``prefix``)."""
    model, inner = _unwrap(model)
    prefix += inner
    layers = []
    for j, layer in enumerate(model.decoder.layers):
        number = getattr(layer, "layer_number", None)
        if not isinstance(number, int) or number < 1:
            raise ValueError(
                f"{prefix}decoder.layers.{j} ({type(layer).__name__}): no 1-based layer_number; "
                "megatron_layout needs megatron-core TransformerLayers."
            )
        for sub in (_ATTN, _MLP):
            if not isinstance(getattr(layer, sub, None), nn.Module):
                raise ValueError(
                    f"{prefix}decoder.layers.{j} ({type(layer).__name__}): no {sub!r} submodule; "
                    f"megatron_layout supports GPT layers with {_ATTN} and {_MLP}."
                )
        layers.append(LayerInfo(number - 1, f"{prefix}decoder.layers.{j}", layer, _ATTN, _MLP))
    tied = bool(getattr(model, "share_embeddings_and_output_weights", False))
    embeddings, final_norm, lm_head = [], None, None
    embedding = getattr(model, "embedding", None)
    if getattr(model, "pre_process", False) and isinstance(embedding, nn.Module):
        for name in ("word_embeddings", "position_embeddings"):
            mod = getattr(embedding, name, None)
            if isinstance(mod, nn.Module) and any(True for _ in mod.parameters()):
                embeddings.append(f"{prefix}embedding.{name}")
    if isinstance(getattr(model.decoder, "final_layernorm", None), nn.Module):
        final_norm = f"{prefix}decoder.final_layernorm"
    output = getattr(model, "output_layer", None)
    if getattr(model, "post_process", False) and isinstance(output, nn.Module):
        lm_head = f"{prefix}output_layer"
        if tied and getattr(output, "weight", None) is not None:
            # Last stage's copy of the shared weight: it follows the embeddings' policy.
            embeddings.append(lm_head)
    return {
        "model": model,
        "layers": layers,
        "embeddings": embeddings,
        "final_norm": final_norm,
        "lm_head": lm_head,
        "tied": tied,
    }


def megatron_layout(model_or_chunks: nn.Module | Sequence[nn.Module]) -> ModelLayout:
    """The layout of a megatron-core ``GPTModel`` stage (or of this rank's virtual chunks).

    Also registers the megatron LoRA dispatchers and prefix installer
    (:func:`register_megatron_policies`), so the ``lora`` and ``prefix`` policies apply to it.

    Args:
        model_or_chunks: a ``GPTModel`` (possibly inside DDP / ``Float16Module`` wrappers), or
            the list of virtual-pipeline chunks of this rank. For a list, names are relative to
            :func:`chunks_module` ``(chunks)`` (``<chunk index>.decoder.layers.<j>``): pass that
            module to ``apply_plan``.

    Returns:
        The layout: layers by global index (``layer_number - 1``) in increasing order,
        ``attn_name="self_attention"``, ``mlp_name="mlp"``; embeddings (first stage), final
        norm and LM head (last stage); geometry from the ``TransformerConfig``
        (``num_kv_heads = num_query_groups``, ``head_dim = kv_channels``);
        ``total_layers = config.num_layers``.

    Raises:
        ValueError: not a megatron GPTModel, chunks with different configs, or duplicate
            global layer indices.
    """
    register_megatron_policies()
    is_list = isinstance(model_or_chunks, (list, tuple, nn.ModuleList))
    chunks = list(model_or_chunks) if is_list else [model_or_chunks]
    if not chunks:
        raise ValueError("megatron_layout: got an empty list of model chunks.")
    parts = [_chunk_parts(c, f"{i}." if is_list else "") for i, c in enumerate(chunks)]
    config = parts[0]["model"].config
    for i, p in enumerate(parts[1:], 1):
        c = p["model"].config
        if (c.num_layers, c.hidden_size, c.num_attention_heads) != (
            config.num_layers,
            config.hidden_size,
            config.num_attention_heads,
        ):
            raise ValueError(
                f"megatron_layout: chunk {i} has another model geometry than chunk 0 "
                f"(num_layers/hidden/heads {c.num_layers}/{c.hidden_size}/"
                f"{c.num_attention_heads} vs {config.num_layers}/{config.hidden_size}/"
                f"{config.num_attention_heads}); pass the chunks of one model."
            )
    layers = sorted((x for p in parts for x in p["layers"]), key=lambda x: x.index)
    seen: dict[int, str] = {}
    for x in layers:
        if not 0 <= x.index < config.num_layers:
            raise ValueError(
                f"{x.name}: layer_number {x.index + 1} is outside the model's "
                f"{config.num_layers} layers (config.num_layers)."
            )
        if x.index in seen:
            raise ValueError(
                f"megatron_layout: global layer {x.index} appears twice ({seen[x.index]} and "
                f"{x.name}); pass each chunk once."
            )
        seen[x.index] = x.name
    heads = config.num_attention_heads
    kv = config.num_query_groups or heads
    head_dim = config.kv_channels or config.hidden_size // heads

    def last(key: str) -> str | None:
        found = [p[key] for p in parts if p[key] is not None]
        return found[-1] if found else None

    return ModelLayout(
        layers=layers,
        model_type="megatron_gpt",
        hidden_size=config.hidden_size,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=head_dim,
        embeddings=[e for p in parts for e in p["embeddings"]],
        final_norm=last("final_norm"),
        lm_head=last("lm_head"),
        tied_embeddings=any(p["tied"] for p in parts),
        blocks_name="decoder.layers",
        total_layers=config.num_layers,
    )
