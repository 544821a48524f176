"""Healing a pruned model: a short LoRA run on generic text (Gromov et al., section 3).

Gromov et al. heal with QLoRA: LoRA on every linear layer of the decoder over a frozen base in
4-bit NF4, a short run of next-token loss on generic text. :func:`heal_model` does that in this
process (``layerfreeze prune --heal``): optionally quantize the base (:mod:`layerfreeze.quant`),
apply a LoRA plan (default ``lora_all``: rank 16 on every attention and MLP linear, embeddings,
final norm and LM head frozen), train with AdamW, and measure the held-out loss before and
after. :func:`finish_healing` dequantizes the base so that
:func:`layerfreeze.export.export_merged` writes ``dequant(NF4 base) + (alpha / r) B A``.

For long runs, several GPUs or a DeepSpeed config, heal with ``layerfreeze train`` and a LoRA
plan instead (docs/diagnostics-prune.md; full-precision base only).

    from layerfreeze.diagnostics.heal import HealConfig, heal_model, token_blocks
    cfg = HealConfig(quantize="nf4", steps=200, lr=2e-4)
    blocks = token_blocks(files, tokenizer, cfg.seq_len, cfg.max_tokens)
    applied, report = heal_model(model, blocks, cfg)
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from layerfreeze.errors import ConfigError
from layerfreeze.quant import QUANTIZE_CHOICES

__all__ = ["HealConfig", "HealReport", "finish_healing", "heal_model", "heldout_loss", "token_blocks"]


def _key(name: str) -> str:
    """The CLI option of a :class:`HealConfig` field (``steps`` -> ``--heal-steps``)."""
    return "--heal-" + name.replace("_", "-")


@dataclass
class HealConfig:
    """Options of a healing run (``layerfreeze prune --heal --heal-<field> ...``)."""

    data: list[str] = field(default_factory=lambda: ["@bundled"])
    """Text to heal on: .txt/.jsonl files or directories (``@bundled``: the bundled corpus)."""
    plan: str = "lora_all"
    """The LoRA plan (any plan string); the default adapts every linear of every layer, as
    Gromov et al. (QLoRA) do."""
    quantize: str = "none"
    """Frozen base precision: ``none`` (the checkpoint's dtype) or ``nf4`` (bitsandbytes 4-bit
    NormalFloat, QLoRA's and the paper's choice)."""
    steps: int = 100
    """Optimizer steps."""
    lr: float = 2e-4
    """AdamW learning rate (constant; gradients clipped to norm 1)."""
    batch_size: int = 4
    """Sequences per step."""
    seq_len: int = 256
    """Tokens per sequence (capped at the model's positions)."""
    max_tokens: int = 262144
    """Tokens read from ``data`` in all (training plus held-out)."""
    heldout_fraction: float = 0.1
    """Share of the sequences (the last ones) kept out of training to measure the held-out loss."""
    seed: int = 0
    """Seed of the adapters' initialisation and the batch order."""

    def __post_init__(self) -> None:
        problems: list[str] = []
        if isinstance(self.data, (str, Path)):
            self.data = [str(self.data)]
        if not self.data:
            problems.append(f"{_key('data')}: no files given, got []. Pass files or @bundled.")
        if self.quantize not in QUANTIZE_CHOICES:
            problems.append(
                f"{_key('quantize')}: must be one of {', '.join(QUANTIZE_CHOICES)}, got "
                f"{self.quantize!r}."
            )
        for name in ("steps", "batch_size", "seq_len", "max_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                problems.append(f"{_key(name)}: must be an integer >= 1, got {v!r}.")
        if isinstance(self.seq_len, int) and not isinstance(self.seq_len, bool) and self.seq_len < 2:
            problems.append(f"{_key('seq_len')}: must be at least 2 (next-token loss), got {self.seq_len}.")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            problems.append(f"{_key('lr')}: must be a finite number > 0, got {self.lr!r}.")
        if not (isinstance(self.heldout_fraction, (int, float)) and 0 < self.heldout_fraction < 1):
            problems.append(
                f"{_key('heldout_fraction')}: must be in (0, 1), got {self.heldout_fraction!r}."
            )
        if not problems:
            from layerfreeze.plan import LayerPlan

            try:
                LayerPlan.parse(self.plan, path=_key("plan"))
            except ConfigError as e:
                problems.extend(e.problems)
        if not problems and self.quantize == "nf4":
            from layerfreeze.quant import require_bitsandbytes

            require_bitsandbytes(_key("quantize"))  # before any weight is loaded
        if problems:
            raise ConfigError(problems)

    @classmethod
    def field_names(cls) -> list[str]:
        """The options, in declaration order."""
        return [f.name for f in fields(cls)]


@dataclass
class HealReport:
    """What a healing run did (``prune.json``'s ``heal``)."""

    config: dict[str, Any]
    quantized_linears: int
    trainable_params: int
    train_sequences: int
    heldout_sequences: int
    heldout_loss_before: float
    heldout_loss_after: float
    train_losses: list[float]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def token_blocks(
    paths: Sequence[str | Path], tokenizer: Any, seq_len: int, max_tokens: int
) -> torch.Tensor:
    """Pack the documents of ``paths`` (each followed by EOS) into ``(n, seq_len)`` token blocks.

    Raises:
        ConfigError: a missing or unsupported path (:func:`layerfreeze.data.corpus.resolve_files`).
        ValueError: fewer tokens than two blocks (one to train on, one held out).
    """
    from layerfreeze.data.corpus import iter_documents, resolve_files

    files = resolve_files(list(paths), key=_key("data"))
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    for path in files:
        for doc in iter_documents(path):
            ids.extend(tokenizer(doc, add_special_tokens=True)["input_ids"])
            if eos is not None:
                ids.append(eos)
            if len(ids) >= max_tokens:
                break
        if len(ids) >= max_tokens:
            break
    ids = ids[:max_tokens]
    n = len(ids) // seq_len
    if n < 2:
        raise ValueError(
            f"{_key('data')}: {len(ids)} tokens in {', '.join(map(str, paths))} make {n} "
            f"sequence(s) of {seq_len}; healing needs at least 2 (train + held out). Add text "
            f"or lower {_key('seq_len')}."
        )
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


@torch.no_grad()
def heldout_loss(model: nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy of ``model`` over ``blocks`` (eval mode, restored after)."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        x = blocks[i : i + batch_size].to(device)
        n = x.shape[0] * (x.shape[1] - 1)
        total += float(model(input_ids=x, labels=x).loss) * n
        count += n
    model.train(was)
    return total / count


def heal_model(model: nn.Module, blocks: torch.Tensor, cfg: HealConfig) -> tuple[Any, HealReport]:
    """Quantize the base if asked, apply the LoRA plan and train it on ``blocks``, in place.

    The last ``heldout_fraction`` of ``blocks`` (at least one) is held out; the report gives
    its loss before and after. The model keeps its adapters (and a 4-bit base with ``nf4``):
    :func:`finish_healing` prepares it for :func:`layerfreeze.export.export_merged`.

    Args:
        model: the (pruned) causal LM, plain (no layerfreeze adapters).
        blocks: ``(n, seq_len)`` token blocks, ``n >= 2`` (:func:`token_blocks`).
        cfg: the options.

    Returns:
        The :class:`layerfreeze.apply.AppliedPlan` and the :class:`HealReport`.

    Raises:
        ConfigError: the plan does not apply to this model.
        ValueError: ``nf4`` cannot quantize a layer, or the model already carries adapters.
    """
    from layerfreeze import apply_plan
    from layerfreeze.apply import adapter_param_names
    from layerfreeze.quant import quantize_model

    t0 = time.perf_counter()
    if adapter_param_names(model):
        raise ValueError(
            f"--heal: the model already carries layerfreeze adapters "
            f"({adapter_param_names(model)[0]}, from its export sidecar); heal a plain "
            "checkpoint, or heal with `layerfreeze train` and a plan."
        )
    n_held = max(1, round(len(blocks) * cfg.heldout_fraction))
    if len(blocks) - n_held < 1:
        raise ValueError(f"{_key('data')}: {len(blocks)} sequences leave none to train on.")
    train, held = blocks[:-n_held], blocks[-n_held:]
    quantized = quantize_model(model, key=_key("quantize")) if cfg.quantize == "nf4" else []
    torch.manual_seed(cfg.seed)  # the adapters' initialisation
    applied = apply_plan(model, cfg.plan, log=False)
    before = heldout_loss(model, held)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(applied.param_groups(cfg.lr, 0.0))
    device = params[0].device
    gen = torch.Generator().manual_seed(cfg.seed)
    losses = []
    model.train()
    for _ in range(cfg.steps):
        x = train[torch.randint(len(train), (cfg.batch_size,), generator=gen)].to(device)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    report = HealReport(
        config=asdict(cfg),
        quantized_linears=len(quantized),
        trainable_params=sum(p.numel() for p in params),
        train_sequences=len(train),
        heldout_sequences=len(held),
        heldout_loss_before=before,
        heldout_loss_after=heldout_loss(model, held),
        train_losses=losses,
        seconds=round(time.perf_counter() - t0, 3),
    )
    return applied, report


def finish_healing(model: nn.Module) -> list[str]:
    """Dequantize a 4-bit base in place (its adapters stay), ready for ``export_merged``.

    Returns:
        The dequantized linears (empty for a full-precision base).
    """
    from layerfreeze.quant import dequantize_model

    return dequantize_model(model)
