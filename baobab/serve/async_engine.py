"""The engine on a background thread, for asyncio servers.

All torch work runs on one engine thread, so the event loop only ever waits on queues.
``add_request`` validates synchronously (so the server can answer 400/429 at once) and
hands the request over; the thread folds new requests and aborts into the engine between
steps, runs ``step()``, and delivers each output to its :class:`RequestStream` with
``loop.call_soon_threadsafe`` (one call per loop per step).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import threading
import weakref
from collections import defaultdict

import torch

from baobab.data.tokenizer import Tokenizer
from baobab.serve.engine import Engine
from baobab.serve.types import EngineStats, QueueFullError, RequestOutput, SamplingParams

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
    request reaches the engine (``_check``, ``_enqueue``, ``_submit``, ``_pending``)."""

    def __init__(
        self, model_name: str, tokenizer: Tokenizer, context_length: int, max_queue: int,
        stats: EngineStats,
    ) -> None:  # fmt: skip
        self.model_name = model_name
        self.tokenizer = tokenizer
        self.eos_token_id: int | None = tokenizer.eot_id
        self.context_length = context_length
        self.max_queue = max_queue
        self._lock = threading.Lock()  # guards everything below that two threads touch
        self._streams: dict[str, tuple[RequestStream, asyncio.AbstractEventLoop]] = {}
        self._stats = stats  # as of the engine's last step
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
        """Submit a request from the running event loop; its outputs arrive on the stream.

        Raises at once: PromptTooLongError, ValueError (bad prompt ids), QueueFullError, or
        RuntimeError when the engine is shutting down or has died.
        """
        loop = asyncio.get_running_loop()
        if self._error is not None:
            raise RuntimeError(f"the engine stopped after an error: {self._error}")
        if not self._accepting:
            raise RuntimeError("the engine is shutting down")
        self._check(prompt_ids, params)
        stream = RequestStream(request_id)
        prompt_ids = [int(t) for t in prompt_ids]
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use.")
            if self._stats.waiting + self._pending() >= self.max_queue:
                raise QueueFullError(
                    f"the engine's queue is full ({self.max_queue} requests waiting); retry later"
                )
            self._streams[request_id] = (stream, loop)
            self._enqueue(request_id, prompt_ids, params)
        self._submit(request_id, prompt_ids, params)
        return stream

    def stats(self) -> EngineStats:
        """Gauges as of the last engine step (requests not yet seen by the engine count as
        waiting)."""
        with self._lock:
            s = self._stats
            return EngineStats(
                s.running,
                s.waiting + self._pending(),
                s.kv_cache_usage,
                s.kv_cache_blocks_total,
                s.kv_cache_blocks_used,
            )

    # ------------------------------------------------------------------ for subclasses
    def _check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise what the engine would refuse the request for (synchronously: 400 at once)."""
        raise NotImplementedError

    def _pending(self) -> int:
        """Requests handed over but not yet seen by the engine (called under ``_lock``)."""
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
            model_name, engine.tokenizer, engine.context_length, engine.config.max_queue,
            engine.stats(),
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

    def _pending(self) -> int:
        return len(self._new)

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
            self._busy = self._busy or bool(new)  # shutdown() must not see a gap
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
        with self._lock:
            self._stats = self.engine.stats()
            self._busy = self.engine.has_unfinished()
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
