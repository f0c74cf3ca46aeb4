"""Hugging Face ``LlamaForCausalLM`` <-> baobab ``gpt`` (its default, Llama variant).

baobab's RoPE already uses HF's rotate_half convention, so wq/wk are copied unpermuted
(proven by the logits parity tests in tests/export).
"""

from __future__ import annotations

from typing import Any

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

ARCH = "LlamaForCausalLM"
LLAMA_VARIANT = dict(norm="rmsnorm", mlp="swiglu", position="rope", bias=False)

# baobab gpt tensor -> Hugging Face Llama tensor outside the blocks (both directions).
LLAMA_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
}
# baobab gpt block module -> Hugging Face Llama decoder-layer module (both directions).
LLAMA_LAYER_NAMES = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def llama_pairs(n_layer: int, tied: bool) -> Pairs:
    """Every parameter of a Llama-variant gpt with its HF name (no head when tied)."""
    return gpt_pairs(LLAMA_NAMES, LLAMA_LAYER_NAMES, "model.layers.{i}.", n_layer, tied)


def llama_config(cfg: Any) -> dict[str, Any]:
    """The config.json of ``LlamaForCausalLM`` for a baobab GPTConfig (shapes and options)."""
    return {
        "architectures": [ARCH],
        "model_type": "llama",
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_seq_len,
        "rope_theta": cfg.rope_theta,
        # transformers >= 5 reads rope_parameters; older versions read rope_theta.
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": cfg.dropout,
        "initializer_range": 0.02,
    }


def llama_weights(model: nn.Module) -> Weights:
    """A Llama-variant gpt's tensors under HF Llama names (no lm_head.weight when tied)."""
    cfg = model.cfg
    return to_hf_names(model.state_dict(), llama_pairs(cfg.n_layer, cfg.tie_embeddings))


def _rope_theta(hf: dict[str, Any]) -> float:
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    for rope in (params, scaling):
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind != "default":
            raise ValueError(
                f"{ARCH} rope_type={kind!r} is not supported; baobab supports 'default'."
            )
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def llama_from_hf(hf: dict[str, Any], w: Weights) -> tuple[dict[str, Any], Weights]:
    """GPTConfig values and the baobab state dict of an HF Llama config.json and tensors."""
    need(hf, "hidden_act", ["silu"], ARCH)
    need(hf, "attention_bias", [False], ARCH)
    need(hf, "mlp_bias", [False], ARCH)
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    need(hf, "head_dim", [d // heads, None], ARCH)
    tied = bool(hf.get("tie_word_embeddings", False)) or "lm_head.weight" not in w
    cfg = dict(
        vocab_size=hf["vocab_size"],
        n_layer=hf["num_hidden_layers"],
        n_head=heads,
        n_kv_head=hf.get("num_key_value_heads") or heads,
        d_model=d,
        ffn_hidden=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        rope_theta=_rope_theta(hf),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=tied,
    )
    sd = from_hf_names(w, llama_pairs(cfg["n_layer"], tied), tied)
    return cfg, sd


LLAMA = GPTFormat(
    architecture=ARCH,
    needs=lambda cfg: LLAMA_VARIANT,
    hf_config=llama_config,
    to_hf=llama_weights,
    from_hf=llama_from_hf,
)
