"""Export a training checkpoint as one consolidated, optionally dtype-cast, safetensors file.

The checkpoint may have been saved under any parallel layout: it is read in this process
alone (no process group) and written atomically, so ``out`` is either the complete export
or untouched.
"""

from __future__ import annotations

from pathlib import Path

from baobab.export.artifact import TOKENIZER_FILE, parse_dtype, save_exported
from baobab.export.atomic import refuse_to_overwrite


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
    tok = ckpt / TOKENIZER_FILE
    return save_exported(
        model,
        out,
        meta["model"],
        meta.get("objective"),
        meta.get("step"),
        tok if tok.is_file() else None,
        overwrite,
    )
