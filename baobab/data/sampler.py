"""A resumable sampler that splits each global batch across data-parallel ranks.

The state is global, not per rank: every rank walks the same seeded permutation of
the dataset with the same cursor (samples consumed by all ranks together). At each
step the next `batch_size * world_size` indices form the global batch and rank r
takes the contiguous slice `[r * batch_size, (r + 1) * batch_size)`, so concatenating
the ranks' batches in rank order gives exactly the batch one process would draw with
`batch_size * world_size`. Because of that, a run may resume on a different number of
ranks: only the global batch size has to match.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np


class GlobalSampler:
    """Indices for one rank; see the module docstring for the contract."""

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
    ) -> None:
        if num_samples < 1:
            raise ValueError(
                f"the dataset is empty (num_samples={num_samples}); it needs at least one sample"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if world_size < 1:
            raise ValueError(f"world_size must be at least 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.num_samples = int(num_samples)
        self.batch_size = int(batch_size)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.global_batch_size = self.batch_size * self.world_size
        if drop_last and self.num_samples < self.global_batch_size:
            raise ValueError(
                f"the dataset has {self.num_samples} samples, fewer than one global batch of "
                f"{self.global_batch_size} (batch_size {batch_size} x world_size {world_size}); "
                f"lower batch_size or set drop_last=False"
            )
        self._epoch = 0
        self._cursor = 0
        self._perm: np.ndarray | None = None
        self._perm_epoch = -1

    @property
    def batches_per_epoch(self) -> int:
        """Steps per epoch (the same on every rank)."""
        full, rest = divmod(self.num_samples, self.global_batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    @property
    def epoch(self) -> int:
        """The epoch the next batch comes from."""
        return self._epoch

    @property
    def cursor(self) -> int:
        """Samples of this epoch consumed so far by all ranks together."""
        return self._cursor

    def _epoch_end(self) -> int:
        # With drop_last the trailing remainder (< one global batch) is never drawn.
        if self.drop_last:
            return self.num_samples // self.global_batch_size * self.global_batch_size
        return self.num_samples

    def permutation(self, epoch: int) -> np.ndarray:
        """The order of the samples in `epoch`, shape (num_samples,), int64."""
        if epoch != self._perm_epoch:
            if self.shuffle:
                rng = np.random.default_rng([self.seed, epoch])
                self._perm = rng.permutation(self.num_samples).astype(np.int64)
            else:
                self._perm = np.arange(self.num_samples, dtype=np.int64)
            self._perm_epoch = epoch
        assert self._perm is not None
        return self._perm

    def next_indices(self) -> np.ndarray:
        """This rank's indices for the next step (shape (batch_size,) except in a
        partial last batch without drop_last), advancing the global cursor."""
        start = self._cursor
        stop = min(start + self.global_batch_size, self._epoch_end())
        global_batch = self.permutation(self._epoch)[start:stop]
        if global_batch.size == self.global_batch_size:
            local = global_batch[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        else:
            # Partial last batch: near-equal contiguous pieces (a rank may get none).
            local = np.array_split(global_batch, self.world_size)[self.rank]
        self._cursor = stop
        if self._cursor >= self._epoch_end():
            self._epoch, self._cursor = self._epoch + 1, 0
        return local.copy()

    def __iter__(self) -> Iterator[np.ndarray]:
        """Endless stream of `next_indices()`, crossing epochs."""
        while True:
            yield self.next_indices()

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self._epoch,
            "cursor": self._cursor,
            "seed": self.seed,
            "num_samples": self.num_samples,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the saved global cursor (and the saved seed).

        The saving run may have used another world size or per-rank batch size; the
        sequence of global batches continues unchanged as long as the global batch
        size is the same.
        """
        num_samples = int(state["num_samples"])
        if num_samples != self.num_samples:
            raise ValueError(
                f"the sampler state is for {num_samples} samples but this dataset has "
                f"{self.num_samples}; resume with the same data"
            )
        epoch, cursor = int(state["epoch"]), int(state["cursor"])
        if epoch < 0 or not 0 <= cursor <= self.num_samples:
            raise ValueError(
                f"the sampler state has an invalid position (epoch {epoch}, cursor {cursor})"
            )
        self.seed = int(state.get("seed", self.seed))
        self._perm_epoch = -1  # the seed may have changed
        self._epoch, self._cursor = epoch, cursor
        if self._cursor >= self._epoch_end():
            self._epoch, self._cursor = self._epoch + 1, 0

    def __repr__(self) -> str:
        return (
            f"GlobalSampler(num_samples={self.num_samples}, batch_size={self.batch_size}, "
            f"rank={self.rank}, world_size={self.world_size}, epoch={self._epoch}, cursor={self._cursor})"
        )


# Mixed into the sample's seed so that it shares no stream with the training order, which
# is seeded by [seed, epoch].
_SPREAD_SAMPLE_TAG = 0x5EED_E7A1


def spread_sample(num_samples: int, count: int, seed: int) -> np.ndarray:
    """``count`` distinct sample indices spread over ``[0, num_samples)``, sorted, int64.

    The range is cut into ``count`` equal strata (sizes differ by at most one) and one
    index is drawn from each by a generator seeded with ``seed`` (no global state): it covers
    the whole split evenly (unlike its first ``count`` samples, which may all come from one
    file), is random within each stratum (no aliasing with a periodic layout of the data),
    and is the same at every call, so evaluations made with it are comparable.
    ``count >= num_samples`` gives every index.
    """
    if count < 1:
        raise ValueError(f"the evaluation sample needs at least 1 sample, got {count}")
    if count >= num_samples:
        return np.arange(num_samples, dtype=np.int64)
    bounds = np.arange(count + 1, dtype=np.int64) * num_samples // count  # (count + 1,)
    rng = np.random.default_rng([seed, _SPREAD_SAMPLE_TAG])
    return rng.integers(bounds[:-1], bounds[1:]).astype(np.int64)  # bounds[i] <= pick < [i+1]


def ordered_batches(
    num_samples: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    indices: np.ndarray | None = None,
) -> Iterator[np.ndarray]:
    """One in-order pass for evaluation: rank r's share of each global batch, the last
    partial batch included and split with np.array_split; empty shares are skipped.

    ``indices`` (default: all of ``range(num_samples)``) is the pass's global order, e.g.
    a ``spread_sample``; the ranks' shares of one global batch concatenate in rank order to
    the batch one process would take, so the world size does not change what is covered.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    order = np.arange(num_samples, dtype=np.int64) if indices is None else np.asarray(indices)
    global_batch = batch_size * world_size
    for start in range(0, order.size, global_batch):
        idx = order[start : start + global_batch]
        if idx.size == global_batch:
            local = idx[rank * batch_size : (rank + 1) * batch_size]
        else:
            local = np.array_split(idx, world_size)[rank]
        if local.size:
            yield local
