"""Server fixtures: the reciting language model exported once per session, and a shared
real server over it (see ``serving.py``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from serving import (
    RunningServer,
    export_classifier,
    export_reciter,
    serve_in_thread,
    served_app,
)


@pytest.fixture(scope="session")
def lm_export(tmp_path_factory) -> Path:
    """An export directory (safetensors + config + byte tokenizer) of the reciting gpt-nano."""
    return export_reciter(tmp_path_factory.mktemp("lm"))


@pytest.fixture(scope="session")
def lm_server(lm_export) -> Iterator[RunningServer]:
    """The reciting model behind a server with no API key, shared by the test modules."""
    with serve_in_thread(served_app(lm_export)) as running:
        yield running


@pytest.fixture(scope="session")
def image_export(tmp_path_factory) -> Path:
    """An export directory of a tiny (untrained) image classifier with label names."""
    return export_classifier(tmp_path_factory.mktemp("image"))
