"""The trainer's own state (step, schedule, data position, RNG) on disk without pickle.

``trainer_state.json`` holds the structure and every plain value; each tensor is replaced
by ``{"__tensor__": "<n>"}`` and stored under key ``<n>`` in ``trainer_state.safetensors``.
JSON cannot say everything Python can, so a few values are tagged to come back identical:

- tuples:               ``{"__tuple__": [...]}``
- dicts whose keys are not all strings (e.g. ``{0: ...}``), or that use a tag as a key:
                        ``{"__dict__": [[key, value], ...]}``
- nan and +-inf floats: ``{"__float__": "nan" | "inf" | "-inf"}`` (the file stays strict JSON)

Finite floats round-trip exactly (``json`` writes the shortest repr). Tensors keep their
dtype and shape and come back on the CPU. Anything else (numpy values, arbitrary objects)
is refused when saving rather than silently changed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

JSON_FILE, TENSORS_FILE = "trainer_state.json", "trainer_state.safetensors"
FORMAT_VERSION = 1
_TAGS = ("__tensor__", "__tuple__", "__dict__", "__float__")


def _encode(value: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"__float__": repr(value)}
    if isinstance(value, torch.Tensor):
        key = str(len(tensors))
        # A private contiguous copy: safetensors refuses tensors that share memory.
        tensors[key] = value.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": key}
    if isinstance(value, list):
        return [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and not any(k in _TAGS for k in value):
            return {k: _encode(v, tensors, f"{where}.{k}") for k, v in value.items()}
        return {
            "__dict__": [
                [_encode(k, tensors, where), _encode(v, tensors, f"{where}.{k}")]
                for k, v in value.items()
            ]
        }
    raise TypeError(
        f"trainer_state{where} has type {type(value).__name__}; only None, bool, int, float, str, "
        "list, tuple, dict and torch.Tensor can be checkpointed"
    )


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        (tag, inner), *_ = value.items()
        if tag == "__tensor__":
            return tensors[inner]
        if tag == "__tuple__":
            return tuple(_decode(v, tensors) for v in inner)
        if tag == "__dict__":
            return {_decode(k, tensors): _decode(v, tensors) for k, v in inner}
        if tag == "__float__":
            return float(inner)
    return {k: _decode(v, tensors) for k, v in value.items()}


def save_trainer_state(state: dict[str, Any], directory: Path) -> None:
    """Write ``state`` as trainer_state.json + trainer_state.safetensors into ``directory``."""
    tensors: dict[str, torch.Tensor] = {}
    body = _encode(state, tensors, "")
    text = json.dumps({"format": FORMAT_VERSION, "state": body}, indent=1, allow_nan=False)
    save_file(tensors, str(directory / TENSORS_FILE))
    (directory / JSON_FILE).write_text(text + "\n")


def load_trainer_state(directory: Path) -> dict[str, Any]:
    """Read back exactly what :func:`save_trainer_state` wrote (tensors on the CPU)."""
    payload = json.loads((directory / JSON_FILE).read_text())
    if payload.get("format") != FORMAT_VERSION:
        raise ValueError(
            f"'{directory / JSON_FILE}' has format {payload.get('format')!r}; "
            f"this baobab reads format {FORMAT_VERSION}"
        )
    return _decode(payload["state"], load_file(str(directory / TENSORS_FILE)))
