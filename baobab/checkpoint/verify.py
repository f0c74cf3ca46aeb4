"""Is a checkpoint whole? Checked from its files before a resume trusts it, and on every load.

Atomic publishing (``layout.py``) means a ``step_*`` directory holding meta.json was whole
when it appeared; these checks catch what can happen to it afterwards (a truncated copy,
a full disk on another tool's write, a deleted shard, a flipped byte):

- meta.json and trainer_state.json parse as JSON objects;
- meta.json matches its own checksum and every file matches the size and sha256 it records
  (``checksum.py``), .metadata first, before anything unpickles it;
- trainer_state.safetensors has a readable header and exactly the bytes it announces;
- DCP's ``.metadata`` loads and every shard file it points to exists and is long enough.

A checkpoint saved before checksums (meta.json without ``"checksums"``) gets the other
checks only; loading it prints one warning.

Reading ``.metadata`` unpickles it (DCP's format), which is fine for the run's own
directory: checkpoints are trusted training state (see ``baobab/checkpoint/__init__.py``).
"""

from __future__ import annotations

import json
import struct
import sys
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from baobab.checkpoint import checksum
from baobab.checkpoint.checksum import DCP_METADATA
from baobab.checkpoint.layout import META_FILE, checkpoint_dirs, incomplete_checkpoints
from baobab.checkpoint.trainer_state import JSON_FILE, TENSORS_FILE


def verify_checkpoint(path: str | Path) -> str | None:
    """None when the checkpoint at ``path`` is whole, else the first problem, in words.

    Reads every byte of a checkpoint that records checksums (hashing up to 4 files at once).
    """
    path = Path(path)
    for name in (META_FILE, JSON_FILE):
        try:
            if not isinstance(json.loads((path / name).read_text()), dict):
                return f"{name} is not a JSON object"
        except (OSError, ValueError) as err:
            return f"{name} is unreadable ({type(err).__name__})"
    meta = json.loads((path / META_FILE).read_text())
    sums = checksum.recorded(meta)
    if sums is not None:
        problem = _check_sums(path, meta, [DCP_METADATA])  # before anything unpickles it
        rest = sums["files"].keys() - {DCP_METADATA} if problem is None else ()
        problem = problem or checksum.check_files(path, sums, rest)
        if problem:
            return problem
    problem = _check_safetensors(path / TENSORS_FILE) or _check_dcp(path)
    if problem is None and sums is not None:
        checksum.remember_verified(path)  # its load need not hash it again
    return problem


def _check_sums(path: Path, meta: dict, names: list[str]) -> str | None:
    """meta.json's own checksum, then the files ``names``."""
    problem = checksum.check_meta(meta)
    if problem:
        return problem
    missing = [n for n in names if n not in meta[checksum.CHECKSUMS]["files"]]
    if missing:
        return f"meta.json records no checksum for {missing[0]}"
    return checksum.check_files(path, meta[checksum.CHECKSUMS], names)


def _check_safetensors(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
    except (OSError, ValueError, struct.error) as err:
        return f"{path.name} is unreadable ({type(err).__name__})"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    expected = 8 + header_len + max(ends, default=0)
    size = path.stat().st_size
    return None if size == expected else f"{path.name} has {size} bytes, not {expected}"


def _check_dcp(path: Path) -> str | None:
    import torch.distributed.checkpoint as dcp

    try:
        metadata = dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as err:  # any failure to read it means the checkpoint cannot load
        return f"DCP .metadata is unreadable ({type(err).__name__})"
    needed: dict[str, int] = {}  # shard file -> bytes it must hold at least
    for info in (metadata.storage_data or {}).values():
        end = info.offset + info.length
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for name, end in sorted(needed.items()):
        shard = path / name
        if not shard.is_file():
            return f"shard {name} is missing"
        if shard.stat().st_size < end:
            return f"shard {name} is truncated ({shard.stat().st_size} of {end} bytes)"
    return None


def newest_loadable(run_dir: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest whole checkpoint of ``run_dir`` (or None), and every checkpoint passed
    over on the way (crash leftovers and newer broken ones), each with its reason."""
    ignored = list(incomplete_checkpoints(run_dir))
    for path in reversed(checkpoint_dirs(run_dir)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path, ignored
        ignored.append((path, problem))
    return None, ignored


class LoadCheck:
    """The checksums of a checkpoint being loaded; every rank builds one, collectively.

    Built before DCP reads anything: it checks meta.json and ``.metadata`` (DCP unpickles
    the latter) and raises ValueError on a damaged one. :meth:`start` then hashes this
    rank's share of the other files (rank r: every world-th of them) on a thread while DCP
    reads them, and :meth:`finish` waits for it: every rank raises the same one-sentence
    ValueError if any rank found damage, which also replaces the error DCP or torch gave
    while reading a damaged shard. A checkpoint this process has just verified whole
    (a resume's choice) is not hashed again.
    """

    def __init__(self, ckpt: Path, distributed: bool) -> None:
        self.ckpt, self.distributed = ckpt, distributed
        self.rank, self.world = _rank_and_world(distributed)
        self.meta: dict[str, Any] = {}
        self._sums: dict[str, Any] = {}
        self._todo: list[str] = []  # this rank's share of the files, hashed by start()
        self._future: Future | None = None
        problem = None
        try:
            self.meta = json.loads((ckpt / META_FILE).read_text())
            if not isinstance(self.meta, dict):
                problem = f"{META_FILE} is not a JSON object"
        except (OSError, ValueError) as err:
            problem = f"{META_FILE} is unreadable ({type(err).__name__})"
        sums = None if problem else checksum.recorded(self.meta)
        if problem is None and sums is None:
            if self.rank == 0:
                print(
                    f"warning: checkpoint '{ckpt}' has no checksums (saved by an older "
                    "baobab); loading it unverified",
                    file=sys.stderr,
                    flush=True,
                )
            return
        skip = problem is None and checksum.take_verified(ckpt)
        if distributed:
            skip = _broadcast(skip)
        if problem is None and not skip:
            problem = _check_sums(ckpt, self.meta, [DCP_METADATA])
            if problem is None:
                self._sums = sums or {}
                rest = self._sums["files"].keys() - {DCP_METADATA}
                self._todo = sorted(rest)[self.rank :: self.world]
        self._raise_if(problem)

    def start(self) -> None:
        if self._todo:
            self._future = checksum.check_in_background(self.ckpt, self._sums, self._todo)

    def finish(self, load_error: BaseException | None) -> None:
        """Raise the damage any rank found (collective), else ``load_error`` if any."""
        problem = None
        if self._future is not None:
            try:
                problem = self._future.result()
            except Exception as err:  # still take part in the collective below
                problem = f"its checksums could not be checked ({type(err).__name__}: {err})"
            self._future = None
        self._raise_if(problem)
        if load_error is not None:
            raise load_error

    def _raise_if(self, problem: str | None) -> None:
        if self.distributed:
            problem = _first(problem)
        if problem:
            raise ValueError(
                f"checkpoint '{self.ckpt}' is damaged: {problem}; load an earlier checkpoint "
                "of the run (a resume passes over damaged ones by itself)"
            )


def _rank_and_world(distributed: bool) -> tuple[int, int]:
    if not distributed:
        return 0, 1
    import torch.distributed as dist

    return dist.get_rank(), dist.get_world_size()


def _broadcast(value: Any) -> Any:
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _first(problem: str | None) -> str | None:
    """The lowest rank's problem, on every rank (None when no rank has one)."""
    import torch.distributed as dist

    pieces: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(pieces, problem)
    return next((p for p in pieces if p), None)
