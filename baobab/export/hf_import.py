"""Import a local Hugging Face model directory as a baobab model, without transformers.

Reads ``config.json`` and the ``*.safetensors`` weights (one file, or shards listed in
``model.safetensors.index.json``); pickled ``pytorch_model.bin`` files are never opened.

    LlamaForCausalLM                     -> gpt (Llama architecture), see hf_llama.py
    GPT2LMHeadModel                      -> gpt (norm="layernorm", mlp="gelu",
                                                 position="learned", bias=True), see hf_gpt2.py
    BertForMaskedLM, BertModel           -> bert (BertModel: the MLM head stays at its init)

The causal-LM name tables live in their architecture's module and serve export too.
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
from baobab.export.hf_common import GPTFormat, Weights, need
from baobab.export.hf_gpt2 import GPT2
from baobab.export.hf_llama import LLAMA
from baobab.models.common.init import load_weights

INDEX_FILE = "model.safetensors.index.json"
# Hugging Face causal-LM architecture -> the gpt variant it maps to, both directions.
GPT_FORMATS: dict[str, GPTFormat] = {f.architecture: f for f in (LLAMA, GPT2)}


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


def _bert(hf: dict[str, Any], w: Weights) -> tuple[str, dict[str, Any], Weights]:
    arch = "BertForMaskedLM"
    need(hf, "hidden_act", ["gelu"], arch)
    need(hf, "position_embedding_type", ["absolute"], arch)
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


Converter = Callable[[dict[str, Any], Weights], tuple[str, dict[str, Any], Weights]]


def _gpt(fmt: GPTFormat) -> Converter:
    return lambda hf, w: ("gpt", *fmt.from_hf(hf, w))


# config.json architecture -> (config.json, tensors) -> (family, config values, state dict).
CONVERTERS: dict[str, Converter] = {
    **{arch: _gpt(fmt) for arch, fmt in GPT_FORMATS.items()},
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
    if not path.is_dir():
        raise FileNotFoundError(f"Hugging Face model directory '{path}' does not exist.")
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
    model = models.build_model(cfg, device="meta")  # the weights are assigned, not copied
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
    used = {t.untyped_storage().data_ptr() for t in sd.values()}  # views share storage
    if dtype is not None:
        sd = {k: t.to(dtype) if t.is_floating_point() else t for k, t in sd.items()}
    # Converted views (transposes, permutations, the chunks of a fused c_attn) become
    # parameters that own their storage, as safetensors needs to save them; a BertModel
    # without its MLM head gets that head from its init rules, seeded as a run's seed 0.
    sd = {k: _owning(t) for k, t in sd.items()}
    load_weights(model, sd, str(path), against=f"its {arch} config.json", missing_seed=0)
    if dtype is not None:
        model.to(dtype)  # the computed buffers and initialised head too
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


def _owning(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when it is the whole of its storage, else a contiguous copy."""
    if t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.contiguous().clone() if t.is_contiguous() else t.contiguous()
