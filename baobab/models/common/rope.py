"""Rotary position embeddings in the Hugging Face Llama convention (rotate_half).

The head dimension is split in two halves (x1, x2), not interleaved pairs, so weights
exported to ``LlamaForCausalLM`` give identical logits without permuting wq/wk.

Shapes: T = positions, D = head_dim, B = batch, H = heads.

The models rotate with :func:`apply_rotary_rolled` and a sin table whose first half is
negated (:func:`rotation_sin`, once per forward): ``rotate_half(x) * sin`` equals
``x.roll(D/2) * rotation_sin(sin)`` bit for bit (``(-a) * b == a * (-b)`` in IEEE, and
so do their gradients), one roll instead of chunk/neg/cat per tensor and layer.
"""

import torch


def rope_cos_sin(
    head_dim: int, max_seq_len: int, theta: float, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return float32 ``cos, sin`` of shape (max_seq_len, head_dim), as HF Llama computes them."""
    # Same expression as HF LlamaRotaryEmbedding, so the float32 values match bit for bit.
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (theta**exponent)  # (D/2,)
    t = torch.arange(max_seq_len, dtype=torch.int64, device=device).float()
    freqs = torch.outer(t, inv_freq)  # (T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, D)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (B, H, T, D) and k (B, H_kv, T, D) by cos/sin (T, D) for positions 0..T-1."""
    cos = cos.to(q.dtype)  # (T, D), broadcast over (B, H)
    sin = sin.to(q.dtype)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def rotation_sin(sin: torch.Tensor) -> torch.Tensor:
    """``sin`` (..., D) with its first half negated, for :func:`apply_rotary_rolled`."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def apply_rotary_rolled(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, rot_sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`apply_rotary` bit for bit, given ``rot_sin = rotation_sin(sin)``.

    q (B, H, T, D), k (B, Hkv, T, D); cos and rot_sin broadcast to them, e.g. (B, 1, T, D)
    for each token's own position.
    """
    if cos.dtype != q.dtype:  # float32 tables, lower-precision activations (autocast)
        cos, rot_sin = cos.to(q.dtype), rot_sin.to(q.dtype)
    half = q.shape[-1] // 2
    return q * cos + q.roll(half, -1) * rot_sin, k * cos + k.roll(half, -1) * rot_sin
