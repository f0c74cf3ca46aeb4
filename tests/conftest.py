"""Shared fixtures: a tiny prepared corpus made from real text on this machine."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")


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
