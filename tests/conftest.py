"""Shared fixtures: a tiny prepared corpus made from real text on this machine."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked ``cuda`` are skipped, with the reason, where torch sees no CUDA GPU
    (every developer's and CI's machine today; ``benchmarks/gpu_check.sh`` runs them on one)."""
    marked = [item for item in items if item.get_closest_marker("cuda") is not None]
    if not marked:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in marked:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """A byte-level corpus from a few standard-library modules (no download, no BPE training)."""
    from baobab import data as bdata

    files = [str(p) for p in bdata.stdlib_files()[:40]]
    out = tmp_path_factory.mktemp("corpus") / "bytes"
    bdata.prepare(
        bdata.PrepareConfig(
            inputs=files,
            out=str(out),
            tokenizer="bytes",
            val_fraction=0.2,
            workers=1,
            progress=False,
        )
    )
    return out
