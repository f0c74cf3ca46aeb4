"""``baobab serve``: load an export and answer the OpenAI-compatible API until SIGTERM.

The server listens at once (``/health`` answers 503 while the model loads). On SIGTERM or
Ctrl-C it stops accepting connections, lets in-flight requests finish for at most
``drain_timeout`` seconds (the engine aborts what is left), and exits 0. A request's body is
limited to ``max_body_mib`` and must arrive, headers and body, within ``request_timeout``
seconds (``limits.py``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import signal
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from baobab.export.artifact import read_config
from baobab.serve.chat import ChatTemplate
from baobab.serve.config import EngineConfig
from baobab.serve.limits import DEFAULT_MAX_BODY_MIB, DEFAULT_REQUEST_TIMEOUT_S, MIB, timed_protocol
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


def server_config(
    app: FastAPI,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    drain_timeout: float = 30.0,
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S,
) -> uvicorn.Config:
    """uvicorn's configuration for ``app`` as ``baobab serve`` runs it (tests use it too)."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        http=timed_protocol(request_timeout),  # h11, with a deadline on each request
        # A backstop only: the engine's drain ends every stream within drain_timeout.
        timeout_graceful_shutdown=drain_timeout + 5,
    )


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
    max_body_mib: float = DEFAULT_MAX_BODY_MIB,
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S,
) -> None:
    """Serve an exported model over an OpenAI-compatible HTTP API.

    Args:
        export_dir: a directory written by ``baobab export`` (a language or image model), or
            a registry name, ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` (pulled into
            the cache and verified first).
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
        max_body_mib: request bodies larger than this many MiB are answered 413 (a chat
            message's content and a prompt are also capped at 1,000,000 characters).
        request_timeout: seconds a client has to send a request's headers and body, from its
            first byte (or from connecting); a slower one gets 408 and is disconnected.
    """
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be in 0..65535, got {port}")
    if drain_timeout < 0:
        raise ValueError(f"drain_timeout must be >= 0, got {drain_timeout}")
    if not (max_body_mib > 0 and math.isfinite(max_body_mib)):
        raise ValueError(f"max_body_mib must be a number of MiB > 0, got {max_body_mib}")
    if not (request_timeout > 0 and math.isfinite(request_timeout)):
        raise ValueError(f"request_timeout must be a number of seconds > 0, got {request_timeout}")
    keys = [api_key] if isinstance(api_key, str) else list(api_key or [])
    if not keys and os.environ.get(API_KEY_ENV):
        keys = [os.environ[API_KEY_ENV]]
    if any(not k for k in keys):
        raise ValueError("api_key must not be empty")
    if export_dir.startswith("models:/"):
        from baobab.registry import resolve_model_dir

        export_dir = str(resolve_model_dir(export_dir))  # a tampered blob is refused here
    read_config(export_dir)  # a missing or incomplete export fails here, before listening
    template = ChatTemplate.for_export(export_dir)
    if not isinstance(engine, EngineConfig):  # the CLI hands nested flags over as a namespace
        engine = EngineConfig(**vars(engine))
    # replace() re-runs EngineConfig's validation (max_queue >= 1 among it).
    config = engine if max_queue is None else dataclasses.replace(engine, max_queue=max_queue)

    def load():
        from baobab.serve.launch import load_served_model

        return load_served_model(str(Path(export_dir)), config)

    app = build_app(
        load,
        api_keys=keys,
        chat_template=template,
        shutdown_timeout=drain_timeout,
        max_body_bytes=int(max_body_mib * MIB),
    )
    state: ServerState = app.state.baobab
    uv_config = server_config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        drain_timeout=drain_timeout,
        request_timeout=request_timeout,
    )
    server = DrainingServer(uv_config, state, drain_timeout)
    # uvicorn re-raises the exit signal once shut down; a no-op handler makes that a clean
    # exit 0 instead of death by SIGTERM.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if state.served is None and state.error is not None:
        raise ValueError(state.error)
