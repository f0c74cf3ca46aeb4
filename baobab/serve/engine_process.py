"""The engine core in its own process (vLLM V1's "engine core"), behind EngineClient's API.

In one process the engine thread and the asyncio loop share one GIL: every SSE event the
loop writes delays the next engine step, and at concurrency 16 that costs about a third of
the throughput. Here a spawned child process loads the export and runs
:class:`~baobab.serve.engine_core.EngineCore` rounds (the same rounds as the in-process
thread); the HTTP process keeps the event loop, the streams and a reader thread that hands
each round's output to ``EngineClient._receive``.

One duplex pipe carries the typed messages of ``messages.py``. Parent to child:
AddRequests, Explain, Abort, Shutdown. Child to parent: Ready once, then one RoundOutput per round,
or Failed when the engine could not be loaded or raised (the child then exits).

Lifetime: the child ignores SIGINT/SIGTERM (the parent drains, then sends Shutdown) and
exits when the pipe closes, so a parent that dies any way takes the child with it; the
parent joins the child on shutdown and kills it at interpreter exit if it is still there.
Spawn, not fork: forking a process whose torch (OpenMP) threads have started is unsafe.
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
from baobab.serve.client import EngineClient
from baobab.serve.config import EngineConfig
from baobab.serve.engine_core import EngineCore
from baobab.serve.loader import load_engine, weight_bytes
from baobab.serve.messages import Failed, FromCore, Ready, RoundOutput, ToCore

logger = logging.getLogger(__name__)
_LOAD_TIMEOUT_S = 600.0


class ProcessEngine(EngineClient):
    """:class:`~baobab.serve.client.EngineClient` over an engine process.

    The constructor spawns the process and waits until the model is loaded (it raises
    RuntimeError with the child's message if loading fails); ``start()`` starts the thread
    that reads its outputs.
    """

    def __init__(
        self, export_dir: Path, config: EngineConfig, model_name: str, tokenizer: Tokenizer
    ) -> None:
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
        super().__init__(model_name, tokenizer, config, self._recv_ready())
        # Sends hold only _send_lock, never _lock, which the reader needs: a send blocked on
        # a full pipe (the child busy sending to us) must not stop the reader draining it.
        self._send_lock = threading.Lock()
        self._reader: threading.Thread | None = None

    def _recv_ready(self) -> Ready:
        waited = 0.0
        while not self._conn.poll(0.1):
            waited += 0.1
            if not self._process.is_alive() or waited > _LOAD_TIMEOUT_S:
                self._kill()
                raise RuntimeError(
                    f"the engine process exited while loading (exit code {self._process.exitcode})"
                )
        try:
            message: FromCore = self._conn.recv()
        except (EOFError, OSError):
            message = Failed("the engine process exited while loading")
        if not isinstance(message, Ready):
            self._kill()
            raise RuntimeError(getattr(message, "message", repr(message)))
        return message

    def start(self) -> None:
        """Start the thread that delivers outputs (idempotent)."""
        with self._lock:
            if self._reader is None:
                self._reader = threading.Thread(
                    target=self._read, name="baobab-engine-reader", daemon=True
                )
                self._reader.start()

    # ------------------------------------------------------------------ the transport
    def _post(self, message: ToCore) -> None:
        # OSError: the child is gone, and the reader reports it.
        with self._send_lock, contextlib.suppress(OSError):
            self._conn.send(message)

    async def _stopped(self) -> None:
        while self._reader.is_alive():
            await asyncio.sleep(0.01)
        await asyncio.to_thread(self._process.join, 10)
        self._kill()

    def _read(self) -> None:
        while True:
            try:
                message: FromCore = self._conn.recv()
            except (EOFError, OSError):
                if not self._stopping:
                    code = self._process.exitcode
                    self._fail(f"the engine process exited unexpectedly (exit code {code})")
                return
            if isinstance(message, RoundOutput):
                self._receive(message)
            else:
                self._fail(getattr(message, "message", repr(message)))
                return

    def _kill(self) -> None:
        if self._process.is_alive():
            self._process.kill()
        self._process.join(timeout=10)


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
    # The parent drains on SIGINT/SIGTERM and then sends Shutdown; a signal to the whole
    # process group (Ctrl-C) must not kill the engine under the drain.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        if torch.device(config.device).type == "cpu":
            torch.set_num_threads(config.num_threads(weight_bytes(Path(export_dir))))
        core = EngineCore(load_engine(Path(export_dir), config), Path(export_dir))
    except Exception as err:
        conn.send(Failed(f"the model could not be loaded: {err}"))
        return
    conn.send(core.ready())
    try:
        core.run(lambda block: _receive(conn, block), conn.send)
    except (EOFError, BrokenPipeError, ConnectionResetError):  # the parent is gone
        return
    except BaseException as err:
        logger.exception("the engine stopped")
        conn.send(Failed(repr(err)))


def _receive(conn: Connection, block: bool) -> list[ToCore]:
    """Every message that has arrived; ``block``: wait for the first."""
    messages = [conn.recv()] if block else []
    while conn.poll():
        messages.append(conn.recv())
    return messages
