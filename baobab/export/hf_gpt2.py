"""Hugging Face ``GPT2LMHeadModel`` <-> baobab ``gpt`` in its GPT-2 variant.

The variant: ``norm="layernorm"``, ``mlp="gelu"`` (tanh approximation, HF's
``gelu_new``), ``position="learned"``, ``bias=True`` and ``n_kv_head == n_head``.

HF GPT-2 stores its projections as ``Conv1D`` weights of shape (in, out): they are
transposed to and from ``nn.Linear``'s (out, in), and its fused ``c_attn`` (C, 3C) holds
wq, wk, wv side by side along the output dim. Tensors are written under the
``transformer.`` prefix ``save_pretrained`` uses; on import the prefix is optional (the
original OpenAI checkpoints lack it).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from baobab.export.hf_common import (
    GPTFormat,
    Pairs,
    Weights,
    from_hf_names,
    gpt_pairs,
    need,
    to_hf_names,
)

ARCH = "GPT2LMHeadModel"
GPT2_VARIANT = dict(norm="layernorm", mlp="gelu", position="learned", bias=True)
PREFIX = "transformer."  # every tensor but lm_head.weight

# baobab gpt tensor -> HF GPT-2 tensor outside the blocks (both directions).
GPT2_NAMES = {
    "tok_embeddings.weight": "wte.weight",
    "pos_embeddings.weight": "wpe.weight",
    "norm.weight": "ln_f.weight",
    "norm.bias": "ln_f.bias",
}
# baobab gpt block module -> HF GPT2Block module (weight and bias each), both directions.
GPT2_LAYER_NAMES = {
    "attention_norm": "ln_1",
    "attention.wo": "attn.c_proj",
    "ffn_norm": "ln_2",
    "feed_forward.w1": "mlp.c_fc",
    "feed_forward.w2": "mlp.c_proj",
}
CONV1D = ("attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # stored (in, out): transposed
QKV = ("attention.wq", "attention.wk", "attention.wv")  # fused, in this order, into attn.c_attn


def gpt2_pairs(n_layer: int, tied: bool) -> Pairs:
    """Every parameter of a GPT-2-variant gpt but wq/wk/wv (see ``QKV``) with its HF name
    (without ``PREFIX``; no head when tied)."""
    return gpt_pairs(
        GPT2_NAMES, GPT2_LAYER_NAMES, "h.{i}.", n_layer, tied, ("weight", "bias"), CONV1D
    )


def gpt2_needs(cfg: Any) -> dict[str, Any]:
    """The GPTConfig values GPT2LMHeadModel can hold (it has no grouped-query attention)."""
    return {**GPT2_VARIANT, "n_kv_head": cfg.n_head}


def gpt2_config(cfg: Any) -> dict[str, Any]:
    """The config.json of ``GPT2LMHeadModel`` for a GPT-2-variant GPTConfig."""
    return {
        "architectures": [ARCH],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.max_seq_len,
        "n_embd": cfg.d_model,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": cfg.ffn_hidden,
        "activation_function": "gelu_new",  # the tanh approximation baobab's gelu MLP uses
        "layer_norm_epsilon": cfg.norm_eps,
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": 0.02,
    }


def gpt2_weights(model: nn.Module) -> Weights:
    """A GPT-2-variant gpt's tensors under HF GPT-2 names (no lm_head.weight when tied)."""
    cfg, sd = model.cfg, model.state_dict()
    w = to_hf_names(sd, gpt2_pairs(cfg.n_layer, cfg.tie_embeddings))
    for i in range(cfg.n_layer):
        q = f"layers.{i}."
        # (3C, C) Linear weight -> (C, 3C) Conv1D weight; biases (3C,).
        w[f"h.{i}.attn.c_attn.weight"] = torch.cat([sd[q + n + ".weight"] for n in QKV]).t()
        w[f"h.{i}.attn.c_attn.bias"] = torch.cat([sd[q + n + ".bias"] for n in QKV])
    return {(k if k.startswith("lm_head.") else PREFIX + k): v for k, v in w.items()}


def gpt2_from_hf(hf: dict[str, Any], w: Weights) -> tuple[dict[str, Any], Weights]:
    """GPTConfig values and the baobab state dict of an HF GPT-2 config.json and tensors."""
    need(hf, "activation_function", ["gelu_new", "gelu_pytorch_tanh"], ARCH)
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        need(hf, flag, [False], ARCH)
    need(hf, "scale_attn_weights", [True], ARCH)
    w = {k.removeprefix(PREFIX): v for k, v in w.items()}
    d = hf["n_embd"]
    tied = bool(hf.get("tie_word_embeddings", True)) or "lm_head.weight" not in w
    cfg = dict(
        vocab_size=hf["vocab_size"],
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        n_kv_head=hf["n_head"],
        d_model=d,
        ffn_hidden=hf.get("n_inner") or 4 * d,
        max_seq_len=hf.get("n_positions", 1024),
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        tie_embeddings=tied,
        **GPT2_VARIANT,
    )
    sd = from_hf_names(w, gpt2_pairs(cfg["n_layer"], tied), tied)
    for i in range(cfg["n_layer"]):
        p, q = f"h.{i}.attn.c_attn.", f"layers.{i}."
        qkv_w = w[p + "weight"].t().chunk(3, dim=0)  # 3 x (C, C)
        qkv_b = w[p + "bias"].chunk(3, dim=0)  # 3 x (C,)
        for name, weight, bias in zip(QKV, qkv_w, qkv_b, strict=True):
            sd[q + name + ".weight"], sd[q + name + ".bias"] = weight, bias
    return cfg, sd


GPT2 = GPTFormat(
    architecture=ARCH,
    needs=gpt2_needs,
    hf_config=gpt2_config,
    to_hf=gpt2_weights,
    from_hf=gpt2_from_hf,
)
