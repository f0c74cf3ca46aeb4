"""LSTM language model: embedding -> multi-layer LSTM -> [projection] -> vocabulary head.

With ``tie_embeddings`` the head reuses the embedding matrix; when d_hidden != d_embed a
bias-free projection d_hidden -> d_embed is inserted so the shapes match.

Shape legend: B batch, T sequence length, E d_embed, Hd d_hidden, V vocab_size.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn

from baobab.models.common import check_fraction, check_positive
from baobab.models.common.init import InitFn, linear_default, uniform, zeros


@dataclass(frozen=True)
class LSTMConfig:
    """Shape of an LSTM language model. Defaults: two untied 256-wide layers."""

    vocab_size: int = 4096
    """Number of token ids; the trainer sets it from the tokenizer."""
    d_embed: int = 256
    """Width of the token embeddings."""
    d_hidden: int = 256
    """Hidden (and cell) state width of every LSTM layer."""
    n_layer: int = 2
    """Number of stacked LSTM layers."""
    dropout: float = 0.0
    """Dropout on embeddings, between LSTM layers and before the head."""
    tie_embeddings: bool = False
    """Share the embedding matrix with the head (adds a projection if d_hidden != d_embed)."""
    max_seq_len: int = 256
    """Training sequence length and example-input length; not a hard limit."""

    def __post_init__(self) -> None:
        check_positive(
            "LSTMConfig",
            vocab_size=self.vocab_size,
            d_embed=self.d_embed,
            d_hidden=self.d_hidden,
            n_layer=self.n_layer,
            max_seq_len=self.max_seq_len,
        )
        check_fraction("LSTMConfig", dropout=self.dropout)


class LSTMLM(nn.Module):
    """Language model: forward(idx (B, T) int64) -> logits (B, T, V) float32."""

    def __init__(self, cfg: LSTMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        with torch.device("meta"):
            self.embedding = nn.Embedding(cfg.vocab_size, cfg.d_embed)
            self.dropout = nn.Dropout(cfg.dropout)
            self.lstm = nn.LSTM(
                cfg.d_embed,
                cfg.d_hidden,
                cfg.n_layer,
                batch_first=True,
                dropout=cfg.dropout if cfg.n_layer > 1 else 0.0,
            )
            needs_proj = cfg.tie_embeddings and cfg.d_hidden != cfg.d_embed
            self.proj = nn.Linear(cfg.d_hidden, cfg.d_embed, bias=False) if needs_proj else None
            head_in = cfg.d_embed if cfg.tie_embeddings else cfg.d_hidden
            self.output = nn.Linear(head_in, cfg.vocab_size)
            if cfg.tie_embeddings:
                self.output.weight = self.embedding.weight  # one Parameter, two users
        # Built on meta; build_model allocates it and fills it by init_rules().

    def init_rules(self) -> dict[str, InitFn]:
        """How every tensor starts, by name (see baobab.models.common.init), Zaremba et al.
        style: embedding and head U(-0.1, 0.1), head bias zero, LSTM weights and biases
        U(-1/sqrt(Hd), 1/sqrt(Hd)) as nn.LSTM does, the projection at nn.Linear's default."""
        bound = 1 / math.sqrt(self.cfg.d_hidden)
        return {
            "embedding.weight": uniform(-0.1, 0.1),
            "lstm.*": uniform(-bound, bound),
            "proj.weight": linear_default(self.cfg.d_hidden)[0],
            "output.weight": uniform(-0.1, 0.1),
            "output.bias": zeros,
        }

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.dropout(self.embedding(idx))  # (B, T, E)
        h, _ = self.lstm(h)  # (B, T, Hd)
        h = self.dropout(h)
        if self.proj is not None:
            h = self.proj(h)  # (B, T, E)
        return self.output(h).float()  # (B, T, V)
