"""Directories that appear complete or not at all: every export writer goes through here."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def refuse_to_overwrite(out: Path, overwrite: bool) -> None:
    """An existing non-empty ``out`` is replaced only when asked."""
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(
            f"'{out}' already exists and is not empty; pass overwrite=True to replace it"
        )


@contextmanager
def atomic_directory(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``out``; when the block ends without error it
    takes ``out``'s place in one rename, otherwise ``out`` is left as it was."""
    out = Path(out)
    refuse_to_overwrite(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        _replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _replace(tmp: Path, out: Path) -> None:
    """Put ``tmp`` at ``out`` in one rename (an existing ``out`` is swapped out, then deleted)."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.with_name(f".tmp-old-{out.name}-{os.getpid()}")
    os.replace(out, old)
    os.replace(tmp, out)
    if old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)
