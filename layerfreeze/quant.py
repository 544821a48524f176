"""A 4-bit NF4 frozen base for QLoRA-style training (bitsandbytes ``Linear4bit``, CPU and GPU).

Gromov et al. heal a pruned model with QLoRA (Dettmers et al.): LoRA on every linear layer over
a frozen base stored in 4-bit NormalFloat. :func:`quantize_model` replaces every ``nn.Linear``
of the decoder layers by a bitsandbytes ``Linear4bit`` (NF4, blocks of 64 weights sharing one
absmax scale, the scales themselves stored in 8 bits: QLoRA's double quantization; computing in
the weight's former dtype); call it *before*
:func:`layerfreeze.apply_plan`, which then puts its LoRA adapters on the 4-bit linears (the
dispatcher registered here). Embeddings, norms and the LM head stay in full precision, as in
QLoRA. :func:`dequantize_model` turns the 4-bit linears back into ``nn.Linear`` holding
``dequantize_4bit(base)`` with their adapters and hooks kept, so a merged export is
``dequant(NF4 base) + (alpha / r) B A``: the model that was trained, not the original weights.

bitsandbytes >= 0.49 runs ``Linear4bit`` forward and backward on CPU through a torch fallback
(the warning that a hub kernel repository could not be verified is harmless offline).

    from layerfreeze.quant import quantize_model, dequantize_model
    quantize_model(model)                     # nn.Linear -> NF4 Linear4bit in every layer
    applied = apply_plan(model, "lora_all")   # LoRA over the frozen 4-bit base
    ...train...
    dequantize_model(model)                   # then export_merged(applied, dir)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from layerfreeze.models import discover_layout
from layerfreeze.policies.lora import LoRAAdapter, LoRADispatcher, register_lora_dispatcher

__all__ = [
    "QUANTIZE_CHOICES",
    "check_quantizable",
    "dequantize_model",
    "dequantize_weight",
    "is_quantized_linear",
    "quantize_model",
    "quantized_linears",
    "require_bitsandbytes",
]

#: Values of a ``quantize`` option: ``none`` (full precision) or ``nf4``.
QUANTIZE_CHOICES = ("none", "nf4")
#: Weights sharing one absmax scale (QLoRA's and bitsandbytes' default).
NF4_BLOCKSIZE = 64

# Module-level (no closures): the hooks dicts move between modules on (de)quantization.
_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


def require_bitsandbytes(key: str = "quantize") -> Any:
    """Import bitsandbytes for ``key``'s ``nf4``, or raise a one-line ``ValueError`` saying how.

    Raises:
        ValueError: bitsandbytes is not installed (or fails to import: the reason is given).
    """
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        missing = isinstance(e, ModuleNotFoundError) or "None in sys.modules" in text
        why = "is not installed" if missing else f"fails to import ({text})"
        raise ValueError(
            f"{key}: nf4 needs bitsandbytes, which {why}. Install it with "
            "pip install 'layerfreeze[quant]' (bitsandbytes==0.50.2), or use none."
        ) from None
    return bnb


def is_quantized_linear(module: nn.Module) -> bool:
    """True for a bitsandbytes 4-bit linear (checked by class, without importing bitsandbytes)."""
    return any(
        c.__name__ == "Linear4bit" and c.__module__.startswith("bitsandbytes")
        for c in type(module).__mro__
    )


def quantized_linears(model: nn.Module) -> list[str]:
    """Qualified names of the 4-bit linears in ``model``."""
    return [n for n, m in model.named_modules() if is_quantized_linear(m)]


def _unquantizable(layer_module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules of a layer holding a weight matrix of their own that are not a plain nn.Linear."""
    out = []
    for path, mod in layer_module.named_modules():
        if type(mod) is nn.Linear or is_quantized_linear(mod):
            continue
        if any(p.dim() >= 2 for p in mod.parameters(recurse=False)):
            out.append((path, mod))
    return out


def check_quantizable(model: nn.Module, key: str = "quantize") -> None:
    """Raise unless :func:`quantize_model` can quantize ``model`` (works on the meta device).

    Raises:
        ValueError: a layer holds a weight matrix in a module other than ``nn.Linear`` (GPT-2's
            ``Conv1D``, fused MoE experts, ...), which ``Linear4bit`` cannot replace; or the
            model already carries adapters (quantize before the plan).
    """
    from layerfreeze.apply import adapter_param_names

    if adapter_param_names(model):
        raise ValueError(
            f"{key}: nf4 must quantize the base before a plan installs adapters; the model "
            f"already carries {adapter_param_names(model)[0]}. Quantize first, then apply_plan."
        )
    bad = [
        f"layer {layer.index} ({layer.name}).{path} is a {type(mod).__name__}"
        for layer in discover_layout(model).layers
        for path, mod in _unquantizable(layer.module)
    ]
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise ValueError(
            f"{key}: nf4 cannot quantize {bad[0]}{more}; bitsandbytes' Linear4bit replaces "
            "nn.Linear only. Use none for this model."
        )


def quantize_model(model: nn.Module, key: str = "quantize") -> list[str]:
    """Replace every ``nn.Linear`` in the decoder layers by a frozen NF4 ``Linear4bit``, in place.

    The 4-bit linears compute in the weight's former dtype and sit on its device; their bias
    stays in that dtype, frozen. Call before :func:`layerfreeze.apply_plan`.

    Args:
        model: a decoder-only causal LM (layout discovered by :func:`discover_layout`).
        key: the option's name for error messages (``--heal-quantize``, ``heal.quantize``).

    Returns:
        Qualified names of the quantized linears.

    Raises:
        ValueError: bitsandbytes is missing; a layer holds a weight matrix in a module other
            than ``nn.Linear`` (GPT-2's ``Conv1D``, fused MoE experts, ...), which ``Linear4bit``
            cannot replace; or the model already carries adapters (quantize before the plan).
    """
    bnb = require_bitsandbytes(key)
    check_quantizable(model, key)
    layout = discover_layout(model)
    _register_lora_dispatcher()
    done = []
    for layer in layout.layers:
        for path, lin in list(layer.module.named_modules()):
            if type(lin) is not nn.Linear:
                continue
            q = bnb.nn.Linear4bit(
                lin.in_features, lin.out_features, bias=lin.bias is not None,
                compute_dtype=lin.weight.dtype, quant_type="nf4", compress_statistics=True,
                device="meta",
            )
            q.weight = bnb.nn.Params4bit(
                lin.weight.detach().clone(), requires_grad=False, quant_type="nf4",
                blocksize=NF4_BLOCKSIZE, compress_statistics=True,
            )
            if lin.bias is not None:
                q.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
            q = q.to(lin.weight.device)  # Params4bit quantizes when it moves to a real device
            # On CPUs with AVX512-BF16, bitsandbytes repacks the weight in place at the first
            # eval-mode no-grad forward, rounding the absmax scales to bf16: evaluation would
            # then run a different model than training did, and the repacked layout is not what
            # dequantize_4bit reads. Keep the one layout (fp32 scales) for train, eval and export.
            q.support_avx512bf16_for_cpu = False
            q.train(lin.training)
            _replace(layer.module, path, lin, q)
            done.append(f"{layer.name}.{path}")
    return done


def dequantize_weight(module: nn.Module) -> torch.Tensor:
    """The full-precision weight a 4-bit linear computes with: bitsandbytes'
    ``dequantize_4bit(weight, quant_state)`` in the module's compute dtype, shape ``(out, in)``."""
    from bitsandbytes.functional import dequantize_4bit

    w = module.weight
    if getattr(w.quant_state, "packing_format_for_cpu", False):
        raise ValueError(
            "this Linear4bit was repacked for bitsandbytes' CPU inference kernel (bf16 scales); "
            "dequantize_4bit cannot read that layout. Quantize with layerfreeze.quant.quantize_model."
        )
    dtype = getattr(module, "compute_dtype", None) or w.quant_state.dtype
    return dequantize_4bit(w.data, w.quant_state).to(dtype)


@torch.no_grad()
def dequantize_model(model: nn.Module) -> list[str]:
    """Replace every 4-bit linear by an ``nn.Linear`` holding its dequantized weight, in place.

    Adapters (child modules) and hooks move to the new linear, so the model computes the same
    function (up to float rounding) and ``export_merged`` folds LoRA into ``dequant(base)``.
    The base-tensor record of :func:`layerfreeze.apply_plan` is refreshed to the new weights.

    Returns:
        Qualified names of the dequantized linears.
    """
    from layerfreeze.apply import refresh_base_tensors

    names = quantized_linears(model)
    for name in names:
        q = model.get_submodule(name)
        w = dequantize_weight(q)
        lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None,
                        device="meta", dtype=w.dtype)
        lin.weight = nn.Parameter(w, requires_grad=False)
        if q.bias is not None:
            lin.bias = nn.Parameter(q.bias.detach().clone(), requires_grad=q.bias.requires_grad)
        lin.train(q.training)
        _replace(model, name, q, lin)
    if names:  # the base record holds the 4-bit tensors by reference; the export reads the new
        refresh_base_tensors(model)
    return names


def _replace(root: nn.Module, path: str, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` at ``root.<path>`` in place of ``old``, moving ``old``'s children and hooks."""
    for cname, child in old._modules.items():
        new._modules[cname] = child
    for attr in _HOOK_DICTS:
        hooks = getattr(old, attr, None)
        if hooks:
            getattr(new, attr).update(hooks)
    parent_name, _, attr = path.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    assert parent._modules[attr] is old
    parent._modules[attr] = new


# ------------------------------------------------------------------------------ LoRA on 4-bit


class NF4LoRAAdapter(LoRAAdapter):
    """A :class:`LoRAAdapter` over a frozen 4-bit base: the same update, in the compute dtype.

    Merging into a 4-bit weight is refused (it cannot hold the update); dequantize first.
    """

    @torch.no_grad()
    def merge(self, base: nn.Module) -> None:
        if is_quantized_linear(base):
            raise ValueError(
                "cannot merge LoRA into a 4-bit NF4 base weight; call "
                "layerfreeze.quant.dequantize_model(model) first (the export is then "
                "dequant(base) + the LoRA update)."
            )
        super().merge(base)


def _build_nf4_adapter(base: nn.Module, **kwargs: Any) -> NF4LoRAAdapter:
    return NF4LoRAAdapter(
        base.in_features, base.out_features, transposed=False, device=base.weight.device,
        dtype=base.compute_dtype or torch.float32, **kwargs,
    )


def _register_lora_dispatcher() -> None:
    """LoRA on a ``Linear4bit`` (before the plain ``nn.Linear`` one, which it subclasses)."""
    register_lora_dispatcher(
        LoRADispatcher("bitsandbytes.Linear4bit", is_quantized_linear, _build_nf4_adapter)
    )
