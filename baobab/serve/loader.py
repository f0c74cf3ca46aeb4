"""From an export directory to what serves it: an :class:`Engine` (gpt) or an
:class:`AsyncClassifier` (resnet, mlp), on this process's device.

Reads what ``baobab export`` and ``baobab quantize`` write (see ``baobab/export``): weights
from safetensors only, the model rebuilt from config.json, the tokenizer from
tokenizer.json. Nothing is inferred from file or directory names. Which transport serves
an engine (a thread or a process) is ``launch.load_served_model``'s choice; the engine
process calls :func:`load_engine` itself.
"""

from __future__ import annotations

from pathlib import Path

import torch

from baobab.data.tokenizer import Tokenizer
from baobab.export.artifact import DTYPES, TOKENIZER_FILE, load_exported, read_config
from baobab.export.quantize import load_quantized
from baobab.serve.classifier import AsyncClassifier, class_labels, image_shape
from baobab.serve.config import EngineConfig
from baobab.serve.engine import Engine
from baobab.serve.speculative import check_draft


def weight_bytes(path: Path) -> int:
    """Bytes of the export's weight files: what a decode step reads (tied tensors are stored
    once; the safetensors header adds a few KB) and what the engine's thread count depends
    on."""
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def _load_model(path: Path, meta: dict, config: EngineConfig) -> torch.nn.Module:
    """Built on meta, the stored tensors assigned on the device (cast to the serving dtype
    as they are read): nothing initialised, nothing copied twice."""
    if meta.get("quantization"):
        return load_quantized(path, device=config.device)[0]
    dtype = DTYPES[config.dtype] if config.dtype is not None else None
    return load_exported(path, device=config.device, dtype=dtype)[0]


def load_engine(path: Path, config: EngineConfig, model: torch.nn.Module | None = None) -> Engine:
    """The :class:`Engine` over a checked gpt export (what the engine process runs)."""
    if model is None:
        model = _load_model(path, read_config(path), config)
    draft = None if config.draft is None else _load_draft(Path(config.draft), path, model, config)
    return Engine(model, Tokenizer.load(path / TOKENIZER_FILE), config, draft)


def _load_draft(draft_dir: Path, path: Path, model: torch.nn.Module, config: EngineConfig):
    """The draft model of ``--engine.draft``: a gpt export with the target's tokenizer,
    vocabulary and context (ValueError, one sentence, otherwise)."""
    if not (draft_dir / TOKENIZER_FILE).is_file():
        raise ValueError(
            f"--engine.draft '{draft_dir}' is not a gpt export with a {TOKENIZER_FILE}."
        )
    meta = read_config(draft_dir)
    if (meta.get("model") or {}).get("family") != "gpt":
        raise ValueError(f"--engine.draft '{draft_dir}' does not hold a gpt model.")
    draft = _load_model(draft_dir, meta, config)
    same = (draft_dir / TOKENIZER_FILE).read_text(), (path / TOKENIZER_FILE).read_text()
    check_draft(model.cfg, draft.cfg, same[1], same[0])
    return draft


def load_classifier(path: Path, meta: dict, config: EngineConfig, name: str) -> AsyncClassifier:
    """The :class:`AsyncClassifier` over a resnet or mlp classification export (``meta`` is
    its config.json); a regression mlp or a non-image one is refused (ValueError)."""
    model = _load_model(path, meta, config)
    image_shape(model)  # refuses a regression mlp or a non-image one
    family = meta["model"]["family"]
    num_classes = model.cfg.num_classes if family == "resnet" else model.cfg.out_features
    return AsyncClassifier(model, name, class_labels(meta, num_classes))
