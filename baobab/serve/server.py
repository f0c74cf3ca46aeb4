"""The OpenAI-compatible HTTP API over a served model (FastAPI).

:func:`build_app` wraps an ``AsyncEngine`` (text generation) or an ``AsyncClassifier``
(images), or a function that loads one: the app starts answering at once, ``/health`` says
503 until the model is loaded, and the load runs in a thread. Routes:

=========================  ===============================================================
``GET /health``            200 ``{"status": "ok"}``; 503 while loading, draining or dead
                           (every GET route also answers HEAD: the same status, no body)
``GET /metrics``           Prometheus text format (see ``metrics.py``)
``GET /v1/models``         the served model
``POST /v1/completions``   text completion, streamed or not (``handlers.py``)
``POST /v1/chat/completions``  chat completion through the chat template (``chat.py``)
``POST /v1/classify``      image classification (image models)
``POST /v1/explain``       why the model gives a text after a prompt: token attributions,
                           attention maps, logit lens (language models; ``explain_http.py``)
=========================  ===============================================================

Every error has OpenAI's shape (``errors.py``); with API keys set, every route but
``/health`` needs ``Authorization: Bearer KEY``. Nothing answers a bare 500: an unexpected
exception is logged and answered 503 in the error shape. A body over ``max_body_bytes`` is
answered 413 with no more than that held (``limits.py``); prompts are tokenized off the
event loop (``prompts.py``), so ``/health`` and running streams keep their latency.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import hmac
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from baobab.serve import explain_http, handlers
from baobab.serve import protocol as p
from baobab.serve.chat import ChatTemplate
from baobab.serve.errors import APIError, documented, error_response, quoted
from baobab.serve.explain_protocol import ExplainRequest, ExplainResponse
from baobab.serve.limits import DEFAULT_MAX_BODY_MIB, MIB, BodyLimit
from baobab.serve.metrics import ServerMetrics

log = logging.getLogger("baobab.serve")

Served = Any  # an AsyncEngine or an AsyncClassifier (baobab.serve.async_engine / classifier)


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _sse(chunk: str) -> dict:
    """The ``text/event-stream`` entry of a streaming route: the schema of one event (OpenAPI
    before 3.2), whose ``data`` is a JSON chunk, an error, or ``[DONE]`` (the last event)."""
    payload = {
        "type": "string",
        "contentMediaType": "application/json",
        "contentSchema": {"anyOf": [_ref(chunk), _ref("ErrorResponse")]},
    }
    event = {
        "type": "object",
        "required": ["data"],
        "properties": {"data": {"anyOf": [{"const": "[DONE]"}, payload]}},
    }
    return {"text/event-stream": {"schema": event}}


def _with_stream_schemas(app: FastAPI) -> None:
    """/openapi.json also describes the streamed chunks (models no route returns directly)."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, summary=app.summary, routes=app.routes
            )
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            # Invalid requests are answered 400 (as OpenAI does), never FastAPI's 422.
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            for unused in ("HTTPValidationError", "ValidationError"):
                components.pop(unused, None)
            for model in (p.ChatCompletionChunk, p.CompletionResponse, p.ErrorResponse):
                described = model.model_json_schema(
                    ref_template="#/components/schemas/{model}", mode="serialization"
                )
                for name, definition in described.pop("$defs", {}).items():
                    components.setdefault(name, definition)
                components.setdefault(model.__name__, described)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


class ServerState:
    """What the app serves, and whether it can: loading, ready, draining or failed."""

    def __init__(self, chat_template: ChatTemplate) -> None:
        self.served: Served | None = None
        self.error: str | None = None  # load failure or engine failure
        self.draining = False
        self.chat_template = chat_template
        self.created = int(time.time())
        self.metrics = ServerMetrics(self._stats)
        self._drain: asyncio.Future | None = None

    def _stats(self):
        served = self.served
        if served is None or not hasattr(served, "stats"):
            return None
        return served.model_name, served.stats()

    def set_served(self, served: Served) -> None:
        served.start()  # from the event loop, as the engine contract asks
        self.served = served
        self.metrics.bind(served.model_name)

    def fail(self, message: str) -> None:
        log.error("serving failed: %s", message)
        self.error = message

    def unavailable(self) -> str | None:
        """Why the server cannot serve now, or None when it can."""
        if self.error is not None:
            return self.error
        if self.served is None:
            return "the model is still loading"
        if self.draining:
            return "the server is shutting down"
        if not self.served.healthy:
            return "the engine has stopped"
        return None

    def ready(self, model: str | None, kind: str) -> Served:
        """The served model for a request naming ``model`` that needs ``kind`` of model."""
        reason = self.unavailable()
        if reason is not None:
            raise APIError(503, reason, code="unavailable", headers={"Retry-After": "5"})
        served = self.served
        if model and model != served.model_name:  # None or "": the served model
            raise APIError(
                404,
                f"the model {quoted(model)} does not exist; this server serves "
                f"'{served.model_name}'",
                param="model",
                code="model_not_found",
            )
        generates = hasattr(served, "add_request")
        if kind == "generate" and not generates:
            raise APIError(
                400, f"the model '{served.model_name}' classifies images; use POST /v1/classify"
            )
        if kind == "explain" and not generates:
            raise APIError(
                400,
                f"the model '{served.model_name}' classifies images; explanations over HTTP "
                "are for language models (use baobab explain for image models)",
            )
        if kind == "classify" and generates:
            raise APIError(
                400, f"the model '{served.model_name}' generates text; it does not classify images"
            )
        return served

    def drain(self, timeout: float) -> asyncio.Future:
        """Stop accepting and let in-flight requests finish for ``timeout`` s (idempotent)."""
        if self._drain is None:
            self.draining = True
            served = self.served
            if served is not None:
                self._drain = asyncio.ensure_future(served.shutdown(timeout))
            else:
                self._drain = asyncio.get_running_loop().create_future()
                self._drain.set_result(None)
        return self._drain


class _Guard:
    """Outermost ASGI layer: API-key check, HEAD answered as GET without a body, and no
    exception ever escapes as a bare 500."""

    def __init__(self, app, api_keys: Sequence[str]) -> None:
        self.app = app
        self.keys = [k.encode() for k in api_keys]

    def _authorized(self, scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, key = header.partition(b" ")
        ok = False
        for k in self.keys:  # every key compared, in constant time, whatever matches
            ok |= hmac.compare_digest(key.strip(), k)
        return ok and scheme.lower() == b"bearer"

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.keys and scope["path"] != "/health" and not self._authorized(scope):
            message = "a valid API key is required: send the header 'Authorization: Bearer KEY'"
            response = error_response(
                401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
            )
            return await response(scope, receive, send)
        if scope["method"] == "HEAD":  # uvicorn drops the body: it still sees HEAD
            scope = {**scope, "method": "GET"}
        started = False

        async def send_tracking(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_tracking)
        except Exception:  # logged once here; the app's handler already answered when it could
            log.exception("request %s %s failed", scope.get("method"), scope.get("path"))
            if not started:
                await _internal_error()(scope, receive, send)


def _internal_error() -> JSONResponse:
    return error_response(
        503, "the server failed on this request; it has been logged", code="internal_error"
    )


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "function-before"}


def _is_field(part: str | int) -> bool:
    return isinstance(part, int) or (part.isidentifier() and part not in _TYPE_TAGS)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    err = exc.errors()[0]
    if err.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    # Union members add tags ("str", "list[int]", "constrained-str") to the path: drop them.
    loc = [str(x) for x in err.get("loc", ())[1:] if _is_field(x)]
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    if not loc:
        if err.get("type") in ("model_attributes_type", "dict_type", "missing"):
            return "the request body must be a JSON object (Content-Type: application/json)", None
        return msg, (err.get("ctx") or {}).get("param")  # a model validator names its field
    param = ".".join(loc)
    return f"'{param}' is invalid: {msg}", param


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        messages = {404: f"there is no route {request.url.path}", 405: "method not allowed"}
        message = messages.get(exc.status_code, str(exc.detail))
        return error_response(exc.status_code, message, headers=exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        return _internal_error()


def build_app(
    served: Served | Callable[[], Served],
    *,
    api_keys: Sequence[str] = (),
    chat_template: ChatTemplate | None = None,
    shutdown_timeout: float = 30.0,
    max_body_bytes: int = int(DEFAULT_MAX_BODY_MIB * MIB),
) -> FastAPI:
    """The FastAPI app serving ``served``, or what the function ``served`` returns once it has
    loaded it (in a thread, while ``/health`` answers 503).

    Args:
        served: an AsyncEngine or AsyncClassifier, or a function that loads one.
        api_keys: accepted bearer keys; empty: no authentication.
        chat_template: how /v1/chat/completions renders messages (default: ``chat.py``'s).
        shutdown_timeout: at app shutdown, seconds in-flight requests may take to finish.
        max_body_bytes: larger request bodies are answered 413 (see ``limits.py``).
    """
    state = ServerState(chat_template or ChatTemplate())

    async def load() -> None:
        try:
            model = await asyncio.to_thread(served) if callable(served) else served
            state.set_served(model)
        except Exception as err:
            said, lead = str(err), "the model could not be loaded"  # the engine process's
            state.fail(said if said.startswith(lead) else f"{lead}: {said}")  # says it already

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        loading = asyncio.ensure_future(load())
        yield
        if not loading.done():
            loading.cancel()
        with contextlib.suppress(Exception):
            await state.drain(shutdown_timeout)

    app = FastAPI(
        title="baobab",
        summary="An OpenAI-compatible API over a baobab export.",
        version="1",
        lifespan=lifespan,
    )
    app.state.baobab = state
    _add_error_handlers(app)
    _add_routes(app, state)
    _with_stream_schemas(app)
    refused = functools.partial(state.metrics.rejected, "body_too_large")
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes, on_refused=refused)
    app.add_middleware(_Guard, api_keys=list(api_keys))  # outermost: before the body is read
    return app


def _context(state: ServerState, model: str | None, kind: str = "generate") -> handlers.Context:
    return handlers.Context(
        engine=state.ready(model, kind),
        metrics=state.metrics,
        chat_template=state.chat_template,
        on_failure=state.fail,
    )


def _add_routes(app: FastAPI, state: ServerState) -> None:
    v1 = documented(400, 401, 404, 413, 429, 503)

    @app.get("/health", responses=documented(503))
    async def health() -> p.HealthResponse:
        """200 when the model is loaded and the engine runs; 503 otherwise."""
        reason = state.unavailable()
        if reason is not None:
            raise APIError(503, reason, code="unavailable")
        return p.HealthResponse()

    @app.get(
        "/metrics",
        response_class=Response,
        responses={
            200: {"content": {"text/plain": {"schema": {"type": "string"}}}},
            **documented(401),
        },
    )
    async def metrics() -> Response:
        """Prometheus metrics, every series labelled with the model name."""
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", responses=documented(401, 503))
    async def list_models() -> p.ModelList:
        """The served model."""
        served = state.ready(None, "any")
        card = p.ModelCard(
            id=served.model_name,
            created=state.created,
            max_model_len=getattr(served, "context_length", None),
        )
        return p.ModelList(data=[card])

    @app.post(
        "/v1/completions",
        response_model=p.CompletionResponse,
        responses={200: {"content": _sse("CompletionResponse")}, **v1},
    )
    async def completions(req: p.CompletionRequest, request: Request):
        """Continue a prompt (text or token ids); ``stream`` answers with server-sent events."""
        return await handlers.completion(_context(state, req.model), req, request)

    @app.post(
        "/v1/chat/completions",
        response_model=p.ChatCompletionResponse,
        responses={200: {"content": _sse("ChatCompletionChunk")}, **v1},
    )
    async def chat_completions(req: p.ChatCompletionRequest, request: Request):
        """Answer a conversation, rendered through the model's chat template."""
        return await handlers.chat_completion(_context(state, req.model), req, request)

    @app.post("/v1/explain", response_model=ExplainResponse, responses=v1)
    async def explain(req: ExplainRequest, request: Request):
        """Explain why the model gives ``target`` (or its own next token, or each token of a
        ``completion``) after ``prompt``: per-token attributions, attention maps and a logit
        lens, the JSON of ``baobab explain`` (extension). Run inside the engine between
        decode steps; its work is bounded (tokens x ig_steps) and its queue too (429)."""
        return await explain_http.explanation(_context(state, req.model, "explain"), req, request)

    @app.post("/v1/classify", responses=v1)
    async def classify(req: p.ClassifyRequest) -> p.ClassifyResponse:
        """Classify images (image models): the top_k labels of each, most likely first."""
        classifier = state.ready(req.model, "classify")
        start = time.monotonic()
        images = [_decode_image(i, data) for i, data in enumerate(req.images)]
        top_k = min(req.top_k, len(classifier.labels))
        try:
            results = await classifier.classify(images, top_k)
        except ValueError as err:
            raise APIError(400, str(err), param="images") from None
        except RuntimeError as err:  # "the classifier is shutting down"
            raise APIError(503, str(err), code="unavailable") from None
        state.metrics.classified(len(images), time.monotonic() - start)
        return p.ClassifyResponse(
            id=f"cls-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=classifier.model_name,
            data=[
                p.Classification(
                    index=i, labels=[p.LabelScore(label=lab, score=s) for lab, s in ranked]
                )
                for i, ranked in enumerate(results)
            ],
        )


def _decode_image(index: int, data: str) -> bytes:
    if data.startswith("data:"):  # data:image/png;base64,....
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if not raw:
        raise APIError(400, f"images[{index}] is not base64-encoded image data", param="images")
    return raw
