"""Structured output: OpenAI's ``response_format`` as a grammar that masks logits per request.

The HTTP layer turns ``{"type": "json_object"}`` or ``{"type": "json_schema", ...}`` into an
llguidance grammar (:func:`grammar_for`: JSON text, so it crosses the engine's process pipe
inside :class:`~baobab.serve.types.SamplingParams`), refusing a schema llguidance cannot
compile with a :class:`UnsupportedSchemaError` that names the construct. The engine gives
each such request a matcher (:meth:`Grammars.matcher`); every step, before sampling, the
rows of those requests get the tokens their grammar forbids set to -inf
(:meth:`Grammars.mask`), and after sampling each matcher consumes its token
(:func:`consume`); a grammar that can take nothing more ends its request with "stop".

Only grammar rows are touched (on a copy of the logits), so the other rows of a batch sample
exactly what they would alone. Logprobs stay those of the raw logits, as vLLM reports them
by default (``logprobs_mode="raw_logprobs"``). JSON is compact (no whitespace between
tokens, as llguidance writes it with ``whitespace_flexible`` off): free whitespace would let
a model pad its output until ``max_tokens`` instead of closing the value.
"""

from __future__ import annotations

import functools
import json
import re
from collections import OrderedDict
from typing import Any

import llguidance
import llguidance.numpy
import numpy as np
import torch

from baobab.data.tokenizer import Tokenizer

# Options of llguidance's JSON-schema compiler; a schema's own "x-guidance" overrides them.
JSON_OPTIONS = {"whitespace_flexible": False}
ANY_OBJECT = {"type": "object"}  # what json_object asks for, as vLLM compiles it
MAX_CACHED_GRAMMARS = 64  # compiled matchers kept per engine, least recently used dropped


class UnsupportedSchemaError(ValueError):
    """A JSON schema llguidance cannot compile; the message names the construct. The server
    answers 400 with ``param`` response_format."""

    param = "response_format"


def _one_sentence(message: str) -> str:
    """llguidance's message on one line: a regex error's caret lines are dropped."""
    lines = [line.strip() for line in message.splitlines()]
    text = " ".join(line for line in lines if line and set(line) != {"^"})
    text = re.sub(r"\s+", " ", text)
    return text if len(text) <= 300 else text[:300] + "..."


def grammar_for(response_format: dict[str, Any] | None) -> str | None:
    """The llguidance grammar (JSON text) of an OpenAI ``response_format``, None for text.

    ``response_format`` is the validated request field as a dict: ``{"type": "text"}``,
    ``{"type": "json_object"}`` or ``{"type": "json_schema", "json_schema": {"schema":
    {...}, ...}}``. Raises UnsupportedSchemaError for a schema that does not compile.
    """
    kind = (response_format or {}).get("type", "text")
    if kind == "text":
        return None
    schema = ANY_OBJECT if kind == "json_object" else response_format["json_schema"]["schema"]
    try:
        text = json.dumps(schema)
    except RecursionError:  # pydantic took it, so only its depth can be at fault
        raise UnsupportedSchemaError(_refusal("the schema nests too deeply")) from None
    return _grammar_of_schema(text)


def _refusal(reason: str) -> str:
    return f"the JSON schema of 'response_format' is not supported: {reason}"


@functools.lru_cache(maxsize=MAX_CACHED_GRAMMARS)
def _grammar_of_schema(schema: str) -> str:
    """The grammar of a JSON schema's text; cached: clients send the same schema again."""
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        error = llguidance.LLMatcher.validate_grammar(grammar)
    except ValueError as err:  # e.g. "recursion limit exceeded" (serde_json's, at depth 128)
        error = str(err)
    if error:
        raise UnsupportedSchemaError(_refusal(_one_sentence(error)))
    return grammar


class Grammars:
    """The engine's side: matchers for requests, and the per-step mask over their rows.

    The model's logits may be wider than the tokenizer's vocabulary (ids past it decode to
    ""); grammar rows never sample those ids.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._lltokenizer: llguidance.LLTokenizer | None = None
        self._compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()

    @property
    def lltokenizer(self) -> llguidance.LLTokenizer:
        # Built on first use: a large BPE vocabulary takes about a second, and most servers
        # never see a grammar.
        if self._lltokenizer is None:
            tok = self.tokenizer
            self._lltokenizer = llguidance.LLTokenizer(tok.to_str(), eos_token=tok.eot_id)
        return self._lltokenizer

    def matcher(self, grammar: str) -> llguidance.LLMatcher:
        """A fresh matcher of ``grammar``: a copy of the one compiled for the first request
        with this text. Raises ValueError (one sentence) if the grammar does not compile."""
        compiled = self._compiled.pop(grammar, None)
        if compiled is None:
            compiled = llguidance.LLMatcher(self.lltokenizer, grammar, log_level=0)
            if compiled.is_error():
                error = _one_sentence(compiled.get_error())
                raise ValueError(f"the response format does not compile: {error}")
        self._compiled[grammar] = compiled  # most recently used last
        while len(self._compiled) > MAX_CACHED_GRAMMARS:
            self._compiled.popitem(last=False)
        return compiled.deep_copy()

    def allowed(self, matchers: list[llguidance.LLMatcher], width: int) -> np.ndarray:
        """(R, width) bool: the tokens each matcher allows next (at least one), over logits
        of ``width`` ids."""
        tokenizer_vocab = self.lltokenizer.vocab_size
        bitmask = llguidance.numpy.allocate_token_bitmask(len(matchers), tokenizer_vocab)
        for row, m in enumerate(matchers):
            llguidance.numpy.fill_next_token_bitmask(m, bitmask, row)
        # Bit t of the little-endian int32 words is token t.
        bits = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")
        allowed = np.zeros((len(matchers), width), dtype=bool)
        known = min(tokenizer_vocab, width)
        allowed[:, :known] = bits[:, :known]
        # A matcher in an error state allows nothing: let it end with the end-of-text token.
        allowed[~allowed.any(axis=1), self.tokenizer.eot_id] = True
        return allowed

    def mask(
        self, logits: torch.Tensor, matchers: list[llguidance.LLMatcher | None]
    ) -> torch.Tensor:
        """``logits`` (N, V) with each row that has a matcher limited to what it allows (-inf
        elsewhere): a masked copy, or ``logits`` itself when no row has a matcher."""
        rows = [i for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return logits
        allowed = torch.from_numpy(self.allowed([matchers[i] for i in rows], logits.shape[1]))
        masked = logits.clone()
        index = torch.tensor(rows, device=logits.device)
        masked[index] = masked[index].masked_fill(~allowed.to(logits.device), float("-inf"))
        return masked


def consume(matcher: llguidance.LLMatcher, token: int) -> bool:
    """Advance ``matcher`` by the sampled ``token``; True when its grammar can take nothing
    more (the value is complete, or the matcher failed): the request is done."""
    matcher.consume_token(token)
    return matcher.is_stopped()
