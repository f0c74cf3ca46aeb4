"""From an export directory to a served model: an AsyncEngine (gpt) or an AsyncClassifier.

Reads what ``baobab export`` and ``baobab quantize`` write (see ``baobab/export``): weights
from safetensors only, the model rebuilt from config.json, the tokenizer from
tokenizer.json. Nothing is inferred from file or directory names.
"""

from __future__ import annotations

from pathlib import Path

import torch

from baobab.data.tokenizer import Tokenizer
from baobab.export.artifact import DTYPES, TOKENIZER_FILE, load_exported, read_config
from baobab.export.quantize import load_quantized
from baobab.serve.async_engine import AsyncEngine
from baobab.serve.classifier import AsyncClassifier, class_labels, image_shape
from baobab.serve.config import EngineConfig
from baobab.serve.engine import Engine


def load_served_model(
    export_dir: str | Path, config: EngineConfig | None = None
) -> AsyncEngine | AsyncClassifier:
    """Load an export for serving; the caller then calls ``start()`` on the result.

    A gpt export (float or int8/int4 quantized) becomes an :class:`AsyncEngine`; a resnet
    or mlp classification export an :class:`AsyncClassifier`. Anything else is refused
    with one sentence (ValueError); a missing directory raises FileNotFoundError.
    """
    config = config or EngineConfig()
    path = Path(export_dir)
    meta = read_config(path)
    described = meta.get("model") or {}
    family, name = described.get("family"), described.get("name") or "model"
    if family == "bert":
        raise ValueError(
            f"'{path}' holds a bert model, which is not generative; serve a gpt export or an "
            "image classifier."
        )
    if family not in ("gpt", "resnet", "mlp"):
        raise ValueError(
            f"'{path}' holds a {family} model, which cannot be served; serve a gpt export or "
            "a resnet/mlp image classifier."
        )
    if family == "gpt" and not (path / TOKENIZER_FILE).is_file():
        raise ValueError(
            f"'{path}' has no {TOKENIZER_FILE}; a language model is served with its tokenizer."
        )
    if family == "gpt" and config.separate_process:
        from baobab.serve.engine_process import ProcessEngine

        if torch.device(config.device).type == "cpu":
            torch.set_num_threads(1)  # the engine process has the cores; this one serves HTTP
        return ProcessEngine(path, config, name, Tokenizer.load(path / TOKENIZER_FILE))
    if torch.device(config.device).type == "cpu":
        torch.set_num_threads(config.num_threads(weight_bytes(path)))
    model = _load_model(path, meta, config)
    if family == "gpt":
        return AsyncEngine(load_engine(path, config, model), name)
    image_shape(model)  # refuses a regression mlp or a non-image one
    num_classes = model.cfg.num_classes if family == "resnet" else model.cfg.out_features
    return AsyncClassifier(model, name, class_labels(meta, num_classes))


def weight_bytes(path: Path) -> int:
    """Bytes of the export's weight files: what a decode step reads (tied tensors are stored
    once; the safetensors header adds a few KB) and what the engine's thread count depends
    on."""
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def _load_model(path: Path, meta: dict, config: EngineConfig) -> torch.nn.Module:
    quantized = bool(meta.get("quantization"))
    model, _ = (load_quantized if quantized else load_exported)(path, device=config.device)
    if config.dtype is not None and not quantized:
        model.to(DTYPES[config.dtype])
    return model


def load_engine(path: Path, config: EngineConfig, model: torch.nn.Module | None = None) -> Engine:
    """The :class:`Engine` over a checked gpt export (what the engine process runs)."""
    if model is None:
        model = _load_model(path, read_config(path), config)
    return Engine(model, Tokenizer.load(path / TOKENIZER_FILE), config)
