"""Attention backends: the swappable part of a decoder's forward.

A model computes the queries, keys and values of its new tokens (already rotated) and
hands them to an ``attend`` callable, which decides which keys each query sees and where
keys live between calls (gpt-fast's ``input_pos`` + cache, vLLM's attention backends):

* :func:`causal_attention`: the whole sequence at once, causal (training, and a forward
  without a cache). The default.
* :class:`ContiguousKVCache`: one contiguous cache per sequence, for ``generate``: a
  prompt is prefilled once, then each new token attends to the cached keys.
* the serving runner's paged attention (``baobab.serve.runner``): many requests packed
  into one sequence of rows, each attending to its own run of a shared cache.

Shapes: B batch, T new tokens, H query heads, Hkv key/value heads, D head_dim,
L cached + new keys. Head counts may be per-rank slices (tensor parallelism).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F


class Attend(Protocol):
    """``attend(layer, q, k, v, dropout_p) -> y``: q (B, H, T, D), k and v (B, Hkv, T, D)
    of the new tokens of block ``layer``; y (B, T, H * D), ready for the output projection.
    Query head h uses key head h // (H // Hkv), as Hugging Face's ``repeat_kv`` does."""

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float
    ) -> torch.Tensor: ...


def causal_attention(
    layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0
) -> torch.Tensor:
    """Causal attention over the new tokens only (no cache): token t sees tokens 0..t."""
    del layer  # nothing is kept between calls
    y = F.scaled_dot_product_attention(
        q, k, v, dropout_p=dropout_p, is_causal=True, enable_gqa=q.shape[1] != k.shape[1]
    )  # (B, H, T, D)
    return y.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)  # (B, T, H * D)


class ContiguousKVCache:
    """Keys and values of ``batch`` sequences at positions 0..length-1, per layer.

    Set ``start`` (the position of the first new token; the keys before it are cached)
    before each forward; the forward's positions must be ``start, start + 1, ...``. A
    forward from ``start = 0`` is the training forward exactly (causal attention over the
    new tokens); later ones see every cached key. Tensors are allocated on the first call,
    in the dtype and on the device of the keys: (B, Hkv, length, D) per layer.
    """

    def __init__(self, n_layer: int, length: int) -> None:
        self.length = length
        self.start = 0
        self.k: list[torch.Tensor | None] = [None] * n_layer
        self.v: list[torch.Tensor | None] = [None] * n_layer

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0
    ) -> torch.Tensor:
        start, end = self.start, self.start + q.shape[2]
        if end > self.length:
            raise ValueError(
                f"positions {start}..{end - 1} do not fit a KV cache of {self.length} positions."
            )
        keys, values = self._store(layer, k, v, start, end)  # (B, Hkv, end, D)
        if start == 0:  # nothing cached before: the plain causal forward, bit for bit
            return causal_attention(layer, q, k, v, dropout_p)
        # Query i (position start + i) sees keys 0..start + i: bottom-right causal.
        mask = None
        if end - start > 1:
            cols = torch.arange(end, device=q.device)
            mask = cols[None, :] <= torch.arange(start, end, device=q.device)[:, None]
        y = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1]
        )  # (B, H, T, D)
        return y.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)  # (B, T, H * D)

    def _store(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int, end: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, Hkv, T, D) at positions start..end-1; the views 0..end-1."""
        if self.k[layer] is None:
            shape = (*k.shape[:2], self.length, k.shape[3])  # (B, Hkv, length, D)
            self.k[layer] = k.new_zeros(shape)
            self.v[layer] = v.new_zeros(shape)
        keys, values = self.k[layer], self.v[layer]
        keys[:, :, start:end] = k
        values[:, :, start:end] = v
        return keys[:, :, :end], values[:, :, :end]
