"""DataLoader: a dataset with `get_batch` plus a GlobalSampler.

Batches are gathered in the calling process (memory maps and in-memory arrays are
cheap to index), so there are no worker processes and the position in the data is
exactly the sampler's state.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from baobab.data.arrays import BatchDataset
from baobab.data.sampler import GlobalSampler, ordered_batches

Batch = tuple[torch.Tensor, torch.Tensor]


class DataLoader:
    """Endless, resumable batches of `dataset` for one data-parallel rank."""

    def __init__(
        self,
        dataset: BatchDataset,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
    ) -> None:
        self.dataset = dataset
        self.sampler = GlobalSampler(
            len(dataset),
            batch_size,
            rank,
            world_size,
            seed=seed,
            shuffle=shuffle,
            drop_last=drop_last,
        )

    @property
    def batch_size(self) -> int:
        return self.sampler.batch_size

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    @property
    def batches_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch

    def next_batch(self) -> Batch:
        """The next (x, y) of this rank; moves to the next epoch by itself."""
        return self.dataset.get_batch(self.sampler.next_indices())

    def __iter__(self) -> Iterator[Batch]:
        """Endless: `for x, y in loader` runs across epochs until the caller stops."""
        while True:
            yield self.next_batch()

    def iter_epoch(
        self, batch_size: int | None = None, indices: np.ndarray | None = None
    ) -> Iterator[Batch]:
        """One in-order pass over all samples (or over ``indices``, e.g. a
        ``spread_sample``) for evaluation, split across ranks like training batches (the
        last partial batch included; a rank with no share of it gets no batch). Leaves the
        training position untouched."""
        s = self.sampler
        for idx in ordered_batches(
            len(self.dataset), batch_size or s.batch_size, s.rank, s.world_size, indices
        ):
            yield self.dataset.get_batch(idx)

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)

    def __repr__(self) -> str:
        return f"DataLoader({self.dataset!r}, {self.sampler!r})"
