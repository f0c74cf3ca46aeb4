"""The exported model directory: writing it, and loading it without torch.distributed or pickle.

An export directory holds::

    model.safetensors   consolidated weights (tied tensors stored once), in ``dtype``
    config.json         {"baobab_version", "model": {"name", "family", "config"},
                         "objective", "step", "dtype"}
    tokenizer.json      when the checkpoint had one

A registry snapshot of a gpt (``baobab registry push``) holds Hugging Face files instead,
with the export's config.json as ``baobab_config.json``: :func:`read_config` returns that,
and :func:`load_exported` converts the Hugging Face weights back (exactly: renames and
permutations).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_model
from torch import nn

import baobab
from baobab.export.atomic import atomic_directory

MODEL_FILE, CONFIG_FILE, TOKENIZER_FILE = "model.safetensors", "config.json", "tokenizer.json"
BAOBAB_CONFIG_FILE = "baobab_config.json"  # an export's config.json beside Hugging Face files
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
    """The config.json of an export directory (its baobab_config.json in a registry snapshot)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"exported model directory '{path}' does not exist")
    for name in (CONFIG_FILE, MODEL_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"'{path}' is not an exported model: it has no {name}")
    if (path / BAOBAB_CONFIG_FILE).is_file():
        return json.loads((path / BAOBAB_CONFIG_FILE).read_text())
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


class StoredWeights(Mapping[str, torch.Tensor]):
    """An export's tensors by the model's names, each read from disk when asked for.

    A sharded fine-tune (``--model.init``) copies its shards from one full tensor at a
    time and so never holds the whole base. A tied name (the head of a tied GPT) reads its
    group's one stored tensor. ``shapes`` comes from the file's header, reading nothing.
    """

    def __init__(self, file: Path, model: nn.Module) -> None:
        from baobab.models.common.init import tied_groups

        self.file = file
        with safe_open(str(file), framework="pt") as f:
            stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
        self._names = {k: k for k in stored}  # model name -> stored name
        for group in tied_groups(model):
            held = next((n for n in group if n in stored), None)
            self._names.update(dict.fromkeys(group, held) if held else {})
        self.shapes = {name: stored[key] for name, key in self._names.items()}

    def __getitem__(self, name: str) -> torch.Tensor:
        with safe_open(str(self.file), framework="pt") as f:
            return f.get_tensor(self._names[name])

    def __contains__(self, name: object) -> bool:  # Mapping's default would read the tensor
        return name in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def open_exported(path: str | Path) -> tuple[nn.Module, StoredWeights, dict[str, Any]]:
    """An export's model built on meta (nothing allocated), its tensors to read lazily,
    and its config.json: what a sharded fine-tune starts from."""
    from baobab import models

    path = Path(path)
    config = read_config(path)
    described = config["model"]
    cfg = models.get_config(described["name"], **described["config"])
    model = models.build_model(cfg, device="meta")
    return model, StoredWeights(path / MODEL_FILE, model), config


def load_exported(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild an exported model and load its safetensors weights (eval mode).

    The model is built on the meta device and the stored tensors, read straight onto
    ``device`` in their stored dtype (or cast to ``dtype`` one tensor at a time), are
    assigned to it: no random init is drawn or overwritten. Only the non-persistent
    buffers (RoPE tables) are computed.
    """
    from baobab import models
    from baobab.models.common.init import load_weights

    path = Path(path)
    config = read_config(path)
    if (path / BAOBAB_CONFIG_FILE).is_file():  # a registry snapshot: Hugging Face weights
        from baobab.export.hf_import import import_hf

        model = import_hf(path, dtype or parse_dtype(config.get("dtype")))[0]
        return model.to(device).eval(), config
    described = config["model"]
    cfg = models.get_config(described["name"], **described["config"])
    model = models.build_model(cfg, device="meta")
    stored = load_file(path / MODEL_FILE, device=str(torch.device(device)))
    if dtype is not None:
        for key, tensor in stored.items():
            if tensor.is_floating_point():
                stored[key] = tensor.to(dtype)
    load_weights(model, stored, str(path / MODEL_FILE), against="its config.json")
    dtype = dtype or parse_dtype(config.get("dtype"))
    if dtype is not None:  # the computed buffers too, as the stored weights (no copy of those)
        model.to(dtype)
    return model.eval(), config
