"""The built-in model families and named sizes, registered explicitly in one table.

Parameter counts (tied weights once) are checked in tests/models/test_model_sizes.py.
"""

import torch

from baobab.models.bert import Bert, BertConfig
from baobab.models.gpt import GPT, GPTConfig
from baobab.models.lstm import LSTMLM, LSTMConfig
from baobab.models.mlp import MLP, MLPConfig
from baobab.models.registry import ModelFamily, register_family, register_size
from baobab.models.resnet import ResNet, ResNetConfig


def _tokens(cfg: GPTConfig | BertConfig | LSTMConfig, batch: int, seq_len: int) -> torch.Tensor:
    return torch.zeros(batch, seq_len, dtype=torch.long)  # (B, T)


def _images(cfg: ResNetConfig, batch: int, seq_len: int) -> torch.Tensor:
    return torch.zeros(batch, cfg.in_channels, cfg.image_size, cfg.image_size)  # (B, C, H, W)


def _vectors(cfg: MLPConfig, batch: int, seq_len: int) -> torch.Tensor:
    return torch.zeros(batch, cfg.in_features)  # (B, I)


register_family(ModelFamily("gpt", GPTConfig, GPT, "causal_lm", _tokens))
register_family(ModelFamily("bert", BertConfig, Bert, "masked_lm", _tokens))
register_family(
    ModelFamily("lstm", LSTMConfig, LSTMLM, "causal_lm", _tokens, flops_linear_in_seq=True)
)
register_family(ModelFamily("resnet", ResNetConfig, ResNet, "classification", _images))
register_family(ModelFamily("mlp", MLPConfig, MLP, "regression", _vectors))

# "mlp" (the family default) is the seed network 10 -> 5 -> 1.
register_size(
    "mlp-digits", "mlp", in_features=64, hidden=(64,), out_features=10, task="classification"
)

# Decoders. vocab_size is overridden from the tokenizer by the trainer.
_gpt = dict(rope_theta=10000.0, tie_embeddings=True)
register_size("gpt-nano", "gpt", vocab_size=512, n_layer=2, n_head=4, n_kv_head=2, d_model=64,
              ffn_hidden=192, max_seq_len=256, **_gpt)  # fmt: skip
register_size("gpt-mini", "gpt", vocab_size=4096, n_layer=4, n_head=6, n_kv_head=2, d_model=192,
              ffn_hidden=512, max_seq_len=256, **_gpt)  # fmt: skip
# GPT-2 small's shape with Llama blocks; SwiGLU width 2048 keeps ~124M parameters.
register_size("gpt2-124m", "gpt", vocab_size=50257, n_layer=12, n_head=12, n_kv_head=12,
              d_model=768, ffn_hidden=2048, max_seq_len=1024, **_gpt)  # fmt: skip
# The real GPT-2 small architecture (124M): LayerNorm, learned positions, GELU MLP, biases;
# weights load from Hugging Face GPT2LMHeadModel through baobab.export.hf_import.
register_size("gpt2", "gpt", vocab_size=50257, n_layer=12, n_head=12, n_kv_head=12, d_model=768,
              ffn_hidden=3072, max_seq_len=1024, norm="layernorm", mlp="gelu",
              position="learned", bias=True, tie_embeddings=True)  # fmt: skip
# Llama 3.2 1B / Llama 3 8B shapes (no llama3 RoPE frequency scaling).
_llama = dict(vocab_size=128256, rope_theta=500000.0, max_seq_len=8192, norm_eps=1e-5)
register_size("llama-1b", "gpt", n_layer=16, n_head=32, n_kv_head=8, d_model=2048,
              ffn_hidden=8192, tie_embeddings=True, **_llama)  # fmt: skip
register_size("llama-8b", "gpt", n_layer=32, n_head=32, n_kv_head=8, d_model=4096,
              ffn_hidden=14336, tie_embeddings=False, **_llama)  # fmt: skip

# Encoders: the Turc et al. (2019) compact BERTs and BERT-base.
register_size("bert-tiny", "bert", n_layer=2, n_head=2, d_model=128, ffn_hidden=512)
register_size("bert-mini", "bert", n_layer=4, n_head=4, d_model=256, ffn_hidden=1024)
register_size("bert-base", "bert", n_layer=12, n_head=12, d_model=768, ffn_hidden=3072)

# ImageNet shapes (torchvision parameter counts), and a small net for 8x8 digits.
register_size("resnet18", "resnet", depth=18, num_classes=1000)
register_size("resnet34", "resnet", depth=34, num_classes=1000)
register_size("resnet50", "resnet", depth=50, num_classes=1000)
register_size("resnet18-digits", "resnet", depth=18, num_classes=10, in_channels=1,
              small_input=True, width=16, image_size=8)  # fmt: skip

register_size("lstm-tiny", "lstm", vocab_size=512, d_embed=64, d_hidden=64, n_layer=1,
              max_seq_len=64)  # fmt: skip
register_size("lstm-small", "lstm", vocab_size=4096, d_embed=256, d_hidden=256, n_layer=2,
              tie_embeddings=True, max_seq_len=256)  # fmt: skip
