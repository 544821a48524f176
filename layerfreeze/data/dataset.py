"""Packed fixed-length sequences over a token cache, and the sharded, resumable batch iterator.

Packing (Megatron style): sequence ``i`` is ``tokens[i*L : i*L + L + 1]`` for ``L = seq_len``, so
consecutive sequences overlap by one token and every token of the stream except the first is a
label exactly once. ``input_ids = seq[:-1]``, ``labels = seq[1:]``. Documents are already
separated by EOS (and started by BOS) in the stream; a sequence may span documents (no
attention masking across them). The tail that does not fill a whole sequence is not used.

Order: a fixed global stream, independent of the number of ranks. Epoch ``e`` is the permutation
of all ``N`` sequences drawn from ``np.random.default_rng([seed, e])`` (the identity without
shuffling), and the epochs are concatenated: stream position ``p`` is sequence
``perm_{p // N}[p % N]``. Nothing is dropped at an epoch end; a global batch may straddle two
epochs.

Sharding: the iterator keeps one *global sample cursor* ``c`` (sequences consumed by all ranks
together). A micro-batch step on ``W`` ranks of ``M`` sequences each takes stream positions
``[c, c + M*W)``; rank ``r`` gets ``[c + r*M, c + (r+1)*M)``; then ``c += M*W`` on every rank.
Ranks are disjoint and the cursor is the same on every rank.

Resume: ``state_dict()`` holds the cursor (plus what fixes the stream: seed, shuffle, sequence
length, number of sequences). Because the stream does not depend on ``W`` or ``M``, a run saved
on 4 ranks can resume on 2 (or with another micro-batch size) and sees every remaining sample
exactly once: no sample of the stream before the cursor is seen again and none after it is
skipped. Consumed tokens are ``c * seq_len`` input tokens. State dicts of the earlier
``(epoch, batch)`` format (which dropped each epoch's remainder) load too: the position maps
to ``epoch*N + batch*M_saved*W_saved``, which continues exactly where that run stopped.
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
    """Deterministic, sharded micro-batches over a :class:`PackedDataset`, resumable on any
    number of ranks.

    Iterating never ends: the stream runs through epoch after epoch. Each call of
    :meth:`next_batch` yields one micro-batch for this rank and advances the global cursor by
    ``micro_batch_size * world_size`` on every rank; with gradient accumulation call it once per
    micro-step. See the module docstring for the order.

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

    STATE_VERSION = 2

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
            raise ValueError(
                f"micro_batch_size: must be a positive integer, got {micro_batch_size!r}."
            )
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in range for world size {self.world_size}.")
        global_batch = micro_batch_size * self.world_size
        if len(dataset) < global_batch:
            raise ValueError(
                f"data: one global batch needs micro_batch_size x world_size = {micro_batch_size} x "
                f"{self.world_size} = {global_batch} sequences of {dataset.seq_len + 1} tokens, but the "
                f"corpus packs into only {len(dataset)}. Add more text, lower data.seq_len or the "
                "micro-batch size."
            )
        self.consumed = 0  # global sample cursor: stream positions consumed by all ranks together
        self._perms: dict[int, np.ndarray] = {}

    @property
    def global_batch_size(self) -> int:
        """Sequences one micro-step takes over all ranks (``micro_batch_size * world_size``)."""
        return self.micro_batch_size * self.world_size

    @property
    def epoch(self) -> int:
        """Epoch of the next sequence in the stream."""
        return self.consumed // len(self.dataset)

    @property
    def tokens_consumed(self) -> int:
        """Input tokens consumed by all ranks together (``consumed * seq_len``)."""
        return self.consumed * self.dataset.seq_len

    def _permutation(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            n = len(self.dataset)
            if self.shuffle:
                perm = np.random.default_rng([self.seed, epoch]).permutation(n)
            else:
                perm = np.arange(n)
            # A global batch spans at most two epochs: keep the newest two.
            self._perms = {e: p for e, p in self._perms.items() if e == epoch - 1}
            self._perms[epoch] = perm
        return perm

    def stream(self, start: int, count: int) -> np.ndarray:
        """Sequence indices at global stream positions ``[start, start + count)``."""
        n = len(self.dataset)
        out = np.empty(count, dtype=np.int64)
        done = 0
        while done < count:
            epoch, offset = divmod(start + done, n)
            take = min(count - done, n - offset)
            out[done : done + take] = self._permutation(epoch)[offset : offset + take]
            done += take
        return out

    def indices(self, cursor: int | None = None) -> np.ndarray:
        """This rank's sequence indices for the micro-step whose global batch starts at stream
        position ``cursor`` (default: the next one)."""
        c = self.consumed if cursor is None else cursor
        return self.stream(c + self.rank * self.micro_batch_size, self.micro_batch_size)

    def next_batch(self) -> dict[str, torch.Tensor]:
        """This rank's next micro-batch: ``input_ids`` and ``labels``, LongTensors ``[M, seq_len]``."""
        idx = self.indices()
        windows = torch.from_numpy(np.stack([self.dataset.window(int(i)) for i in idx]))
        self.consumed += self.global_batch_size
        return {"input_ids": windows[:, :-1].contiguous(), "labels": windows[:, 1:].contiguous()}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield self.next_batch()

    @property
    def tokens_per_batch(self) -> int:
        """Input tokens in one micro-batch on one rank."""
        return self.micro_batch_size * self.dataset.seq_len

    def state_dict(self) -> dict[str, Any]:
        """The global cursor plus what fixes the stream (plain ints/bools, JSON-friendly).

        The same on every rank and independent of the world size: ``consumed`` is the cursor;
        ``epoch``, ``position`` (within the epoch) and ``tokens`` are derived from it for
        reading; ``micro_batch_size`` and ``world_size`` record the saving run's shape only.
        """
        n = len(self.dataset)
        return {
            "version": self.STATE_VERSION,
            "consumed": self.consumed,
            "epoch": self.consumed // n,
            "position": self.consumed % n,
            "tokens": self.tokens_consumed,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_sequences": n,
            "seq_len": self.dataset.seq_len,
            "micro_batch_size": self.micro_batch_size,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved cursor, on any world size and micro-batch size.

        Args:
            state: a :meth:`state_dict`, or one of the earlier ``(epoch, batch)`` format.

        Raises:
            ValueError: the saved run used a different seed, shuffle, sequence length or corpus
                (number of sequences), so the stream differs; or the position is malformed.
        """
        mine = self.state_dict()
        problems = [
            f"{k}: saved {state.get(k)!r}, now {mine[k]!r}"
            for k in ("seed", "shuffle", "seq_len", "num_sequences")
            if state.get(k) != mine[k]
        ]
        if problems:
            raise ValueError(
                "data position: cannot resume, the data order differs from the saved run ("
                + "; ".join(problems)
                + "). Resume with the same data, data.seq_len, data.shuffle and seed."
            )
        n = len(self.dataset)
        if "consumed" in state:
            consumed = state["consumed"]
            if not isinstance(consumed, int) or isinstance(consumed, bool) or consumed < 0:
                raise ValueError(
                    f"data position: saved cursor 'consumed' must be a non-negative integer, "
                    f"got {consumed!r}."
                )
        else:  # the earlier (epoch, batch) format: that run dropped each epoch's remainder
            epoch, batch = state.get("epoch"), state.get("batch")
            m, w = state.get("micro_batch_size"), state.get("world_size")
            ints = (epoch, batch, m, w)
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in ints):
                raise ValueError(
                    "data position: the saved state has neither 'consumed' nor integer 'epoch', "
                    f"'batch', 'micro_batch_size', 'world_size', got {state!r}."
                )
            per_epoch = n // (m * w) if m > 0 and w > 0 else 0
            if epoch < 0 or not 0 <= batch < per_epoch:
                raise ValueError(
                    f"data position: saved position epoch={epoch} batch={batch} is outside "
                    f"0..{per_epoch - 1} batches per epoch."
                )
            consumed = epoch * n + batch * m * w
        self.consumed = consumed
