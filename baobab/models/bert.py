"""BERT-style bidirectional encoder with a masked-LM head.

Learned position and token-type embeddings, post-LayerNorm blocks, GELU feed-forward,
attention through ``scaled_dot_product_attention`` with an optional key padding mask, and
an MLM head (dense, GELU, LayerNorm, decoder tied to the word embeddings plus its own bias).

Shape legend:
    B batch, T sequence length, C d_model, V vocab_size,
    H n_head, D head_dim = d_model // n_head, F ffn_hidden.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from baobab.models.common import check_fraction, check_positive
from baobab.models.common.init import InitFn, normal, ones, zeros


@dataclass(frozen=True)
class BertConfig:
    """Shape of a BERT encoder. Defaults are the ``bert-mini`` shape."""

    vocab_size: int = 30522
    """Number of token ids; the trainer sets it from the tokenizer."""
    n_layer: int = 4
    """Number of encoder blocks."""
    n_head: int = 4
    """Number of attention heads; must divide d_model."""
    d_model: int = 256
    """Hidden width."""
    ffn_hidden: int = 1024
    """Hidden width of the GELU feed-forward."""
    max_seq_len: int = 512
    """Number of learned positions: the longest sequence the model accepts."""
    type_vocab_size: int = 2
    """Number of token types (segments A and B)."""
    norm_eps: float = 1e-12
    """Epsilon of every LayerNorm."""
    dropout: float = 0.0
    """Dropout on embeddings, attention probabilities and residual branches."""

    def __post_init__(self) -> None:
        check_positive(
            "BertConfig",
            vocab_size=self.vocab_size,
            n_layer=self.n_layer,
            n_head=self.n_head,
            d_model=self.d_model,
            ffn_hidden=self.ffn_hidden,
            max_seq_len=self.max_seq_len,
            type_vocab_size=self.type_vocab_size,
            norm_eps=self.norm_eps,
        )
        check_fraction("BertConfig", dropout=self.dropout)
        if self.d_model % self.n_head:
            raise ValueError(
                f"BertConfig.d_model must be divisible by n_head; "
                f"got d_model={self.d_model}, n_head={self.n_head}."
            )


class BertAttention(nn.Module):
    """Bidirectional multi-head self-attention with biases."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.head_dim = cfg.d_model // cfg.n_head
        self.dropout = cfg.dropout
        self.wq = nn.Linear(cfg.d_model, cfg.d_model)
        self.wk = nn.Linear(cfg.d_model, cfg.d_model)
        self.wv = nn.Linear(cfg.d_model, cfg.d_model)
        self.wo = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.wk(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        v = self.wv(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )  # (B, H, T, D)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, C)


class BertFeedForward(nn.Module):
    """w2(gelu(w1 x)), exact (erf) GELU as in BERT."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.d_model, cfg.ffn_hidden)
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x)))  # (B, T, C)


class BertBlock(nn.Module):
    """Post-norm block: h = norm(x + attn(x)); out = norm(h + ffn(h))."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.attention = BertAttention(cfg)
        self.attention_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.feed_forward = BertFeedForward(cfg)
        self.ffn_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        h = self.attention_norm(x + self.dropout(self.attention(x, mask)))
        return self.ffn_norm(h + self.dropout(self.feed_forward(h)))


class MLMHead(nn.Module):
    """dense -> GELU -> LayerNorm -> decoder (weight tied to the word embeddings) + bias."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.decoder = nn.Linear(cfg.d_model, cfg.vocab_size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(F.gelu(self.dense(h))))  # (B, T, V)


class Bert(nn.Module):
    """Masked-LM encoder: forward(idx (B, T), attention_mask (B, T) 1=keep) -> logits (B, T, V).

    Padded positions are excluded as keys; their own logits are computed but meaningless.
    A row whose mask keeps no position at all gives undefined (NaN) outputs.
    """

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.cfg = cfg
        with torch.device("meta"):
            self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
            self.position_embeddings = nn.Embedding(cfg.max_seq_len, cfg.d_model)
            self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.d_model)
            self.embed_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
            self.dropout = nn.Dropout(cfg.dropout)
            self.layers = nn.ModuleDict({str(i): BertBlock(cfg) for i in range(cfg.n_layer)})
            self.mlm_head = MLMHead(cfg)
            # One Parameter, two users; the decoder keeps its own bias.
            self.mlm_head.decoder.weight = self.word_embeddings.weight
        # Built on meta; build_model allocates it and fills it by init_rules().

    def init_rules(self) -> dict[str, InitFn]:
        """How every tensor starts, by name (see baobab.models.common.init), as Hugging Face
        BERT does: linear and embedding weights N(0, 0.02), LayerNorms at one and zero,
        biases at zero; the decoder is the word embedding matrix."""
        return {
            "*norm.weight": ones,  # embed_norm, attention_norm, ffn_norm, mlm_head.norm
            "*.bias": zeros,
            "*.weight": normal(0.02),  # embeddings and linears
        }

    def forward(
        self,
        idx: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        seq_len = idx.shape[1]  # T
        if seq_len > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence length {seq_len} exceeds BertConfig.max_seq_len={self.cfg.max_seq_len}; "
                "use at most max_seq_len tokens."
            )
        pos = torch.arange(seq_len, device=idx.device)  # (T,)
        h = self.word_embeddings(idx) + self.position_embeddings(pos)  # (B, T, C)
        if token_type_ids is None:
            h = h + self.token_type_embeddings.weight[0]
        else:
            h = h + self.token_type_embeddings(token_type_ids)
        h = self.dropout(self.embed_norm(h))
        mask = None
        if attention_mask is not None:
            mask = attention_mask.to(torch.bool)[:, None, None, :]  # (B, 1, 1, T) True = attend
        for layer in self.layers.values():
            h = layer(h, mask)
        return self.mlm_head(h).float()  # (B, T, V)
