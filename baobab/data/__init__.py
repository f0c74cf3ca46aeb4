"""baobab.data: tokenizers, corpus -> token shards + manifest, resumable loaders.

The torch-free modules are imported eagerly; the datasets and the loader, which need
torch, are imported on first use (PEP 562). `prepare` spawns encoding processes that
import this package, and without this each of them would pay ~3 s for importing torch
although encoding never touches it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from baobab.data.manifest import Manifest, token_dtype
from baobab.data.prepare import PrepareConfig, prepare, prepare_stdlib
from baobab.data.sampler import GlobalSampler
from baobab.data.sources import find_files, iter_documents, stdlib_files
from baobab.data.tokenizer import SPECIAL_TOKENS, Tokenizer, byte_tokenizer, train_bpe

# name -> submodule, for the names that need torch
_LAZY = {
    "TokenWindows": "tokens",
    "ArrayDataset": "arrays",
    "Subset": "arrays",
    "train_val_split": "arrays",
    "load_arrays": "arrays",
    "load_image_folder": "arrays",
    "load_digits": "arrays",
    "make_regression": "arrays",
    "DataLoader": "loader",
}

__all__ = [
    "SPECIAL_TOKENS",
    "ArrayDataset",
    "DataLoader",
    "GlobalSampler",
    "Manifest",
    "PrepareConfig",
    "Subset",
    "TokenWindows",
    "Tokenizer",
    "byte_tokenizer",
    "find_files",
    "iter_documents",
    "load_arrays",
    "load_digits",
    "load_image_folder",
    "make_regression",
    "prepare",
    "prepare_stdlib",
    "stdlib_files",
    "token_dtype",
    "train_bpe",
    "train_val_split",
]

if TYPE_CHECKING:  # static tools see ordinary imports
    from baobab.data.arrays import (
        ArrayDataset,
        Subset,
        load_arrays,
        load_digits,
        load_image_folder,
        make_regression,
        train_val_split,
    )
    from baobab.data.loader import DataLoader
    from baobab.data.tokens import TokenWindows


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'baobab.data' has no attribute '{name}'")
    value = getattr(importlib.import_module(f"baobab.data.{module}"), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
