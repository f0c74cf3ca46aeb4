"""A baobab tokenizer as GGUF tokenizer metadata (``tokenizer.ggml.*``), as llama.cpp reads it.

baobab's tokenizers are Hugging Face ``tokenizers`` byte-level BPEs, which llama.cpp calls
the "gpt2" tokenizer model. The keys follow what llama.cpp's ``convert_hf_to_gguf.py``
writes for such a tokenizer (``TextModel._set_vocab_gpt2`` and ``gguf.SpecialVocab``):

- ``tokens``: every id's token text in byte-level form (``Ġ`` for a space), ids the model
  has but the tokenizer lacks as ``[PAD{i}]`` (type UNUSED);
- ``token_type``: NORMAL, CONTROL for special added tokens (``<|endoftext|>`` and the
  others), USER_DEFINED for non-special added tokens;
- ``merges``: "left right" strings in rank order;
- ``bos``/``eos`` = ``<|endoftext|>`` (baobab's document boundary and end of turn),
  ``padding`` = ``<|pad|>``, and ``add_bos_token`` false: baobab prompts start with no BOS;
- ``pre`` = "gpt-2", llama.cpp's name for GPT-2's regex split before merging, which
  ``train_bpe``'s tokenizers use too (its ByteLevel pre-tokenizer, ``use_regex``); the byte
  tokenizer splits nothing but has no merges, so splitting changes none of its ids. Either
  way llama.cpp's own text tokenization gives baobab's ids
  (``benchmarks/gguf_llama_check.py`` checks it on its prompt).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import gguf

from baobab.data.tokenizer import EOT, MASK, PAD, Tokenizer


@dataclass(frozen=True)
class GGUFVocab:
    """Everything ``tokenizer.ggml.*`` holds for one tokenizer and model vocabulary size."""

    tokens: list[str]  # by id, len == the model's vocab_size
    types: list[int]  # gguf.TokenType per id
    merges: list[str]  # "left right", rank order
    eos_id: int
    pad_id: int


def gguf_vocab(tok: Tokenizer, vocab_size: int) -> GGUFVocab:
    """The GGUF vocabulary of ``tok`` for a model with ``vocab_size`` ids (module docstring);
    ValueError when the tokenizer has ids the model has not, or is not a BPE."""
    data = json.loads(tok.to_str())
    if data["model"]["type"] != "BPE":
        raise ValueError(
            f"GGUF export writes byte-level BPE tokenizers; this one is {data['model']['type']}."
        )
    if tok.vocab_size > vocab_size:
        raise ValueError(
            f"the tokenizer has {tok.vocab_size} ids but the model only {vocab_size}; "
            "export the tokenizer the model was trained with."
        )
    by_id = {i: t for t, i in tok.backend.get_vocab(with_added_tokens=True).items()}
    added = tok.backend.get_added_tokens_decoder()  # id -> AddedToken
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            special = added[i].special or by_id[i] in (EOT, PAD, MASK)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    # tokenizers writes a merge as "a b" (older files) or ["a", "b"] (newer ones).
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges", [])]
    if not merges:
        # A tokenizer with no merges (baobab's byte tokenizer) still needs the key: llama.cpp
        # refuses a "gpt2" vocabulary without it, and the gguf package drops empty arrays. One
        # merge of two control tokens never applies: llama.cpp splits specials off before BPE.
        merges = [f"{EOT} {PAD}"]
    return GGUFVocab(tokens, [int(t) for t in types], merges, tok.eot_id, tok.pad_id)


def add_vocab(writer: gguf.GGUFWriter, vocab: GGUFVocab, chat_template: str | None) -> None:
    """Write ``vocab`` and ``chat_template`` (Jinja, as Hugging Face and llama.cpp read it;
    None: none)."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    writer.add_bos_token_id(vocab.eos_id)
    writer.add_eos_token_id(vocab.eos_id)
    writer.add_pad_token_id(vocab.pad_id)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
