"""A Llama-style baobab ``gpt`` as one GGUF file (llama.cpp, Ollama, LM Studio), optionally with
an Ollama ``Modelfile`` beside it.

The file is written with the ``gguf`` package that llama.cpp publishes, the way llama.cpp's
own ``convert_hf_to_gguf.py`` writes a ``LlamaForCausalLM``:

- tensors under llama.cpp's names (``token_embd``, ``blk.N.attn_q``, ..., ``output_norm``,
  ``output`` when the head is not tied), found by the package's own name map from the
  Hugging Face names ``hf_llama.py`` gives; numpy shapes are (out, in) as torch's, and GGUF
  lists them reversed;
- q and k rows permuted (``LlamaModel.permute``): baobab's rotary, like Hugging Face's,
  rotates the two halves of each head (rotate_half), llama.cpp's "llama" rope rotates
  adjacent pairs; the permutation makes the two equal, :func:`from_gguf_rope` undoes it;
- ``--gguf-type``: f32 everywhere; f16 or q8_0 for 2-D weights with 1-D norms in f32 (as
  the converter does); a q8_0 row not a multiple of 32 falls back to f16, as there;
- metadata: ``general.*``, ``llama.*`` shapes, rope base and RMSNorm epsilon, the
  tokenizer (``gguf_vocab.py``) and the chat template (the model directory's
  ``chat_template.jinja``, else baobab's default, as ``baobab export`` passes it; Jinja, as
  llama.cpp reads it).

Only the Llama variant (rope, rmsnorm, swiglu, no bias) has a GGUF form here; any other
model is refused in one sentence before anything is written. Writes are atomic.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from torch import nn

from baobab.export.atomic import atomic_directory, refuse_to_overwrite
from baobab.export.gguf_vocab import add_vocab, gguf_vocab
from baobab.export.hf_llama import LLAMA, llama_weights

GGUF_FILE, MODELFILE = "model.gguf", "Modelfile"
# --gguf-type -> (general.file_type, the type of 2-D weights)
GGUF_TYPES = {
    "f32": (gguf.LlamaFileType.ALL_F32, gguf.GGMLQuantizationType.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0),
}
Q = gguf.GGMLQuantizationType

# baobab's default chat template (baobab.serve.chat.DEFAULT_TEMPLATE, which this layer may not
# import) in Ollama's Go-template form: the same text for the same messages (one
# "<|role|>\n content <|endoftext|>\n" per message, then the assistant's turn); a test keeps
# the two equal.
OLLAMA_DEFAULT_TEMPLATE = (
    "{{ range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|endoftext|>\n{{ end }}<|assistant|>\n"
)


def check_llama(model: nn.Module) -> Any:
    """The GPTConfig of a Llama-variant gpt; ValueError (one sentence) for any other model."""
    cfg = getattr(model, "cfg", None)
    if type(cfg).__name__ != "GPTConfig":
        raise ValueError(
            f"GGUF export needs a Llama-style baobab 'gpt' model; got {type(model).__name__}."
        )
    missing = LLAMA.mismatches(cfg)
    if missing:
        has = ", ".join(f"{k}={ours!r}" for k, (ours, _) in missing.items())
        needs = ", ".join(f"{k}={want!r}" for k, (_, want) in missing.items())
        raise ValueError(
            f"GGUF export writes Llama-style gpt models ({needs}); this one has {has}."
        )
    return cfg


def to_gguf_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """q or k rows (n_head * head_dim, d) from rotate_half order to llama.cpp's adjacent
    pairs: within each head, rows (i, head_dim/2 + i) become rows (2i, 2i + 1)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def from_gguf_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of :func:`to_gguf_rope`."""
    return (
        w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def gguf_tensors(model: nn.Module, gguf_type: str) -> list[tuple[str, np.ndarray, Q]]:
    """(llama.cpp name, data, GGML type) of every tensor; q8_0 data is the packed bytes."""
    cfg = check_llama(model)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.n_layer)
    wanted = GGUF_TYPES[gguf_type][1]
    out = []
    for hf_name, tensor in llama_weights(model).items():
        name = names.get_name(hf_name, try_suffixes=(".weight",))
        if name is None:  # the name table and gguf's map disagree: a bug, not bad input
            raise RuntimeError(f"gguf has no llama.cpp name for {hf_name}")
        data = tensor.detach().to("cpu", torch.float32).numpy()
        if hf_name.endswith("q_proj.weight"):
            data = to_gguf_rope(data, cfg.n_head)
        elif hf_name.endswith("k_proj.weight"):
            data = to_gguf_rope(data, cfg.n_kv_head)
        kind = wanted if data.ndim == 2 else Q.F32
        if kind == Q.Q8_0 and data.shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0]:
            kind = Q.F16
        if kind == Q.Q8_0:
            data = gguf.quants.quantize(data, Q.Q8_0)
        else:
            data = np.ascontiguousarray(data, np.float16 if kind == Q.F16 else np.float32)
        out.append((name, data, kind))
    return out


def model_from_gguf(path: str | Path, cfg: Any) -> nn.Module:
    """A float32 baobab gpt of ``cfg`` holding the GGUF file's tensors, dequantized by the
    ``gguf`` package and q/k un-permuted: what the file's weights compute, for comparing a
    runtime's output with (the tests and ``benchmarks/gguf_llama_check.py`` use it)."""
    from baobab.export.hf_llama import llama_pairs
    from baobab.models import build_model
    from baobab.models.common.init import load_weights

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.n_layer)
    pairs = llama_pairs(cfg.n_layer, cfg.tie_embeddings)
    ours = {names.get_name(hf, try_suffixes=(".weight",)): mine for mine, hf, _ in pairs}
    sd = {}
    for t in gguf.GGUFReader(path).tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        data = data.reshape(tuple(reversed(t.shape.tolist())))  # GGUF lists dims innermost first
        if t.name.endswith("attn_q.weight"):
            data = from_gguf_rope(data, cfg.n_head)
        elif t.name.endswith("attn_k.weight"):
            data = from_gguf_rope(data, cfg.n_kv_head)
        sd[ours[t.name]] = torch.from_numpy(data.copy())  # a tied head: the embedding's
    model = build_model(cfg, device="meta")
    load_weights(model, sd, str(path), against="the model's config")
    return model.eval()


def write_gguf(
    model: nn.Module,
    path: str | Path,
    tokenizer: Any,
    chat_template: str | None,
    gguf_type: str = "f16",
    name: str = "baobab",
) -> Path:
    """Write ``model`` (a Llama-variant gpt) as the GGUF file ``path`` (module docstring).

    Args:
        model: the model; its weights are read as float32, then stored as ``gguf_type``.
        path: the file to write (not atomic on its own: :func:`export_gguf` is).
        tokenizer: its ``baobab.data.Tokenizer`` (byte-level BPE).
        chat_template: the Jinja chat template stored as ``tokenizer.chat_template`` (None:
            none; llama.cpp then falls back to its own default).
        gguf_type: "f32", "f16" or "q8_0".
        name: ``general.name``.
    """
    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"--gguf-type must be one of {', '.join(GGUF_TYPES)}; got {gguf_type!r}.")
    cfg = check_llama(model)
    vocab = gguf_vocab(tokenizer, cfg.vocab_size)  # before writing: it may refuse
    tensors = gguf_tensors(model, gguf_type)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    # general.* and llama.*: each is the gguf writer's add_<key>(value)
    fields: dict[str, Any] = {
        "name": name,
        "file_type": GGUF_TYPES[gguf_type][0],
        "vocab_size": cfg.vocab_size,
        "context_length": cfg.max_seq_len,
        "embedding_length": cfg.d_model,
        "block_count": cfg.n_layer,
        "feed_forward_length": cfg.ffn_hidden,
        "head_count": cfg.n_head,
        "head_count_kv": cfg.n_kv_head,
        "rope_dimension_count": cfg.head_dim,
        "rope_freq_base": cfg.rope_theta,
        "layer_norm_rms_eps": cfg.norm_eps,
    }
    if gguf_type == "q8_0":
        fields["quantization_version"] = gguf.GGML_QUANT_VERSION
    for key, value in fields.items():
        getattr(writer, f"add_{key}")(value)
    add_vocab(writer, vocab, chat_template)
    for tensor_name, data, kind in tensors:
        writer.add_tensor(tensor_name, data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def ollama_modelfile(go_template: str, eos: str, context: int) -> str:
    """A Modelfile for ``./model.gguf``: the chat template in Ollama's Go-template form, the
    end of turn as a stop token, the context length."""
    return (
        f"FROM ./{GGUF_FILE}\n"
        f'TEMPLATE """{go_template}"""\n'
        f'PARAMETER stop "{eos}"\n'
        f"PARAMETER num_ctx {context}\n"
    )


def export_gguf(
    source: str | Path,
    out: str | Path,
    gguf_type: str = "f16",
    chat_template: str | None = None,
    go_template: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``out/model.gguf`` (and ``out/Modelfile`` with ``go_template``) from a model
    directory.

    Args:
        source: a baobab export, a training checkpoint or run directory, or a Hugging Face
            Llama directory; it must hold a tokenizer.json (llama.cpp needs the vocabulary).
        out: the directory to write; an existing GGUF or export there is replaced only with
            ``overwrite``.
        gguf_type: "f32", "f16" or "q8_0".
        chat_template: the Jinja chat template to store (``baobab export`` passes the
            model's ``chat_template.jinja`` or baobab's default); None stores none.
        go_template: the same template in Ollama's Go-template form (e.g.
            :data:`OLLAMA_DEFAULT_TEMPLATE`): then ``out/Modelfile`` is written too, for
            ``ollama create NAME -f out/Modelfile``.
        overwrite: replace an existing export at ``out``.
    """
    from baobab.data.tokenizer import EOT, Tokenizer
    from baobab.export.open import open_model

    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"--gguf-type must be one of {', '.join(GGUF_TYPES)}; got {gguf_type!r}.")
    out = Path(out)
    refuse_to_overwrite(out, overwrite, (source,))  # before the (slow) load
    opened = open_model(source)
    cfg = check_llama(opened.model)
    if opened.tokenizer_file is None:
        raise ValueError(f"'{source}' has no tokenizer.json, which a GGUF file must carry.")
    tokenizer = Tokenizer.load(opened.tokenizer_file)
    name = opened.described.get("name") or "baobab"
    with atomic_directory(out, overwrite, "GGUF directory", (source,)) as tmp:
        write_gguf(opened.model, tmp / GGUF_FILE, tokenizer, chat_template, gguf_type, name)
        if go_template is not None:
            modelfile = ollama_modelfile(go_template, EOT, cfg.max_seq_len)
            (tmp / MODELFILE).write_text(modelfile, encoding="utf-8")
    return out
