"""The exported model directory: writing it, and loading it without torch.distributed or pickle.

An export directory holds::

    model.safetensors   consolidated weights (tied tensors stored once), in ``dtype``
    config.json         {"baobab_version", "model": {"name", "family", "config"},
                         "objective", "step", "dtype"}
    tokenizer.json      when the checkpoint had one
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn

import baobab
from baobab.export.atomic import atomic_directory

MODEL_FILE, CONFIG_FILE, TOKENIZER_FILE = "model.safetensors", "config.json", "tokenizer.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(dtype: str | None) -> torch.dtype | None:
    """The torch dtype of an export dtype name (None keeps the checkpoint's dtype)."""
    if dtype is None:
        return None
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)} (or unset), got {dtype!r}")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def read_config(path: str | Path) -> dict[str, Any]:
    """The config.json of an export directory."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"exported model directory '{path}' does not exist")
    for name in (CONFIG_FILE, MODEL_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"'{path}' is not an exported model: it has no {name}")
    return json.loads((path / CONFIG_FILE).read_text())


def save_exported(
    model: nn.Module,
    out: str | Path,
    described: dict[str, Any],
    objective: str | None,
    step: int | None = None,
    tokenizer_file: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` as an export directory, atomically (every exporter ends here).

    Args:
        model: the model, in the dtype to store (cast it first to change it).
        out: the export directory; an existing export there is replaced only with
            ``overwrite`` (a run, checkpoint, corpus or other directory never is).
        described: ``{"name", "family", "config"}`` that rebuild the model's structure.
        objective: its training objective (e.g. "causal_lm"), for the commands that use it.
        step: the training step it comes from, if any.
        tokenizer_file: a tokenizer.json to store beside it (None: none).
        overwrite: replace an existing directory at ``out``.
    """
    weights_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    config = {
        "baobab_version": baobab.__version__,
        "model": {k: described.get(k) for k in ("name", "family", "config")},
        "objective": objective,
        "step": step,
        "dtype": dtype_name(weights_dtype) if weights_dtype is not None else None,
    }
    with atomic_directory(out, overwrite) as tmp:
        # save_model stores tied tensors once and makes every tensor contiguous.
        save_model(model, str(tmp / MODEL_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer_file is not None:
            shutil.copyfile(tokenizer_file, tmp / TOKENIZER_FILE)
    return Path(out)


def load_exported(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild an exported model and load its safetensors weights (eval mode)."""
    from baobab import models

    path = Path(path)
    config = read_config(path)
    described = config["model"]
    model = models.build_model(models.get_config(described["name"], **described["config"]))
    dtype = parse_dtype(config.get("dtype"))
    if dtype is not None:
        model.to(dtype)
    try:
        load_model(model, path / MODEL_FILE, strict=True)
    except RuntimeError as err:  # missing/unexpected keys or a shape mismatch
        detail = " ".join(str(err).split())
        raise ValueError(
            f"'{path / MODEL_FILE}' does not match its config.json: {detail}"
        ) from None
    return model.to(device).eval(), config
