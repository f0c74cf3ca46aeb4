"""Export a training checkpoint as one consolidated, optionally dtype-cast, safetensors file.

The checkpoint may have been saved under any parallel layout: it is read in this process
alone (no process group) and written atomically, so ``out`` is either the complete export
or untouched.
"""

from __future__ import annotations

import json
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
from baobab.export.atomic import atomic_directory, refuse_to_overwrite


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
    refuse_to_overwrite(out, overwrite)  # before the (slow) load
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
    with atomic_directory(out, overwrite) as tmp:
        save_model(model, str(tmp / MODEL_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        if (ckpt / TOKENIZER_FILE).is_file():
            shutil.copyfile(ckpt / TOKENIZER_FILE, tmp / TOKENIZER_FILE)
    return out
