"""Serving: a continuous-batching engine for gpt exports and an image classifier.

``load_served_model(export_dir, EngineConfig(...))`` (``launch.py``) gives an engine client
(:class:`ProcessEngine` or :class:`AsyncEngine`) or an :class:`AsyncClassifier`; the HTTP
layer speaks only the types in ``types.py`` to them. The roles, in import order:

- the engine: ``scheduler.py`` (plain Python) plans each step, ``runner.py`` runs the model
  over the ``kv_cache.py`` blocks, ``engine.py`` ties them as schedule() -> execute() ->
  update(), and ``engine_core.py``'s :class:`EngineCore` is the round (add, abort, step,
  report) over the typed messages of ``messages.py``;
- the clients: ``client.py`` (admission, streams, gauges), with two transports for the
  same core: ``async_engine.py`` (a thread) and ``engine_process.py`` (a process);
- loading: ``loader.py`` (an export to an Engine or a classifier), ``launch.py`` (the
  transport);
- HTTP: ``server.py``, ``handlers.py``, ``protocol.py`` and their helpers.
"""

from baobab.serve.async_engine import AsyncEngine
from baobab.serve.classifier import AsyncClassifier
from baobab.serve.client import EngineClient, EngineDeadError, RequestStream
from baobab.serve.config import EngineConfig
from baobab.serve.detokenize import IncrementalDetokenizer
from baobab.serve.engine import Engine
from baobab.serve.engine_core import EngineCore
from baobab.serve.engine_process import ProcessEngine
from baobab.serve.launch import load_served_model
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
    "EngineClient",
    "EngineConfig",
    "EngineCore",
    "EngineDeadError",
    "EngineStats",
    "FinishReason",
    "IncrementalDetokenizer",
    "ProcessEngine",
    "PromptTooLongError",
    "QueueFullError",
    "RequestOutput",
    "RequestStream",
    "SamplingParams",
    "Scheduler",
    "TokenLogprob",
    "load_served_model",
]
