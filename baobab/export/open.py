"""Open any model directory baobab can start from: an export, a checkpoint or run, or an HF dir.

Fine-tuning (``model.init``), distillation teachers and the HF exporter all take "a model
directory" from the user; this is the one place that tells the kinds apart, by their files
(never by the directory's name):

- a baobab export: ``config.json`` with a ``"model"`` entry, plus ``model.safetensors``;
- a Hugging Face directory: ``config.json`` with ``"architectures"`` (Llama, GPT-2, BERT);
- otherwise a training checkpoint, or a run directory (its newest checkpoint).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from baobab.export.artifact import BAOBAB_CONFIG_FILE, CONFIG_FILE, MODEL_FILE, TOKENIZER_FILE


@dataclass
class OpenedModel:
    model: nn.Module  # eval mode, on CPU, plain modules (adapters merged, not quantized);
    # on the meta device when opened ``lazy`` from an export (then ``weights`` holds them)
    described: dict[str, Any]  # {"name", "family", "config"} as in an export's config.json
    tokenizer_file: Path | None  # the tokenizer.json stored with the model, if any
    source: str  # "export", "huggingface" or "checkpoint"
    weights: Mapping[str, torch.Tensor] | None = None  # lazily read tensors (lazy exports)

    def tensors(self) -> Mapping[str, torch.Tensor]:
        """The model's tensors by name: read one at a time from disk for a lazy export,
        else the loaded model's state dict."""
        return self.weights if self.weights is not None else self.model.state_dict()


def open_model(path: str | Path, lazy: bool = False) -> OpenedModel:
    """Load the model stored in ``path`` (see the module docstring for what ``path`` may be).

    Every kind is built on meta and its stored tensors assigned (never a random init that
    is then overwritten). With ``lazy``, an export's tensors are not read now: ``model``
    stays on meta and ``weights`` reads each tensor when asked (a sharded fine-tune's base).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model directory '{path}' does not exist")
    config = _json(path / CONFIG_FILE)
    if config is not None and "architectures" in config:
        from baobab.export.hf_import import import_hf

        model, meta = import_hf(path)
        tok = meta.get("tokenizer")
        # A registry snapshot keeps the export's own description (its size name) beside.
        described = (_json(path / BAOBAB_CONFIG_FILE) or {}).get("model") or meta["model"]
        return OpenedModel(model, described, Path(tok) if tok else None, "huggingface")
    if config is not None and "model" in config and (path / MODEL_FILE).is_file():
        if "quantization" in config:
            raise ValueError(
                f"'{path}' is a quantized export; start from the unquantized model instead"
            )
        from baobab.export.artifact import load_exported, open_exported

        tokenizer = _file(path / TOKENIZER_FILE)
        if lazy:
            model, weights, config = open_exported(path)
            return OpenedModel(model, config["model"], tokenizer, "export", weights)
        model, config = load_exported(path)
        return OpenedModel(model, config["model"], tokenizer, "export")
    # Imported here: only checkpoints need torch.distributed.checkpoint.
    from baobab.checkpoint import load_trained_model, resolve_checkpoint

    ckpt = resolve_checkpoint(path)
    model, meta = load_trained_model(ckpt)
    described = {k: meta["model"].get(k) for k in ("name", "family", "config")}
    return OpenedModel(model, described, _file(ckpt / TOKENIZER_FILE), "checkpoint")


def _json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"'{path}' is not valid JSON ({err})") from None
    return value if isinstance(value, dict) else None


def _file(path: Path) -> Path | None:
    return path if path.is_file() else None
