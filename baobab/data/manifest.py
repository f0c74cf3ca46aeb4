"""The manifest of a prepared corpus: what `prepare` wrote and how to read it back.

Layout of a prepared directory:

    manifest.json        {"version": 1, "dtype", "tokenizer", "splits", "sources", "config"}
    tokenizer.json       the tokenizer that produced the ids
    train_000000.bin     raw little-endian token ids (dtype from the manifest)
    val_000000.bin       ...

Every shard holds exactly `shard_tokens` ids except the last of each split; documents
are concatenated, each followed by the end-of-text id, and may span shards.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from baobab.data.tokenizer import Tokenizer

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds ids 0..vocab_size-1 (uint16 or uint32)."""
    if vocab_size < 1 or vocab_size > 2**32:
        raise ValueError(f"vocab_size must be in [1, 2**32], got {vocab_size}")
    # Explicit little-endian so shards read the same on any machine.
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class Manifest:
    """A loaded manifest.json; paths are resolved against the corpus directory."""

    def __init__(self, directory: str | Path, data: dict[str, Any]) -> None:
        self.dir = Path(directory)
        self.data = data

    @classmethod
    def load(cls, directory: str | Path) -> Manifest:
        directory = Path(directory)
        path = directory / MANIFEST_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f"'{directory}' has no manifest.json; run `baobab prepare` first"
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            raise ValueError(f"'{path}' is not valid JSON; re-run baobab prepare") from None
        version = data.get("version") if isinstance(data, dict) else None
        if version != MANIFEST_VERSION:
            raise ValueError(
                f"'{path}' has manifest version {version!r}; this baobab reads version "
                f"{MANIFEST_VERSION}, so re-run baobab prepare"
            )
        return cls(directory, data)

    # -- tokenizer ---------------------------------------------------------------------
    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.data["dtype"]).newbyteorder("<")

    @property
    def vocab_size(self) -> int:
        return int(self.data["tokenizer"]["vocab_size"])

    @property
    def eot_id(self) -> int:
        return int(self.data["tokenizer"]["eot_id"])

    @property
    def pad_id(self) -> int:
        return int(self.data["tokenizer"]["pad_id"])

    @property
    def mask_id(self) -> int:
        return int(self.data["tokenizer"]["mask_id"])

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.load(self.dir / self.data["tokenizer"]["file"])

    # -- splits ------------------------------------------------------------------------
    def _split(self, split: str) -> dict[str, Any]:
        splits = self.data["splits"]
        if split not in splits:
            raise ValueError(f"unknown split '{split}'; this corpus has {', '.join(splits)}")
        return splits[split]

    def split_tokens(self, split: str) -> int:
        return int(self._split(split)["tokens"])

    def split_documents(self, split: str) -> int:
        return int(self._split(split)["documents"])

    def shard_paths(self, split: str) -> list[Path]:
        return [self.dir / s["file"] for s in self._split(split)["shards"]]

    def verify(self, split: str | None = None) -> None:
        """Recompute every shard's size and sha256; raise ValueError on the first mismatch.

        `split=None` checks all splits.
        """
        splits = list(self.data["splits"]) if split is None else [split]
        for name in splits:
            for shard in self._split(name)["shards"]:
                path = self.dir / shard["file"]
                ok = (
                    path.is_file()
                    and path.stat().st_size == int(shard["tokens"]) * self.dtype.itemsize
                    and sha256_file(path) == shard["sha256"]
                )
                if not ok:
                    raise ValueError(
                        f"shard {shard['file']} failed its checksum: the corpus in {self.dir} "
                        f"is corrupt; re-run baobab prepare"
                    )

    def open_tokens(self, split: str) -> list[np.memmap]:
        """Read-only memory maps of the split's shards, each of shape (shard tokens,)."""
        out = []
        for shard in self._split(split)["shards"]:
            path = self.dir / shard["file"]
            n = int(shard["tokens"])
            if not path.is_file() or path.stat().st_size != n * self.dtype.itemsize:
                raise ValueError(
                    f"shard {shard['file']} is missing or has the wrong size: the corpus in "
                    f"{self.dir} is corrupt; re-run baobab prepare"
                )
            out.append(np.memmap(path, dtype=self.dtype, mode="r", shape=(n,)))
        return out

    def __repr__(self) -> str:
        counts = ", ".join(f"{s}={self.split_tokens(s)}" for s in self.data["splits"])
        return f"Manifest('{self.dir}', vocab_size={self.vocab_size}, tokens: {counts})"
