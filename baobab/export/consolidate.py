"""Export a training checkpoint as one consolidated, optionally dtype-cast, safetensors file.

The checkpoint may have been saved under any parallel layout: it is read in this process
alone (no process group) and written atomically, so ``out`` is either the complete export
or untouched.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from safetensors.torch import save_model

import baobab
from baobab.export.artifact import (
    CONFIG_FILE,
    MODEL_FILE,
    TOKENIZER_FILE,
    dtype_name,
    parse_dtype,
)


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    dtype: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``out/`` with model.safetensors, config.json and tokenizer.json (if any).

    Args:
        checkpoint: a checkpoint directory, or a run directory (its newest checkpoint).
        out: the export directory; an existing non-empty one is replaced only with
            ``overwrite``.
        dtype: cast floating weights to "float32", "bfloat16" or "float16" (unset: keep).
        overwrite: replace an existing export at ``out``.
    """
    # Imported here so that loading an export (this package's other half) never pulls in
    # torch.distributed.checkpoint.
    from baobab.checkpoint import load_trained_model, resolve_checkpoint

    torch_dtype = parse_dtype(dtype)
    out = Path(out)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(
            f"'{out}' already exists and is not empty; pass overwrite=True to replace it"
        )
    ckpt = resolve_checkpoint(checkpoint)
    model, meta = load_trained_model(ckpt)
    if torch_dtype is not None:
        model.to(torch_dtype)
    weights_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    config = {
        "baobab_version": baobab.__version__,
        "model": {k: meta["model"].get(k) for k in ("name", "family", "config")},
        "objective": meta.get("objective"),
        "step": meta.get("step"),
        "dtype": dtype_name(weights_dtype) if weights_dtype is not None else None,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_model(model, str(tmp / MODEL_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        if (ckpt / TOKENIZER_FILE).is_file():
            shutil.copyfile(ckpt / TOKENIZER_FILE, tmp / TOKENIZER_FILE)
        _replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


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
