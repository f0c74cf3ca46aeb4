"""Llama-style decoder-only transformer.

Pre-norm RMSNorm blocks, rotary position embeddings (HF rotate_half convention), SwiGLU
feed-forward, grouped-query attention through ``scaled_dot_product_attention``. Parameter
names follow torchtitan's Llama so plans and converters can address them by path.

Shape legend:
    B batch, T sequence length, C d_model, V vocab_size,
    H n_head, Hkv n_kv_head, D head_dim = d_model // n_head, F ffn_hidden.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from baobab.models.common import (
    apply_rotary,
    check_fraction,
    check_positive,
    materialize,
    rope_cos_sin,
)


@dataclass(frozen=True)
class GPTConfig:
    """Shape of a Llama-style decoder. Defaults are the ``gpt-mini`` CPU quickstart model."""

    vocab_size: int = 4096
    """Number of token ids; the trainer sets it from the tokenizer."""
    n_layer: int = 4
    """Number of transformer blocks."""
    n_head: int = 6
    """Number of query heads."""
    n_kv_head: int = 2
    """Number of key/value heads (grouped-query attention); must divide n_head."""
    d_model: int = 192
    """Residual stream width; must be divisible by n_head with an even head_dim."""
    ffn_hidden: int = 512
    """Hidden width of the SwiGLU feed-forward."""
    max_seq_len: int = 256
    """Longest sequence the model accepts; RoPE tables are built for this length."""
    rope_theta: float = 10000.0
    """RoPE base frequency (Llama 3 uses 500000)."""
    norm_eps: float = 1e-5
    """Epsilon of every RMSNorm."""
    tie_embeddings: bool = True
    """Share the token embedding matrix with the output head."""
    dropout: float = 0.0
    """Dropout on embeddings, attention probabilities and residual branches."""

    def __post_init__(self) -> None:
        check_positive(
            "GPTConfig",
            vocab_size=self.vocab_size,
            n_layer=self.n_layer,
            n_head=self.n_head,
            n_kv_head=self.n_kv_head,
            d_model=self.d_model,
            ffn_hidden=self.ffn_hidden,
            max_seq_len=self.max_seq_len,
            rope_theta=self.rope_theta,
            norm_eps=self.norm_eps,
        )
        check_fraction("GPTConfig", dropout=self.dropout)
        if self.d_model % self.n_head:
            raise ValueError(
                f"GPTConfig.d_model must be divisible by n_head; "
                f"got d_model={self.d_model}, n_head={self.n_head}."
            )
        if self.n_head % self.n_kv_head:
            raise ValueError(
                f"GPTConfig.n_kv_head must divide n_head; "
                f"got n_head={self.n_head}, n_kv_head={self.n_kv_head}."
            )
        if self.head_dim % 2:
            raise ValueError(
                f"GPTConfig.d_model // n_head (head_dim) must be even for RoPE; got {self.head_dim}."
            )

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.d_model // self.n_head


class Attention(nn.Module):
    """Causal grouped-query self-attention with RoPE; no biases."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.head_dim = cfg.head_dim
        self.dropout = cfg.dropout
        self.wq = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=False)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def init_weights(self, std: float, out_std: float) -> None:
        for lin in (self.wq, self.wk, self.wv):
            nn.init.normal_(lin.weight, mean=0.0, std=std)
        nn.init.normal_(self.wo.weight, mean=0.0, std=out_std)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        # -1 for the head count: under tensor parallelism each rank holds a slice of heads.
        q = self.wq(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.wk(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.wv(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        q, k = apply_rotary(q, k, cos, sin)
        # enable_gqa maps query head h to kv head h // (H // Hkv), as HF repeat_kv does.
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=True,
            enable_gqa=q.shape[1] != k.shape[1],
        )  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, H * D)
        return self.resid_dropout(self.wo(y))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x); w1 is the gate, w3 the up and w2 the down projection."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=False)
        self.w3 = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.w1.weight, mean=0.0, std=std)
        nn.init.normal_(self.w3.weight, mean=0.0, std=std)
        nn.init.normal_(self.w2.weight, mean=0.0, std=out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resid_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))  # (B, T, C)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then h + ffn(norm(h))."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.attention_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def init_weights(self, std: float, out_std: float) -> None:
        self.attention_norm.reset_parameters()
        self.attention.init_weights(std, out_std)
        self.ffn_norm.reset_parameters()
        self.feed_forward.init_weights(std, out_std)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin)
        return h + self.feed_forward(self.ffn_norm(h))


class GPT(nn.Module):
    """Decoder-only language model: forward(idx (B, T) int64) -> logits (B, T, V) float32.

    A pipeline split may delete entries of ``layers`` and set ``tok_embeddings``, ``norm``
    or ``output`` to None; forward then passes hidden states (B, T, C) through.
    """

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        with torch.device("meta"):
            self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
            self.dropout = nn.Dropout(cfg.dropout)
            self.layers = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.n_layer)})
            self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
            self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
            # Non-persistent: recomputed by init_weights, never stored in checkpoints.
            cos, sin = rope_cos_sin(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)  # (max_seq_len, D)
            self.register_buffer("rope_sin", sin, persistent=False)  # (max_seq_len, D)
        materialize(self)

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter and the RoPE tables from the global RNG."""
        cfg = self.cfg
        cos, sin = rope_cos_sin(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)
        std, out_std = 0.02, 0.02 / math.sqrt(2 * cfg.n_layer)  # GPT-2 residual scaling
        if self.tok_embeddings is not None:
            nn.init.normal_(self.tok_embeddings.weight, mean=0.0, std=std)
        for layer in self.layers.values():
            layer.init_weights(std, out_std)
        if self.norm is not None:
            self.norm.reset_parameters()
        if self.output is not None:
            if cfg.tie_embeddings and self.tok_embeddings is not None:
                # Re-tie on every call: Module.to_empty() replaces the shared Parameter.
                self.output.weight = self.tok_embeddings.weight
            else:
                nn.init.normal_(self.output.weight, mean=0.0, std=std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        seq_len = idx.shape[1]  # T
        if seq_len > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence length {seq_len} exceeds GPTConfig.max_seq_len={self.cfg.max_seq_len}; "
                "use at most max_seq_len tokens."
            )
        h = self.tok_embeddings(idx) if self.tok_embeddings is not None else idx  # (B, T, C)
        h = self.dropout(h)
        cos, sin = self.rope_cos[:seq_len], self.rope_sin[:seq_len]  # (T, D)
        for layer in self.layers.values():
            h = layer(h, cos, sin)
        if self.norm is not None:
            h = self.norm(h)
        return self.output(h).float() if self.output is not None else h  # (B, T, V)
