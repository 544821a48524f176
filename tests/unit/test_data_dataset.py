"""Packing, sharding, deterministic shuffling and resumable position of the batch iterator."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from layerfreeze.data import DistributedBatchIterator, PackedDataset, build_token_cache, train_tokenizer
from layerfreeze.data import load_tokenizer


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


def _epoch_indices(it: DistributedBatchIterator, epoch: int) -> list[list[int]]:
    return [it.indices(epoch, b).tolist() for b in range(it.batches_per_epoch)]


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("shuffle", [True, False])
def test_shards_are_disjoint_and_equal(world_size, shuffle):
    ds = PackedDataset(_stream(1 + 4 * 103), 4)  # 103 sequences: remainders for every size
    m = 5
    its = [DistributedBatchIterator(ds, m, r, world_size, seed=3, shuffle=shuffle) for r in range(world_size)]
    expected_batches = 103 // (m * world_size)
    assert {it.batches_per_epoch for it in its} == {expected_batches}
    for epoch in range(3):
        per_rank = [_epoch_indices(it, epoch) for it in its]
        flat = [i for rank in per_rank for batch in rank for i in batch]
        assert all(len(b) == m for rank in per_rank for b in rank)
        assert len(flat) == len(set(flat)) == expected_batches * m * world_size
        assert set(flat) <= set(range(103))
        if not shuffle:  # corpus order: global batch b = sequences [b*M*W, (b+1)*M*W)
            for b in range(expected_batches):
                glob = sorted(i for rank in per_rank for i in rank[b])
                assert glob == list(range(b * m * world_size, (b + 1) * m * world_size))


def test_batches_hold_the_indexed_windows():
    ds = PackedDataset(_stream(1 + 8 * 30), 8)
    it = DistributedBatchIterator(ds, 3, rank=1, world_size=2, seed=9)
    idx = it.indices(0, 0).tolist()
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
    assert _epoch_indices(a, 0) == _epoch_indices(b, 0)
    assert _epoch_indices(a, 0) != _epoch_indices(c, 0)
    assert _epoch_indices(a, 0) != _epoch_indices(a, 1)
    # Each epoch's order is the seeded permutation of all sequences.
    perm = np.random.default_rng([5, 1]).permutation(200)
    assert [i for batch in _epoch_indices(a, 1) for i in batch] == perm.tolist()
    ordered = DistributedBatchIterator(ds, 4, 0, 1, seed=5, shuffle=False)
    assert [i for batch in _epoch_indices(ordered, 0) for i in batch] == list(range(200))


def test_epochs_roll_over():
    ds = PackedDataset(_stream(1 + 3 * 10), 3)  # 10 sequences
    it = DistributedBatchIterator(ds, 2, 0, 2, seed=1)  # 2 batches per epoch
    seen = []
    for _ in range(5):
        seen.append((it.epoch, it.batch))
        it.next_batch()
    assert seen == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0)]
    assert it.state_dict()["epoch"] == 2 and it.state_dict()["batch"] == 1


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
        rest = [b for _, b in zip(range(total - stop), resumed)]
        for got, want in zip(rest, reference[stop:]):
            assert torch.equal(got["input_ids"], want["input_ids"])
            assert torch.equal(got["labels"], want["labels"])


def test_resume_rejects_a_different_setup():
    ds = PackedDataset(_stream(1 + 4 * 50), 4)
    state = DistributedBatchIterator(ds, 2, 0, 2, seed=1).state_dict()
    other = DistributedBatchIterator(ds, 5, 0, 1, seed=2)
    with pytest.raises(ValueError, match=r"cannot resume.*seed: saved 1, now 2; micro_batch_size: saved 2, now 5; "
                                         r"world_size: saved 2, now 1"):
        other.load_state_dict(state)
    it = DistributedBatchIterator(ds, 2, 0, 2, seed=1)
    with pytest.raises(ValueError, match="outside 0..11 batches per epoch"):
        it.load_state_dict({**state, "batch": 12})


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
    assert scope["state"]["batch"] == 1 and scope["state"]["seq_len"] == 128
    assert (tmp_path / "runs" / "demo" / "tokenizer" / "tokenizer.json").is_file()
