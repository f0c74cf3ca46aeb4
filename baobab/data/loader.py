"""DataLoader: a dataset with `get_batch` plus a GlobalSampler; Prefetcher: the next batch
drawn (and pinned for a GPU) while the current step runs.

Batches are gathered in the calling process (memory maps and in-memory arrays are
cheap to index), so there are no worker processes and the position in the data is
exactly the sampler's state.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
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


class Prefetcher:
    """``loader``'s batches, each drawn in a background thread while the step before it
    runs, pinned in page-locked memory when ``pin`` (for a GPU: the copy to the device is
    then asynchronous), and moved to ``device`` with ``non_blocking``.

    One batch ahead, in the same order as ``loader.next_batch()``: a run with prefetching
    sees exactly the batches of one without. ``state_dict`` is the position of the next
    batch *handed out*, not drawn, so a checkpoint resumes where training was. The loader
    is used only through this object (and only by its thread while a draw is under way).
    """

    def __init__(self, loader: DataLoader, device: Any = "cpu", pin: bool = False) -> None:
        self.loader, self.device, self.pin = loader, device, pin
        self._pool: ThreadPoolExecutor | None = None
        self._ahead: Future | None = None  # -> (loader state after the draw, batch)
        self._position: dict[str, int] | None = None  # after the last batch handed out

    def _draw(self) -> tuple[dict[str, int], Batch]:
        x, y = self.loader.next_batch()
        after = self.loader.state_dict()
        if self.pin:
            x, y = x.pin_memory(), y.pin_memory()
        return after, (x, y)

    def _drop_ahead(self) -> None:
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            ahead.result()  # wait: the loader is the thread's until then

    def next_batch(self) -> Batch:
        ahead, self._ahead = self._ahead, None
        self._position, (x, y) = ahead.result() if ahead is not None else self._draw()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="baobab-prefetch")
        self._ahead = self._pool.submit(self._draw)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    @property
    def epoch(self) -> int:
        """The epoch the next batch handed out comes from."""
        return self.state_dict()["epoch"]

    def state_dict(self) -> dict[str, int]:
        """The position of the next batch handed out (never waits for the thread)."""
        if self._position is not None:
            return dict(self._position)
        return self.loader.state_dict()  # nothing handed out: nothing drawn ahead either

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._drop_ahead()  # a batch drawn from the old position
        self._position = None
        self.loader.load_state_dict(state)

    def close(self) -> None:
        """Stop the thread and leave ``loader`` at the position of the next batch handed
        out (a batch drawn ahead is put back)."""
        self._drop_ahead()
        if self._position is not None:
            self.loader.load_state_dict(self._position)
            self._position = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
