"""The model card: a README.md with Hugging Face front matter (YAML between ``---`` lines).

The front matter carries what the hub reads (``license``, ``library_name``, ``tags``,
``base_model``) and a ``baobab`` block: family, size name, parameter count, recipe and its
overrides, data manifest hash, evaluation results and parent model, each when known.
:data:`CARD_FIELDS` is the extension point: other code adds ``name -> function(config)``
(e.g. a privacy budget) and its value appears in the block when not None. Torch-free: the
parameter count comes from the safetensors header's shapes, not from building the model.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

# name -> config.json of the export -> value (None: left out). Add to extend the card.
CARD_FIELDS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "recipe": lambda c: c.get("recipe"),
    "overrides": lambda c: c.get("overrides"),
    "data_manifest_sha256": lambda c: c.get("data_manifest_sha256") or c.get("data_manifest"),
    "eval": lambda c: c.get("eval") or c.get("evaluation"),
    "objective": lambda c: c.get("objective"),
    "step": lambda c: c.get("step"),
    "dtype": lambda c: c.get("dtype"),
}


def safetensors_params(path: Path) -> int:
    """Elements stored in a safetensors file, from its header alone (a tied tensor is
    stored once, so counted once, as count_params does)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))  # little-endian u64 header size
        header = json.loads(f.read(length))
    return sum(math.prod(t["shape"]) for k, t in header.items() if k != "__metadata__")


def card_metadata(
    config: dict[str, Any],
    params: int | None,
    parent: str | None = None,
    license: str | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The front matter of a model card for an export whose config.json is ``config``."""
    model = config.get("model") or {}
    block = {
        "family": model.get("family"),
        "size": model.get("name"),
        "parameters": params,
        "parent": parent,
        **{key: field(config) for key, field in CARD_FIELDS.items()},
        **(extra or {}),
    }
    meta = {
        "library_name": "baobab",
        "license": license or "other",
        "tags": ["baobab", *([model["family"]] if model.get("family") else [])],
        **({"base_model": parent} if parent else {}),
        "baobab": {k: v for k, v in block.items() if v is not None},
    }
    return meta


def render_card(name: str, meta: dict[str, Any]) -> str:
    """README.md text: the front matter, then a short human summary of the same facts."""
    front = yaml.safe_dump(meta, sort_keys=False, default_flow_style=False)
    info = meta["baobab"]
    lines = [f"---\n{front}---\n", f"# {name}\n"]
    described = f"A baobab `{info.get('family', '?')}` model ({info.get('size', '?')}"
    if info.get("parameters") is not None:
        described += f", {info['parameters']:,} parameters"
    lines.append(described + ").\n")
    if info.get("parent"):
        lines.append(f"Derived from `{info['parent']}`.\n")
    lines.append(
        "Load it with `baobab serve models:/NAME@ALIAS` or, for Llama- and GPT-2-style "
        "models, with `transformers.AutoModelForCausalLM.from_pretrained`.\n"
    )
    return "\n".join(lines)


def read_card(path: Path) -> dict[str, Any]:
    """The front matter of a README.md written by :func:`render_card`."""
    text = path.read_text()
    if not text.startswith("---\n"):
        raise ValueError(f"'{path}' has no front matter.")
    return yaml.safe_load(text[4:].split("\n---\n", 1)[0])
