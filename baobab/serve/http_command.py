"""``baobab serve``: load an export and answer the OpenAI-compatible API until SIGTERM.

The server listens at once (``/health`` answers 503 while the model loads). On SIGTERM or
Ctrl-C it stops accepting connections, lets in-flight requests finish for at most
``drain_timeout`` seconds (the engine aborts what is left), and exits 0.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
from pathlib import Path

import uvicorn

from baobab.export.artifact import read_config
from baobab.serve.chat import ChatTemplate
from baobab.serve.config import EngineConfig
from baobab.serve.server import ServerState, build_app

log = logging.getLogger("uvicorn.error")  # shares uvicorn's console handler
API_KEY_ENV = "BAOBAB_API_KEY"


class DrainingServer(uvicorn.Server):
    """uvicorn, plus: the first exit signal starts the engine's drain right away, and a model
    that fails to load stops the server."""

    def __init__(self, config: uvicorn.Config, state: ServerState, drain_timeout: float) -> None:
        super().__init__(config)
        self.state, self.drain_timeout = state, drain_timeout
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)
        asyncio.ensure_future(self._watch_load())

    async def _watch_load(self) -> None:
        while self.state.served is None and self.state.error is None and not self.should_exit:
            await asyncio.sleep(0.05)
        if self.state.served is not None:
            log.info("serving '%s'", self.state.served.model_name)
        elif self.state.error is not None:
            self.should_exit = True

    def handle_exit(self, sig: int, frame) -> None:
        first = not self.should_exit
        super().handle_exit(sig, frame)
        if first and self._loop is not None:
            # Runs in the signal handler: hand the drain to the loop rather than start it here.
            self._loop.call_soon_threadsafe(self.state.drain, self.drain_timeout)


def serve(
    export_dir: str,
    /,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | list[str] | None = None,
    max_queue: int | None = None,
    drain_timeout: float = 30.0,
    engine: EngineConfig = EngineConfig(),  # noqa: B008 (never mutated: replaced below)
    log_level: str = "info",
) -> None:
    """Serve an exported model over an OpenAI-compatible HTTP API.

    Args:
        export_dir: a directory written by ``baobab export`` (a language or image model).
        host: the address to listen on; the default answers this machine only.
        port: the TCP port to listen on.
        api_key: a key clients must send as 'Authorization: Bearer KEY' on every route but
            /health; several with ``--api_key+ K1 --api_key+ K2``. Default: the
            BAOBAB_API_KEY environment variable; unset: no authentication.
        max_queue: requests that may wait for a KV slot; more are answered 429 (default:
            ``engine.max_queue``).
        drain_timeout: on SIGTERM, seconds in-flight requests may take to finish.
        engine: engine options (KV cache, batch sizes, device, ...).
        log_level: uvicorn's log level: critical, error, warning, info, debug or trace.
    """
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be in 0..65535, got {port}")
    if drain_timeout < 0:
        raise ValueError(f"drain_timeout must be >= 0, got {drain_timeout}")
    keys = [api_key] if isinstance(api_key, str) else list(api_key or [])
    if not keys and os.environ.get(API_KEY_ENV):
        keys = [os.environ[API_KEY_ENV]]
    if any(not k for k in keys):
        raise ValueError("api_key must not be empty")
    read_config(export_dir)  # a missing or incomplete export fails here, before listening
    template = ChatTemplate.for_export(export_dir)
    if not isinstance(engine, EngineConfig):  # the CLI hands nested flags over as a namespace
        engine = EngineConfig(**vars(engine))
    # replace() re-runs EngineConfig's validation (max_queue >= 1 among it).
    config = engine if max_queue is None else dataclasses.replace(engine, max_queue=max_queue)

    def load():
        from baobab.serve.loader import load_served_model

        return load_served_model(str(Path(export_dir)), config)

    app = build_app(load, api_keys=keys, chat_template=template, shutdown_timeout=drain_timeout)
    state: ServerState = app.state.baobab
    server = DrainingServer(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level=log_level,
            # A backstop only: the engine's drain ends every stream within drain_timeout.
            timeout_graceful_shutdown=drain_timeout + 5,
        ),
        state,
        drain_timeout,
    )
    # uvicorn re-raises the exit signal once shut down; a no-op handler makes that a clean
    # exit 0 instead of death by SIGTERM.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if state.served is None and state.error is not None:
        raise ValueError(state.error)
