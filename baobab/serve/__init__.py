"""Serving: a continuous-batching engine for gpt exports and an image classifier.

``load_served_model(export_dir, EngineConfig(...))`` gives an :class:`AsyncEngine` or an
:class:`AsyncClassifier`; the HTTP layer speaks only the types in ``types.py`` to them.
Inside: ``scheduler.py`` (plain Python) plans each step, ``runner.py`` runs the model over
the ``kv_cache.py`` blocks, ``engine.py`` ties them as schedule() -> execute() -> update().
"""

from baobab.serve.async_engine import AsyncEngine, EngineDeadError, RequestStream
from baobab.serve.classifier import AsyncClassifier
from baobab.serve.config import EngineConfig
from baobab.serve.detokenize import IncrementalDetokenizer
from baobab.serve.engine import Engine
from baobab.serve.loader import load_served_model
from baobab.serve.scheduler import Scheduler
from baobab.serve.types import (
    EngineStats,
    FinishReason,
    PromptTooLongError,
    QueueFullError,
    RequestOutput,
    SamplingParams,
    TokenLogprob,
)

__all__ = [
    "AsyncClassifier",
    "AsyncEngine",
    "Engine",
    "EngineConfig",
    "EngineDeadError",
    "EngineStats",
    "FinishReason",
    "IncrementalDetokenizer",
    "PromptTooLongError",
    "QueueFullError",
    "RequestOutput",
    "RequestStream",
    "SamplingParams",
    "Scheduler",
    "TokenLogprob",
    "load_served_model",
]
