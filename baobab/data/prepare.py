"""Raw files -> tokenizer + fixed-size token shards + manifest.json (see manifest.py).

Pipeline: find files -> tokenizer (train / bytes / load) -> encode files in worker
processes, each writing its own per-split part files -> the main process streams the
parts, in file order, into shards. The output depends only on the inputs and the
config, never on the worker count. Everything is built in a temporary directory next
to `out` and renamed into place once complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from baobab.data.manifest import MANIFEST_NAME, MANIFEST_VERSION, SPLITS, Manifest, token_dtype
from baobab.data.sources import find_files as _find_files
from baobab.data.sources import iter_documents, stdlib_files
from baobab.data.tokenizer import Tokenizer, byte_tokenizer, train_bpe
from baobab.diskspace import writing

_FLUSH_TOKENS = 1 << 20  # a worker buffers at most ~this many ids per split in memory
_COPY_TOKENS = 1 << 22  # the main process copies parts into shards in chunks this big
_BATCH_DOCS = 256  # documents per encode_batch call (amortises per-call overhead)
_BATCH_CHARS = 1 << 20


@dataclass
class PrepareConfig:
    """How `baobab prepare` turns raw files into token shards."""

    inputs: list[str]
    """Files and directories to read (directories are searched for .txt, .jsonl, .parquet)."""
    out: str
    """Output directory; it receives manifest.json, tokenizer.json and the shards."""
    tokenizer: str = "bpe"
    """Which tokenizer: "bpe" trains a byte-level BPE on the inputs, "bytes" uses raw bytes, any other value is a path to a tokenizer.json."""
    vocab_size: int = 8192
    """Vocabulary size of a trained BPE tokenizer (special tokens included)."""
    min_frequency: int = 2
    """A pair must occur at least this often to become a BPE merge."""
    val_fraction: float = 0.01
    """Fraction of documents sent to the validation split, chosen by a seeded hash."""
    shard_tokens: int = 50_000_000
    """Tokens per shard file (the last shard of each split may hold fewer)."""
    workers: int = 0
    """Encoding processes; 0 means one per CPU core."""
    seed: int = 0
    """Seed of the train/validation assignment."""
    text_key: str = "text"
    """Field (.jsonl) or column (.parquet) that holds the text."""
    overwrite: bool = False
    """Replace an existing prepared corpus in `out` (only once the new one is complete)."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        if isinstance(self.inputs, (str, Path)):
            self.inputs = [self.inputs]
        self.inputs = [str(i) for i in self.inputs]
        self.out = str(self.out)
        self.tokenizer = str(self.tokenizer)
        if not self.inputs:
            raise ValueError("inputs must name at least one file or directory")
        if not self.out:
            raise ValueError("out must name an output directory")
        if not 260 <= self.vocab_size < 2**32:
            raise ValueError(f"vocab_size must be in [260, 2**32), got {self.vocab_size}")
        if self.min_frequency < 1:
            raise ValueError(f"min_frequency must be at least 1, got {self.min_frequency}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.shard_tokens < 1:
            raise ValueError(f"shard_tokens must be at least 1, got {self.shard_tokens}")
        if self.workers < 0:
            raise ValueError(f"workers must be 0 (one per CPU) or more, got {self.workers}")
        if not self.text_key:
            raise ValueError("text_key must be a non-empty field name")


def val_score(seed: int, file_index: int, doc_index: int) -> float:
    """A uniform number in [0, 1) fixed by (seed, file, document); < val_fraction -> val."""
    digest = hashlib.blake2b(f"{seed}/{file_index}/{doc_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


# -- worker side -------------------------------------------------------------------------

_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_path: str, pooled: bool) -> None:
    global _worker_tokenizer
    if pooled:
        # Parallelism comes from the processes; Rust threads in each would oversubscribe.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tokenizer = Tokenizer.load(tokenizer_path)


def _batched(texts: Iterator[str]) -> Iterator[list[str]]:
    """Groups of documents (at most _BATCH_DOCS, or about _BATCH_CHARS characters)."""
    batch: list[str] = []
    chars = 0
    for text in texts:
        batch.append(text)
        chars += len(text)
        if len(batch) >= _BATCH_DOCS or chars >= _BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


@dataclass
class _Task:
    index: int  # position of the file in the sorted input list (feeds the val hash)
    path: str
    parts_dir: str
    text_key: str
    seed: int
    val_fraction: float
    dtype: str


def _encode_file(task: _Task) -> dict[str, Any]:
    """Encode one file into `{parts_dir}/{index}.{split}.bin`; return per-split counts."""
    tok = _worker_tokenizer
    assert tok is not None, "worker tokenizer not initialised"
    dtype = np.dtype(task.dtype)
    eot = tok.eot_id
    parts = {s: Path(task.parts_dir) / f"{task.index:08d}.{s}.bin" for s in SPLITS}
    buffers: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    buffered = dict.fromkeys(SPLITS, 0)
    counts = {s: {"tokens": 0, "documents": 0} for s in SPLITS}
    files = {s: parts[s].open("wb") for s in SPLITS}
    try:
        doc_index = 0
        for texts in _batched(iter_documents(task.path, task.text_key)):
            for ids in tok.encode_batch(texts):
                ids.append(eot)  # every document ends with end-of-text, even the last
                score = val_score(task.seed, task.index, doc_index)
                split = "val" if score < task.val_fraction else "train"
                doc_index += 1
                arr = np.asarray(ids, dtype=dtype)
                buffers[split].append(arr)
                buffered[split] += arr.size
                counts[split]["tokens"] += arr.size
                counts[split]["documents"] += 1
                if buffered[split] >= _FLUSH_TOKENS:
                    files[split].write(np.concatenate(buffers[split]).tobytes())
                    buffers[split], buffered[split] = [], 0
        for s in SPLITS:
            if buffers[s]:
                files[s].write(np.concatenate(buffers[s]).tobytes())
    finally:
        for f in files.values():
            f.close()
    return {"index": task.index, "parts": {s: str(p) for s, p in parts.items()}, "counts": counts}


# -- main side ---------------------------------------------------------------------------


class _ShardWriter:
    """Streams ids into `{split}_{k:06d}.bin` files of exactly `shard_tokens` ids each."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.directory, self.split, self.dtype, self.shard_tokens = (
            directory,
            split,
            dtype,
            shard_tokens,
        )
        self.shards: list[dict[str, Any]] = []
        self._file = None
        self._hash = None
        self._count = 0

    def write(self, ids: np.ndarray) -> None:
        while ids.size:
            if self._file is None:
                name = f"{self.split}_{len(self.shards):06d}.bin"
                self._file = (self.directory / name).open("wb")
                self._hash, self._count = hashlib.sha256(), 0
                self.shards.append({"file": name, "tokens": 0, "sha256": ""})
            take = ids[: self.shard_tokens - self._count]
            data = take.astype(self.dtype, copy=False).tobytes()
            self._file.write(data)
            self._hash.update(data)
            self._count += take.size
            ids = ids[take.size :]
            if self._count == self.shard_tokens:
                self._finish()

    def _finish(self) -> None:
        self._file.close()
        self.shards[-1].update(tokens=self._count, sha256=self._hash.hexdigest())
        self._file = None

    def close(self) -> list[dict[str, Any]]:
        if self._file is not None:
            self._finish()
        return self.shards


def _all_documents(files: Sequence[Path], text_key: str) -> Iterator[str]:
    for path in files:
        yield from iter_documents(path, text_key)


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"'{out}' is a file; choose a directory for the prepared corpus")
    if (out / MANIFEST_NAME).exists():
        if not overwrite:
            raise ValueError(
                f"'{out}' already holds a prepared corpus; pass --overwrite true or choose another --out"
            )
    elif out.is_dir() and any(out.iterdir()):
        # Never replace a directory we did not write: it may hold anything.
        raise ValueError(
            f"'{out}' exists and is not a prepared corpus; choose an empty or new directory"
        )


def _make_tokenizer(cfg: PrepareConfig, files: Sequence[Path]) -> tuple[Tokenizer, str]:
    if cfg.tokenizer == "bpe":
        docs = _all_documents(files, cfg.text_key)
        return train_bpe(docs, cfg.vocab_size, cfg.min_frequency, show_progress=cfg.progress), "bpe"
    if cfg.tokenizer == "bytes":
        return byte_tokenizer(), "bytes"
    return Tokenizer.load(cfg.tokenizer), "file"


def _encode_all(
    tasks: list[_Task], tokenizer_path: Path, workers: int, progress: bool
) -> Iterator[dict[str, Any]]:
    """Results of `_encode_file` in task order, whatever the number of workers."""
    bar = tqdm(total=len(tasks), unit="file", desc="encode", disable=not progress)
    try:
        if workers <= 1:
            # In-process: one worker is not worth a spawn.
            _init_worker(str(tokenizer_path), pooled=False)
            for task in tasks:
                yield _encode_file(task)
                bar.update()
            return
        # spawn: safe with threads (tokenizers, torch) and the same on every platform.
        ctx = mp.get_context("spawn")
        with ctx.Pool(
            workers, initializer=_init_worker, initargs=(str(tokenizer_path), True)
        ) as pool:
            for result in pool.imap(_encode_file, tasks):  # imap keeps task order
                yield result
                bar.update()
    finally:
        bar.close()


def prepare(cfg: PrepareConfig) -> Manifest:
    """Build a prepared corpus in `cfg.out` and return its manifest.

    When `workers` > 1 this starts processes with the "spawn" method, so a script that
    calls it must guard its entry point with `if __name__ == "__main__":`.
    """
    out = Path(cfg.out)
    _check_out(out, cfg.overwrite)
    if cfg.tokenizer not in ("bpe", "bytes") and not Path(cfg.tokenizer).exists():
        raise FileNotFoundError(
            f"tokenizer '{cfg.tokenizer}' is neither 'bpe', 'bytes' nor an existing tokenizer.json"
        )
    files = _find_files(cfg.inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        # A full disk is one sentence, its free space read before the cleanup below.
        with writing(f"the prepared corpus '{out}'", out.parent):
            tmp.mkdir()
            manifest = _build(cfg, files, tmp)
            _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Manifest(out, manifest)


def _build(cfg: PrepareConfig, files: list[Path], tmp: Path) -> dict[str, Any]:
    tok, kind = _make_tokenizer(cfg, files)
    tokenizer_path = tok.save(tmp / "tokenizer.json")
    dtype = token_dtype(tok.vocab_size)
    parts_dir = tmp / "parts"
    parts_dir.mkdir()
    tasks = [
        _Task(i, str(p), str(parts_dir), cfg.text_key, cfg.seed, cfg.val_fraction, dtype.str)
        for i, p in enumerate(files)
    ]
    workers = min(cfg.workers or os.cpu_count() or 1, len(tasks))
    writers = {s: _ShardWriter(tmp, s, dtype, cfg.shard_tokens) for s in SPLITS}
    documents = dict.fromkeys(SPLITS, 0)
    # closing(): an error here shuts the worker pool down at once.
    with contextlib.closing(_encode_all(tasks, tokenizer_path, workers, cfg.progress)) as results:
        for result in results:
            for s in SPLITS:
                documents[s] += result["counts"][s]["documents"]
                part = Path(result["parts"][s])
                with part.open("rb") as f:
                    while (chunk := np.fromfile(f, dtype=dtype, count=_COPY_TOKENS)).size:
                        writers[s].write(chunk)
                part.unlink()  # keep disk use near one copy of the corpus
    parts_dir.rmdir()
    shards = {s: w.close() for s, w in writers.items()}
    total_docs = sum(documents.values())
    if cfg.val_fraction > 0 and documents["val"] == 0:
        raise ValueError(
            f"no document fell into the validation split ({total_docs} documents, val_fraction "
            f"{cfg.val_fraction}); raise --val-fraction or add documents"
        )
    if documents["train"] == 0:
        raise ValueError(
            f"no document fell into the training split ({total_docs} documents, val_fraction "
            f"{cfg.val_fraction}); lower --val-fraction or add documents"
        )
    manifest = {
        "version": MANIFEST_VERSION,
        "dtype": dtype.name,
        "tokenizer": {
            "kind": kind,
            "file": "tokenizer.json",
            "vocab_size": tok.vocab_size,
            "eot_id": tok.eot_id,
            "pad_id": tok.pad_id,
            "mask_id": tok.mask_id,
        },
        "splits": {
            s: {
                "tokens": sum(sh["tokens"] for sh in shards[s]),
                "documents": documents[s],
                "shards": shards[s],
            }
            for s in SPLITS
        },
        "sources": {"files": len(files), "bytes": sum(p.stat().st_size for p in files)},
        "config": dataclasses.asdict(cfg),
    }
    # Written last: a directory with a manifest.json is a complete corpus.
    (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished `tmp` to `out`; an old `out` is removed only after the swap."""
    if not out.exists():
        tmp.rename(out)
        return
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        old.rename(out)  # put the previous corpus back
        raise
    shutil.rmtree(old, ignore_errors=True)


def prepare_stdlib(
    out: str | Path, vocab_size: int = 4096, seed: int = 0, val_fraction: float = 0.02, **kw: Any
) -> Manifest:
    """The quickstart corpus: this interpreter's standard library (~12 MB of Python)."""
    inputs = [str(p) for p in stdlib_files()]
    cfg = PrepareConfig(
        inputs=inputs,
        out=str(out),
        vocab_size=vocab_size,
        seed=seed,
        val_fraction=val_fraction,
        **kw,
    )
    return prepare(cfg)
