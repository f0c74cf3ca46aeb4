"""Limits on what one HTTP request may cost the server before a handler runs.

- :class:`BodyLimit` (ASGI): a body larger than ``max_bytes`` is answered 413, decided from
  ``Content-Length`` before a byte of the body is read, or while a chunked body streams in;
  at most ``max_bytes`` of a body is ever held. The rest of a refused body is read and
  dropped by uvicorn (bounded by the request timeout below), so the client reads the 413.
- :func:`timed_protocol` (uvicorn): a connection must deliver each request, headers and
  body, within ``request_timeout`` seconds of its first byte (the first request: of the
  connection's opening). uvicorn has no header-read timeout, and its keep-alive timer is
  cancelled by every byte received, so without this a client sending one byte a second
  holds a connection forever. Past the deadline the server answers 408 when it can and
  closes the connection; a request whose body was late is seen by the app as a disconnect.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from baobab.serve.errors import error_body, error_response

log = logging.getLogger("baobab.serve")

# Room for ~6 MB of base64 images, or a prompt of 1,000,000 characters (protocol.py's cap)
# unless most of them are multi-byte or JSON-escaped.
DEFAULT_MAX_BODY_MIB = 8.0
DEFAULT_REQUEST_TIMEOUT_S = 30.0
MIB = 1 << 20


def _mib(n: int) -> str:
    return f"{n / MIB:g} MiB"


class BodyLimit:
    """ASGI layer: reads a request's body (at most ``max_bytes``) before the app runs, and
    answers 413 in OpenAI's error shape beyond it. ``on_refused`` is told of each 413."""

    def __init__(self, app, max_bytes: int, on_refused: Callable[[], None] = lambda: None):
        self.app, self.max_bytes, self.on_refused = app, max_bytes, on_refused

    async def _too_large(self, scope, receive, send) -> None:
        self.on_refused()
        message = (
            f"the request body is larger than this server's limit of {_mib(self.max_bytes)} "
            "(baobab serve --max_body_mib)"
        )
        await error_response(413, message, code="request_too_large")(scope, receive, send)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"").strip()
        if declared.isdigit() and int(declared) > self.max_bytes:  # h11 refused malformed ones
            return await self._too_large(scope, receive, send)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left (or sent too slowly): nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                chunks.clear()
                return await self._too_large(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        chunks.clear()

        async def replay():
            # The whole body in one message, then the connection's own events (disconnect).
            nonlocal body
            if body is None:
                return await receive()
            message, body = {"type": "http.request", "body": body, "more_body": False}, None
            return message

        await self.app(scope, replay, send)


def _raw_408(timeout: float) -> bytes:
    message = (
        f"the request was not received within {timeout:g} s of its first byte "
        "(baobab serve --request_timeout)"
    )
    body = error_body(408, message, code="request_timeout").model_dump_json().encode()
    head = (
        "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on receiving each request (see module doc).

    The timer runs while the client owes bytes of a request: from the connection's opening
    until its first request is complete, then from the first byte of each later request
    until that request is complete. Between requests uvicorn's keep-alive timeout applies.
    """

    request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._request_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._settle()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may start the next (pipelined) request
        self._settle()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._request_timer is None:
            self._request_timer = self.loop.call_later(self.request_timeout, self._expired)

    def _disarm(self) -> None:
        if self._request_timer is not None:
            self._request_timer.cancel()
            self._request_timer = None

    def _settle(self) -> None:
        """Keep the timer while a request is partly received, stop it otherwise."""
        state = self.conn.their_state
        partial_head = state is h11.IDLE and bool(self.conn.trailing_data[0])
        if partial_head or state is h11.SEND_BODY:
            self._arm()
        else:  # DONE (all received), IDLE with nothing buffered, MUST_CLOSE, CLOSED, ERROR
            self._disarm()

    def _expired(self) -> None:
        self._request_timer = None
        if self.transport.is_closing():
            return
        log.info("closing a connection that sent a request too slowly (%s)", self.client)
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete and not cycle.response_started:
            # The app waits for the body, which never comes: its receive() now says
            # http.disconnect and whatever it sends is dropped.
            cycle.disconnected = True
            cycle.message_event.set()
        if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):  # no response begun: 408 fits
            self.transport.write(_raw_408(self.request_timeout))
        self.transport.close()


def timed_protocol(request_timeout: float) -> type[TimedH11Protocol]:
    """The uvicorn ``http`` protocol class with this request timeout (seconds, > 0)."""
    if not request_timeout > 0:
        raise ValueError(f"request_timeout must be > 0 seconds, got {request_timeout}")
    return type("TimedH11Protocol", (TimedH11Protocol,), {"request_timeout": request_timeout})
