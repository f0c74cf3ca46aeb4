"""A full disk in one sentence: what was being written, where, and how much room is left.

Every writer of lasting files (``prepare``'s shards, a run's checkpoints and metrics, the
export directories) wraps its writes in :func:`writing`; a write that fails because the
file system is full (or a quota is reached) leaves as a :class:`DiskFullError`, whose one
sentence the CLI prints before it exits 1::

    with writing("checkpoint step_00000010 in run directory 'runs/a'", "runs/a"):
        save_checkpoint(...)
    # DiskFullError: the disk is full: writing checkpoint step_00000010 in run directory
    # 'runs/a' failed; its file system now has 0 bytes free of 20.0 GiB

The wrapped error may be far from an ``OSError(ENOSPC)``: torch's zip writer says only
``unexpected pos 704 vs 598``, DCP wraps each rank's failure in a ``CheckpointException``
(a ``BaseException``), safetensors reports a Rust ``StorageFull``, and a rank that heard of
rank 0's failure over a collective has only its text. :func:`disk_full_cause` reads all of
these. A writer error with no errno (torch's, a short write) counts only when the file
system really is (nearly) full at that moment, so an unrelated bug is never reported as a
full disk.

This module imports nothing from baobab: ``data/``, ``train/`` (around each checkpoint
save) and ``export/`` all use it.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

NO_SPACE_ERRNOS = {errno.ENOSPC: "the disk is full"}
if hasattr(errno, "EDQUOT"):  # not on Windows
    NO_SPACE_ERRNOS[errno.EDQUOT] = "the disk quota is exceeded"
# The same errors as text, for a rank's failure forwarded as a string and for safetensors'
# Rust io errors ("StorageFull", "QuotaExceeded").
_NO_SPACE_TEXT = {
    code: re.compile(
        rf"{re.escape(os.strerror(code))}|\[Errno {code}\]|{rust}", re.IGNORECASE
    )
    for code, rust in ((errno.ENOSPC, "StorageFull"), (getattr(errno, "EDQUOT", -1), "QuotaExceeded"))
    if code in NO_SPACE_ERRNOS
}  # fmt: skip
# Writer failures that do not say why: torch.save's zip writer ("[enforce fail at
# inline_container.cc:672] . unexpected pos 704 vs 598", "PytorchStreamWriter failed
# writing file"), a short write.
_WRITER_TEXT = re.compile(
    r"inline_container|PytorchStreamWriter|unexpected pos|file write failed|short write",
    re.IGNORECASE,
)
# A writer failure without errno counts as a full disk below this many free bytes: when a
# write fails for lack of space, the partial file it left fills the disk to (almost) 0.
NEARLY_FULL_BYTES = 16 << 20
_PASS_THROUGH = (KeyboardInterrupt, SystemExit, GeneratorExit)


class DiskFullError(OSError):
    """A write failed because its file system is full; the message says what, where and
    how much room is left (``errno`` is ``ENOSPC`` or ``EDQUOT``)."""

    def __init__(self, message: str, code: int = errno.ENOSPC) -> None:
        super().__init__(message)
        self.errno = code

    def __str__(self) -> str:  # the sentence alone, never "[Errno 28] ..."
        return str(self.args[0])


def _causes(err: BaseException, seen: set[int]) -> Iterator[BaseException]:
    """``err`` and every exception behind it: ``__cause__``/``__context__`` chains and
    DCP's ``CheckpointException.failures`` ({rank: (exception, traceback)})."""
    if id(err) in seen:
        return
    seen.add(id(err))
    yield err
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict):
        for value in failures.values():
            inner = value[0] if isinstance(value, tuple) and value else value
            if isinstance(inner, BaseException):
                yield from _causes(inner, seen)
    for inner in (err.__cause__, err.__context__):
        if inner is not None:
            yield from _causes(inner, seen)


def disk_free(path: str | Path) -> tuple[int, int]:
    """(free, total) bytes of the file system that holds ``path`` (or would: the nearest
    existing parent); (-1, -1) when that cannot be read."""
    path = Path(os.path.abspath(path))
    for candidate in (path, *path.parents):
        if candidate.exists():
            try:
                usage = shutil.disk_usage(candidate)
            except OSError:
                break
            return usage.free, usage.total
    return -1, -1


def disk_full_cause(err: BaseException, where: str | Path) -> int | None:
    """``ENOSPC``/``EDQUOT`` when ``err`` (or what it wraps) is a write that failed for lack
    of room on the file system of ``where``; None for any other error."""
    texts = []
    for cause in _causes(err, set()):
        code = getattr(cause, "errno", None)
        if isinstance(cause, OSError) and code in NO_SPACE_ERRNOS:
            return code
        texts.append(str(cause))
    text = " ".join(texts)
    for code, pattern in _NO_SPACE_TEXT.items():
        if pattern.search(text):
            return code
    if _WRITER_TEXT.search(text):
        free, _ = disk_free(where)
        if 0 <= free < NEARLY_FULL_BYTES:
            return errno.ENOSPC
    return None


def size_text(n: int) -> str:
    """``1536`` -> ``"1.5 KiB"``; exact below 1 KiB (``"0 bytes"``)."""
    if n < 1024:
        return f"{n} byte{'s' if n != 1 else ''}"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


def disk_full_message(what: str, where: str | Path, code: int = errno.ENOSPC) -> str:
    """One sentence: what could not be written, and the free and total bytes of the file
    system of ``where``."""
    free, total = disk_free(where)
    if free < 0:
        room = "its file system's free space cannot be read"
    else:  # "now": a writer may have deleted its partial file (safetensors does)
        exact = f" ({free:,} bytes)" if free >= 1024 else ""
        room = f"its file system now has {size_text(free)}{exact} free of {size_text(total)}"
    reason = NO_SPACE_ERRNOS.get(code, NO_SPACE_ERRNOS[errno.ENOSPC])
    return f"{reason}: writing {what} failed; {room}"


@contextmanager
def writing(what: str, where: str | Path) -> Iterator[None]:
    """Turn a full disk met inside the block into a :class:`DiskFullError` naming ``what``
    and the free space at ``where`` (a directory being written, or the one it goes in).

    Measured at once, before any cleanup frees the partial files. Any other error passes
    unchanged, as does a DiskFullError from an inner, more precise ``writing`` block.
    """
    try:
        yield
    except DiskFullError:
        raise
    except BaseException as err:
        code = None if isinstance(err, _PASS_THROUGH) else disk_full_cause(err, where)
        if code is None:
            raise
        raise DiskFullError(disk_full_message(what, where, code), code) from err
