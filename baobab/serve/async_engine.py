"""The engine on a background thread, for asyncio servers.

All torch work runs on one engine thread, so the event loop only ever waits on queues.
``add_requests`` validates and admits a request's choices synchronously, in one check (so
the server can answer 400/429 at once, having handed nothing over; the rule is
``EngineClient._admit``), and hands them over; the thread folds new requests and aborts
into the engine between steps, runs ``step()``, and delivers each output to its
:class:`RequestStream` with ``loop.call_soon_threadsafe`` (one call per loop per step).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import dataclasses
import logging
import threading
import weakref
from collections import defaultdict
from collections.abc import Sequence

import torch

from baobab.data.tokenizer import Tokenizer
from baobab.serve.engine import Engine
from baobab.serve.types import (
    EngineStats,
    QueueFullError,
    RequestOutput,
    SamplingParams,
    TooManyChoicesError,
)

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine thread stopped with an exception; every open stream raises this."""


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
    """What the HTTP layer talks to, whatever runs the engine: request admission, streams,
    gauges and failure. :class:`AsyncEngine` (a thread here) and
    :class:`~baobab.serve.engine_process.ProcessEngine` (a child process) fill in how a
    request reaches the engine (``_check``, ``_enqueue``, ``_submit``) and report each
    engine round with :meth:`_acknowledge`."""

    def __init__(
        self, model_name: str, tokenizer: Tokenizer, context_length: int, max_num_seqs: int,
        max_queue: int, stats: EngineStats,
    ) -> None:  # fmt: skip
        self.model_name = model_name
        self.tokenizer = tokenizer
        self.eos_token_id: int | None = tokenizer.eot_id
        self.context_length = context_length
        self.max_num_seqs = max_num_seqs
        self.max_queue = max_queue
        self._lock = threading.Lock()  # guards everything below that two threads touch
        self._streams: dict[str, tuple[RequestStream, asyncio.AbstractEventLoop]] = {}
        self._stats = stats  # as of the engine's last round
        # Adds handed over, and adds the engine had taken in when it computed ``_stats``:
        # the difference is in flight, in neither ``_stats.waiting`` nor ``_stats.running``.
        self._adds_sent = 0
        self._adds_seen = 0
        self._busy = False  # the engine holds unfinished requests
        self._accepting = True
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
        if self._error is not None:
            raise RuntimeError(f"the engine stopped after an error: {self._error}")
        if not self._accepting:
            raise RuntimeError("the engine is shutting down")
        if len(requests) > self.max_num_seqs + self.max_queue:
            raise TooManyChoicesError(len(requests), self.max_num_seqs, self.max_queue)
        batch = []
        for request_id, prompt_ids, params in requests:
            self._check(prompt_ids, params)
            batch.append((request_id, [int(t) for t in prompt_ids], params))
        ids = [request_id for request_id, _, _ in batch]
        streams = [RequestStream(request_id) for request_id in ids]
        with self._lock:
            seen: set[str] = set()
            for request_id in ids:
                if request_id in self._streams or request_id in seen:
                    raise ValueError(f"request id {request_id!r} is already in use.")
                seen.add(request_id)
            self._admit(len(batch))
            for (request_id, prompt_ids, params), stream in zip(batch, streams):
                self._streams[request_id] = (stream, loop)
                self._enqueue(request_id, prompt_ids, params)
            self._adds_sent += len(batch)
        for request_id, prompt_ids, params in batch:
            self._submit(request_id, prompt_ids, params)
        return streams

    def stats(self) -> EngineStats:
        """Gauges as of the engine's last round; requests not yet seen by the engine count as
        waiting."""
        with self._lock:
            return self._view()

    # ------------------------------------------------------------------ admission
    def _view(self) -> EngineStats:
        """The last round's gauges with the adds in flight among the waiting (under _lock)."""
        return dataclasses.replace(self._stats, waiting=self._stats.waiting + self._pending())

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

    def _acknowledge(self, stats: EngineStats, busy: bool, adds_seen: int) -> None:
        """An engine round ended: its gauges, whether requests remain unfinished, and how
        many adds it had taken in, all as of the same moment."""
        with self._lock:
            self._stats, self._busy, self._adds_seen = stats, busy, adds_seen

    # ------------------------------------------------------------------ for subclasses
    def _check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise what the engine would refuse the request for (synchronously: 400 at once)."""
        raise NotImplementedError

    def _enqueue(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        """Record the request as handed over (under ``_lock``)."""

    def _submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        """Hand the request to the engine (after ``_lock`` is released)."""

    async def _drain(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the engine to finish every request it was
        handed (shutdown, once new ones are refused); returns early if the engine dies."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout)
        while self._error is None and loop.time() < deadline:
            with self._lock:
                if not self._busy and not self._pending():
                    return
            await asyncio.sleep(0.01)

    def _deliver(
        self, outputs: list[RequestOutput], failed: list[tuple[str, BaseException]]
    ) -> None:
        deliver(self._lock, self._streams, outputs, failed)

    def _fail(self, message: str) -> None:
        """The engine died: remember why, and end every open stream with EngineDeadError."""
        logger.error("the engine stopped: %s", message)
        self._error = message
        with self._lock:
            streams, self._streams = self._streams, {}
        dead = EngineDeadError(f"the engine stopped after an error: {message}")
        for stream, loop in streams.values():
            _call_soon(loop, stream._put, dead)


class AsyncEngine(EngineClient):
    """An :class:`Engine` driven by a background thread (see the module docstring)."""

    def __init__(self, engine: Engine, model_name: str) -> None:
        super().__init__(
            model_name, engine.tokenizer, engine.context_length, engine.config.max_num_seqs,
            engine.config.max_queue, engine.stats(),
        )  # fmt: skip
        self.engine = engine
        self._new: list[tuple[str, list[int], SamplingParams]] = []
        self._aborts: list[str] = []
        self._stop = False
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the engine thread (idempotent)."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="baobab-engine", daemon=True)
                self._thread.start()
                atexit.register(_stop_at_exit, weakref.ref(self))

    def abort(self, request_id: str) -> None:
        """Abort a request from any thread; its KV cache is freed before the next step and its
        stream ends with finish_reason "abort". Unknown or finished ids are ignored."""
        with self._lock:
            self._aborts.append(request_id)
        self._wake.set()

    def _check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        self.engine.check_request(prompt_ids, params)

    def _enqueue(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        self._new.append((request_id, prompt_ids, params))

    def _submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        self._wake.set()  # requests added before start() wait for it

    async def shutdown(self, timeout: float) -> None:
        """Refuse new requests, let running ones finish for up to ``timeout`` seconds, abort
        the rest, and stop the thread."""
        self._accepting = False
        if self._thread is not None:  # a never-started engine makes no progress to wait for
            await self._drain(timeout)
        with self._lock:
            self._stop = True
        self.start()  # a never-started engine still aborts what was queued, then exits
        self._wake.set()
        while self._thread.is_alive():
            await asyncio.sleep(0.01)

    # ------------------------------------------------------------------ the engine thread
    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while self._loop_once():
                    pass
        except BaseException as err:  # reported to every stream, then the thread ends
            logger.exception("the engine thread stopped")
            self._fail(repr(err))

    def _loop_once(self) -> bool:
        """One round: fold in new requests and aborts, step, deliver. False: exit."""
        with self._lock:
            new, self._new = self._new, []
            aborts, self._aborts = self._aborts, []
            stop = self._stop
            # Adds taken here stay in flight (_pending) until this round's _acknowledge.
            adds_seen = self._adds_seen + len(new)
        outputs: list[RequestOutput] = []
        failed: list[tuple[str, BaseException]] = []
        for request_id, prompt_ids, params in new:
            try:
                self.engine.add_request(request_id, prompt_ids, params)
            except (ValueError, QueueFullError) as err:  # raced past the checks in add_request
                failed.append((request_id, err))
        if stop:
            aborts += self.engine.request_ids
        for request_id in aborts:
            out = self.engine.abort(request_id)
            if out is not None:
                outputs.append(out)
        if not stop and self.engine.has_unfinished():
            outputs += self.engine.step()
        self._acknowledge(self.engine.stats(), self.engine.has_unfinished(), adds_seen)
        with self._lock:
            idle = not self._busy and not self._new and not self._aborts and not self._stop
        self._deliver(outputs, failed)
        if stop:
            return False
        if idle:
            self._wake.wait(timeout=1.0)
            self._wake.clear()
        return True


def deliver(
    lock: threading.Lock,
    streams: dict[str, tuple[RequestStream, asyncio.AbstractEventLoop]],
    outputs: list[RequestOutput],
    failed: list[tuple[str, BaseException]],
) -> None:
    """Hand a step's outputs (and per-request failures) to their streams, one
    ``call_soon_threadsafe`` per event loop; a finished or failed request leaves ``streams``.
    Shared by the in-process engine thread and the engine process's reader thread."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
    with lock:
        for request_id, value in [*((o.request_id, o) for o in outputs), *failed]:
            done = isinstance(value, BaseException) or value.finished
            entry = streams.pop(request_id, None) if done else streams.get(request_id)
            if entry is not None:
                by_loop[entry[1]].append((entry[0], value))
    for loop, items in by_loop.items():
        _call_soon(loop, _put_all, items)


def _stop_at_exit(ref: weakref.ref) -> None:
    """Stop a still-running engine thread before the interpreter tears torch down under it."""
    engine = ref()
    if engine is not None and engine._thread is not None and engine._thread.is_alive():
        with engine._lock:
            engine._stop = True
        engine._wake.set()
        engine._thread.join(timeout=10)


def _put_all(items: list[tuple[RequestStream, RequestOutput | BaseException]]) -> None:
    for stream, value in items:
        stream._put(value)


def _call_soon(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening any more
        loop.call_soon_threadsafe(fn, *args)
