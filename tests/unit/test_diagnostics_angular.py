"""Angular distance, its streaming accumulator and the layer-input recorder."""

from __future__ import annotations

import math

import pytest
import torch

from layerfreeze.diagnostics.angular import (
    AngularAccumulator,
    LayerInputRecorder,
    angular_distance,
    trace_angular,
)
from layerfreeze.models import discover_layout
from tests.helpers.tiny_models import build_tiny_model, tiny_batch


def _hand(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(y * y for y in b))
    return math.acos(max(-1.0, min(1.0, dot / (na * nb)))) / math.pi


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_vector_and_itself_is_zero(dtype):
    x = torch.randn(5, 7, 33, generator=torch.Generator().manual_seed(0)).to(dtype)
    d = angular_distance(x, x)
    assert d.shape == (5, 7)
    assert torch.equal(d, torch.zeros_like(d))
    # scaling does not change a direction (powers of two scale exactly in every dtype)
    assert angular_distance(x, 4 * x).abs().max() < 1e-6
    assert float(angular_distance(x, -x).min()) == pytest.approx(1.0, abs=1e-6)


def test_matches_hand_computation():
    cases = [
        ([1.0, 0.0], [1.0, 1.0], 0.25),  # 45 degrees
        ([1.0, 0.0], [0.0, 2.0], 0.5),  # orthogonal
        ([1.0, 0.0], [-3.0, 0.0], 1.0),  # opposite
        ([1.0, 2.0, 3.0], [-2.0, 0.5, 4.0], None),
        ([0.3, -1.1, 2.2, 0.7], [1.5, 0.2, -0.4, 0.9], None),
    ]
    for a, b, exact in cases:
        expected = _hand(a, b)
        if exact is not None:
            assert expected == pytest.approx(exact, abs=1e-12)
        got = angular_distance(
            torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
        )
        assert float(got) == pytest.approx(expected, abs=1e-12)
        got32 = angular_distance(torch.tensor(a), torch.tensor(b))
        assert float(got32) == pytest.approx(expected, abs=1e-6)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="last dimensions differ"):
        angular_distance(torch.ones(3), torch.ones(4))


def _hand_means(states, mask):
    """Independent double loop over points, rows and tokens."""
    p = len(states)
    bsz, seq, _ = states[0].shape
    tok = [[0.0] * p for _ in range(p)]
    last = [[0.0] * p for _ in range(p)]
    n_tok = n_seq = 0
    for b in range(bsz):
        keep = [t for t in range(seq) if mask[b][t]]
        n_tok += len(keep)
        n_seq += bool(keep)
        for i in range(p):
            for m in range(i + 1, p):
                for t in keep:
                    tok[i][m] += _hand(states[i][b, t].tolist(), states[m][b, t].tolist())
                if keep:
                    t = keep[-1]
                    last[i][m] += _hand(states[i][b, t].tolist(), states[m][b, t].tolist())
    return tok, last, n_tok, n_seq


def test_accumulator_streams_to_the_same_means_as_a_hand_loop():
    g = torch.Generator().manual_seed(3)
    p, hidden = 4, 6
    batches = []
    for bsz, seq in [(2, 5), (3, 4)]:
        states = [torch.randn(bsz, seq, hidden, generator=g, dtype=torch.float64) for _ in range(p)]
        mask = torch.ones(bsz, seq, dtype=torch.long)
        mask[0, -2:] = 0  # right padding
        mask[-1, :1] = 0  # left padding
        batches.append((states, mask))
    acc = AngularAccumulator(p)
    tok = [[0.0] * p for _ in range(p)]
    last = [[0.0] * p for _ in range(p)]
    n_tok = n_seq = 0
    for states, mask in batches:
        acc.update(states, mask)
        t, la, nt, ns = _hand_means(states, mask.tolist())
        n_tok, n_seq = n_tok + nt, n_seq + ns
        for i in range(p):
            for m in range(p):
                tok[i][m] += t[i][m]
                last[i][m] += la[i][m]
    res = acc.result()
    assert (res.num_tokens, res.num_sequences) == (n_tok, n_seq)
    for i in range(p):
        for n in range(1, p - i):
            assert res.d(i, n) == pytest.approx(tok[i][i + n] / n_tok, abs=1e-12)
            assert res.d(i, n, last_token=True) == pytest.approx(last[i][i + n] / n_seq, abs=1e-12)
    assert torch.isnan(res.mean[1, 1]) and torch.isnan(res.mean[2, 0])
    d = res.to_dict()
    assert len(d["mean"]) == p - 1 and len(d["mean"][0]) == p - 1 and len(d["mean"][-1]) == 1
    assert d["mean"][1][1] == pytest.approx(res.d(1, 2))


def test_accumulator_memory_does_not_grow_with_tokens():
    acc = AngularAccumulator(3)
    before = [t.numel() for t in (acc.token_sum, acc.last_sum)]
    for _ in range(3):
        acc.update([torch.randn(4, 16, 8) for _ in range(3)])
    assert [t.numel() for t in (acc.token_sum, acc.last_sum)] == before == [9, 9]
    assert acc.num_tokens == 3 * 4 * 16


def test_empty_and_bad_input():
    acc = AngularAccumulator(2)
    acc.update([torch.randn(1, 3, 4)] * 2, torch.zeros(1, 3))
    with pytest.raises(ValueError, match="no tokens"):
        acc.result()
    with pytest.raises(ValueError, match="expected 2"):
        acc.update([torch.randn(1, 3, 4)] * 3)
    with pytest.raises(ValueError, match="at least 2"):
        AngularAccumulator(1)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_recorder_points_are_the_hidden_states(family):
    """Recorded inputs equal transformers' own hidden_states (0..L-1) and the pre-norm output."""
    model = build_tiny_model(family, num_layers=3)
    ids = tiny_batch(model)
    with torch.no_grad():
        ref = model(ids, output_hidden_states=True).hidden_states
        with LayerInputRecorder(model) as rec:
            model(ids)
            states = rec.take()
    assert len(states) == 4
    for p in range(3):
        torch.testing.assert_close(states[p], ref[p], rtol=0, atol=0)
    # transformers' last hidden state is after the final norm; ours is its input
    layout = discover_layout(model)
    norm = model.get_submodule(layout.final_norm)
    torch.testing.assert_close(norm(states[3]), ref[3], rtol=1e-6, atol=1e-6)
    # hooks are gone
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_hooks_removed_after_an_exception():
    model = build_tiny_model("llama", num_layers=2)
    with pytest.raises(RuntimeError, match="boom"), LayerInputRecorder(model):
        raise RuntimeError("boom")
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_zeroed_layer_has_zero_distance_across_it():
    model = build_tiny_model("llama", num_layers=4)
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    ids = tiny_batch(model, batch=2, seq=6)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    res = trace_angular(model, [{"input_ids": ids, "attention_mask": mask}])
    assert res.num_points == 5 and res.num_tokens == 10
    assert res.d(2, 1) == 0.0 and res.d(2, 1, last_token=True) == 0.0
    assert all(res.d(i, 1) > 1e-3 for i in (0, 1, 3))
    assert res.best_block(1) == (2, 0.0)


def _distances(mean_rows: list[list[float]], last_rows: list[list[float]]):
    """AngularDistances with ``mean[l][n-1]`` / ``last[l][n-1]`` given as ragged rows."""
    from layerfreeze.diagnostics.angular import AngularDistances

    p = len(mean_rows) + 1
    mean = torch.full((p, p), float("nan"), dtype=torch.float64)
    last = mean.clone()
    for i, (mr, lr) in enumerate(zip(mean_rows, last_rows, strict=True)):
        for n, (a, b) in enumerate(zip(mr, lr, strict=True), start=1):
            mean[i, i + n], last[i, i + n] = a, b
    return AngularDistances(p, 10, 2, mean, last)


def test_best_block_scores_the_last_token_by_default_as_gromov_et_al():
    # 3 layers; blocks of one layer: the token mean prefers layer 0, the last token layer 2
    dist = _distances(
        [[0.10, 0.5, 0.6], [0.30, 0.5], [0.20]],
        [[0.40, 0.5, 0.6], [0.30, 0.5], [0.05]],
    )
    assert dist.block_scores(1) == [0.40, 0.30, 0.05]  # last token, the paper's choice
    assert dist.best_block(1) == (2, 0.05)
    # the token mean stays available
    assert dist.block_scores(1, last_token=False) == [0.10, 0.30, 0.20]
    assert dist.best_block(1, last_token=False) == (0, 0.10)
    # the pruning entry point agrees with best_block's default
    from layerfreeze.diagnostics.prune import choose_block

    assert choose_block(3, 1, "angular", dist).start == dist.best_block(1)[0] == 2
