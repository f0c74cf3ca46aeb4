"""Rotary position embeddings in the Hugging Face Llama convention (rotate_half).

The head dimension is split in two halves (x1, x2), not interleaved pairs, so weights
exported to ``LlamaForCausalLM`` give identical logits without permuting wq/wk.

Shapes: T = positions, D = head_dim, B = batch, H = heads.
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
