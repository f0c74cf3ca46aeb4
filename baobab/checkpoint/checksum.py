"""A checksum of every file of a checkpoint, taken as it is written and checked on load.

meta.json, the completion marker, records them (``"checksums"``)::

    {"algorithm": "xxh3_128",
     "files": {"__0_0.distcp": {"bytes": 1640000000, "xxh3_128": "9f2c..."}, ...},
     "meta": "<checksum of meta.json's own JSON without this field>"}

- DCP's files (``__<rank>_<n>.distcp`` and ``.metadata``) are hashed by the rank that writes
  them, as the bytes go out (:class:`HashingWriter`): no second pass over the data. A large
  buffer is hashed on a helper thread while the writer's ``write`` call copies the same
  buffer into the file (both release the GIL), so the two overlap instead of adding up.
- The small files rank 0 writes itself (trainer_state.*, tokenizer.json) are hashed just
  after they are written, while they are still in the page cache.
- ``meta`` covers meta.json itself, so a flipped digit in its step or model config is found
  too; a flip that breaks its JSON shows as unreadable.

Why XXH3-128 (the ``xxhash`` package) and not sha256 like token shards: a load verifies
every byte it reads, and DCP loads a checkpoint from the page cache at about the speed
sha256 hashes (1.7 GB/s with SHA-NI, the fastest hash in hashlib), so sha256 added about
half again to a load on a 2-core machine; XXH3-128 hashes at about 24 GB/s and releases
the GIL. Against accidental damage (flipped bits, truncation, torn copies) 128 bits are
as good in practice: a random change goes unnoticed with probability 2**-128. Nothing
here defends against tampering, which a checkpoint cannot anyway: DCP's ``.metadata`` is
a pickle (see ``__init__.py``). Checkpoints that record sha256 verify too. ``benchmarks/checkpoint_hash.py`` measures both.

Checkpoints from before checksums lack the field: they still load, after one warning.
"""

from __future__ import annotations

import hashlib
import io
import json
import mmap
import os
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem

ALGORITHM = "xxh3_128"  # what saves record; loads verify whichever ALGORITHMS names
ALGORITHMS = ("xxh3_128", "sha256")
CHECKSUMS = "checksums"  # the key in meta.json
_OVERLAP_BYTES = 1 << 20  # buffers from this size on are hashed on the helper thread
_CHUNK = 8 << 20  # bytes read at a time when hashing a file
DCP_METADATA = ".metadata"  # DCP's index of the shards, unpickled on load
_helper: list[ThreadPoolExecutor] = []  # one lazily created hashing thread per process
_saving = [ALGORITHM]  # None or another algorithm only in benchmarks/checkpoint_hash.py
os.register_at_fork(after_in_child=_helper.clear)  # a forked child has no helper thread


def new_hash(algorithm: str) -> Any:
    """A fresh hash object (``update``, ``hexdigest``) of ``algorithm``."""
    if algorithm == "sha256":
        return hashlib.sha256()
    if algorithm == "xxh3_128":
        import xxhash  # a dependency of baobab; imported where checkpoints are hashed

        return xxhash.xxh3_128()
    raise ValueError(f"unknown checksum algorithm {algorithm!r}; known: {', '.join(ALGORITHMS)}")


def _hash_thread() -> ThreadPoolExecutor:
    if not _helper:
        _helper.append(ThreadPoolExecutor(1, thread_name_prefix="baobab-hash"))
    return _helper[0]


# -- hashing as DCP writes ------------------------------------------------------------------
class _HashingStream:
    """A binary file opened for writing that hashes every byte written through it."""

    def __init__(self, raw: Any, algorithm: str, on_close: Any) -> None:
        self._raw, self._algorithm, self._on_close = raw, algorithm, on_close
        self._hash, self._bytes = new_hash(algorithm), 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")  # tensors arrive as typed buffers
        if view.nbytes >= _OVERLAP_BYTES:  # hash on the helper thread while the write copies
            hashing = _hash_thread().submit(self._hash.update, view)
            try:
                written = self._raw.write(view)
            finally:
                hashing.result()  # the buffer may be reused once write returns
        else:
            self._hash.update(view)
            written = self._raw.write(view)
        if written != view.nbytes:  # a buffered file writes all or raises
            raise OSError(f"short write to {self._raw.name}: {written} of {view.nbytes} bytes")
        self._bytes += written
        return written

    def close(self) -> None:
        if not self._raw.closed:
            self._raw.close()
            self._on_close({"bytes": self._bytes, self._algorithm: self._hash.hexdigest()})

    def __getattr__(self, name: str) -> Any:  # tell, flush, fileno, closed, ...
        return getattr(self._raw, name)


class _HashingFileSystem(FileSystem):
    """DCP's local file system, recording the checksum of every file it writes."""

    def __init__(self, algorithm: str) -> None:
        super().__init__()
        self.algorithm = algorithm
        self.files: dict[str, dict[str, Any]] = {}  # file name -> {"bytes", algorithm}
        self._lock = threading.Lock()  # DCP may write files from several threads

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[io.IOBase]:
        if "w" not in mode:
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        name = Path(path).name

        def record(entry: dict[str, Any]) -> None:
            with self._lock:
                self.files[name] = entry

        with super().create_stream(path, mode) as raw:
            stream = _HashingStream(raw, self.algorithm, record)
            try:
                yield stream  # type: ignore[misc]
            finally:
                stream.close()

    def rename(self, path: str | os.PathLike, new_path: str | os.PathLike) -> None:
        super().rename(path, new_path)  # .metadata.tmp -> .metadata
        with self._lock:
            entry = self.files.pop(Path(path).name, None)
            if entry is not None:
                self.files[Path(new_path).name] = entry

    def rm_file(self, path: str | os.PathLike) -> None:
        super().rm_file(path)
        with self._lock:
            self.files.pop(Path(path).name, None)


class HashingWriter(FileSystemWriter):
    """DCP's FileSystemWriter that hashes each file as it writes it (see :attr:`files`).

    Used for ``dcp.save`` and ``dcp.async_save`` alike; in the async case it also stages
    the state dict on CPU, as FileSystemWriter does.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__(path)
        self.algorithm = saving_algorithm()
        if self.algorithm is not None:
            self.fs = _HashingFileSystem(self.algorithm)

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        """``{file name: {"bytes": n, algorithm: hex}}`` of what this rank wrote."""
        return dict(getattr(self.fs, "files", {}))


# -- hashing files on disk ------------------------------------------------------------------
def hash_file(path: Path, algorithm: str) -> dict[str, Any]:
    """``{"bytes": n, algorithm: hex}`` of a file.

    Hashed through a memory map, chunk by chunk: pages in the page cache are hashed where
    they lie, without first being copied into a buffer (the GIL is released per chunk).
    """
    digest = new_hash(algorithm)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                if hasattr(mapped, "madvise"):  # read ahead: the file is hashed in order
                    mapped.madvise(mmap.MADV_SEQUENTIAL)
                view = memoryview(mapped)
                try:
                    for start in range(0, size, _CHUNK):
                        digest.update(view[start : start + _CHUNK])
                finally:
                    view.release()  # before the map closes
    return {"bytes": size, algorithm: digest.hexdigest()}


def _label(name: str) -> str:
    return f"shard {name}" if name.endswith(".distcp") else "DCP .metadata" if name == DCP_METADATA else name  # fmt: skip


def check_file(directory: Path, name: str, entry: dict[str, Any], algorithm: str) -> str | None:
    """None when ``directory/name`` has the recorded size and checksum, else the problem."""
    path, label = directory / name, _label(name)
    try:
        size = path.stat().st_size
        expected = int(entry["bytes"])
        if size < expected:
            return f"{label} is truncated ({size} of {expected} bytes)"
        if size > expected:
            return f"{label} has {size} bytes, not {expected}"
        if hash_file(path, algorithm)[algorithm] != entry[algorithm]:
            return f"{label} does not match its {algorithm} checksum (its bytes changed)"
    except FileNotFoundError:
        return f"{label} is missing"
    except OSError as err:
        return f"{label} is unreadable ({err.strerror or type(err).__name__})"
    return None


def check_files(directory: Path, sums: dict[str, Any], names: Iterable[str]) -> str | None:
    """The first problem among ``names`` (checked on up to 4 threads), or None; ``sums`` is
    meta.json's ``checksums``, already passed by :func:`check_meta`."""
    files, algorithm = sums["files"], sums["algorithm"]
    names = sorted(names)
    if len(names) <= 1:
        return next((p for n in names if (p := check_file(directory, n, files[n], algorithm))), None)  # fmt: skip
    with ThreadPoolExecutor(min(4, len(names), os.cpu_count() or 1)) as pool:
        problems = pool.map(lambda n: check_file(directory, n, files[n], algorithm), names)
        return next((p for p in problems if p), None)


def check_in_background(directory: Path, sums: dict[str, Any], names: Iterable[str]) -> Future:
    """Start :func:`check_files` on a thread (e.g. while DCP reads the same files)."""
    future: Future = Future()
    names = list(names)

    def run() -> None:
        try:
            future.set_result(check_files(directory, sums, names))
        except BaseException as err:  # an unreadable file: reported by whoever waits
            future.set_exception(err)

    threading.Thread(target=run, name="baobab-verify", daemon=True).start()
    return future


# -- meta.json ------------------------------------------------------------------------------
def _meta_digest(meta: dict[str, Any]) -> str:
    sums = {k: v for k, v in meta[CHECKSUMS].items() if k != "meta"}
    canonical = json.dumps({**meta, CHECKSUMS: sums}, sort_keys=True, separators=(",", ":"))
    digest = new_hash(sums["algorithm"])
    digest.update(canonical.encode())
    return digest.hexdigest()


def seal(meta: dict[str, Any], files: dict[str, dict[str, Any]], algorithm: str | None) -> str:
    """The text of meta.json: ``meta`` plus the checksums of ``files`` and of itself
    (``algorithm`` None: no checksums, only in the benchmark's baseline)."""
    if algorithm is None:
        return json.dumps(meta, indent=2)
    sums = {"algorithm": algorithm, "files": dict(sorted(files.items()))}
    sealed = {**meta, CHECKSUMS: sums}
    sums["meta"] = _meta_digest(sealed)
    return json.dumps(sealed, indent=2)


def recorded(meta: dict[str, Any]) -> dict[str, Any] | None:
    """meta.json's ``checksums``, or None for a checkpoint saved before checksums; check
    them with :func:`check_meta` before use."""
    return meta.get(CHECKSUMS)


def check_meta(meta: dict[str, Any]) -> str | None:
    """None when meta.json's checksums are well formed and its own checksum matches."""
    sums = meta.get(CHECKSUMS)
    algorithm = sums.get("algorithm") if isinstance(sums, dict) else None
    if algorithm not in ALGORITHMS:
        return f"meta.json's {CHECKSUMS} name no known algorithm ({', '.join(ALGORITHMS)})"
    files = sums.get("files")
    if not isinstance(files, dict) or not all(
        isinstance(e, dict)
        and isinstance(e.get("bytes"), int)
        and isinstance(e.get(algorithm), str)
        for e in files.values()
    ):
        return f"meta.json's {CHECKSUMS} are malformed"
    if sums.get("meta") != _meta_digest(meta):
        return f"meta.json does not match its {algorithm} checksum (its text changed)"
    return None


# -- checkpoints verified in this process ---------------------------------------------------
_verified: dict[str, tuple] = {}  # resolved path -> its files' fingerprint when it verified


def _fingerprint(directory: Path) -> tuple:
    stats = [(p.name, p.stat()) for p in directory.iterdir()]
    return tuple(sorted((n, s.st_size, s.st_mtime_ns, s.st_ctime_ns) for n, s in stats))


def remember_verified(directory: Path) -> None:
    """Note that every file of ``directory`` just matched its checksum."""
    _verified[str(directory.resolve())] = _fingerprint(directory)


def take_verified(directory: Path) -> bool:
    """Whether this process verified ``directory`` and no file changed since (size, times),
    forgetting it: a resume verifies the checkpoint it chooses, and its one load that
    follows need not hash it again."""
    key = str(directory.resolve())
    try:
        return _verified.pop(key, None) == _fingerprint(directory)
    except OSError:
        return False


@contextmanager
def saving_with(algorithm: str | None) -> Iterator[None]:
    """Saves inside record ``algorithm``; None: saves record no checksums and loads verify
    nothing. For ``benchmarks/checkpoint_hash.py`` (its baseline and sha256), never a user
    option."""
    if algorithm is not None:
        new_hash(algorithm)  # refuses an unknown name
    _saving[0] = algorithm
    try:
        yield
    finally:
        _saving[0] = ALGORITHM


def saving_algorithm() -> str | None:
    return _saving[0]
