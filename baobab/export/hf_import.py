"""Import a local Hugging Face model directory as a baobab model, without transformers.

Reads ``config.json`` and the ``*.safetensors`` weights (one file, or shards listed in
``model.safetensors.index.json``); pickled ``pytorch_model.bin`` files are never opened.

    LlamaForCausalLM                     -> gpt (Llama architecture)
    GPT2LMHeadModel                      -> gpt (norm="layernorm", mlp="gelu",
                                                 position="learned", bias=True)
    BertForMaskedLM, BertModel           -> bert (BertModel: the MLM head stays at its init)

HF GPT-2 stores its projections as ``Conv1D`` weights of shape (in, out): they are
transposed into ``nn.Linear`` (out, in), and the fused ``c_attn`` is split into wq, wk, wv.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from baobab.export.artifact import CONFIG_FILE, TOKENIZER_FILE

INDEX_FILE = "model.safetensors.index.json"
Weights = dict[str, torch.Tensor]


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


def read_safetensors(path: Path) -> Weights:
    """Every tensor of the directory's safetensors file(s), by HF name, on the CPU."""
    index = path / INDEX_FILE
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        if any(path.glob("pytorch_model*.bin")):
            raise ValueError(
                f"'{path}' holds only pickled pytorch_model.bin weights, which baobab never "
                "unpickles; convert them to safetensors first (e.g. save_pretrained with "
                "safe_serialization=True)."
            )
        raise ValueError(f"'{path}' holds no *.safetensors weights.")
    weights: Weights = {}
    for name in files:
        with safe_open(str(path / name), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                weights[key] = f.get_tensor(key)
    return weights


def _need(hf: dict[str, Any], key: str, allowed: Any, arch: str) -> None:
    value = hf.get(key, allowed[0])
    if value not in allowed:
        raise ValueError(
            f"{arch} config {key}={value!r} is not supported; baobab supports {allowed!r}."
        )


def _rope_theta(hf: dict[str, Any]) -> float:
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    for rope in (params, scaling):
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind != "default":
            raise ValueError(
                f"LlamaForCausalLM rope_type={kind!r} is not supported; baobab supports 'default'."
            )
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _llama(hf: dict[str, Any], w: Weights) -> tuple[str, dict[str, Any], Weights]:
    arch = "LlamaForCausalLM"
    _need(hf, "hidden_act", ["silu"], arch)
    _need(hf, "attention_bias", [False], arch)
    _need(hf, "mlp_bias", [False], arch)
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    _need(hf, "head_dim", [d // heads, None], arch)
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
    sd = {
        "tok_embeddings.weight": w["model.embed_tokens.weight"],
        "norm.weight": w["model.norm.weight"],
    }
    sd["output.weight"] = w["model.embed_tokens.weight"] if tied else w["lm_head.weight"]
    names = LLAMA_LAYER_NAMES
    for i in range(cfg["n_layer"]):
        for ours, theirs in names.items():
            sd[f"layers.{i}.{ours}.weight"] = w[f"model.layers.{i}.{theirs}.weight"]
    return "gpt", cfg, sd


def _gpt2(hf: dict[str, Any], w: Weights) -> tuple[str, dict[str, Any], Weights]:
    arch = "GPT2LMHeadModel"
    _need(hf, "activation_function", ["gelu_new", "gelu_pytorch_tanh"], arch)
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        _need(hf, flag, [False], arch)
    _need(hf, "scale_attn_weights", [True], arch)
    w = {k.removeprefix("transformer."): v for k, v in w.items()}
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
        norm="layernorm",
        mlp="gelu",
        position="learned",
        bias=True,
    )
    sd = {
        "tok_embeddings.weight": w["wte.weight"],
        "pos_embeddings.weight": w["wpe.weight"],
        "norm.weight": w["ln_f.weight"],
        "norm.bias": w["ln_f.bias"],
        "output.weight": w["wte.weight"] if tied else w["lm_head.weight"],
    }
    for i in range(cfg["n_layer"]):
        p, q = f"h.{i}.", f"layers.{i}."
        # Conv1D weights are (in, out): transpose to nn.Linear's (out, in).
        qkv_w = w[p + "attn.c_attn.weight"].t().chunk(3, dim=0)  # 3 x (C, C)
        qkv_b = w[p + "attn.c_attn.bias"].chunk(3, dim=0)  # 3 x (C,)
        for name, wt, b in zip(("wq", "wk", "wv"), qkv_w, qkv_b, strict=True):
            sd[q + f"attention.{name}.weight"], sd[q + f"attention.{name}.bias"] = wt, b
        for ours, theirs in {
            "attention.wo": "attn.c_proj",
            "feed_forward.w1": "mlp.c_fc",
            "feed_forward.w2": "mlp.c_proj",
        }.items():
            sd[q + ours + ".weight"] = w[p + theirs + ".weight"].t()
            sd[q + ours + ".bias"] = w[p + theirs + ".bias"]
        for ours, theirs in {"attention_norm": "ln_1", "ffn_norm": "ln_2"}.items():
            sd[q + ours + ".weight"] = w[p + theirs + ".weight"]
            sd[q + ours + ".bias"] = w[p + theirs + ".bias"]
    return "gpt", cfg, sd


def _bert(hf: dict[str, Any], w: Weights) -> tuple[str, dict[str, Any], Weights]:
    arch = "BertForMaskedLM"
    _need(hf, "hidden_act", ["gelu"], arch)
    _need(hf, "position_embedding_type", ["absolute"], arch)
    w = {k.removeprefix("bert."): v for k, v in w.items()}
    cfg = dict(
        vocab_size=hf["vocab_size"],
        n_layer=hf["num_hidden_layers"],
        n_head=hf["num_attention_heads"],
        d_model=hf["hidden_size"],
        ffn_hidden=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 512),
        type_vocab_size=hf.get("type_vocab_size", 2),
        norm_eps=hf.get("layer_norm_eps", 1e-12),
    )
    e = "embeddings."
    names = {
        "word_embeddings": e + "word_embeddings",
        "position_embeddings": e + "position_embeddings",
        "token_type_embeddings": e + "token_type_embeddings",
        "embed_norm": e + "LayerNorm",
        "mlm_head.dense": "cls.predictions.transform.dense",
        "mlm_head.norm": "cls.predictions.transform.LayerNorm",
    }
    for i in range(cfg["n_layer"]):
        p, q = f"encoder.layer.{i}.", f"layers.{i}."
        names |= {
            q + "attention.wq": p + "attention.self.query",
            q + "attention.wk": p + "attention.self.key",
            q + "attention.wv": p + "attention.self.value",
            q + "attention.wo": p + "attention.output.dense",
            q + "attention_norm": p + "attention.output.LayerNorm",
            q + "feed_forward.w1": p + "intermediate.dense",
            q + "feed_forward.w2": p + "output.dense",
            q + "ffn_norm": p + "output.LayerNorm",
        }
    sd: Weights = {}
    for ours, theirs in names.items():
        for kind in ("weight", "bias"):
            if f"{theirs}.{kind}" in w:
                sd[f"{ours}.{kind}"] = w[f"{theirs}.{kind}"]
    word = w[e + "word_embeddings.weight"]
    decoder = w.get("cls.predictions.decoder.weight", word)
    if not torch.equal(decoder, word):
        raise ValueError(
            "BERT decoder weights differ from the word embeddings; baobab's bert always ties them."
        )
    sd["mlm_head.decoder.weight"] = word
    bias = w.get("cls.predictions.bias", w.get("cls.predictions.decoder.bias"))
    if bias is not None:
        sd["mlm_head.decoder.bias"] = bias
    return "bert", cfg, sd


CONVERTERS: dict[str, Callable[[dict[str, Any], Weights], tuple[str, dict[str, Any], Weights]]] = {
    "LlamaForCausalLM": _llama,
    "GPT2LMHeadModel": _gpt2,
    "BertForMaskedLM": _bert,
    "BertModel": _bert,
}


def import_hf(
    path: str | Path, dtype: torch.dtype | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Build the baobab model of a local HF directory and load its weights (eval mode).

    Returns ``(model, meta)``; ``meta["model"]`` is ``{"name", "family", "config"}`` as in
    a baobab export, plus ``architecture``, ``missing`` (baobab parameters the directory
    did not provide, left at their init), ``ignored`` (HF tensors not used, e.g. BERT's
    pooler) and ``tokenizer`` (the tokenizer.json path, or None).
    """
    from baobab import models

    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        raise ValueError(f"'{path}' is not a Hugging Face model directory: it has no config.json.")
    hf = json.loads((path / CONFIG_FILE).read_text())
    archs = hf.get("architectures") or []
    arch = next((a for a in archs if a in CONVERTERS), None)
    if arch is None:
        raise ValueError(
            f"Hugging Face architecture {', '.join(archs) or '(none)'} is not supported; "
            f"supported: {', '.join(CONVERTERS)}."
        )
    weights = read_safetensors(path)
    try:
        family, values, sd = CONVERTERS[arch](hf, weights)
    except KeyError as err:
        raise ValueError(f"'{path}' lacks {err}, which {arch} needs.") from None
    cfg = models.get_config(family, **values)
    model = models.build_model(cfg)
    expected = model.state_dict()
    missing = sorted(k for k in expected if k not in sd)
    if family == "gpt" and missing:
        raise ValueError(f"'{path}' lacks weights for {', '.join(missing[:5])}.")
    for key, tensor in sd.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ValueError(
                f"weight {key} has shape {tuple(tensor.shape)} but {arch} config.json "
                f"implies {tuple(expected[key].shape)}."
            )
    model.load_state_dict(sd, strict=False)
    if dtype is not None:
        model.to(dtype)
    used = {t.untyped_storage().data_ptr() for t in sd.values()}  # views share storage
    tok = path / TOKENIZER_FILE
    meta = {
        "model": {"name": family, "family": family, "config": dataclasses.asdict(cfg)},
        "architecture": arch,
        "missing": missing,
        "ignored": sorted(
            k for k, t in weights.items() if t.untyped_storage().data_ptr() not in used
        ),
        "tokenizer": str(tok) if tok.is_file() else None,
    }
    return model.eval(), meta
