"""Llama-style decoder-only transformer, with the GPT-2 variant as construction-time swaps.

Pre-norm RMSNorm blocks, rotary position embeddings (HF rotate_half convention), SwiGLU
feed-forward, grouped-query attention through ``scaled_dot_product_attention``. Parameter
names follow torchtitan's Llama so plans and converters can address them by path.

The config fields ``norm``, ``mlp``, ``position`` and ``bias`` choose modules in
``__init__`` (LayerNorm, a 2-layer tanh-GELU MLP, learned absolute positions, biased
projections: GPT-2); their defaults build the Llama model unchanged.

This is the only place a block's math is written. The forward takes the tokens'
``positions`` and an ``attend`` backend (``baobab.models.common.attention``): causal
attention over the whole sequence by default (training), a contiguous KV cache for
``generate``, the serving runner's paged cache. Serving's batch-invariant kernels are module
swaps (fused or packed linears, composed activations), not branches here.

Shape legend:
    B batch, T sequence length, C d_model, V vocab_size,
    H n_head, Hkv n_kv_head, D head_dim = d_model // n_head, F ffn_hidden.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn

from baobab.models.common import (
    check_choice,
    check_fraction,
    check_positive,
    rope_cos_sin,
)
from baobab.models.common.attention import Attend, causal_attention
from baobab.models.common.init import InitFn, computed, normal, ones, zeros
from baobab.models.common.rope import apply_rotary_rolled, rotation_sin

NORMS = ("rmsnorm", "layernorm")
MLPS = ("swiglu", "gelu")
POSITIONS = ("rope", "learned")


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
    """Hidden width of the feed-forward (SwiGLU or GELU)."""
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
    norm: str = "rmsnorm"
    """Normalisation of every block and the final norm: "rmsnorm" (Llama) or "layernorm"
    (with bias, GPT-2)."""
    mlp: str = "swiglu"
    """Feed-forward: "swiglu" (w1 gate, w3 up, w2 down) or "gelu" (w2(gelu_tanh(w1 x)), GPT-2)."""
    position: str = "rope"
    """Positions: "rope" (rotary, no parameters) or "learned" (absolute embedding table,
    ``pos_embeddings``, GPT-2)."""
    bias: bool = False
    """Biases on the attention and feed-forward projections (GPT-2); the head has none."""

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
        check_choice("GPTConfig", "norm", self.norm, NORMS)
        check_choice("GPTConfig", "mlp", self.mlp, MLPS)
        check_choice("GPTConfig", "position", self.position, POSITIONS)
        if not isinstance(self.bias, bool):
            raise ValueError(f"GPTConfig.bias must be true or false; got {self.bias!r}.")
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
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(
                f"GPTConfig.d_model // n_head (head_dim) must be even for RoPE; got {self.head_dim}."
            )

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.d_model // self.n_head


def _no_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return q, k  # learned absolute positions were added to the embeddings


def _norm(cfg: GPTConfig) -> nn.Module:
    if cfg.norm == "layernorm":
        return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)


def _position_tables(
    cfg: GPTConfig, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE ``cos, sin`` (max_seq_len, D); empty (max_seq_len, 0) tables for learned positions."""
    if cfg.position == "rope":
        return rope_cos_sin(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, device)
    empty = torch.empty(cfg.max_seq_len, 0, device=device)
    return empty, empty.clone()


class Attention(nn.Module):
    """Causal grouped-query self-attention with RoPE (or none); biases only with cfg.bias."""

    def __init__(self, cfg: GPTConfig, layer_id: int = 0) -> None:
        super().__init__()
        self.layer_id = layer_id  # which cache an attention backend reads and writes
        self.head_dim = cfg.head_dim
        self.dropout = cfg.dropout
        self.rotary = apply_rotary_rolled if cfg.position == "rope" else _no_rotary
        self.wq = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=cfg.bias)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=cfg.bias)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=cfg.bias)
        self.wo = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attend: Attend = causal_attention,
    ) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C); cos and sin (B or 1, 1, T, D) at the tokens' positions,
        sin with its first half negated (``rope.rotation_sin``)."""
        B, T, _ = x.shape
        # -1 for the head count: under tensor parallelism each rank holds a slice of heads.
        # wq, wk, wv see the same x one after another (a fused swap relies on it).
        q = self.wq(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.wk(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.wv(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        q, k = self.rotary(q, k, cos, sin)
        dropout_p = self.dropout if self.training else 0.0
        y = attend(self.layer_id, q, k, v, dropout_p)  # (B, T, H * D)
        return self.resid_dropout(self.wo(y))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x); w1 is the gate, w3 the up and w2 the down projection."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=cfg.bias)
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=cfg.bias)
        self.w3 = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=cfg.bias)
        self.act = nn.SiLU()  # a module: serving swaps in a batch-invariant one
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # w1 then w3 on the same x (a fused swap relies on it).
        return self.resid_dropout(self.w2(self.act(self.w1(x)) * self.w3(x)))  # (B, T, C)


class GeluFeedForward(nn.Module):
    """GPT-2 MLP: w2(gelu_tanh(w1 x)); w1 is the up and w2 the down projection."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=cfg.bias)
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=cfg.bias)
        self.act = nn.GELU(approximate="tanh")
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resid_dropout(self.w2(self.act(self.w1(x))))  # (B, T, C)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then h + ffn(norm(h))."""

    def __init__(self, cfg: GPTConfig, layer_id: int = 0) -> None:
        super().__init__()
        self.attention_norm = _norm(cfg)
        self.attention = Attention(cfg, layer_id)
        self.ffn_norm = _norm(cfg)
        self.feed_forward = FeedForward(cfg) if cfg.mlp == "swiglu" else GeluFeedForward(cfg)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attend: Attend = causal_attention,
    ) -> torch.Tensor:
        # attend by keyword: a tensor-parallel plan prepares the positional (x, cos, sin).
        h = x + self.attention(self.attention_norm(x), cos, sin, attend=attend)
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
            # Learned absolute positions (GPT-2): added with the token embedding, first stage.
            self.pos_embeddings = (
                nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.position == "learned" else None
            )
            self.dropout = nn.Dropout(cfg.dropout)
            self.layers = nn.ModuleDict({str(i): Block(cfg, i) for i in range(cfg.n_layer)})
            self.norm = _norm(cfg)
            self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
            if cfg.tie_embeddings:
                self.output.weight = self.tok_embeddings.weight  # one Parameter, two users
            # Non-persistent: computed by their init rules, never stored in checkpoints.
            cos, sin = _position_tables(cfg)
            self.register_buffer("rope_cos", cos, persistent=False)  # (max_seq_len, D)
            self.register_buffer("rope_sin", sin, persistent=False)  # (max_seq_len, D)
        # Built on meta: nothing allocated, no random numbers drawn. build_model (or
        # baobab.parallel after sharding) allocates and fills it by init_rules().

    def init_rules(self) -> dict[str, InitFn]:
        """How every tensor starts, by name (see baobab.models.common.init): GPT-2's
        N(0, 0.02), the residual projections (wo, w2) scaled by 1/sqrt(2 n_layer), norms at
        one, biases at zero, RoPE tables computed. A tied head is its embedding."""
        cfg = self.cfg
        std, out_std = 0.02, 0.02 / math.sqrt(2 * cfg.n_layer)  # GPT-2 residual scaling
        return {
            "tok_embeddings.weight": normal(std),
            "pos_embeddings.weight": normal(std),
            "layers.*.attention.wo.weight": normal(out_std),
            "layers.*.feed_forward.w2.weight": normal(out_std),
            "layers.*.w?.weight": normal(std),  # wq, wk, wv; w1, w3
            "*norm.weight": ones,
            "*.bias": zeros,
            "output.weight": normal(std),
            "rope_cos": computed(lambda device: _position_tables(cfg, device)[0]),
            "rope_sin": computed(lambda device: _position_tables(cfg, device)[1]),
        }

    def forward(
        self,
        idx: torch.Tensor,
        positions: torch.Tensor | None = None,
        attend: Attend = causal_attention,
    ) -> torch.Tensor:
        """Logits (B, T, V) float32 of tokens ``idx`` (B, T) at ``positions`` (B or 1, T)
        (default 0..T-1), attending through ``attend`` (default: causal over idx alone)."""
        return self.logits(self.hidden_states(idx, positions, attend))

    def hidden_states(
        self,
        idx: torch.Tensor,
        positions: torch.Tensor | None = None,
        attend: Attend = causal_attention,
    ) -> torch.Tensor:
        """The residual stream (B, T, C) after the last block, before the final norm.

        Explicit ``positions`` are the caller's to keep below max_seq_len (checking them
        would cost a host synchronisation per step); a too-long default is refused.
        """
        seq_len = idx.shape[1]  # T
        if positions is None:
            if seq_len > self.cfg.max_seq_len:
                raise ValueError(
                    f"sequence length {seq_len} exceeds GPTConfig.max_seq_len="
                    f"{self.cfg.max_seq_len}; use at most max_seq_len tokens."
                )
            positions = torch.arange(seq_len, device=idx.device)[None]  # (1, T)
        h = self.tok_embeddings(idx) if self.tok_embeddings is not None else idx  # (B, T, C)
        if self.pos_embeddings is not None and self.tok_embeddings is not None:
            # A module call, not a weight slice, so a tensor-parallel plan can lay the
            # lookup out like the residual stream (its sequence slice under SP).
            h = h + self.pos_embeddings(positions)  # (B or 1, T, C), broadcast over B
        h = self.dropout(h)
        # Each token's own row of the tables: (B or 1, 1, T, D), broadcast over heads.
        cos = self.rope_cos[positions][:, None]
        sin = rotation_sin(self.rope_sin[positions][:, None])
        for layer in self.layers.values():
            h = layer(h, cos, sin, attend=attend)
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and head: (..., C) -> (..., V) float32; h itself on a stage without
        them (pipeline split)."""
        if self.norm is not None:
            h = self.norm(h)
        return self.output(h).float() if self.output is not None else h  # (..., V)
