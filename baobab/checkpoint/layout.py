"""Where checkpoints live on disk and how one becomes visible: atomically, or not at all.

Layout of a run directory::

    run_dir/checkpoints/
        step_00000100/                 complete: holds meta.json (renamed into place last)
        .tmp-step_00000200/            being written, or left by a crash: ignored, swept
        .tmp-old-step_00000200/        the previous copy while a step is saved again
        .tmp-prune-step_00000050/      being deleted by keep-last pruning
        .tmp-broken-step_00000300/     failed verification at a resume: out of the way

Invariants, whatever instant a process dies at:

- a ``step_*`` directory holds meta.json only if it is whole: meta.json is written
  (atomically) into the temporary directory after every shard, and the directory then
  appears under its final name in one rename;
- a temporary directory holding meta.json is whole too, so :func:`recover_interrupted`
  finishes a publish that died between its two renames instead of losing the step;
- pruning renames a checkpoint out of sight before deleting it, so a half-deleted
  directory never counts as complete.

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
OLD_PREFIX = f"{TMP_PREFIX}old-"  # the previous copy of a step being saved again
PRUNE_PREFIX = f"{TMP_PREFIX}prune-"  # a checkpoint being deleted by pruning
BROKEN_PREFIX = f"{TMP_PREFIX}broken-"  # a checkpoint a resume found damaged


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
    """Delete what crashed saves left: ``.tmp-*`` directories and step dirs without meta.json.

    Call :func:`recover_interrupted` first: it turns finished-but-unpublished saves back
    into checkpoints before this deletes the rest.
    """
    if not root.is_dir():
        return
    for path in root.iterdir():
        stale = path.name.startswith(TMP_PREFIX) or (
            _step_of(path) is not None and not (path / META_FILE).is_file()
        )
        if stale and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def recover_interrupted(root: Path) -> list[str]:
    """Finish publishes a crash cut between their two renames; returns what was recovered.

    A ``.tmp-step_X`` holding meta.json is whole (meta.json is written last), so it becomes
    ``step_X`` when that name is free; failing that, a whole ``.tmp-old-step_X`` (the copy
    being replaced) goes back.
    """
    recovered: list[str] = []
    if not root.is_dir():
        return recovered
    for prefix in (TMP_PREFIX, OLD_PREFIX):  # the newer copy first
        for path in sorted(root.glob(f"{prefix}step_*")):
            final = root / path.name[len(prefix) :]
            if _step_of(final) is None or not (path / META_FILE).is_file() or final.exists():
                continue
            os.replace(path, final)
            fsync_dir(root)
            recovered.append(final.name)
    return recovered


def incomplete_checkpoints(run_dir: str | Path) -> list[tuple[Path, str]]:
    """What a crash left in ``run_dir/checkpoints``, each with the reason it does not count."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for path in sorted(root.iterdir()):
        if path.name.startswith(PRUNE_PREFIX):
            found.append((path, "interrupted while keep-last pruning deleted it"))
        elif path.name.startswith(BROKEN_PREFIX):
            found.append((path, "found damaged by an earlier resume"))
        elif path.name.startswith(OLD_PREFIX):
            found.append((path, "the previous copy of a step saved again"))
        elif path.name.startswith(TMP_PREFIX):
            found.append((path, "interrupted save (no meta.json)"))
        elif _step_of(path) is not None and not (path / META_FILE).is_file():
            found.append((path, "no meta.json"))
    return found


def set_aside(path: Path) -> Path:
    """Move a damaged checkpoint out of sight (swept by the next save) in one rename."""
    aside = path.with_name(f"{BROKEN_PREFIX}{path.name}")
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(path, aside)
    return aside


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``path`` so that it holds either nothing or all of ``text``, durably."""
    part = path.with_name(f"{path.name}.part")
    with open(part, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, path)


def publish(tmp: Path, final: Path) -> None:
    """Make ``tmp`` visible as ``final`` in one rename (swapping out an older ``final``)."""
    fsync_dir(tmp)
    if final.exists():  # re-saving a step (e.g. the final one): swap atomically
        old = final.with_name(f"{OLD_PREFIX}{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)  # a crash here: recover_interrupted publishes tmp
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(final.parent)


def prune(run_dir: str | Path, keep_last: int, keep: Path) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints; never ``keep`` itself.

    Each goes out of sight in one rename before its files are deleted, so a crash
    mid-delete leaves a ``.tmp-prune-*`` leftover, never a broken checkpoint that counts.
    """
    dirs = checkpoint_dirs(run_dir)
    for old in dirs[: -max(1, keep_last)]:
        if old != keep:
            doomed = old.with_name(f"{PRUNE_PREFIX}{old.name}")
            shutil.rmtree(doomed, ignore_errors=True)
            os.replace(old, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
    fsync_dir(checkpoint_root(run_dir))


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
