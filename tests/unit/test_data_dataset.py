"""Packing, sharding, deterministic shuffling and resumable position of the batch iterator."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from layerfreeze.data import (
    DistributedBatchIterator,
    PackedDataset,
    build_token_cache,
    load_tokenizer,
    train_tokenizer,
)


def _stream(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1000, size=n).astype(np.uint16)


@pytest.mark.parametrize("n,seq_len", [(101, 10), (100, 10), (11, 10), (57, 1), (1000, 7)])
def test_packing_is_exact(n, seq_len):
    tokens = _stream(n)
    ds = PackedDataset(tokens, seq_len)
    assert len(ds) == (n - 1) // seq_len
    inputs = [ds[i]["input_ids"] for i in range(len(ds))]
    labels = [ds[i]["labels"] for i in range(len(ds))]
    assert all(x.shape == (seq_len,) and x.dtype == torch.int64 for x in inputs + labels)
    used = len(ds) * seq_len
    # Inputs tile the stream, labels are the stream shifted by one: every token after the first
    # is predicted exactly once.
    assert torch.cat(inputs).tolist() == tokens[:used].tolist()
    assert torch.cat(labels).tolist() == tokens[1 : used + 1].tolist()
    assert n - (used + 1) < seq_len  # the unused tail is shorter than one more sequence


def test_packing_over_a_real_cache_keeps_document_separators(tmp_path):
    f = tmp_path / "docs.txt"
    f.write_text("\n\n".join(f"文档 {i} says hello" for i in range(40)) + "\n", encoding="utf-8")
    train_tokenizer(["@bundled"], tmp_path / "tok", vocab_size=800, character_coverage=0.99)
    tok = load_tokenizer(str(tmp_path / "tok"))
    cache = build_token_cache([f], tok, tmp_path / "cache")
    ds = PackedDataset(cache, 16)
    joined = torch.cat([ds[i]["input_ids"] for i in range(len(ds))] + [ds[len(ds) - 1]["labels"][-1:]])
    assert joined.tolist() == np.asarray(cache.tokens[: len(ds) * 16 + 1], dtype=np.int64).tolist()
    docs = [tok.encode(f"文档 {i} says hello", add_special_tokens=False) for i in range(40)]
    stream = [t for d in docs for t in (tok.bos_token_id, *d, tok.eos_token_id)]
    assert joined.tolist() == stream[: len(joined)]


def test_corpus_shorter_than_one_sequence(tmp_path):
    with pytest.raises(ValueError, match=r"data.seq_len: the corpus has 10 tokens, fewer than one sequence "
                                         r"of seq_len \+ 1 = 11 tokens. Add more text or lower data.seq_len"):
        PackedDataset(_stream(10), 10)
    with pytest.raises(ValueError, match="data.seq_len: must be a positive integer, got 0"):
        PackedDataset(_stream(10), 0)


def _straight_stream(n: int, seed: int, epochs: int, shuffle: bool = True) -> list[int]:
    """The global order written out independently: seeded permutations, epoch after epoch."""
    out: list[int] = []
    for e in range(epochs):
        out += np.random.default_rng([seed, e]).permutation(n).tolist() if shuffle else list(range(n))
    return out


def _step(its: list[DistributedBatchIterator]) -> list[list[int]]:
    """One micro-step on every rank: each rank's sequence indices (read before the step)."""
    idx = [it.indices().tolist() for it in its]
    for it in its:
        it.next_batch()
    return idx


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("shuffle", [True, False])
def test_shards_are_disjoint_and_follow_the_global_stream(world_size, shuffle):
    ds = PackedDataset(_stream(1 + 4 * 103), 4)  # 103 sequences: remainders for every size
    m = 5
    its = [DistributedBatchIterator(ds, m, r, world_size, seed=3, shuffle=shuffle) for r in range(world_size)]
    steps = 3 * 103 // (m * world_size) + 1  # into the fourth epoch
    want = _straight_stream(103, 3, 4, shuffle)
    for s in range(steps):
        per_rank = _step(its)
        assert all(len(b) == m for b in per_rank)
        # rank r holds [c + r*M, c + (r+1)*M) of the stream, c = s*M*W
        assert [i for b in per_rank for i in b] == want[s * m * world_size : (s + 1) * m * world_size]
    assert {it.consumed for it in its} == {steps * m * world_size}
    assert {it.epoch for it in its} == {steps * m * world_size // 103}


def test_batches_hold_the_indexed_windows():
    ds = PackedDataset(_stream(1 + 8 * 30), 8)
    it = DistributedBatchIterator(ds, 3, rank=1, world_size=2, seed=9)
    idx = it.indices().tolist()
    assert idx == np.random.default_rng([9, 0]).permutation(30)[3:6].tolist()
    batch = it.next_batch()
    assert batch["input_ids"].shape == (3, 8) and batch["labels"].shape == (3, 8)
    for row, i in enumerate(idx):
        w = ds.window(i)
        assert batch["input_ids"][row].tolist() == w[:-1].tolist()
        assert batch["labels"][row].tolist() == w[1:].tolist()


def test_shuffle_is_deterministic_and_per_epoch():
    ds = PackedDataset(_stream(1 + 2 * 200), 2)
    a = DistributedBatchIterator(ds, 4, 0, 1, seed=5)
    b = DistributedBatchIterator(ds, 4, 0, 1, seed=5)
    c = DistributedBatchIterator(ds, 4, 0, 1, seed=6)
    assert a.stream(0, 200).tolist() == b.stream(0, 200).tolist()
    assert a.stream(0, 200).tolist() != c.stream(0, 200).tolist()
    assert a.stream(0, 200).tolist() != a.stream(200, 200).tolist()
    assert sorted(a.stream(200, 200).tolist()) == list(range(200))
    assert a.stream(0, 600).tolist() == _straight_stream(200, 5, 3)
    ordered = DistributedBatchIterator(ds, 4, 0, 1, seed=5, shuffle=False)
    assert ordered.stream(150, 100).tolist() == list(range(150, 200)) + list(range(50))


def test_epochs_roll_over_without_dropping_the_remainder():
    ds = PackedDataset(_stream(1 + 3 * 10), 3)  # 10 sequences
    its = [DistributedBatchIterator(ds, 2, r, 2, seed=1) for r in range(2)]  # 4 per step
    seen = []
    for _ in range(5):
        seen.append((its[0].epoch, its[0].consumed))
        _step(its)
    assert seen == [(0, 0), (0, 4), (0, 8), (1, 12), (1, 16)]
    state = its[1].state_dict()
    assert state == its[0].state_dict()  # the same on every rank
    assert (state["consumed"], state["epoch"], state["position"], state["tokens"]) == (20, 2, 0, 60)
    # Step 3 straddles epochs 0 and 1: the last 2 of epoch 0, then the first 2 of epoch 1.
    its = [DistributedBatchIterator(ds, 2, r, 2, seed=1) for r in range(2)]
    straddle = [its[r].indices(8).tolist() for r in range(2)]
    want = _straight_stream(10, 1, 2)
    assert straddle == [want[8:10], want[10:12]]


@pytest.mark.parametrize("world_size", [1, 3])
@pytest.mark.parametrize("stop", [0, 4, 7, 13])
def test_resume_continues_the_uninterrupted_sequence(world_size, stop):
    ds = PackedDataset(_stream(1 + 6 * 40), 6)  # 40 sequences
    total = 20
    for rank in range(world_size):
        straight = DistributedBatchIterator(ds, 2, rank, world_size, seed=11)
        reference = [straight.next_batch() for _ in range(total)]
        first = DistributedBatchIterator(ds, 2, rank, world_size, seed=11)
        for _ in range(stop):
            first.next_batch()
        state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
        resumed = DistributedBatchIterator(ds, 2, rank, world_size, seed=11)
        resumed.load_state_dict(state)
        rest = [b for _, b in zip(range(total - stop), resumed, strict=False)]
        for got, want in zip(rest, reference[stop:], strict=True):
            assert torch.equal(got["input_ids"], want["input_ids"])
            assert torch.equal(got["labels"], want["labels"])


def _run(ds, world_size, m, steps, state=None):
    """``steps`` micro-steps on ``world_size`` in-process ranks, optionally resumed from
    ``state`` (through JSON, as a checkpoint stores it); returns the input rows every rank saw
    and the state rank 0 would save."""
    its = [DistributedBatchIterator(ds, m, r, world_size, seed=7) for r in range(world_size)]
    if state is not None:
        for it in its:
            it.load_state_dict(json.loads(json.dumps(state)))
    rows = []
    for _ in range(steps):
        for it in its:
            rows += [tuple(r) for r in it.next_batch()["input_ids"].tolist()]
    return rows, its[0].state_dict()


@pytest.mark.parametrize("m1,m2", [(3, 3), (3, 6), (2, 5)])
def test_elastic_resume_2_to_1_to_2_ranks_sees_each_sample_once(m1, m2):
    """2 ranks -> 1 rank -> 2 ranks (micro-batch sizes may change too): the rows seen, counted in
    tokens, are exactly the straight run's over the same stream span; nothing twice, nothing skipped."""
    seq_len, n = 5, 37  # 37 sequences: the run crosses epoch boundaries mid-batch
    # Distinct rows: draw the stream so no two windows coincide (tokens up to 60000).
    tokens = np.random.default_rng(0).permutation(60000)[: 1 + seq_len * n].astype(np.uint16)
    ds = PackedDataset(tokens, seq_len)
    a, s_a = _run(ds, 2, m1, 4)  # 24 / 16 sequences
    b, s_b = _run(ds, 1, m2, 5, s_a)
    c, s_c = _run(ds, 2, m1, 3, s_b)
    total = s_c["consumed"]
    assert total == 4 * 2 * m1 + 5 * m2 + 3 * 2 * m1
    assert s_c["tokens"] == total * seq_len == (len(a) + len(b) + len(c)) * seq_len
    probe = DistributedBatchIterator(ds, 1, 0, 1, seed=7)
    straight = [tuple(ds.window(int(i))[:-1].tolist()) for i in probe.stream(0, total)]
    assert sorted(a + b + c) == sorted(straight)
    # Within one epoch no window repeats; across the 3 segments the order is the stream's.
    first_epoch = (a + b + c)[:n]
    assert len(set(first_epoch)) == n


def test_resume_from_the_earlier_epoch_batch_state():
    """A state dict of the earlier ``(epoch, batch)`` format continues exactly where that run
    stopped: its order (written out here) was perm_e[b*M*W + r*M : ...], remainder dropped."""
    ds = PackedDataset(_stream(1 + 4 * 50), 4)  # 50 sequences, M*W = 6: 8 batches per epoch
    old = {"epoch": 2, "batch": 3, "seed": 1, "shuffle": True, "micro_batch_size": 2,
           "world_size": 3, "num_sequences": 50, "seq_len": 4}
    perm = np.random.default_rng([1, 2]).permutation(50)
    for r in range(3):
        it = DistributedBatchIterator(ds, 2, r, 3, seed=1)
        it.load_state_dict(old)
        assert it.consumed == 2 * 50 + 3 * 6
        for b in range(3, 8):  # the rest of that epoch matches the old run's batches
            assert it.indices().tolist() == perm[b * 6 + r * 2 : b * 6 + r * 2 + 2].tolist()
            it.next_batch()
    it = DistributedBatchIterator(ds, 2, 0, 3, seed=1)
    with pytest.raises(ValueError, match="outside 0..7 batches per epoch"):
        it.load_state_dict({**old, "batch": 8})


def test_resume_rejects_a_different_stream():
    ds = PackedDataset(_stream(1 + 4 * 50), 4)
    state = DistributedBatchIterator(ds, 2, 0, 2, seed=1).state_dict()
    other = DistributedBatchIterator(ds, 5, 0, 1, seed=2, shuffle=False)
    with pytest.raises(ValueError, match=r"cannot resume.*seed: saved 1, now 2; shuffle: saved True, now False"):
        other.load_state_dict(state)
    shorter = DistributedBatchIterator(PackedDataset(_stream(1 + 4 * 49), 4), 2, 0, 2, seed=1)
    with pytest.raises(ValueError, match="num_sequences: saved 50, now 49"):
        shorter.load_state_dict(state)
    DistributedBatchIterator(ds, 5, 0, 1, seed=1).load_state_dict(state)  # other shape: fine
    it = DistributedBatchIterator(ds, 2, 0, 2, seed=1)
    with pytest.raises(ValueError, match="'consumed' must be a non-negative integer, got -3"):
        it.load_state_dict({**state, "consumed": -3})


def test_not_enough_sequences_for_one_global_batch():
    ds = PackedDataset(_stream(1 + 4 * 5), 4)  # 5 sequences
    with pytest.raises(ValueError, match=r"data: one global batch needs micro_batch_size x world_size = 2 x 3 = 6 "
                                         r"sequences of 5 tokens, but the corpus packs into only 5"):
        DistributedBatchIterator(ds, 2, 0, 3)
    with pytest.raises(ValueError, match="micro_batch_size: must be a positive integer, got 0"):
        DistributedBatchIterator(ds, 0, 0, 1)
    with pytest.raises(ValueError, match="rank 2 is not in range for world size 2"):
        DistributedBatchIterator(ds, 1, 2, 2)


def test_docs_example_runs(tmp_path, monkeypatch, repo_root):
    import re

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LAYERFREEZE_CACHE", str(tmp_path / "cache"))
    text = (repo_root / "docs" / "data.md").read_text(encoding="utf-8")
    code = re.findall(r"```python\n(.*?)```", text, re.S)[0]
    scope: dict = {}
    exec(compile(code, "docs/data.md", "exec"), scope)
    assert scope["batch"]["input_ids"].shape == (4, 128)
    assert scope["state"]["consumed"] == 4 and scope["state"]["seq_len"] == 128
    assert (tmp_path / "runs" / "demo" / "tokenizer" / "tokenizer.json").is_file()
