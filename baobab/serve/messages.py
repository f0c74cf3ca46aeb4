"""What crosses between an engine client and the engine core: typed messages.

The same messages travel on both transports: the engine thread (``async_engine.py``) takes
them from an in-process inbox, the engine process (``engine_process.py``) from a pipe, and
:class:`~baobab.serve.engine_core.EngineCore` folds them into the engine the same way.

To the core: :class:`AddRequests` (one HTTP request's choices, admitted together),
:class:`Explain` (one ``/v1/explain``), :class:`Abort`, :class:`Shutdown`. From the core:
:class:`Ready` once, then one :class:`RoundOutput` per round (finished explanations ride
on it as :class:`ExplainDone`), or :class:`Failed` when the engine raised (nothing
follows).

Every message is a plain dataclass of plain values and the types in ``types.py``, so
pickle (the pipe) carries it whole; exceptions are carried as :class:`Refused` (an
exception's own pickling loses the arguments of errors such as PromptTooLongError).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from baobab.serve.types import EngineStats, QueueFullError, RequestOutput, SamplingParams


# ---------------------------------------------------------------------- client -> core
@dataclass(frozen=True)
class AddRequest:
    """One engine request: prompt token ids, already checked by the client."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams


@dataclass(frozen=True)
class AddRequests:
    """Requests admitted in one check (``EngineClient._admit``); the core takes them in one
    round, in order, and counts each in ``RoundOutput.adds_seen``."""

    requests: list[AddRequest]


@dataclass(frozen=True)
class ExplainSpec:
    """What one ``/v1/explain`` asks of ``baobab.explain.explain`` (checked by the client:
    methods known, work within ``EngineConfig.explain_max_work``, within the context)."""

    prompt: str
    target: str | None = None
    completion: str | None = None  # a text the model produced, sent back by the client
    contrast: str | None = None
    methods: tuple[str, ...] = ("ig",)
    ig_steps: int = 32
    max_delta: float = 0.05
    top_k: int = 5


@dataclass(frozen=True)
class Explain:
    """Explain with the engine's own float32 copy of the model, in slices between steps
    (``explain_worker.py``); the answer comes back as an :class:`ExplainDone`."""

    request_id: str
    spec: ExplainSpec


@dataclass(frozen=True)
class Abort:
    """Drop a request (its KV cache is freed before the next step) or an explanation (it
    stops at its next pause); unknown ids are ignored."""

    request_id: str


@dataclass(frozen=True)
class Shutdown:
    """Abort everything the engine holds, report it, and stop (the client drained first)."""


ToCore = AddRequests | Explain | Abort | Shutdown


# ---------------------------------------------------------------------- core -> client
@dataclass(frozen=True)
class Ready:
    """The engine is loaded: what the client checks requests against, and its gauges."""

    context_length: int
    vocab_size: int
    stats: EngineStats


@dataclass(frozen=True)
class Refused:
    """A request the engine refused on arrival: it raced past the client's checks (the
    engine's own queue cap, or an id still in use). ``error()`` is what its stream raises."""

    request_id: str
    kind: Literal["queue_full", "invalid"]
    message: str

    @classmethod
    def of(cls, request_id: str, err: Exception) -> Refused:
        kind = "queue_full" if isinstance(err, QueueFullError) else "invalid"
        return cls(request_id, kind, str(err))

    def error(self) -> Exception:
        return (
            QueueFullError(self.message) if self.kind == "queue_full" else ValueError(self.message)
        )


@dataclass(frozen=True)
class ExplainDone:
    """An explanation that ended: ``result`` (``to_json()`` of the explanation) when
    ``kind`` is "ok"; otherwise one sentence: "invalid" (the explanation cannot be given as
    asked: HTTP 400), "aborted" (client gone or shutdown), "failed" (an unexpected error,
    logged by the core)."""

    request_id: str
    kind: Literal["ok", "invalid", "aborted", "failed"]
    result: dict[str, Any] | None = None
    message: str = ""


@dataclass(frozen=True)
class RoundOutput:
    """One engine round: its outputs and refusals, and, as of its end, the engine's gauges,
    whether requests or explanations remain unfinished (``busy``) and how many adds it has
    taken in since it started (``adds_seen``; the client's admission counts the rest as in
    flight); likewise explanations: those that ended, those still queued or running
    (``explaining``) and how many it has taken in (``explains_seen``)."""

    outputs: list[RequestOutput]
    failed: list[Refused]
    stats: EngineStats
    busy: bool
    adds_seen: int
    explained: list[ExplainDone] = field(default_factory=list)
    explaining: int = 0
    explains_seen: int = 0


@dataclass(frozen=True)
class Failed:
    """The engine raised (or could not be loaded): every open stream ends with this message."""

    message: str


FromCore = Ready | RoundOutput | Failed
