"""Request text -> prompt token ids, without stalling the HTTP process's event loop.

Two defences against a large prompt (``/health`` and running streams share the loop):

- :func:`refuse_unfittable` refuses, before any tokenization, a prompt whose character
  count alone proves it cannot fit the context. With a byte-level BPE tokenizer (GPT-2's
  kind: every byte of UTF-8 text is a symbol of the vocabulary, nothing is normalized or
  dropped), a token is one vocabulary entry, so it covers at most ``L`` bytes, hence at most
  ``L`` characters, ``L`` being the longest entry in bytes. A text of ``c`` characters is
  therefore at least ``ceil(c / L)`` tokens. :func:`max_chars_per_token` derives ``L`` from
  the vocabulary, or says None when the tokenizer is not of that kind (a normalizer or an
  unknown token could make a long text few tokens) and only the exact count after
  tokenizing applies.
- :func:`off_loop` runs tokenization and chat templating in one worker thread. The
  tokenizers library releases the GIL while it encodes, so the loop keeps running; one
  worker because ``Tokenizer.encode(allow_special=True)`` flips a flag on the shared
  tokenizer, so encodes must never overlap (every encode of the HTTP process goes here).
"""

from __future__ import annotations

import asyncio
import json
import math
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from tokenizers import pre_tokenizers

from baobab.data.tokenizer import Tokenizer
from baobab.serve.errors import APIError

T = TypeVar("T")

_bounds: weakref.WeakKeyDictionary[Tokenizer, int | None] = weakref.WeakKeyDictionary()
_executor: ThreadPoolExecutor | None = None
# Pre-tokenizers that only split text (none with behavior "removed" drops characters).
_SPLITTERS = {"ByteLevel", "Split", "Digits", "Punctuation"}


def _byte_level_bpe(config: dict) -> bool:
    """Whether a tokenizer.json (parsed) is byte-level BPE with nothing that shrinks text."""
    model, pre = config.get("model") or {}, config.get("pre_tokenizer") or {}
    if config.get("normalizer") is not None or model.get("type") != "BPE":
        return False
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return False  # entries then hold characters that are not in the text
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if not parts or any(p.get("type") not in _SPLITTERS for p in parts):
        return False
    if any(str(p.get("behavior", "")).lower() == "removed" for p in parts):
        return False
    return any(p.get("type") == "ByteLevel" for p in parts)


def _bound(tokenizer: Tokenizer) -> int | None:
    backend = tokenizer.backend
    if not _byte_level_bpe(json.loads(backend.to_str())):
        return None
    vocab = backend.get_vocab(with_added_tokens=False)  # entries in the byte alphabet
    if not set(pre_tokenizers.ByteLevel.alphabet()) <= vocab.keys():
        return None  # a byte without a symbol is dropped: a text could be fewer tokens
    added_tokens = backend.get_added_tokens_decoder().values()
    # Special tokens are never matched in request text (it is encoded as plain text), even
    # when a trainer also put them in the model's vocabulary.
    special = {a.content for a in added_tokens if a.special}
    longest = max(len(e) for e in vocab if e not in special)  # one alphabet char per byte
    for added in added_tokens:
        # Other added tokens are matched, and lstrip/rstrip ones swallow any whitespace run.
        if added.special:
            continue
        if added.lstrip or added.rstrip:
            return None
        longest = max(longest, len(added.content))
    return longest


def max_chars_per_token(tokenizer: Tokenizer) -> int | None:
    """The most characters of request text one token can cover, or None when unbounded
    (see the module doc); computed once per tokenizer."""
    if tokenizer not in _bounds:
        _bounds[tokenizer] = _bound(tokenizer)
    return _bounds[tokenizer]


def refuse_unfittable(
    texts: Sequence[str], tokenizer: Tokenizer, max_tokens: int | None, context: int
) -> None:
    """400 (``context_length_exceeded``) when ``texts``, each encoded on its own, are
    certainly more tokens than the context leaves (``max_tokens`` None: the prompt must
    leave room for one token)."""
    per_token = max_chars_per_token(tokenizer)
    if per_token is None:
        return
    chars = sum(len(t) for t in texts)
    at_least = sum(math.ceil(len(t) / per_token) for t in texts)
    if at_least + (1 if max_tokens is None else max_tokens) <= context:
        return
    why = f"its {chars} characters, at most {per_token} per token"
    if max_tokens is None:
        message = (
            f"but the prompt is at least {at_least} tokens ({why}), which leaves no room "
            "for the completion; shorten the prompt"
        )
    else:
        message = (
            f"but the request asks for at least {at_least + max_tokens} tokens (at least "
            f"{at_least} in the prompt, {why}, and {max_tokens} for the completion); "
            "shorten the prompt or lower max_tokens"
        )
    raise APIError(
        400,
        f"this model's maximum context length is {context} tokens, {message}",
        param="max_tokens",
        code="context_length_exceeded",
    )


async def off_loop(fn: Callable[..., T], *args) -> T:
    """``fn(*args)`` in the tokenizer thread (see the module doc)."""
    global _executor
    if _executor is None:
        _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="baobab-tokenize")
    return await asyncio.get_running_loop().run_in_executor(_executor, fn, *args)
