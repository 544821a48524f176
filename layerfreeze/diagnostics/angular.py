"""Angular distance between residual-stream inputs of layers, accumulated while streaming a probe set.

The measure is the one Gromov et al. ("The Unreasonable Ineffectiveness of the Deeper Layers")
use to choose which block of layers to prune, and LayerTracer's representation-evolution map::

    d(l, n) = arccos(cos(x_l, x_{l+n})) / pi        per token, in [0, 1]

where ``x_l`` is the residual stream entering decoder layer ``l``. Points are numbered ``0..L``:
point ``l < L`` is the input of layer ``l``; point ``L`` is the input of the final norm (the
output of the last layer), so ``d(l, n)`` with ``l + n = L`` spans the model's last ``n`` layers.

Memory: :class:`AngularAccumulator` keeps two ``(P, P)`` float64 sums (token mean and last-token
mean, ``P = L + 1`` points) and two counters, whatever the number of tokens streamed.
:class:`LayerInputRecorder` holds one batch's inputs of every layer at once
(``P * batch * seq * hidden`` elements in the model's dtype) until :meth:`AngularAccumulator.update`
consumes them; the update itself adds about ``2 * P * tokens * hidden`` fp32 elements while it runs.

Run::

    from layerfreeze.diagnostics.angular import trace_angular
    dist = trace_angular(model, [{"input_ids": ids, "attention_mask": mask}])
    dist.d(3, 2)            # mean over tokens of d(3, 2)
    dist.best_block(4)      # (l, distance): the 4-layer block whose removal changes least

Block scores (:meth:`AngularDistances.block_scores`, :meth:`AngularDistances.best_block`) use
the last token of each sequence by default, as Gromov et al. do (the last token is the one that
sees the whole sequence, and the one whose prediction matters for their QA tasks); the token
mean is the option ``last_token=False``. :meth:`AngularDistances.d` keeps the token mean by
default: it is the representation-evolution map, not the pruning score.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from layerfreeze.models import ModelLayout, discover_layout

__all__ = [
    "AngularAccumulator",
    "AngularDistances",
    "LayerInputRecorder",
    "angular_distance",
    "hidden_arg",
    "trace_angular",
]

_TINY = 1e-30  # below any squared norm we meet in fp32; a zero vector keeps zero length


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _unit(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    x = x.to(dtype)
    return x / x.norm(dim=-1, keepdim=True).clamp_min(_TINY)


def _angle_of_units(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # arccos(u.v) for unit vectors, in the form that stays exact near 0 and pi:
    # angle = 2 * atan2(|u - v|, |u + v|). arccos(clamp(cos, -1, 1)) loses ~sqrt(eps) at cos ~ 1
    # (a vector against itself would read 1e-4 in fp32 instead of 0).
    return 2.0 * torch.atan2((u - v).norm(dim=-1), (u + v).norm(dim=-1)) / math.pi


def angular_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-vector angular distance ``arccos(cos(a, b)) / pi`` along the last dimension.

    Computed in float32 (float64 when either input is float64), whatever the input dtype, and
    clamped to ``[0, 1]``. Uses ``2 * atan2(|u - v|, |u + v|)`` on the unit vectors, which equals
    ``arccos(clamp(cos, -1, 1))`` but is exact for (anti)parallel vectors. A zero vector has no
    direction: its distance to anything is 0.5, matching ``cos = 0`` as
    ``torch.nn.functional.cosine_similarity`` defines it.

    Args:
        a: tensor ``(..., hidden)``.
        b: tensor broadcastable against ``a``.

    Returns:
        Tensor of the broadcast leading shape, in ``[0, 1]``.

    Raises:
        ValueError: the last dimensions differ.
    """
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(
            f"angular_distance: last dimensions differ, got {tuple(a.shape)} and {tuple(b.shape)}."
        )
    dtype = _compute_dtype(a, b)
    return _angle_of_units(_unit(a, dtype), _unit(b, dtype)).clamp(0.0, 1.0)


@dataclass
class AngularDistances:
    """Mean angular distances between every pair of layer-input points.

    Attributes:
        num_points: ``P = L + 1`` when the final-norm input is a point, else ``L``.
        num_tokens: tokens averaged in :attr:`mean`.
        num_sequences: sequences averaged in :attr:`last` (one last token each).
        mean: ``(P, P)`` float64; ``mean[l, m]`` (``m > l``) is the token mean of the distance
            between the inputs of points ``l`` and ``m``; NaN on and below the diagonal.
        last: same, for the last (non-padding) token of each sequence.
    """

    num_points: int
    num_tokens: int
    num_sequences: int
    mean: torch.Tensor
    last: torch.Tensor

    def d(self, layer: int, n: int, last_token: bool = False) -> float:
        """``d(layer, n)``: distance between the inputs of ``layer`` and ``layer + n``.

        Raises:
            ValueError: ``n < 1`` or ``layer + n`` past the last point.
        """
        if n < 1 or layer < 0 or layer + n >= self.num_points:
            raise ValueError(
                f"d({layer}, {n}): needs n >= 1 and 0 <= layer, layer + n <= {self.num_points - 1}."
            )
        return float((self.last if last_token else self.mean)[layer, layer + n])

    def block_scores(self, n: int, last_token: bool = True) -> list[float]:
        """``[d(0, n), d(1, n), ...]``: one score per block of ``n`` consecutive layers.

        Scored on the last token by default (Gromov et al.); ``last_token=False``: token mean.
        """
        return [self.d(layer, n, last_token) for layer in range(self.num_points - n)]

    def best_block(
        self, n: int, last_token: bool = True, max_end: int | None = None
    ) -> tuple[int, float]:
        """The first layer and distance of the ``n``-layer block with the smallest ``d(l, n)``.

        Args:
            n: block length (layers removed).
            last_token: score by the last-token mean (default, Gromov et al.'s choice);
                False: by the mean over all tokens.
            max_end: only blocks whose point ``l + n`` is at most this (default: all).

        Ties go to the shallowest block, so the result is deterministic.
        """
        scores = self.block_scores(n, last_token)
        limit = len(scores) if max_end is None else max(0, min(len(scores), max_end - n + 1))
        if limit == 0:
            raise ValueError(
                f"best_block({n}): no block of {n} layers fits before point {max_end}."
            )
        best = min(range(limit), key=lambda i: (scores[i], i))
        return best, scores[best]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``mean[l][n - 1] = d(l, n)`` (ragged rows), the same for ``last``."""

        def rows(m: torch.Tensor) -> list[list[float]]:
            return [
                [float(m[i, i + n]) for n in range(1, self.num_points - i)]
                for i in range(self.num_points - 1)
            ]

        return {
            "num_points": self.num_points,
            "num_tokens": self.num_tokens,
            "num_sequences": self.num_sequences,
            "indexing": "mean[l][n-1] = d(l, n) = arccos(cos(x_l, x_{l+n})) / pi; "
            "x_l is the input of layer l, x_L the input of the final norm",
            "mean": rows(self.mean),
            "last_token": rows(self.last),
        }


class AngularAccumulator:
    """Streaming sums of ``d(l, m)`` over tokens for every pair of points ``l < m``.

    Feed one batch at a time with :meth:`update`; memory stays ``O(P^2)``. Under data
    parallelism, call :meth:`all_reduce` once before :meth:`result` to sum over ranks.

    Args:
        num_points: number of residual-stream points per forward (``L + 1`` with the final norm).
    """

    def __init__(self, num_points: int) -> None:
        if num_points < 2:
            raise ValueError(f"num_points: need at least 2 points to compare, got {num_points}.")
        self.num_points = num_points
        self.token_sum = torch.zeros(num_points, num_points, dtype=torch.float64)
        self.last_sum = torch.zeros(num_points, num_points, dtype=torch.float64)
        self.num_tokens = 0
        self.num_sequences = 0

    @torch.no_grad()
    def update(
        self, states: Sequence[torch.Tensor], attention_mask: torch.Tensor | None = None
    ) -> None:
        """Add one batch: ``states[p]`` is the ``(batch, seq, hidden)`` input of point ``p``.

        Args:
            states: one tensor per point, all the same shape.
            attention_mask: ``(batch, seq)``, nonzero on real tokens; padding is skipped and the
                last token of a row is its last nonzero position. None: every token counts.

        Raises:
            ValueError: wrong number of points or mismatched shapes.
        """
        if len(states) != self.num_points:
            raise ValueError(
                f"AngularAccumulator.update: got {len(states)} states, expected {self.num_points}."
            )
        shape = tuple(states[0].shape)
        if len(shape) != 3 or any(tuple(s.shape) != shape for s in states):
            raise ValueError(
                "AngularAccumulator.update: every state must be (batch, seq, hidden) of one shape, "
                f"got {[tuple(s.shape) for s in states]}."
            )
        bsz, seq, _ = shape
        if attention_mask is None:
            mask = torch.ones(bsz, seq, dtype=torch.bool, device=states[0].device)
        else:
            if tuple(attention_mask.shape) != (bsz, seq):
                raise ValueError(
                    f"AngularAccumulator.update: attention_mask is {tuple(attention_mask.shape)}, "
                    f"the states are {shape}."
                )
            mask = attention_mask.to(states[0].device) != 0
        per_row = mask.sum(dim=1)
        n_tok = int(per_row.sum())
        if n_tok == 0:
            return
        # Row-major order of the kept tokens: row b's last kept token sits at cumsum(b) - 1.
        has = per_row > 0
        last_idx = (per_row.cumsum(0) - 1)[has]
        dtype = _compute_dtype(*states)
        units = torch.stack([_unit(s[mask], dtype) for s in states])  # (P, N, H)
        for i in range(self.num_points - 1):
            # distances from point i to every later point: (P - i - 1, N)
            ang = _angle_of_units(units[i + 1 :], units[i].unsqueeze(0)).clamp_(0.0, 1.0)
            self.token_sum[i, i + 1 :] += ang.sum(dim=1, dtype=torch.float64).cpu()
            self.last_sum[i, i + 1 :] += ang[:, last_idx].sum(dim=1, dtype=torch.float64).cpu()
        self.num_tokens += n_tok
        self.num_sequences += int(has.sum())

    def all_reduce(self, group: Any = None) -> None:
        """Sum the statistics over the ranks of ``group`` (no-op without torch.distributed)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        p = self.num_points
        flat = torch.cat(
            [
                self.token_sum.flatten(),
                self.last_sum.flatten(),
                torch.tensor([self.num_tokens, self.num_sequences], dtype=torch.float64),
            ]
        )
        if dist.get_backend(group) == "nccl":
            flat = flat.cuda()
        dist.all_reduce(flat, group=group)
        flat = flat.cpu()
        self.token_sum = flat[: p * p].view(p, p).clone()
        self.last_sum = flat[p * p : 2 * p * p].view(p, p).clone()
        self.num_tokens, self.num_sequences = int(flat[-2]), int(flat[-1])

    def result(self) -> AngularDistances:
        """Means so far.

        Raises:
            ValueError: nothing was accumulated (every batch was empty or all padding).
        """
        if self.num_tokens == 0:
            raise ValueError(
                "angular distances: no tokens were accumulated (empty probe set, or all padding)."
            )
        upper = torch.triu(torch.ones(self.num_points, self.num_points, dtype=torch.bool), 1)
        nan = torch.full_like(self.token_sum, float("nan"))
        mean = torch.where(upper, self.token_sum / self.num_tokens, nan)
        last = torch.where(upper, self.last_sum / max(self.num_sequences, 1), nan)
        return AngularDistances(self.num_points, self.num_tokens, self.num_sequences, mean, last)


def hidden_arg(args: tuple, kwargs: Mapping[str, Any]) -> torch.Tensor:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    h = kwargs.get("hidden_states")
    if isinstance(h, torch.Tensor):
        return h
    raise RuntimeError("LayerInputRecorder: the block was called without a hidden_states tensor.")


class LayerInputRecorder:
    """Context manager: forward pre-hooks that keep the input of every decoder block.

    Point ``p < L`` is the input of layer ``p``; point ``L`` the input of the final norm (when
    the model has one). Hooks are always removed on exit, also after an exception.

    Args:
        model: a decoder-only LM.
        layout: its layout (default: :func:`discover_layout`).
        include_final_norm: add the final-norm input as point ``L``.
    """

    def __init__(
        self, model: nn.Module, layout: ModelLayout | None = None, include_final_norm: bool = True
    ) -> None:
        self.model = model
        self.layout = layout or discover_layout(model)
        self.modules: list[nn.Module] = [info.module for info in self.layout.layers]
        if include_final_norm and self.layout.final_norm is not None:
            self.modules.append(model.get_submodule(self.layout.final_norm))
        self.num_points = len(self.modules)
        self._states: list[torch.Tensor | None] = [None] * self.num_points
        self._handles: list[Any] = []

    def _hook(self, point: int):
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            # A copy: some blocks add into their input in place after the hook has run.
            self._states[point] = hidden_arg(args, kwargs).detach().clone()

        return hook

    def __enter__(self) -> LayerInputRecorder:
        for p, module in enumerate(self.modules):
            self._handles.append(module.register_forward_pre_hook(self._hook(p), with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook and drop the held states (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._states = [None] * self.num_points

    def take(self) -> list[torch.Tensor]:
        """The inputs recorded by the last forward (one per point), releasing them.

        Raises:
            RuntimeError: some point saw no input since the last :meth:`take`.
        """
        missing = [p for p, s in enumerate(self._states) if s is None]
        if missing:
            raise RuntimeError(
                f"LayerInputRecorder: no input recorded for points {missing}; run one forward "
                "between calls to take()."
            )
        states = [s for s in self._states if s is not None]
        self._states = [None] * self.num_points
        return states


def _as_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, Mapping) and "input_ids" in batch:
        return batch["input_ids"], batch.get("attention_mask")
    raise TypeError(
        f"trace_angular: a batch must be a (batch, seq) tensor of token ids or a mapping with "
        f"'input_ids' (and optionally 'attention_mask'), got {type(batch).__name__}."
    )


@torch.no_grad()
def trace_angular(
    model: nn.Module,
    batches: Iterable[Any],
    layout: ModelLayout | None = None,
    include_final_norm: bool = True,
) -> AngularDistances:
    """Angular distances between the inputs of every pair of layers over ``batches``.

    Args:
        model: a decoder-only LM (its mode is left as it is; use ``eval()`` for dropout-free runs).
        batches: token-id tensors ``(batch, seq)`` or mappings with ``input_ids`` and an optional
            ``attention_mask``.
        layout: the model's layout (default: :func:`discover_layout`).
        include_final_norm: add the final-norm input as point ``L``.

    Returns:
        The :class:`AngularDistances` over every non-padding token.

    Raises:
        ValueError: no tokens at all (empty probe set).
    """
    device = next(model.parameters()).device
    with LayerInputRecorder(model, layout, include_final_norm) as rec:
        acc = AngularAccumulator(rec.num_points)
        for batch in batches:
            ids, mask = _as_batch(batch)
            ids = ids.to(device)
            mask = mask.to(device) if mask is not None else None
            model(input_ids=ids, attention_mask=mask, use_cache=False)
            acc.update(rec.take(), mask)
    return acc.result()
