"""Automatic prefix caching (vLLM's): full KV-cache blocks kept by the hash of their content.

Plain Python, no torch (the scheduler's side of it; DESIGN principle 7). A block's hash
is that of its parent block's hash and its own token ids, so equal hashes mean equal
prefixes up to and including the block (:func:`block_hashes`). A block becomes cached
when its owner has computed it; it stays cached after its owner ends, unreferenced, until
a new reservation needs the room and it is the least recently used.

Reuse copies: a request's keys and values are one contiguous run of blocks that attention
reads as a strided view (``kv_cache.py``), so a request that finds its prompt's first
blocks cached gets them copied into its own run (one indexed copy per layer, much cheaper
than recomputing them) and prefills only the rest. While a copy is pending its source
blocks are referenced, so they cannot be evicted under it.

Bit-for-bit equality with and without the cache: a token's keys and values depend on the
bounds of the prefill chunk that computed it (``runner.py``), so only blocks inside whole
chunks (chunk-aligned, ``prefill_chunk_size`` tokens) are cached, and a request reuses a
whole number of chunks: its remaining prefill then runs in exactly the chunks it would have
run in without the cache. At least the prompt's last token is always computed (its logits
give the first output token).
"""

from __future__ import annotations

import hashlib
import math
from array import array
from collections import OrderedDict
from collections.abc import Sequence


def block_hashes(
    token_ids: Sequence[int], block_size: int, limit: int | None = None
) -> list[bytes]:
    """The chained hash of each full block of ``token_ids`` (the first ``limit`` tokens)."""
    end = len(token_ids) if limit is None else min(limit, len(token_ids))
    hashes, parent = [], b""
    for start in range(0, end - block_size + 1, block_size):
        block = token_ids[start : start + block_size]
        digest = hashlib.blake2b(parent, digest_size=16)
        digest.update(array("I", block).tobytes())  # 4 bytes a token id
        parent = digest.digest()
        hashes.append(parent)
    return hashes


class PrefixCache:
    """Which blocks hold which prefix, who references them, and which to evict first.

    Invariants: every cached block has exactly one hash and vice versa; a block is in
    ``_evictable`` (least recently used first) exactly when its reference count is 0; the
    blocks of ``_evictable`` belong to no request and are not free in the allocator.
    """

    def __init__(self, block_size: int, chunk_size: int) -> None:
        self.block_size = block_size
        # Reuse and caching go in whole chunks made of whole blocks.
        self.unit = math.lcm(block_size, chunk_size)
        self._block_of: dict[bytes, int] = {}
        self._hash_of: dict[int, bytes] = {}
        self._refs: dict[int, int] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self.queries = 0  # prompt tokens looked up at admission
        self.hits = 0  # of which found cached

    @property
    def num_cached(self) -> int:
        return len(self._block_of)

    @property
    def num_evictable(self) -> int:
        return len(self._evictable)

    def evictable_blocks(self) -> list[int]:
        return list(self._evictable)

    def cacheable_tokens(self, computed: int) -> int:
        """Tokens of a prompt with ``computed`` tokens computed that lie in whole chunks."""
        return computed // self.unit * self.unit

    def lookup(self, hashes: Sequence[bytes], prompt_len: int) -> list[int]:
        """The cached blocks a prompt of ``prompt_len`` tokens with full-block ``hashes``
        may reuse: its longest cached prefix, cut to whole chunks and to leave at least its
        last token to compute."""
        blocks = []
        for h in hashes:
            block = self._block_of.get(h)
            if block is None:
                break
            blocks.append(block)
        tokens = self.cacheable_tokens(min(len(blocks) * self.block_size, prompt_len - 1))
        return blocks[: tokens // self.block_size]

    def acquire(self, blocks: Sequence[int]) -> None:
        for block in blocks:
            self._refs[block] += 1
            self._evictable.pop(block, None)

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference of each block; unreferenced ones become the most recently used
        evictable blocks, in order."""
        for block in blocks:
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._evictable[block] = None

    def register(self, h: bytes, block: int) -> bool:
        """Cache ``block`` (computed, referenced by its owner) under ``h``; False if ``h`` is
        already cached elsewhere (the block then stays its owner's alone)."""
        if h in self._block_of or block in self._hash_of:
            return False
        self._block_of[h], self._hash_of[block], self._refs[block] = block, h, 1
        return True

    def is_cached(self, block: int) -> bool:
        return block in self._hash_of

    def evict(self) -> int | None:
        """Forget the least recently used unreferenced block and return it (its owner, the
        allocator, frees it); None when every cached block is referenced."""
        if not self._evictable:
            return None
        block, _ = self._evictable.popitem(last=False)
        del self._block_of[self._hash_of.pop(block)], self._refs[block]
        return block
