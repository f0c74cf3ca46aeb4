"""The request mixes ``baobab bench serve`` sends: prompts (token ids) and output lengths.

Every workload is seeded: the same settings and seed give the same requests.

- ``fixed``: random ids, every prompt ``input_len`` tokens, every output ``output_len``;
- ``random``: as ``fixed`` but each input and output length drawn uniformly from
  ``[len x (1 - r), len x (1 + r)]`` with ``r = random_range_ratio`` (vLLM's
  ``--random-range-ratio``; 0.5 gives ½x to 1½x of the nominal);
- ``shared-prefix``: one ``prefix_len``-token system prompt (the same for every request of
  the run, warm-up included) followed by a distinct ``input_len``-token question;
- ``corpus``: ``input_len``-token windows of real text, encoded with the served model's
  tokenizer, from a prepared corpus (``baobab prepare``'s directory: its val split, decoded
  with its own tokenizer) or from text files (``.txt``, ``.py``, ``.md``, ``.jsonl``,
  ``.parquet``, or directories of them).

Prompts are token ids so that every engine behind the OpenAI API (baobab, llama.cpp) gets
the same tokens whatever its own text tokenizer does.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

WORKLOADS = ("fixed", "random", "shared-prefix", "corpus")
CORPUS_EXTENSIONS = (".txt", ".py", ".md", ".jsonl", ".parquet")
# Text read from a corpus, at most: plenty of distinct windows, and a bounded start-up.
CORPUS_MAX_CHARS = 8_000_000
# Ids 3..vocab-1: ordinary tokens of both baobab tokenizer layouts (a trained BPE's
# specials are 0-2, the byte tokenizer's 256-258).
FIRST_ORDINARY_ID = 3

Request = tuple[list[int], int]  # (prompt ids, output tokens)


@dataclass
class Workload:
    """Settings of one request mix; :meth:`requests` draws from it (see the module doc)."""

    kind: str = "fixed"
    input_len: int = 32
    output_len: int = 64
    vocab: int = 256
    random_range_ratio: float = 0.5
    prefix_len: int = 512
    seed: int = 0
    # corpus only: the tokenized documents windows are cut from (each >= input_len ids)
    documents: list[list[int]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in WORKLOADS:
            raise ValueError(f"workload must be one of {', '.join(WORKLOADS)}; got {self.kind!r}")
        for key in ("input_len", "output_len", "prefix_len"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be positive, got {getattr(self, key)}")
        if self.vocab < FIRST_ORDINARY_ID + 1:
            raise ValueError(
                f"vocab must be at least 4 (prompt ids are 3..vocab-1), got {self.vocab}"
            )
        if not 0 <= self.random_range_ratio < 1:
            raise ValueError(f"random_range_ratio must be in [0, 1), got {self.random_range_ratio}")
        if self.kind == "corpus" and not self.documents:
            raise ValueError(
                f"the corpus workload needs documents of at least {self.input_len} tokens; "
                "pass --corpus with text or a prepared corpus and --tokenizer"
            )

    def length_range(self, nominal: int) -> tuple[int, int]:
        """The lengths a ``random`` workload draws for ``nominal`` (both ends included)."""
        low = max(1, int(nominal * (1 - self.random_range_ratio)))
        return low, max(low, int(nominal * (1 + self.random_range_ratio)))

    def shared_prefix(self) -> list[int]:
        """The system prompt every ``shared-prefix`` request starts with (from ``seed`` only)."""
        rng = random.Random(f"prefix-{self.seed}")
        return [rng.randrange(FIRST_ORDINARY_ID, self.vocab) for _ in range(self.prefix_len)]

    def requests(self, count: int, seed: int) -> list[Request]:
        """``count`` (prompt, output length) pairs drawn with ``seed``."""
        rng = random.Random(seed)

        def random_ids(n: int) -> list[int]:
            return [rng.randrange(FIRST_ORDINARY_ID, self.vocab) for _ in range(n)]

        if self.kind == "fixed":
            return [(random_ids(self.input_len), self.output_len) for _ in range(count)]
        if self.kind == "random":
            inputs, outputs = self.length_range(self.input_len), self.length_range(self.output_len)
            return [(random_ids(rng.randint(*inputs)), rng.randint(*outputs)) for _ in range(count)]
        if self.kind == "shared-prefix":
            prefix = self.shared_prefix()
            return [(prefix + random_ids(self.input_len), self.output_len) for _ in range(count)]
        out = []
        for _ in range(count):  # corpus
            doc = self.documents[rng.randrange(len(self.documents))]
            start = rng.randrange(len(doc) - self.input_len + 1)
            out.append((doc[start : start + self.input_len], self.output_len))
        return out


def corpus_texts(path: str | Path, max_chars: int = CORPUS_MAX_CHARS) -> list[str]:
    """Documents of a prepared corpus's val split (decoded) or of text files, in order,
    until ``max_chars`` characters are read."""
    from baobab.data.manifest import MANIFEST_NAME, Manifest
    from baobab.data.sources import find_files, iter_documents

    path = Path(path)
    if (path / MANIFEST_NAME).is_file():
        manifest = Manifest.load(path)
        tokenizer, eot = manifest.tokenizer(), manifest.eot_id
        # The val split's first max_chars ids (a token holds at least one character): its
        # documents, each followed by end-of-text (the last maybe cut), decoded to text.
        parts, count = [], 0
        for shard in manifest.open_tokens("val"):
            parts.append(np.asarray(shard[: max_chars - count]))
            count += len(parts[-1])
            if count >= max_chars:
                break
        ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        bounds = [-1, *np.flatnonzero(ids == eot).tolist(), len(ids)]
        return [
            tokenizer.decode(ids[a + 1 : b].tolist())
            for a, b in zip(bounds, bounds[1:])
            if b > a + 1
        ]
    texts, chars = [], 0
    for file in find_files([path], CORPUS_EXTENSIONS):
        for text in iter_documents(file):
            texts.append(text[: max_chars - chars])
            chars += len(texts[-1])
            if chars >= max_chars:
                return texts
    return texts


def corpus_documents(corpus: str | Path, tokenizer: str | Path, min_len: int) -> list[list[int]]:
    """The corpus's documents encoded with ``tokenizer`` (a tokenizer.json, or a directory
    holding one such as an export), those of at least ``min_len`` ids."""
    from baobab.data.tokenizer import Tokenizer

    tokenizer = Path(tokenizer)
    if tokenizer.is_dir():
        tokenizer = tokenizer / "tokenizer.json"
    if not tokenizer.is_file():
        raise FileNotFoundError(f"no tokenizer at '{tokenizer}'; pass a tokenizer.json")
    encoded = Tokenizer.load(tokenizer).encode_batch(corpus_texts(corpus))
    documents = [ids for ids in encoded if len(ids) >= min_len]
    if not documents:
        raise ValueError(f"no document of '{corpus}' holds {min_len} tokens; lower --input_len")
    return documents


def make_workload(
    kind: str = "fixed",
    input_len: int = 32,
    output_len: int = 64,
    vocab: int = 256,
    random_range_ratio: float = 0.5,
    prefix_len: int = 512,
    corpus: str | None = None,
    tokenizer: str | None = None,
    seed: int = 0,
) -> Workload:
    """A :class:`Workload`, reading and encoding the corpus when ``kind`` is ``corpus``."""
    documents: list[list[int]] = []
    if kind == "corpus":
        if corpus is None or tokenizer is None:
            raise ValueError(
                "the corpus workload needs --corpus (text files or a prepared corpus) and "
                "--tokenizer (the served model's tokenizer.json or export directory)"
            )
        documents = corpus_documents(corpus, tokenizer, max(1, input_len))
    return Workload(kind, input_len, output_len, vocab, random_range_ratio, prefix_len, seed,
                    documents)  # fmt: skip
