"""Export a baobab ``gpt`` as a Hugging Face ``LlamaForCausalLM`` directory.

The directory ``transformers.AutoModelForCausalLM.from_pretrained(out)`` loads::

    config.json              LlamaConfig (architectures, shapes, rope, eps, tying, dtype)
    model.safetensors        weights under HF parameter names (a tied head stored once)
    generation_config.json   bos/eos ids
    tokenizer.json           when a tokenizer is given, with tokenizer_config.json
    tokenizer_config.json    PreTrainedTokenizerFast, bos/eos/pad tokens

baobab's RoPE already uses HF's rotate_half convention, so wq/wk are copied unpermuted
(proven by the logits parity tests). Written atomically: ``out`` is either complete or
untouched. transformers is not needed to write it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from baobab.export.artifact import CONFIG_FILE, MODEL_FILE, TOKENIZER_FILE, dtype_name, parse_dtype
from baobab.export.atomic import atomic_directory, refuse_to_overwrite
from baobab.export.hf_import import LLAMA_LAYER_NAMES

GENERATION_FILE, TOKENIZER_CONFIG_FILE = "generation_config.json", "tokenizer_config.json"
LLAMA_ARCH = dict(norm="rmsnorm", mlp="swiglu", position="rope", bias=False)


def llama_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """baobab gpt parameters renamed to HF Llama's (no lm_head.weight when tied)."""
    cfg = model.cfg
    sd: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": model.tok_embeddings.weight,
        "model.norm.weight": model.norm.weight,
    }
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = model.output.weight
    names = LLAMA_LAYER_NAMES
    for i, layer in model.layers.items():
        for ours, theirs in names.items():
            sd[f"model.layers.{i}.{theirs}.weight"] = layer.get_submodule(ours).weight
    return {k: v.detach().contiguous() for k, v in sd.items()}


def llama_config(
    cfg: Any, dtype: torch.dtype, bos_id: int | None, eos_id: int | None
) -> dict[str, Any]:
    """The config.json of ``LlamaForCausalLM`` for a baobab GPTConfig."""
    return {
        "architectures": ["LlamaForCausalLM"],
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
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "torch_dtype": dtype_name(dtype),
        "dtype": dtype_name(dtype),
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "use_cache": True,
    }


def _load(model_or_checkpoint: nn.Module | str | Path) -> tuple[nn.Module, Path | None]:
    """The model, and the tokenizer.json stored beside it (None when there is none)."""
    if isinstance(model_or_checkpoint, nn.Module):
        return model_or_checkpoint, None
    path = Path(model_or_checkpoint)
    if (path / CONFIG_FILE).is_file() and (path / MODEL_FILE).is_file():  # a baobab export
        from baobab.export.artifact import load_exported

        model, _ = load_exported(path)
        tok = path / TOKENIZER_FILE
    else:
        # Imported here: only checkpoint exports need torch.distributed.checkpoint.
        from baobab.checkpoint import load_trained_model, resolve_checkpoint

        ckpt = resolve_checkpoint(path)
        model, _ = load_trained_model(ckpt)
        tok = ckpt / TOKENIZER_FILE
    return model, tok if tok.is_file() else None


def _tokenizer_files(tokenizer_file: Any, max_len: int) -> tuple[str, dict[str, Any], int, int]:
    """tokenizer.json text, tokenizer_config.json, and the bos/eos (<|endoftext|>) id."""
    from baobab.data.tokenizer import EOT, PAD, Tokenizer

    tok = (
        tokenizer_file if isinstance(tokenizer_file, Tokenizer) else Tokenizer.load(tokenizer_file)
    )
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOT,
        "eos_token": EOT,
        "pad_token": PAD,
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
    }
    return tok.to_str(), config, tok.eot_id, tok.pad_id


def export_hf(
    model_or_checkpoint: nn.Module | str | Path,
    out: str | Path,
    tokenizer_file: Any = None,
    dtype: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``out/`` as a Hugging Face Llama directory (see the module docstring).

    Args:
        model_or_checkpoint: a baobab ``gpt`` module with the Llama architecture, a training
            checkpoint or run directory, or a baobab export directory.
        out: the output directory; an existing non-empty one is replaced only with
            ``overwrite``.
        tokenizer_file: a tokenizer.json path or ``baobab.data.Tokenizer``; unset, the one
            stored with the checkpoint or export (if any) is used.
        dtype: cast floating weights to "float32", "bfloat16" or "float16" (unset: keep).
        overwrite: replace an existing directory at ``out``.
    """
    torch_dtype = parse_dtype(dtype)
    out = Path(out)
    refuse_to_overwrite(out, overwrite)  # before any loading
    model, stored_tok = _load(model_or_checkpoint)
    cfg = getattr(model, "cfg", None)
    if type(cfg).__name__ != "GPTConfig":
        raise ValueError(
            f"export_hf writes LlamaForCausalLM and needs a baobab 'gpt' model; "
            f"got {type(model).__name__}."
        )
    arch = {k: getattr(cfg, k) for k in LLAMA_ARCH}
    if arch != LLAMA_ARCH:
        raise ValueError(
            f"export_hf writes LlamaForCausalLM and needs the Llama architecture {LLAMA_ARCH}; "
            f"the model has {arch}."
        )
    weights = llama_state_dict(model)
    if torch_dtype is not None:
        weights = {k: v.to(torch_dtype) for k, v in weights.items()}
    weights = {k: v.to("cpu").clone() for k, v in weights.items()}  # no shared storage
    weights_dtype = weights["model.embed_tokens.weight"].dtype

    tokenizer_file = tokenizer_file if tokenizer_file is not None else stored_tok
    tok_json, tok_config, bos_id, eos_id, pad_id = None, None, None, None, None
    if tokenizer_file is not None:
        tok_json, tok_config, eot, pad_id = _tokenizer_files(tokenizer_file, cfg.max_seq_len)
        bos_id = eos_id = eot
    config = llama_config(cfg, weights_dtype, bos_id, eos_id)
    if pad_id is not None:
        config["pad_token_id"] = pad_id
    generation = {"bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id}

    with atomic_directory(out, overwrite) as tmp:
        save_file(weights, str(tmp / MODEL_FILE), metadata={"format": "pt"})
        _write_json(tmp / CONFIG_FILE, config)
        _write_json(tmp / GENERATION_FILE, generation)
        if tok_json is not None:
            (tmp / TOKENIZER_FILE).write_text(tok_json, encoding="utf-8")
            _write_json(tmp / TOKENIZER_CONFIG_FILE, tok_config)
    return out


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")
