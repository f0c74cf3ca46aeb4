"""Tokenizers: a thin wrapper over Hugging Face `tokenizers`, byte-level BPE training,
and a raw-bytes tokenizer that is still a real `tokenizer.json`.

Every baobab tokenizer knows the three special tokens in `SPECIAL_TOKENS`. Text is
always encoded as plain text: a literal "<|endoftext|>" inside a document becomes
ordinary bytes, never a document boundary (pass `allow_special=True` to opt in), so
only `prepare` decides where documents end.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>", "<|mask|>")
EOT, PAD, MASK = SPECIAL_TOKENS


def _byte_to_unicode() -> list[str]:
    """GPT-2's reversible byte -> printable-character map, indexed by byte value.

    Printable latin-1 bytes map to themselves; the other 68 bytes map to 256, 257, ...
    This is the alphabet `pre_tokenizers.ByteLevel` produces, in byte order.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    table: dict[int, int] = {b: b for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = 256 + extra
            extra += 1
    return [chr(table[b]) for b in range(256)]


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special-token ids baobab relies on."""

    def __init__(self, tok: tokenizers.Tokenizer) -> None:
        # Append any special token the tokenizer lacks (existing ones keep their ids).
        missing = [s for s in SPECIAL_TOKENS if tok.token_to_id(s) is None]
        if missing:
            tok.add_special_tokens(missing)
        # Not serialized in tokenizer.json, so set on every construction.
        tok.encode_special_tokens = True
        self._tok = tok
        self._eot = tok.token_to_id(EOT)
        self._pad = tok.token_to_id(PAD)
        self._mask = tok.token_to_id(MASK)

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The wrapped Hugging Face tokenizer."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (ids are 0..vocab_size-1)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eot_id(self) -> int:
        return self._eot

    @property
    def pad_id(self) -> int:
        return self._pad

    @property
    def mask_id(self) -> int:
        return self._mask

    def _encode(self, texts: list[str]) -> list[list[int]]:
        # The "fast" variant skips offset tracking (~20% faster); older tokenizers lack it.
        if hasattr(self._tok, "encode_batch_fast"):
            encodings = self._tok.encode_batch_fast(texts, add_special_tokens=False)
        else:
            encodings = self._tok.encode_batch(texts, add_special_tokens=False)
        return [e.ids for e in encodings]

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """Token ids of `text`; special-token strings are matched only if `allow_special`."""
        if allow_special:
            self._tok.encode_special_tokens = False
            try:
                return self._encode([text])[0]
            finally:
                self._tok.encode_special_tokens = True
        return self._encode([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` over many texts (parallel inside the Rust library)."""
        return self._encode(list(texts))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def to_str(self) -> str:
        """The tokenizer.json text."""
        return self._tok.to_str()

    def save(self, path: str | Path) -> Path:
        """Write a standard tokenizer.json to `path` (a directory gets `tokenizer.json`)."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        path.write_text(self._tok.to_str(), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load a tokenizer.json file, or the tokenizer.json inside a directory."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file '{path}' does not exist")
        try:
            tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust error text is long; keep one sentence
            raise ValueError(f"'{path}' is not a valid tokenizer.json ({e})") from None
        return cls(tok)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eot_id={self.eot_id})"


def _byte_level(tok: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
    # No prefix space: decode(encode(text)) must give back text unchanged.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    min_frequency: int = 2,
    *,
    show_progress: bool = False,
) -> Tokenizer:
    """Train a byte-level BPE tokenizer on `texts` in a single streaming pass.

    Ids: the special tokens are 0, 1, 2, then the 256 byte symbols, then merges.
    Deterministic: the same texts give the same tokenizer.json (merge ties are broken
    by pair id inside `tokenizers`).
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)}, got {vocab_size}"
        )
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be at least 1, got {min_frequency}")
    tok = _byte_level(tokenizers.Tokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(iter(texts), trainer)
    return Tokenizer(tok)


def byte_tokenizer() -> Tokenizer:
    """Raw bytes: byte b has id b; the special tokens are 256, 257, 258."""
    alphabet = _byte_to_unicode()
    vocab = {ch: b for b, ch in enumerate(alphabet)}
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    _byte_level(tok)
    # No regex split: with no merges, word boundaries cannot change the ids.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    return Tokenizer(tok)
