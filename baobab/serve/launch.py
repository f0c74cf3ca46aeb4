"""From an export directory to a served model on the transport the config asks for.

The front door of the serving stack: a gpt export becomes an engine client, either a
:class:`~baobab.serve.engine_process.ProcessEngine` (the engine core in its own process,
the default) or an :class:`~baobab.serve.async_engine.AsyncEngine` (the core on a thread
here); a resnet or mlp classification export an
:class:`~baobab.serve.classifier.AsyncClassifier`. Loading itself is ``loader.py``'s.
"""

from __future__ import annotations

from pathlib import Path

import torch

from baobab.data.tokenizer import Tokenizer
from baobab.export.artifact import TOKENIZER_FILE, read_config
from baobab.serve.async_engine import AsyncEngine
from baobab.serve.classifier import AsyncClassifier
from baobab.serve.config import EngineConfig
from baobab.serve.engine_process import ProcessEngine
from baobab.serve.loader import load_classifier, load_engine, weight_bytes


def load_served_model(
    export_dir: str | Path, config: EngineConfig | None = None
) -> AsyncEngine | ProcessEngine | AsyncClassifier:
    """Load an export for serving; the caller then calls ``start()`` on the result.

    A gpt export (float or int8/int4 quantized) becomes a :class:`ProcessEngine`, or an
    :class:`AsyncEngine` with ``separate_process=False``; a resnet or mlp classification
    export an :class:`AsyncClassifier`. Anything else is refused with one sentence
    (ValueError); a missing directory raises FileNotFoundError.
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
    cpu = torch.device(config.device).type == "cpu"
    if family == "gpt" and config.separate_process:
        if cpu:
            torch.set_num_threads(1)  # the engine process has the cores; this one serves HTTP
        return ProcessEngine(path, config, name, Tokenizer.load(path / TOKENIZER_FILE))
    if cpu:
        torch.set_num_threads(config.num_threads(weight_bytes(path)))
    if family == "gpt":
        return AsyncEngine(load_engine(path, config), name, path)
    return load_classifier(path, meta, config, name)
