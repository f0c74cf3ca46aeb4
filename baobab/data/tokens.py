"""Language-model samples from a prepared corpus: fixed windows over memory-mapped shards.

Shard s with n ids gives (n - 1) // seq_len windows; window k covers ids
[k * seq_len, k * seq_len + seq_len + 1), so inputs never overlap and consecutive
windows share only the boundary id that is one window's last target and the next
window's first input. Windows never cross a shard boundary: the few ids at the end
of a shard are dropped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from baobab.data.manifest import Manifest


class TokenWindows:
    """Dataset of (x, y) windows of `seq_len` ids from one split of a prepared corpus."""

    def __init__(
        self,
        manifest_dir: str | Path | Manifest,
        split: str = "train",
        seq_len: int = 256,
        verify: bool = True,
    ) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be at least 1, got {seq_len}")
        self.manifest = (
            manifest_dir if isinstance(manifest_dir, Manifest) else Manifest.load(manifest_dir)
        )
        self.split = split
        self.seq_len = seq_len
        if verify:
            self.manifest.verify(split)
        self.shards = self.manifest.open_tokens(split)
        per_shard = np.array(
            [(len(s) - 1) // seq_len if len(s) else 0 for s in self.shards], dtype=np.int64
        )
        # starts[s] = index of shard s's first window; starts[-1] = number of windows.
        self._starts = np.concatenate([[0], np.cumsum(per_shard)]).astype(np.int64)
        if self._starts[-1] == 0:
            total = self.manifest.split_tokens(split)
            raise ValueError(
                f"the '{split}' split has {total} tokens, fewer than one window of seq_len "
                f"{seq_len} + 1; lower seq_len or prepare more data"
            )

    @property
    def vocab_size(self) -> int:
        return self.manifest.vocab_size

    @property
    def eot_id(self) -> int:
        return self.manifest.eot_id

    def __len__(self) -> int:
        return int(self._starts[-1])

    def window(self, index: int) -> np.ndarray:
        """The seq_len + 1 ids of window `index`, int64."""
        return self._gather(np.asarray([index]))[0]

    def _gather(self, indices: np.ndarray) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self)
        if indices.size and (indices.min() < 0 or indices.max() >= n):
            raise IndexError(f"window indices must be in [0, {n})")
        shard = np.searchsorted(self._starts, indices, side="right") - 1
        offset = (indices - self._starts[shard]) * self.seq_len
        out = np.empty((indices.size, self.seq_len + 1), dtype=np.int64)  # (B, T + 1)
        for row, (s, o) in enumerate(zip(shard.tolist(), offset.tolist())):
            out[row] = self.shards[s][o : o + self.seq_len + 1]
        return out

    def get_batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs x and next-token targets y, both LongTensor of shape (B, seq_len)."""
        windows = torch.from_numpy(self._gather(indices))  # (B, T + 1)
        # contiguous copies so callers may .view() them (B * T,) for the loss
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    def __repr__(self) -> str:
        return f"TokenWindows('{self.manifest.dir}', split='{self.split}', seq_len={self.seq_len}, windows={len(self)})"
