"""HTTP errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

Every refusal the server makes goes through :class:`APIError` (or the handlers in
``server.py`` that translate FastAPI's own errors), so no client ever sees another shape.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

from baobab.serve.protocol import ErrorDetail, ErrorResponse

# status -> (OpenAI error type, what the status means here); also the documented responses.
ERROR_TYPES = {
    400: ("invalid_request_error", "The request is malformed or asks for something impossible."),
    401: ("authentication_error", "A valid 'Authorization: Bearer KEY' header is missing."),
    404: ("not_found_error", "No such model or route."),
    405: ("invalid_request_error", "The route does not take this method."),
    408: ("invalid_request_error", "The request's headers and body took too long to arrive."),
    413: ("invalid_request_error", "The request body is larger than the server's limit."),
    429: ("rate_limit_error", "The engine's queue is full; retry after Retry-After seconds."),
    503: ("service_unavailable", "The model is loading, the engine stopped, or it is draining."),
}


class APIError(Exception):
    """A refusal with its status; the app's handler turns it into the OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param, self.code, self.headers)


def printable(text: str) -> str:
    """``text`` as UTF-8 can carry it: a lone surrogate (JSON's ``"\\udfff"``) becomes the six
    characters ``\\udfff``. Everything an error echoes from a request goes through here."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def quoted(value: str, limit: int = 80) -> str:
    """``'value'`` for an error message: printable, and cut to ``limit`` characters."""
    cut = value if len(value) <= limit else value[:limit] + "..."
    return f"'{printable(cut)}'"


def error_body(status: int, message: str, param: str | None = None, code: str | None = None):
    kind = ERROR_TYPES.get(status, ("server_error", ""))[0]
    param = None if param is None else printable(param)
    detail = ErrorDetail(message=printable(message), type=kind, param=param, code=code)
    return ErrorResponse(error=detail)


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """The JSON response of one error."""
    body = error_body(status, message, param, code).model_dump()
    return JSONResponse(body, status_code=status, headers=headers)


def documented(*statuses: int) -> dict[int | str, dict]:
    """The ``responses=`` entry that puts these error statuses into /openapi.json."""
    return {s: {"model": ErrorResponse, "description": ERROR_TYPES[s][1]} for s in statuses}
