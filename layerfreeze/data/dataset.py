"""Packed fixed-length sequences over a token cache, and the sharded, resumable batch iterator.

Packing (Megatron style): sequence ``i`` is ``tokens[i*L : i*L + L + 1]`` for ``L = seq_len``, so
consecutive sequences overlap by one token and every token of the stream except the first is a
label exactly once. ``input_ids = seq[:-1]``, ``labels = seq[1:]``. Documents are already
separated by EOS (and started by BOS) in the stream; a sequence may span documents (no
attention masking across them). The tail that does not fill a whole sequence is not used.

Order: each epoch is a permutation of all sequences drawn from ``np.random.default_rng([seed,
epoch])`` (or the identity without shuffling). Global batch ``b`` of an epoch is the slice
``perm[b*M*W : (b+1)*M*W]`` (``M`` micro-batch size, ``W`` world size) and rank ``r`` takes
``[r*M : (r+1)*M]`` of it, so ranks are disjoint and every rank has the same number of
batches; the remainder of an epoch that does not fill a global batch is skipped. The position
is ``(epoch, batch)``; ``state_dict()`` saves it and a fresh iterator with ``load_state_dict``
continues with exactly the batches an uninterrupted run would have produced.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from layerfreeze.data.cache import TokenCache

__all__ = ["PackedDataset", "DistributedBatchIterator"]


class PackedDataset:
    """Fixed-length windows of ``seq_len + 1`` tokens over a :class:`TokenCache`.

    Args:
        cache: the opened token cache (or any 1-D integer array of tokens).
        seq_len: tokens per training sequence.

    Raises:
        ValueError: ``seq_len`` < 1, or the corpus is shorter than one sequence.
    """

    def __init__(self, cache: TokenCache | np.ndarray, seq_len: int):
        if not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"data.seq_len: must be a positive integer, got {seq_len!r}.")
        self.cache = cache if isinstance(cache, TokenCache) else None
        self.tokens = cache.tokens if isinstance(cache, TokenCache) else np.asarray(cache)
        self.seq_len = seq_len
        n = int(self.tokens.shape[0])
        if n < seq_len + 1:
            where = ""
            if self.cache is not None:
                where = f" (cache {self.cache.path}, files: {', '.join(self.cache.files)})"
            raise ValueError(
                f"data.seq_len: the corpus has {n} tokens{where}, fewer than one sequence of "
                f"seq_len + 1 = {seq_len + 1} tokens. Add more text or lower data.seq_len."
            )
        self.num_sequences = (n - 1) // seq_len

    def __len__(self) -> int:
        return self.num_sequences

    def window(self, i: int) -> np.ndarray:
        """Raw tokens of sequence ``i`` (``seq_len + 1`` of them), as int64."""
        if not 0 <= i < self.num_sequences:
            raise IndexError(f"sequence {i} out of range (0..{self.num_sequences - 1})")
        start = i * self.seq_len
        return np.asarray(self.tokens[start : start + self.seq_len + 1], dtype=np.int64)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        w = torch.from_numpy(self.window(i))
        return {"input_ids": w[:-1], "labels": w[1:]}


class DistributedBatchIterator:
    """Deterministic, sharded, resumable micro-batches over a :class:`PackedDataset`.

    Iterating never ends: after the last batch of an epoch the next epoch starts with a new
    permutation. Each call of :meth:`next_batch` yields one micro-batch for this rank; with
    gradient accumulation call it once per micro-step.

    Args:
        dataset: the packed sequences.
        micro_batch_size: sequences per batch on each rank.
        rank: data-parallel rank (default: from ``torch.distributed`` / ``RANK``).
        world_size: data-parallel size (default: from ``torch.distributed`` / ``WORLD_SIZE``).
        seed: shuffle seed (the same on every rank).
        shuffle: permute sequences each epoch; False keeps corpus order.

    Raises:
        ValueError: bad sizes, or fewer sequences than one global batch needs.
    """

    def __init__(
        self,
        dataset: PackedDataset,
        micro_batch_size: int,
        rank: int | None = None,
        world_size: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
    ):
        from layerfreeze.utils.dist import get_rank, get_world_size

        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.rank = get_rank() if rank is None else rank
        self.world_size = get_world_size() if world_size is None else world_size
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        if not isinstance(micro_batch_size, int) or micro_batch_size < 1:
            raise ValueError(f"micro_batch_size: must be a positive integer, got {micro_batch_size!r}.")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in range for world size {self.world_size}.")
        global_batch = micro_batch_size * self.world_size
        self.batches_per_epoch = len(dataset) // global_batch
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"data: one global batch needs micro_batch_size x world_size = {micro_batch_size} x "
                f"{self.world_size} = {global_batch} sequences of {dataset.seq_len + 1} tokens, but the "
                f"corpus packs into only {len(dataset)}. Add more text, lower data.seq_len or the "
                "micro-batch size."
            )
        self.epoch = 0
        self.batch = 0  # next batch within the epoch
        self._perm_epoch: int | None = None
        self._perm: np.ndarray | None = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            n = len(self.dataset)
            if self.shuffle:
                self._perm = np.random.default_rng([self.seed, epoch]).permutation(n)
            else:
                self._perm = np.arange(n)
            self._perm_epoch = epoch
        return self._perm  # type: ignore[return-value]

    def indices(self, epoch: int, batch: int) -> np.ndarray:
        """Sequence indices of this rank's micro-batch ``batch`` in ``epoch``."""
        m, w = self.micro_batch_size, self.world_size
        start = batch * m * w + self.rank * m
        return self._permutation(epoch)[start : start + m]

    def next_batch(self) -> dict[str, torch.Tensor]:
        """This rank's next micro-batch: ``input_ids`` and ``labels``, LongTensors ``[M, seq_len]``."""
        idx = self.indices(self.epoch, self.batch)
        windows = torch.from_numpy(np.stack([self.dataset.window(int(i)) for i in idx]))
        self.batch += 1
        if self.batch == self.batches_per_epoch:
            self.epoch += 1
            self.batch = 0
        return {"input_ids": windows[:, :-1].contiguous(), "labels": windows[:, 1:].contiguous()}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield self.next_batch()

    @property
    def tokens_per_batch(self) -> int:
        """Input tokens in one micro-batch on one rank."""
        return self.micro_batch_size * self.dataset.seq_len

    def state_dict(self) -> dict[str, Any]:
        """The position plus what must match on resume (plain ints/bools, JSON-friendly)."""
        return {
            "epoch": self.epoch,
            "batch": self.batch,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "micro_batch_size": self.micro_batch_size,
            "world_size": self.world_size,
            "num_sequences": len(self.dataset),
            "seq_len": self.dataset.seq_len,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position.

        Raises:
            ValueError: the saved run used a different seed, shuffle, micro-batch size, world
                size, sequence length or corpus (number of sequences), so the same position
                would not give the same batches.
        """
        mine = self.state_dict()
        problems = [
            f"{k}: saved {state.get(k)!r}, now {mine[k]!r}"
            for k in ("seed", "shuffle", "micro_batch_size", "world_size", "seq_len", "num_sequences")
            if state.get(k) != mine[k]
        ]
        if problems:
            raise ValueError(
                "data position: cannot resume, the data order differs from the saved run ("
                + "; ".join(problems)
                + "). Resume with the same data, data.seq_len, seed, micro-batch size and world size."
            )
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if epoch < 0 or not 0 <= batch < self.batches_per_epoch:
            raise ValueError(
                f"data position: saved position epoch={epoch} batch={batch} is outside "
                f"0..{self.batches_per_epoch - 1} batches per epoch."
            )
        self.epoch, self.batch = epoch, batch
