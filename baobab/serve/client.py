"""The engine's client side, whatever transport runs the engine: admission, streams, gauges.

:class:`EngineClient` is what the HTTP layer talks to. ``add_requests`` checks and admits a
request's choices synchronously, in one check (so the server answers 400/429 at once,
having handed nothing over; the rule is :meth:`EngineClient._admit`), and posts them to the
engine core as one :class:`~baobab.serve.messages.AddRequests`; each core round comes back
as a :class:`~baobab.serve.messages.RoundOutput` that :meth:`EngineClient._receive` turns
into gauges and stream items, one ``loop.call_soon_threadsafe`` per event loop per round.

A transport (``async_engine.AsyncEngine``: a thread; ``engine_process.ProcessEngine``: a
child process) fills in ``_post`` (a message to the core), ``start``, ``_running`` and
``_stopped``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
from collections import defaultdict
from collections.abc import Sequence

from baobab.data.tokenizer import Tokenizer
from baobab.serve.config import EngineConfig
from baobab.serve.engine import check_request
from baobab.serve.messages import (
    Abort,
    AddRequest,
    AddRequests,
    Explain,
    ExplainDone,
    ExplainSpec,
    Ready,
    RoundOutput,
    Shutdown,
    ToCore,
)
from baobab.serve.types import (
    EngineStats,
    QueueFullError,
    RequestOutput,
    SamplingParams,
    TooManyChoicesError,
)

logger = logging.getLogger(__name__)

Streams = dict[str, tuple["RequestStream", asyncio.AbstractEventLoop]]
Waiters = dict[str, tuple[asyncio.Future, asyncio.AbstractEventLoop]]


class EngineDeadError(RuntimeError):
    """The engine stopped with an exception; every open stream raises this."""


class RequestStream:
    """Async iterator of one request's outputs; it ends after the finished one."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._done = False

    def _put(self, item: RequestOutput | BaseException) -> None:  # on the stream's loop
        self._queue.put_nowait(item)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        self._done = item.finished
        return item


class EngineClient:
    """Request admission, streams, gauges and failure over an engine core that introduced
    itself with ``ready`` (see the module docstring)."""

    def __init__(
        self, model_name: str, tokenizer: Tokenizer, config: EngineConfig, ready: Ready
    ) -> None:
        self.model_name = model_name
        self.tokenizer = tokenizer
        self.config = config
        self.eos_token_id: int | None = tokenizer.eot_id
        self.context_length = ready.context_length
        self.vocab_size = ready.vocab_size  # prompt ids must be below it
        self.max_num_seqs = config.max_num_seqs
        self.max_queue = config.max_queue
        self._lock = threading.Lock()  # guards everything below that two threads touch
        self._streams: Streams = {}
        self._stats = ready.stats  # as of the engine's last round
        # Adds handed over, and adds the engine had taken in when it computed ``_stats``:
        # the difference is in flight, in neither ``_stats.waiting`` nor ``_stats.running``.
        self._adds_sent = 0
        self._adds_seen = 0
        self._busy = False  # the engine holds unfinished requests or explanations
        # Explanations: their answers' futures, how many were handed over, and as of the
        # engine's last round how many it had taken in and how many it holds.
        self._explains: Waiters = {}
        self._explains_sent = 0
        self._explains_seen = 0
        self._explaining = 0
        self._accepting = True
        self._stopping = False  # Shutdown was posted: the core's end is expected
        self._error: str | None = None

    # ------------------------------------------------------------------ the public API
    @property
    def healthy(self) -> bool:
        """False once the engine died."""
        return self._error is None

    def add_request(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams
    ) -> RequestStream:
        """Submit one request from the running event loop (see :meth:`add_requests`)."""
        return self.add_requests([(request_id, prompt_ids, params)])[0]

    def add_requests(
        self, requests: Sequence[tuple[str, list[int], SamplingParams]]
    ) -> list[RequestStream]:
        """Submit requests (one HTTP request's ``n`` choices) from the running event loop, all
        or none, admitted in one check; each one's outputs arrive on its stream.

        Raises at once, having handed nothing over: PromptTooLongError, ValueError (bad
        prompt ids, an id in use), TooManyChoicesError (more than the engine can ever
        hold), QueueFullError, or RuntimeError when the engine is shutting down or has died.
        """
        loop = asyncio.get_running_loop()
        self._check_accepting()
        if len(requests) > self.max_num_seqs + self.max_queue:
            raise TooManyChoicesError(len(requests), self.max_num_seqs, self.max_queue)
        batch = []
        for request_id, prompt_ids, params in requests:
            check_request(prompt_ids, params, self.context_length, self.vocab_size)
            batch.append(AddRequest(request_id, [int(t) for t in prompt_ids], params))
        streams = [RequestStream(add.request_id) for add in batch]
        with self._lock:
            seen: set[str] = set()
            for add in batch:
                if add.request_id in self._streams or add.request_id in seen:
                    raise ValueError(f"request id {add.request_id!r} is already in use.")
                seen.add(add.request_id)
            self._admit(len(batch))
            for add, stream in zip(batch, streams):
                self._streams[add.request_id] = (stream, loop)
            self._adds_sent += len(batch)  # before the post: adds_seen never runs ahead
        self._post(AddRequests(batch))
        return streams

    def explain(self, request_id: str, spec: ExplainSpec) -> asyncio.Future[ExplainDone]:
        """Queue an explanation from the running event loop (``spec`` already checked by the
        caller); the future gets its :class:`ExplainDone`.

        Raises at once, having handed nothing over: QueueFullError when
        ``explain_max_queue`` explanations are queued or running (those in flight to the
        engine count), ValueError for an id in use, RuntimeError when the engine is shutting
        down or has died.
        """
        loop = asyncio.get_running_loop()
        self._check_accepting()
        future: asyncio.Future[ExplainDone] = loop.create_future()
        with self._lock:
            if request_id in self._explains:
                raise ValueError(f"request id {request_id!r} is already in use.")
            held = self._explaining_now()
            if held + 1 > self.config.explain_max_queue:
                raise QueueFullError(
                    f"the explanation queue is full ({held} queued or running, "
                    f"explain_max_queue {self.config.explain_max_queue}); retry later"
                )
            self._explains[request_id] = (future, loop)
            self._explains_sent += 1  # before the post: explains_seen never runs ahead
        self._post(Explain(request_id, spec))
        return future

    def abort(self, request_id: str) -> None:
        """Abort a request or an explanation from any thread; a request's KV cache is freed
        before the next step and its stream ends with finish_reason "abort", an explanation
        stops at its next pause. Unknown or finished ids are ignored."""
        self._post(Abort(request_id))

    def stats(self) -> EngineStats:
        """Gauges as of the engine's last round; requests not yet seen by the engine count as
        waiting."""
        with self._lock:
            return self._view()

    async def shutdown(self, timeout: float) -> None:
        """Refuse new requests, let running ones finish for up to ``timeout`` seconds, abort
        the rest, and stop the engine."""
        self._accepting = False
        if self._running():  # a never-started thread makes no progress to wait for
            await self._drain(timeout)
        self._stopping = True
        self._post(Shutdown())
        self.start()  # a never-started engine still aborts what it was handed, then stops
        await self._stopped()

    # ------------------------------------------------------------------ admission
    def _check_accepting(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"the engine stopped after an error: {self._error}")
        if not self._accepting:
            raise RuntimeError("the engine is shutting down")

    def _view(self) -> EngineStats:
        """The last round's gauges with the adds in flight among the waiting, and the
        explanations held or in flight (under _lock)."""
        return dataclasses.replace(
            self._stats,
            waiting=self._stats.waiting + self._pending(),
            explanations=self._explaining_now(),
        )

    def _explaining_now(self) -> int:
        """Explanations the engine holds as of its last round, and those in flight to it
        (each counted once, as for adds; under _lock)."""
        return self._explaining + self._explains_sent - self._explains_seen

    def _admit(self, n: int) -> None:
        """Admit ``n`` sequences at once or raise QueueFullError (under ``_lock``).

        The one admission rule, for every transport. The engine runs up to max_num_seqs
        requests and max_queue more may wait; what counts against max_queue is only what
        the engine could not start now:

            waiting + in_flight + n <= max_queue + free_slots

        - ``waiting`` and ``free_slots`` are the engine's as of its last round; ``in_flight``
          are adds handed over since (each counted once: the round that takes an add in
          reports it among its waiting or running and as seen, together). New requests take
          free slots in arrival order, after the waiting ones, like the scheduler.
        - KV cache: ``free_slots`` stops at the first waiting request that finds no run of
          free blocks (Scheduler.free_slots), so while the cache is what keeps requests
          out, only max_queue may wait; while it is not, a burst of up to max_num_seqs +
          max_queue requests on an idle engine is never refused, even before the engine
          has seen any of it. (Requests in flight are assumed to find cache: their fit
          depends on the sizes and fragmentation of those before them.)
        - The prefill-token budget per step only delays a start by a few steps: not counted.
        - Since free_slots <= max_num_seqs - running, the engine never holds more than
          max_num_seqs + max_queue requests, the cap Scheduler.add enforces; the engine's
          real count only falls between rounds, so it never refuses what was admitted here.
        """
        view = self._view()
        if view.waiting + n > self.max_queue + view.free_slots:
            raise QueueFullError(
                f"the engine's queue is full ({view.waiting} requests waiting, "
                f"{view.free_slots} free slots, max_queue {self.max_queue}); retry later"
            )

    def _pending(self) -> int:
        """Adds handed over that the engine's last reported round had not taken in."""
        return self._adds_sent - self._adds_seen

    # ------------------------------------------------------------------ the core's side
    def _receive(self, out: RoundOutput) -> None:
        """A core round ended: take its gauges, whether requests remain unfinished and how
        many adds it had taken in (all as of the same moment), then deliver its outputs."""
        with self._lock:
            self._stats, self._busy, self._adds_seen = out.stats, out.busy, out.adds_seen
            self._explaining, self._explains_seen = out.explaining, out.explains_seen
            answered = [(self._explains.pop(d.request_id, None), d) for d in out.explained]
        failed = [(refused.request_id, refused.error()) for refused in out.failed]
        deliver(self._lock, self._streams, out.outputs, failed)
        for waiter, done in answered:
            if waiter is not None:
                _call_soon(waiter[1], _resolve, waiter[0], done)

    async def _drain(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the engine to finish every request it was
        handed (shutdown, once new ones are refused); returns early if the engine dies."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout)
        while self._error is None and loop.time() < deadline:
            with self._lock:
                if not self._busy and not self._pending() and not self._explaining_now():
                    return
            await asyncio.sleep(0.01)

    def _fail(self, message: str) -> None:
        """The engine died: remember why, and end every open stream with EngineDeadError."""
        logger.error("the engine stopped: %s", message)
        self._error = message
        with self._lock:
            streams, self._streams = self._streams, {}
            waiters, self._explains = self._explains, {}
        dead = EngineDeadError(f"the engine stopped after an error: {message}")
        for stream, loop in streams.values():
            _call_soon(loop, stream._put, dead)
        for future, loop in waiters.values():
            _call_soon(loop, _resolve, future, dead)

    # ------------------------------------------------------------------ for transports
    def start(self) -> None:
        """Start delivering outputs (idempotent); called from the event loop."""
        raise NotImplementedError

    def _post(self, message: ToCore) -> None:
        """Hand a message to the engine core, from any thread, never under ``_lock``."""
        raise NotImplementedError

    def _running(self) -> bool:
        """Whether the core makes progress (and reports it) before ``start()``."""
        return True

    async def _stopped(self) -> None:
        """Wait until the core ran its last round (after Shutdown) and its output arrived."""
        raise NotImplementedError


def deliver(
    lock: threading.Lock,
    streams: Streams,
    outputs: list[RequestOutput],
    failed: list[tuple[str, BaseException]],
) -> None:
    """Hand a round's outputs (and per-request failures) to their streams, one
    ``call_soon_threadsafe`` per event loop; a finished or failed request leaves ``streams``."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
    with lock:
        for request_id, value in [*((o.request_id, o) for o in outputs), *failed]:
            done = isinstance(value, BaseException) or value.finished
            entry = streams.pop(request_id, None) if done else streams.get(request_id)
            if entry is not None:
                by_loop[entry[1]].append((entry[0], value))
    for loop, items in by_loop.items():
        _call_soon(loop, _put_all, items)


def _put_all(items: list[tuple[RequestStream, RequestOutput | BaseException]]) -> None:
    for stream, value in items:
        stream._put(value)


def _resolve(future: asyncio.Future, value: ExplainDone | BaseException) -> None:
    if future.done():  # its handler was cancelled (client gone): nobody waits
        return
    if isinstance(value, BaseException):
        future.set_exception(value)
    else:
        future.set_result(value)


def _call_soon(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening any more
        loop.call_soon_threadsafe(fn, *args)
