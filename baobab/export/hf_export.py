"""Export a baobab ``gpt`` as a Hugging Face causal-LM directory, in the format its variant has.

The Llama variant (the default) becomes ``LlamaForCausalLM`` (hf_llama.py), the GPT-2
variant (layernorm, gelu, learned positions, biases) ``GPT2LMHeadModel`` (hf_gpt2.py); a
mix neither holds is refused. The directory ``transformers.AutoModelForCausalLM
.from_pretrained(out)`` loads::

    config.json              architecture, shapes, options, tying, dtype, bos/eos ids
    model.safetensors        weights under HF parameter names (a tied head stored once)
    generation_config.json   bos/eos/pad ids
    tokenizer.json           when a tokenizer is given, with tokenizer_config.json
    tokenizer_config.json    PreTrainedTokenizerFast, bos/eos/pad tokens

Written atomically: ``out`` is either complete or untouched. transformers is not needed
to write it.
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
from baobab.export.hf_common import GPTFormat
from baobab.export.hf_import import GPT_FORMATS

GENERATION_FILE, TOKENIZER_CONFIG_FILE = "generation_config.json", "tokenizer_config.json"


def hf_format(model: nn.Module) -> GPTFormat:
    """The Hugging Face format of a baobab gpt, chosen by its config (see the module docstring)."""
    cfg = getattr(model, "cfg", None)
    if type(cfg).__name__ != "GPTConfig":
        raise ValueError(
            f"export_hf writes Hugging Face causal LMs and needs a baobab 'gpt' model; "
            f"got {type(model).__name__}."
        )
    misses = {arch: fmt.mismatches(cfg) for arch, fmt in GPT_FORMATS.items()}
    for arch, missing in misses.items():
        if not missing:
            return GPT_FORMATS[arch]
    keys = dict.fromkeys(k for missing in misses.values() for k in missing)
    has = ", ".join(f"{k}={getattr(cfg, k)!r}" for k in keys)
    needs = " and ".join(
        f"{arch} needs " + ", ".join(f"{k}={want!r}" for k, (_, want) in missing.items())
        for arch, missing in misses.items()
    )
    raise ValueError(f"export_hf has no Hugging Face format for a gpt with {has}: {needs}.")


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
    """Write ``out/`` as a Hugging Face Llama or GPT-2 directory (see the module docstring).

    Args:
        model_or_checkpoint: a baobab ``gpt`` module, or a directory ``open_model`` reads:
            a baobab export, a training checkpoint or run directory (or an HF directory).
        out: the output directory; an existing export there is replaced only with
            ``overwrite`` (a run, checkpoint, corpus or other directory never is).
        tokenizer_file: a tokenizer.json path or ``baobab.data.Tokenizer``; unset, the one
            stored with the model directory (if any) is used.
        dtype: cast floating weights to "float32", "bfloat16" or "float16" (unset: keep).
        overwrite: replace an existing directory at ``out``.
    """
    torch_dtype = parse_dtype(dtype)
    out = Path(out)
    sources = () if isinstance(model_or_checkpoint, nn.Module) else (model_or_checkpoint,)
    refuse_to_overwrite(out, overwrite, sources)  # before any loading
    if isinstance(model_or_checkpoint, nn.Module):
        model, stored_tok = model_or_checkpoint, None
    else:
        from baobab.export.open import open_model

        opened = open_model(model_or_checkpoint)
        model, stored_tok = opened.model, opened.tokenizer_file
    fmt = hf_format(model)
    cfg = model.cfg
    weights = {k: v.detach() for k, v in fmt.to_hf(model).items()}
    if torch_dtype is not None:
        weights = {k: v.to(torch_dtype) for k, v in weights.items()}
    # Contiguous CPU copies: no shared storage (safetensors refuses it), no transposed views.
    weights = {
        k: v.to("cpu").clone(memory_format=torch.contiguous_format) for k, v in weights.items()
    }
    weights_dtype = next(iter(weights.values())).dtype

    tokenizer_file = tokenizer_file if tokenizer_file is not None else stored_tok
    tok_json, tok_config, bos_id, eos_id, pad_id = None, None, None, None, None
    if tokenizer_file is not None:
        tok_json, tok_config, eot, pad_id = _tokenizer_files(tokenizer_file, cfg.max_seq_len)
        bos_id = eos_id = eot
    config = {
        **fmt.hf_config(cfg),
        "torch_dtype": dtype_name(weights_dtype),
        "dtype": dtype_name(weights_dtype),  # transformers >= 5 reads dtype
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "use_cache": True,
    }
    if pad_id is not None:
        config["pad_token_id"] = pad_id
    generation = {"bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id}

    with atomic_directory(out, overwrite, "Hugging Face directory", sources) as tmp:
        save_file(weights, str(tmp / MODEL_FILE), metadata={"format": "pt"})
        _write_json(tmp / CONFIG_FILE, config)
        _write_json(tmp / GENERATION_FILE, generation)
        if tok_json is not None:
            (tmp / TOKENIZER_FILE).write_text(tok_json, encoding="utf-8")
            _write_json(tmp / TOKENIZER_CONFIG_FILE, tok_config)
    return out


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")
