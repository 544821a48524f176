"""The recipe trains next-token prediction: the micro-batch it hands an engine, through a Hugging
Face causal LM's own loss, equals cross-entropy against the packed data's next tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from layerfreeze.data import PackedDataset
from layerfreeze.train import model_batch
from tests.helpers.tiny_models import build_tiny_model


def test_engine_loss_is_next_token_cross_entropy():
    tokens = np.random.default_rng(0).integers(0, 128, size=1 + 4 * 16).astype(np.int64)
    ds = PackedDataset(tokens, 16)
    raw = {k: torch.stack([ds[i][k] for i in range(3)]) for k in ("input_ids", "labels")}
    model = build_tiny_model("llama", num_layers=2).eval()
    mb = model_batch(raw)
    with torch.no_grad():
        loss = model(**mb).loss
        logits = model(input_ids=mb["input_ids"]).logits.float()
    # position t predicts the packed next token labels[t] (= input_ids[t + 1]); the HF loss
    # covers positions 0..T-2 (the window's last target has no position inside the input)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 128), raw["labels"][:, :-1].reshape(-1))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    two_ahead = F.cross_entropy(logits[:, :-1].reshape(-1, 128), raw["labels"][:, 1:].reshape(-1))
    assert abs(loss.item() - two_ahead.item()) > 1e-3  # the packed labels as-is would train this
    with torch.no_grad():
        buggy = model(input_ids=raw["input_ids"], labels=raw["labels"]).loss
    assert buggy.item() == pytest.approx(two_ahead.item(), rel=1e-6)
