"""The engine core on a background thread, for asyncio servers (``separate_process=False``).

All torch work runs on one engine thread, so the event loop only ever waits on queues. The
client side (admission, streams, gauges) is :class:`~baobab.serve.client.EngineClient`;
the thread runs :class:`~baobab.serve.engine_core.EngineCore` rounds over an inbox of
messages and hands each round's output straight to ``EngineClient._receive``: the same
round as the engine process, with a list instead of a pipe.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import threading
import weakref
from pathlib import Path

from baobab.serve.client import EngineClient, EngineDeadError, RequestStream
from baobab.serve.engine import Engine
from baobab.serve.engine_core import EngineCore
from baobab.serve.messages import Shutdown, ToCore

# Re-exported: ``baobab.serve.async_engine`` has always named them.
__all__ = ["AsyncEngine", "EngineClient", "EngineDeadError", "RequestStream"]

logger = logging.getLogger(__name__)


class AsyncEngine(EngineClient):
    """An :class:`Engine` driven by an :class:`EngineCore` on a background thread."""

    def __init__(self, engine: Engine, model_name: str, export_dir: Path | None = None) -> None:
        """``export_dir``: the export ``engine`` was loaded from, whose unquantized model
        answers ``/v1/explain`` (without it explanations are refused)."""
        self.core = EngineCore(engine, export_dir)
        super().__init__(model_name, engine.tokenizer, engine.config, self.core.ready())
        self._inbox: list[ToCore] = []  # under _lock; the thread takes it whole each round
        self._wake = threading.Event()  # set after every post
        self._thread: threading.Thread | None = None

    @property
    def engine(self) -> Engine:
        """The engine the thread steps (only that thread may call into it once started)."""
        return self.core.engine

    def start(self) -> None:
        """Start the engine thread (idempotent)."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="baobab-engine", daemon=True)
                self._thread.start()
                atexit.register(_stop_at_exit, weakref.ref(self))

    # ------------------------------------------------------------------ the transport
    def _post(self, message: ToCore) -> None:
        with self._lock:
            self._inbox.append(message)
        self._wake.set()  # messages posted before start() wait for it

    def _running(self) -> bool:
        return self._thread is not None

    async def _stopped(self) -> None:
        while self._thread.is_alive():
            await asyncio.sleep(0.01)

    # ------------------------------------------------------------------ the engine thread
    def _run(self) -> None:
        try:
            self.core.run(self._take, self._receive)
        except BaseException as err:  # reported to every stream, then the thread ends
            logger.exception("the engine thread stopped")
            self._fail(repr(err))

    def _take(self, block: bool) -> list[ToCore]:
        """The messages posted since the last round; ``block``: wait for at least one."""
        while True:
            with self._lock:
                if self._inbox or not block:
                    taken, self._inbox = self._inbox, []
                    return taken
                # Cleared under the lock: a post after this check sets it again after.
                self._wake.clear()
            self._wake.wait()


def _stop_at_exit(ref: weakref.ref) -> None:
    """Stop a still-running engine thread before the interpreter tears torch down under it."""
    engine = ref()
    if engine is not None and engine._thread is not None and engine._thread.is_alive():
        engine._post(Shutdown())
        engine._thread.join(timeout=10)
