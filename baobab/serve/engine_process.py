"""The engine in its own process (vLLM V1's "engine core"), behind AsyncEngine's API.

In one process the engine thread and the asyncio loop share one GIL: every SSE event the
loop writes delays the next engine step, and at concurrency 16 that costs about a third of
the throughput. Here a spawned child process loads the export and runs
``schedule() -> execute() -> update()``; the HTTP process keeps the event loop, the
streams and a reader thread that hands each step's outputs to the loop with
``call_soon_threadsafe`` (one call per loop per step).

Messages on one duplex pipe. Parent to child: ``("add", id, prompt_ids, params)``,
``("abort", id)``, ``("stop",)``. Child to parent: ``("ready", context_length,
vocab_size, stats)`` once, then one ``("step", outputs, failed, stats, busy, adds_seen)``
per round, or ``("dead", message)`` when the engine raised (the child then exits).

Lifetime: the child ignores SIGINT/SIGTERM (the parent drains, then sends "stop") and exits
when the pipe closes, so a parent that dies any way takes the child with it; the parent
joins the child on shutdown and kills it at interpreter exit if it is still there. Spawn,
not fork: forking a process whose torch (OpenMP) threads have started is unsafe.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import multiprocessing
import signal
import threading
import weakref
from multiprocessing.connection import Connection
from pathlib import Path

import torch

from baobab.data.tokenizer import Tokenizer
from baobab.serve.async_engine import EngineClient
from baobab.serve.config import EngineConfig
from baobab.serve.engine import check_request
from baobab.serve.types import QueueFullError, RequestOutput, SamplingParams

logger = logging.getLogger(__name__)
_LOAD_TIMEOUT_S = 600.0


class ProcessEngine(EngineClient):
    """:class:`~baobab.serve.async_engine.AsyncEngine`'s API over an engine process.

    The constructor spawns the process and waits until the model is loaded (it raises
    RuntimeError with the child's message if loading fails); ``start()`` starts the thread
    that reads its outputs.
    """

    def __init__(
        self, export_dir: Path, config: EngineConfig, model_name: str, tokenizer: Tokenizer
    ) -> None:
        self.config = config
        ctx = multiprocessing.get_context("spawn")
        self._conn, child_conn = ctx.Pipe(duplex=True)
        self._process = ctx.Process(
            target=_child_main,
            args=(child_conn, str(export_dir), config),
            name="baobab-engine",
            daemon=True,
        )
        self._process.start()
        child_conn.close()  # the child's end lives in the child only: its exit closes the pipe
        _reap_at_exit(self)
        _, context_length, self._vocab_size, stats = self._recv_ready()
        super().__init__(
            model_name, tokenizer, context_length, config.max_num_seqs, config.max_queue, stats
        )
        # Sends hold only _send_lock, never _lock, which the reader needs: a send blocked on
        # a full pipe (the child busy sending to us) must not stop the reader draining it.
        self._send_lock = threading.Lock()
        self._stopping = False
        self._reader: threading.Thread | None = None

    def _recv_ready(self) -> tuple:
        waited = 0.0
        while not self._conn.poll(0.1):
            waited += 0.1
            if not self._process.is_alive() or waited > _LOAD_TIMEOUT_S:
                self._kill()
                raise RuntimeError(
                    f"the engine process exited while loading (exit code {self._process.exitcode})"
                )
        try:
            message = self._conn.recv()
        except (EOFError, OSError):
            message = ("dead", "the engine process exited while loading")
        if message[0] != "ready":
            self._kill()
            raise RuntimeError(message[1])
        return message

    # ------------------------------------------------------------------ the public API
    def start(self) -> None:
        """Start the thread that delivers outputs (idempotent)."""
        with self._lock:
            if self._reader is None:
                self._reader = threading.Thread(
                    target=self._read, name="baobab-engine-reader", daemon=True
                )
                self._reader.start()

    def abort(self, request_id: str) -> None:
        """Abort a request from any thread (see ``AsyncEngine.abort``)."""
        self._send(("abort", request_id))

    def _check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        check_request(prompt_ids, params, self.context_length, self._vocab_size)

    def _submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        self._send(("add", request_id, prompt_ids, params))

    async def shutdown(self, timeout: float) -> None:
        """Refuse new requests, let running ones finish for up to ``timeout`` seconds, abort
        the rest, and stop the engine process."""
        self._accepting = False
        await self._drain(timeout)
        self.start()  # a never-started engine's outputs (aborts) are still delivered
        self._stopping = True
        self._send(("stop",))
        while self._reader.is_alive():
            await asyncio.sleep(0.01)
        await asyncio.to_thread(self._process.join, 10)
        self._kill()

    # ------------------------------------------------------------------ the reader thread
    def _send(self, message: tuple) -> None:
        # OSError: the child is gone, and the reader reports it.
        with self._send_lock, contextlib.suppress(OSError):
            self._conn.send(message)

    def _read(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                if not self._stopping:
                    code = self._process.exitcode
                    self._fail(f"the engine process exited unexpectedly (exit code {code})")
                return
            if message[0] == "dead":
                self._fail(message[1])
                return
            _, outputs, failed, stats, busy, adds_seen = message
            self._acknowledge(stats, busy, adds_seen)
            self._deliver(outputs, [(rid, _rebuild(kind, text)) for rid, kind, text in failed])

    def _kill(self) -> None:
        if self._process.is_alive():
            self._process.kill()
        self._process.join(timeout=10)


def _rebuild(kind: str, text: str) -> BaseException:
    return QueueFullError(text) if kind == "QueueFullError" else ValueError(text)


def _reap_at_exit(engine: ProcessEngine) -> None:
    """Kill a still-running engine process at interpreter exit (weakly: no leak)."""
    ref = weakref.ref(engine)

    def reap() -> None:
        live = ref()
        if live is not None:
            live._kill()

    atexit.register(reap)


# ---------------------------------------------------------------------- the engine process
def _child_main(conn: Connection, export_dir: str, config: EngineConfig) -> None:
    # The parent drains on SIGINT/SIGTERM and then says "stop"; a signal to the whole
    # process group (Ctrl-C) must not kill the engine under the drain.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        from baobab.serve.loader import load_engine, weight_bytes

        if torch.device(config.device).type == "cpu":
            torch.set_num_threads(config.num_threads(weight_bytes(Path(export_dir))))
        engine = load_engine(Path(export_dir), config)
    except Exception as err:
        conn.send(("dead", f"the model could not be loaded: {err}"))
        return
    conn.send(("ready", engine.context_length, engine.vocab_size, engine.stats()))
    try:
        with torch.inference_mode():
            _serve(conn, engine)
    except (EOFError, BrokenPipeError, ConnectionResetError):  # the parent is gone
        return
    except BaseException as err:
        logger.exception("the engine stopped")
        conn.send(("dead", repr(err)))


def _serve(conn: Connection, engine) -> None:
    """Rounds of: take every message, step once, send the outputs; until "stop"."""
    adds_seen = 0
    while True:
        # Idle: block for the next message; busy: take what has arrived and step.
        messages = [] if engine.has_unfinished() else [conn.recv()]
        while conn.poll():
            messages.append(conn.recv())
        outputs: list[RequestOutput] = []
        failed: list[tuple[str, str, str]] = []
        stop = False
        for message in messages:
            if message[0] == "add":
                adds_seen += 1
                try:
                    engine.add_request(*message[1:])
                except (ValueError, QueueFullError) as err:  # raced past the parent's checks
                    failed.append((message[1], type(err).__name__, str(err)))
            elif message[0] == "abort":
                out = engine.abort(message[1])
                if out is not None:
                    outputs.append(out)
            else:
                stop = True
        if stop:
            outputs += [engine.abort(rid) for rid in engine.request_ids]
        elif engine.has_unfinished():
            outputs += engine.step()
        conn.send(("step", outputs, failed, engine.stats(), engine.has_unfinished(), adds_seen))
        if stop:
            return
