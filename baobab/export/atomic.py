"""Directories that appear complete or not at all: every export writer goes through here.

``export``, ``quantize``, ``hf export`` and ``hf import`` all write an *export*: a
directory holding config.json and safetensors weights (a baobab export, a quantized one, a
Hugging Face directory), or a GGUF file (``export --format gguf``). ``overwrite`` replaces an existing export and nothing else:

- an output that is, or lies inside, a run directory, a checkpoint or a prepared corpus
  is refused whatever ``overwrite`` says (replacing it would delete training state);
- an output that is, or contains, the command's own input is refused;
- an existing non-empty directory that is not an export is never replaced.

Each refusal is one sentence that names the CLI flag (``--out``, ``--overwrite true``).
The names below are those of ``baobab.checkpoint.layout``, ``baobab.train.metrics`` and
``baobab.data.manifest``, copied (a test keeps them equal) so that writing an export never
imports torch.distributed.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from baobab.diskspace import writing

# Each kind by files only baobab writes together (generic names such as manifest.json or
# meta.json alone would claim unrelated directories, and every export below them).
CHECKPOINTS, METRICS_FILE, RUN_CONFIG = "checkpoints", "metrics.jsonl", "config.yaml"  # run
DCP_METADATA, TRAINER_STATE = ".metadata", "trainer_state.json"  # a checkpoint, even partial
MANIFEST_FILE, FIRST_SHARD = "manifest.json", "train_000000.bin"  # a prepared corpus
EXPORT_CONFIG = "config.json"  # an export: with *.safetensors beside it (or a *.gguf file)


def _is_run(path: Path) -> bool:
    root = path / CHECKPOINTS
    if root.is_dir() and any(p.name.startswith(("step_", ".tmp-step_")) for p in root.iterdir()):
        return True
    return (path / METRICS_FILE).is_file() and (path / RUN_CONFIG).is_file()


def _is_checkpoint(path: Path) -> bool:
    return (path / DCP_METADATA).is_file() or (path / TRAINER_STATE).is_file()


def protected_kind(path: Path) -> str | None:
    """What ``path`` is when an export must never replace it, nor be written inside it:
    "run directory", "checkpoint" or "prepared corpus"; None otherwise."""
    if not path.is_dir():
        return None
    if _is_checkpoint(path):
        return "checkpoint"
    if _is_run(path):
        return "run directory"
    if (path / MANIFEST_FILE).is_file() and (path / FIRST_SHARD).is_file():
        return "prepared corpus"
    return None


def is_export(path: Path) -> bool:
    """True for a directory an export writer may replace: config.json and safetensors
    weights (baobab, quantized or Hugging Face) or a GGUF file, and nothing that holds
    training state."""
    weights = (path / EXPORT_CONFIG).is_file() and any(path.glob("*.safetensors"))
    return path.is_dir() and (weights or any(path.glob("*.gguf"))) and protected_kind(path) is None


def refuse_to_overwrite(out: Path, overwrite: bool, sources: Iterable[str | Path] = ()) -> None:
    """Raise ValueError (one sentence) unless writing an export at ``out`` is safe: see the
    module docstring. ``sources`` are the command's inputs (directories or files)."""
    out = Path(out)
    target = out.resolve()
    for place in (target, *target.parents):
        kind = protected_kind(place)
        if kind is not None:
            where = f"is a {kind}" if place == target else f"is inside the {kind} '{place}'"
            raise ValueError(
                f"--out '{out}' {where}, which an export must never replace nor write into; "
                "choose an --out outside it"
            )
    for source in sources:
        src = Path(source).resolve()
        if target == src or target in src.parents:
            role = "is" if target == src else "contains"
            raise ValueError(
                f"--out '{out}' {role} the input '{source}', which writing there would "
                "delete; choose another --out"
            )
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir():
        raise ValueError(f"--out '{out}' is a file, not an export directory; choose another --out")
    if not any(out.iterdir()):
        return  # an empty directory is fine
    if not is_export(out):
        raise ValueError(
            f"--out '{out}' already exists and is not empty, and is not an export (config.json "
            "with *.safetensors), so even --overwrite true does not replace it; choose an empty "
            "or new --out"
        )
    if not overwrite:
        raise ValueError(
            f"--out '{out}' already holds an export; pass --overwrite true to replace it"
        )


@contextmanager
def atomic_directory(
    out: str | Path,
    overwrite: bool = False,
    what: str = "export directory",
    sources: Iterable[str | Path] = (),
) -> Iterator[Path]:
    """Yield a temporary directory beside ``out``; when the block ends without error it
    takes ``out``'s place in one rename, otherwise ``out`` is left as it was.

    ``out`` must be safe to write (:func:`refuse_to_overwrite`, with ``sources``); a full
    disk leaves as a one-sentence ``DiskFullError`` naming ``what`` and ``out``.
    """
    out = Path(out)
    refuse_to_overwrite(out, overwrite, sources)
    with replaced_directory(out, what) as tmp:
        yield tmp


@contextmanager
def replaced_directory(out: str | Path, what: str) -> Iterator[Path]:
    """Yield a temporary directory beside ``out``; when the block ends without error it
    takes ``out``'s place in one rename, otherwise ``out`` is left as it was. Whether
    ``out`` may be replaced is the caller's to check (:func:`atomic_directory` does)."""
    place = Path(out).resolve()  # "." and "dir/.." have no name to put a temporary beside
    place.parent.mkdir(parents=True, exist_ok=True)
    tmp = place.with_name(f".tmp-{place.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        # Measured inside: the free space is read before the cleanup below frees it.
        with writing(f"{what} '{out}'", place.parent):
            tmp.mkdir()
            yield tmp
            _replace(tmp, place)
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
