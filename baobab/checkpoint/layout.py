"""Where checkpoints live on disk and how one becomes visible: atomically, or not at all.

Layout of a run directory::

    run_dir/checkpoints/
        step_00000100/                 complete: holds meta.json (renamed into place last)
        .tmp-step_00000200/            being written, or left by a crash: ignored, swept

Nothing in this module touches torch.distributed: callers decide which rank does the work.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

CHECKPOINTS = "checkpoints"
META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.json"
TMP_PREFIX = ".tmp-"


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def _step_of(path: Path) -> int | None:
    prefix, _, number = path.name.partition("_")
    return int(number) if prefix == "step" and number.isdigit() else None


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``run_dir`` (directories holding a meta.json), oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _step_of(p) is not None and (p / META_FILE).is_file()]
    return sorted(found, key=lambda p: _step_of(p) or 0)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run directory, or None."""
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or the newest checkpoint of a run directory."""
    path = Path(path)
    if (path / META_FILE).is_file():
        return path
    newest = latest_checkpoint(path)
    if newest is None:
        raise FileNotFoundError(f"'{path}' is neither a checkpoint nor a run directory holding one")
    return newest


def read_meta(path: str | Path) -> dict[str, Any]:
    """The meta.json of a checkpoint (or of a run directory's newest checkpoint)."""
    return json.loads((resolve_checkpoint(path) / META_FILE).read_text())


def sweep_incomplete(root: Path) -> None:
    """Delete what crashed saves left: ``.tmp-*`` directories and step dirs without meta.json."""
    if not root.is_dir():
        return
    for path in root.iterdir():
        stale = path.name.startswith(TMP_PREFIX) or (
            _step_of(path) is not None and not (path / META_FILE).is_file()
        )
        if stale and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def publish(tmp: Path, final: Path) -> None:
    """Make ``tmp`` visible as ``final`` in one rename (swapping out an older ``final``)."""
    fsync_dir(tmp)
    if final.exists():  # re-saving a step (e.g. the final one): swap atomically
        old = final.with_name(f"{TMP_PREFIX}old-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(final.parent)


def prune(run_dir: str | Path, keep_last: int, keep: Path) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints; never ``keep`` itself."""
    dirs = checkpoint_dirs(run_dir)
    for old in dirs[: -max(1, keep_last)]:
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
