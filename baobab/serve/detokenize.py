"""Streaming detokenization: token ids in, text increments out, stop strings cut.

Byte-level BPE tokens may end in the middle of a multi-byte UTF-8 character; decoding such a
prefix gives a trailing U+FFFD. Like vLLM's ``detokenize_incrementally``, the decoder keeps
two offsets into the ids: text is released once the window ``ids[prefix:]`` decodes to more
than ``ids[prefix:read]`` without a trailing U+FFFD, so an increment never ends inside a
character. Decoding only that short window keeps each step O(1) in the output length.

Bytes that are not UTF-8 at all (a model emitting garbage) would otherwise be held until a
valid character follows: as a character spans at most 4 bytes, and a token holds at least
one, the text of all but the last 3 tokens is final once the whole window's decode agrees
with it, and it is released then (invalid bytes show as U+FFFD).

Stop strings: a stop string may span increments, so the text that could be the start of
one is held back until it is either completed (the request stops, the stop string and
what follows are dropped) or ruled out (it is released).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from baobab.data.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns a request's output token ids into text increments (see the module docstring).

    Invariant: ``text[:emitted]`` has been returned, holds no stop string, and no stop
    string occurrence can start before ``emitted`` in any later text.
    """

    def __init__(
        self, tokenizer: Tokenizer, stop: Sequence[str] = (), skip_special_tokens: bool = True
    ) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._stops = [s for s in stop if s]
        self._ids: list[int] = []
        self._prefix = 0  # ids[prefix:read] decode to the tail of `text` (complete chars)
        self._read = 0
        self.text = ""  # complete characters decoded so far
        self.emitted = 0  # chars of `text` already returned
        self.stop_string: str | None = None  # the stop string that ended the text, if any

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip)

    def add(self, token_ids: Iterable[int]) -> str:
        """Feed new tokens; return the text that is now safe to release (may be "")."""
        if self.stop_string is not None:
            return ""
        self._ids.extend(token_ids)
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) > len(before) and not after.endswith(REPLACEMENT):
            self.text += after[len(before) :]
            self._prefix, self._read = self._read, len(self._ids)
        elif len(self._ids) - 3 > self._read:  # invalid bytes: release what is settled
            settled = self._decode(self._ids[self._prefix : len(self._ids) - 3])
            if len(settled) > len(before) and after.startswith(settled):
                self.text += settled[len(before) :]
                self._prefix, self._read = self._read, len(self._ids) - 3
        return self._release(final=False)

    def finish(self) -> str:
        """The request ended for another reason: release everything still held, including
        an incomplete character (as U+FFFD)."""
        if self.stop_string is not None:
            return ""
        tail = self._decode(self._ids[self._prefix :])
        before = self._decode(self._ids[self._prefix : self._read])
        if len(tail) > len(before):
            self.text += tail[len(before) :]
            self._prefix = self._read = len(self._ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        start = self.emitted
        # The earliest complete stop string ends the text.
        hits = [(i, s) for s in self._stops if (i := self.text.find(s, start)) >= 0]
        if hits:
            cut, self.stop_string = min(hits)
            self.text = self.text[:cut]
            self.emitted = cut
            return self.text[start:cut]
        end = len(self.text) if final else len(self.text) - self._held(start)
        self.emitted = max(start, end)
        return self.text[start : self.emitted]

    def _held(self, start: int) -> int:
        """Length of the longest suffix of ``text[start:]`` that begins a stop string."""
        tail = self.text[start:]
        held = 0
        for s in self._stops:
            for k in range(min(len(s) - 1, len(tail)), held, -1):
                if tail.endswith(s[:k]):
                    held = k
                    break
        return held
