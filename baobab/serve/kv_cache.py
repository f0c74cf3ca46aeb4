"""The KV cache: one preallocated key tensor and one value tensor per layer.

Shape legend: P cache positions (num_blocks * block_size), Hkv key/value heads, D head_dim.

Each layer holds ``k`` and ``v`` of shape (Hkv, P + 1, D). A request owns a contiguous run
of blocks (the scheduler's :class:`~baobab.serve.scheduler.BlockAllocator` hands them out,
sized for its prompt + max_tokens), so its keys at positions 0..n-1 are the strided view
``k[:, base:base + n]`` (Hkv, n, D) that attention reads directly: no gather, no copy, and
a view that is the same whatever else is cached. The extra last position is scratch:
padding rows of a step write there and nothing reads it. Everything is allocated once at
start-up (DESIGN principle 8).
"""

from __future__ import annotations

import torch

from baobab.models.gpt import GPTConfig


def token_bytes(cfg: GPTConfig, dtype: torch.dtype) -> int:
    """Bytes of one token's keys and values in every layer."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * itemsize


def num_blocks_for(cfg: GPTConfig, dtype: torch.dtype, budget_bytes: int, block_size: int) -> int:
    """Blocks of ``block_size`` tokens that ``budget_bytes`` buys; ValueError unless they hold
    at least one full-context request (``max_seq_len`` tokens)."""
    blocks = budget_bytes // (token_bytes(cfg, dtype) * block_size)
    if blocks * block_size < cfg.max_seq_len:
        need = token_bytes(cfg, dtype) * (-(-cfg.max_seq_len // block_size) * block_size)
        raise ValueError(
            f"EngineConfig.kv_cache_memory_gib is too small: one full-context request "
            f"({cfg.max_seq_len} tokens) needs {need / 2**30:.4f} GiB, got "
            f"{budget_bytes / 2**30:.4f} GiB."
        )
    return int(blocks)


class KVCache:
    """Keys and values of every layer at ``num_blocks * block_size`` positions + scratch."""

    def __init__(
        self,
        cfg: GPTConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self.capacity = num_blocks * block_size
        self.scratch = self.capacity  # padding rows write here; never read
        self.heads, self.head_dim = cfg.n_kv_head, cfg.head_dim
        shape = (cfg.n_kv_head, self.capacity + 1, cfg.head_dim)
        # Zeros, not empty: the memory is committed now, not on first use.
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layer)]
        self._stride = (0, (self.capacity + 1) * cfg.head_dim, cfg.head_dim, 1)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    def write(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k``, ``v`` (Hkv, M, D) of M tokens at cache ``positions`` (M,)."""
        self.k[layer].index_copy_(1, positions, k)
        self.v[layer].index_copy_(1, positions, v)

    def copy_blocks(self, blocks: list[int], first: int) -> None:
        """Copy the keys and values of ``blocks`` to the run of blocks from ``first``, in
        every layer (prefix caching: a request's reused prefix into its own run)."""
        size = self.block_size
        src = torch.tensor([b * size + i for b in blocks for i in range(size)])
        dst = torch.arange(first * size, (first + len(blocks)) * size)
        src, dst = src.to(self.k[0].device), dst.to(self.k[0].device)
        for cache in (*self.k, *self.v):
            cache.index_copy_(1, dst, cache.index_select(1, src))

    def view(self, layer: int, base: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values at positions base..base+length-1: (1, Hkv, length, D) views."""
        size = (1, self.heads, length, self.head_dim)
        offset = base * self.head_dim
        return (
            self.k[layer].as_strided(size, self._stride, offset),
            self.v[layer].as_strided(size, self._stride, offset),
        )

    def gather(
        self, layer: int, positions: torch.Tensor, groups: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values at ``positions`` (G * L,), G runs of L: (Hkv, G, L, D) copies."""
        shape = (self.heads, groups, -1, self.head_dim)
        return (
            self.k[layer].index_select(1, positions).view(shape),
            self.v[layer].index_select(1, positions).view(shape),
        )
