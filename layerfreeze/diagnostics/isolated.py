"""Per-layer stability measured in isolation: one layer changed, its own output compared.

The whole-model ``stability`` measure (:func:`layerfreeze.diagnostics.measures.stability`)
trains every layer together and reads each layer's output drift; that drift accumulates with
depth (layer ``i`` sees the drift of every layer below it), so it cannot tell one layer from
another. :func:`layer_stability` changes one layer at a time and feeds it its own reference
inputs:

1. **Reference inputs.** For each probe batch, a forward of the unchanged model is stopped at
   layer ``i`` (a pre-hook records the block's call, hidden states and every keyword argument
   such as the attention mask and rotary embeddings, then ends the forward); these are the
   inputs layer ``i`` sees in the intact model.
2. **Change the layer alone** (``mode``):

   * ``perturb`` (default): every parameter ``W`` of the block with two or more dimensions
     becomes ``W + s * rms(W) * e``, ``e ~ N(0, 1)`` with the seeds of ``noise_sensitivity``
     (``(seed, layer, parameter index)``, drawn on the CPU), so ``||dW||_F ~= s ||W||_F``.
     Deterministic, no backward, the same relative size for every layer.
   * ``steps``: ``steps`` AdamW steps (``lr``, no weight decay) on the block's parameters only,
     float32 master copies, with the causal-LM loss of the probe sequences (the mean over
     sequences of each sequence's mean next-token NLL; multiple choice: the prompts) through
     the frozen rest of the model, one probe batch per step in order (cycling).

3. **Measure** the block's output on the reference inputs with the changed parameters against
   its output with the original ones, over real (non-padding) tokens:
   ``output_change = sqrt(sum_t ||y'_t - y_t||^2) / sqrt(sum_t ||y_t||^2)`` (``y`` the block's
   output, i.e. the residual stream it hands on), ``output_angle`` the token mean of the angular
   distance between ``y'_t`` and ``y_t``, and ``weight_change = ||W' - W||_F / ||W||_F`` over
   all the block's parameters.

Nothing in the model changes: the changed parameters live in a dict passed to
``torch.func.functional_call``, so weights, ``requires_grad`` and ``.grad`` stay as they were.
Memory, one layer at a time: one batch's reference inputs of one layer (``B*T*H*s`` bytes plus
the keyword tensors the model computes anyway), two outputs of the block (float32), one copy of
the block's matrices; ``steps`` adds float32 master copies, gradients and AdamW moments of one
block (16 bytes per block parameter) and the backward's activations of one batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from layerfreeze.diagnostics.angular import angular_distance
from layerfreeze.diagnostics.probe import ProbeBatch, ProbeSet
from layerfreeze.models import ModelLayout

__all__ = ["LAYER_STABILITY_MODES", "layer_stability", "block_reference_inputs"]

#: ``mode`` values of :func:`layer_stability`.
LAYER_STABILITY_MODES = ("perturb", "steps")

Tick = Callable[[int], Any]


class _Reached(Exception):
    """Raised by the pre-hook to end a forward once the block's inputs are recorded."""


def _noop(_n: int = 1) -> None:
    return None


def block_reference_inputs(
    model: nn.Module, block: nn.Module, batch: ProbeBatch
) -> tuple[tuple, dict[str, Any]]:
    """``(args, kwargs)`` of ``block``'s call in a forward of ``model`` on ``batch``.

    The forward stops at the block (layers above it never run); the hook is removed on exit.

    Raises:
        RuntimeError: the forward never called the block.
    """
    from layerfreeze.diagnostics.measures import model_logits

    seen: dict[str, Any] = {}

    def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        seen["args"], seen["kwargs"] = args, dict(kwargs)
        raise _Reached

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model_logits(model, batch)
    except _Reached:
        pass
    finally:
        handle.remove()
    if not seen:
        raise RuntimeError("layer stability: the model's forward never called the layer.")
    return seen["args"], seen["kwargs"]


def _fresh(args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """A copy of the hidden-states input (blocks may add into it in place)."""
    if args and isinstance(args[0], torch.Tensor):
        return (args[0].clone(), *args[1:]), kwargs
    kwargs = dict(kwargs)
    kwargs["hidden_states"] = kwargs["hidden_states"].clone()
    return args, kwargs


def _block_out(
    block: nn.Module, params: dict[str, torch.Tensor] | None, args: tuple, kwargs: dict
) -> torch.Tensor:
    args, kwargs = _fresh(args, kwargs)
    with torch.no_grad():
        if params is None:
            out = block(*args, **kwargs)
        else:
            out = torch.func.functional_call(block, params, args, kwargs)
    return (out if isinstance(out, torch.Tensor) else out[0]).float()


def _perturbed(block: nn.Module, layer: int, scale: float, seed: int) -> dict[str, torch.Tensor]:
    """The block's matrices plus seeded relative noise (the draws of ``noise_sensitivity``)."""
    from layerfreeze.diagnostics.measures import _noise_seed, _noise_targets

    out = {}
    for pi, (name, p) in enumerate(_noise_targets(block)):
        g = torch.Generator().manual_seed(_noise_seed(seed, layer, pi))
        e = torch.randn(p.shape, generator=g, dtype=torch.float32)
        rms = p.detach().float().pow(2).mean().sqrt()
        out[name] = (p.detach().float() + scale * rms * e.to(p.device)).to(p.dtype)
    return out


def _trained(
    model: nn.Module,
    prefix: str,
    block: nn.Module,
    probe: ProbeSet,
    steps: int,
    lr: float,
    tick: Tick,
) -> dict[str, torch.Tensor]:
    """``steps`` AdamW steps on ``block``'s parameters alone (float32 masters), the rest frozen."""
    from layerfreeze.diagnostics.measures import _device, batch_loss, model_logits

    named = list(block.named_parameters())
    masters = {n: p.detach().float().clone().requires_grad_(True) for n, p in named}
    dtypes = {n: p.dtype for n, p in named}
    opt = torch.optim.AdamW(list(masters.values()), lr=lr, weight_decay=0.0)
    device = _device(model)
    for k in range(steps):
        b = probe.batches[k % len(probe.batches)].to(device)
        with torch.enable_grad():
            params = {f"{prefix}.{n}": m.to(dtypes[n]) for n, m in masters.items()}
            loss = batch_loss(model_logits(model, b, params), b, "text")
            grads = torch.autograd.grad(loss, list(masters.values()), allow_unused=True)
        for m, g in zip(masters.values(), grads, strict=True):
            m.grad = torch.zeros_like(m) if g is None else g
        opt.step()
        opt.zero_grad(set_to_none=True)
        tick(1)
    return {n: m.detach().to(dtypes[n]) for n, m in masters.items()}


def _rel_weight_change(block: nn.Module, new: dict[str, torch.Tensor]) -> float:
    num = den = 0.0
    for n, p in block.named_parameters():
        w = p.detach().double()
        den += float(w.pow(2).sum())
        if n in new:
            num += float((new[n].double() - w).pow(2).sum())
    return math.sqrt(num) / max(math.sqrt(den), 1e-30)


def layer_stability(
    model: nn.Module,
    layout: ModelLayout,
    probe: ProbeSet,
    mode: str = "perturb",
    scale: float = 0.05,
    seed: int = 0,
    steps: int = 4,
    lr: float = 1e-4,
    tick: Tick = _noop,
) -> dict[str, Any]:
    """Per layer, in isolation: relative change of the layer's own output on its reference
    inputs when that layer alone is perturbed (``perturb``) or trained (``steps``).

    Args:
        model: the LM (left unchanged; put it in eval mode for dropout-free numbers).
        layout: its layout.
        probe: the probe set (reference inputs and, for ``steps``, the training batches).
        mode: ``perturb`` or ``steps`` (see the module docstring).
        scale: relative perturbation size ``s`` (``perturb``).
        seed: seed of the perturbation draws (``perturb``).
        steps: AdamW steps per layer (``steps``).
        lr: their learning rate (``steps``).
        tick: progress callback, called once per probe batch compared and per training step.

    Returns:
        ``mode`` and its options, and per layer ``output_change``, ``output_angle`` and
        ``weight_change``.

    Raises:
        ValueError: an unknown mode, a negative or non-finite scale, steps < 1, lr <= 0.
    """
    from layerfreeze.diagnostics.measures import _device

    if mode not in LAYER_STABILITY_MODES:
        raise ValueError(
            f"--layer-stability: unknown mode {mode!r}; choose {' or '.join(LAYER_STABILITY_MODES)}."
        )
    if not (math.isfinite(scale) and scale >= 0):
        raise ValueError(f"--layer-stability-scale: must be finite and >= 0, got {scale}.")
    if mode == "steps" and steps < 1:
        raise ValueError(f"--stability-steps: must be >= 1, got {steps}.")
    if mode == "steps" and not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"--stability-lr: must be > 0, got {lr}.")
    device = _device(model)
    change, angle, wchange = [], [], []
    for info in layout.layers:
        block = info.module
        if mode == "perturb":
            new = _perturbed(block, info.index, scale, seed)
        else:
            new = _trained(model, info.name, block, probe, steps, lr, tick)
        diff2 = ref2 = ang = 0.0
        n_tok = 0
        for batch in probe.batches:
            b = batch.to(device)
            args, kwargs = block_reference_inputs(model, block, b)
            y = _block_out(block, None, args, kwargs)
            y_new = _block_out(block, new, args, kwargs)
            del args, kwargs
            keep = b.attention_mask.to(y.device) != 0
            diff2 += float((y_new - y)[keep].double().pow(2).sum())
            ref2 += float(y[keep].double().pow(2).sum())
            ang += float(angular_distance(y_new, y)[keep].double().sum())
            n_tok += int(keep.sum())
            tick(1)
        change.append(math.sqrt(diff2) / max(math.sqrt(ref2), 1e-30))
        angle.append(ang / max(n_tok, 1))
        wchange.append(_rel_weight_change(block, new))
        del new
    out: dict[str, Any] = {
        "measure": "per-layer stability in isolation: each layer alone is "
        + (
            f"perturbed (relative weight noise {scale:g})"
            if mode == "perturb"
            else f"trained ({steps} AdamW steps, lr {lr:g}, the rest frozen)"
        )
        + " and its own output is compared on its reference inputs",
        "mode": mode,
    }
    out.update({"scale": scale, "seed": seed} if mode == "perturb" else {"steps": steps, "lr": lr})
    out.update(output_change=change, output_angle=angle, weight_change=wchange)
    return out
