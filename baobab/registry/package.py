"""From a baobab export directory to the files of a registry snapshot.

A gpt export that has a Hugging Face format (Llama- or GPT-2-style, unquantized) becomes
``baobab hf export``'s files (config.json, model.safetensors, generation_config.json,
tokenizer files) plus the export's own config.json as ``baobab_config.json``: transformers
reads the snapshot by repo id and baobab reads the same files (see
``baobab.export.artifact.read_config``). Every other export is carried as it is. Both get a
generated README.md (the model card). Only the Hugging Face conversion imports torch;
:func:`check_export` does not, so a bad directory is refused before anything is loaded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from baobab.registry.card import card_metadata, render_card, safetensors_params

CONFIG_FILE, MODEL_FILE, CARD_FILE = "config.json", "model.safetensors", "README.md"
BAOBAB_CONFIG_FILE = "baobab_config.json"  # as baobab.export.artifact names it (torch-free here)


def check_export(path: str | Path) -> dict[str, Any]:
    """The config.json of the export at ``path``; anything else is a ValueError."""
    path = Path(path)
    config_file = path / CONFIG_FILE
    config = None
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text())
        except json.JSONDecodeError:
            config = None
    model = config.get("model") if isinstance(config, dict) else None
    if not path.is_dir() or not isinstance(model, dict) or not (path / MODEL_FILE).is_file():
        raise ValueError(
            f"'{path}' is not a baobab export (a directory with config.json holding a "
            f'"model" entry and {MODEL_FILE}); write one with `baobab export`.'
        )
    return config


def package_export(
    export_dir: str | Path,
    work: str | Path,
    name: str,
    parent: str | None = None,
    license: str | None = None,
    card_extra: dict[str, Any] | None = None,
) -> tuple[dict[str, Path], dict[str, Any]]:
    """The snapshot's files (name -> path, some written under ``work``) and the manifest's
    metadata for the export at ``export_dir``."""
    export_dir, work = Path(export_dir), Path(work)
    config = check_export(export_dir)
    model = config["model"]
    params = None if config.get("quantization") else safetensors_params(export_dir / MODEL_FILE)
    layout = "baobab"
    files = {p.name: p for p in sorted(export_dir.iterdir()) if p.is_file()}
    if model.get("family") == "gpt" and not config.get("quantization"):
        hf_dir = _hf_files(export_dir, work / "hf")
        if hf_dir is not None:
            layout = "huggingface"
            files = {p.name: p for p in sorted(hf_dir.iterdir()) if p.is_file()}
            files[BAOBAB_CONFIG_FILE] = export_dir / CONFIG_FILE
    card = card_metadata(config, params, parent, license, card_extra)
    card_path = work / CARD_FILE
    card_path.parent.mkdir(parents=True, exist_ok=True)
    card_path.write_text(render_card(name, card))
    files[CARD_FILE] = card_path
    meta = {
        "layout": layout,
        "family": model.get("family"),
        "size": model.get("name"),
        "config": model.get("config"),
        "parameters": params,
        "parent": parent,
        "card": card["baobab"],
    }
    return files, meta


def _hf_files(export_dir: Path, out: Path) -> Path | None:
    """``baobab hf export``'s directory for the export, or None when its variant has no
    Hugging Face format."""
    from baobab.export.hf_export import export_hf

    shutil.rmtree(out, ignore_errors=True)
    try:
        return export_hf(export_dir, out)
    except ValueError as err:
        if "no Hugging Face format" in str(err):
            return None
        raise
