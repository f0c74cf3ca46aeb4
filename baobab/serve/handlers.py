"""Completions and chat completions: OpenAI request -> token ids + SamplingParams -> engine
-> OpenAI response, or server-sent events ``data: {...}\\n\\n`` ending with ``data: [DONE]``.

This module only translates; the engine decides everything about scheduling and sampling.
``n`` choices are ``n`` engine requests (``{id}-{i}``, seed ``seed + i``) whose outputs are
merged as they come. A request whose client goes away, or whose handler is cancelled, is
aborted in the engine (freeing its KV cache) by the ``finally`` of :func:`_merged`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from baobab.serve import prompts
from baobab.serve import protocol as p
from baobab.serve.chat import ChatTemplate, ChatTemplateError
from baobab.serve.errors import APIError, error_body
from baobab.serve.metrics import ServerMetrics
from baobab.serve.structured import UnsupportedSchemaError, grammar_for
from baobab.serve.types import (
    PromptTooLongError,
    QueueFullError,
    RequestOutput,
    SamplingParams,
    TokenLogprob,
    merge_outputs,
)

T = TypeVar("T")
RETRY_AFTER_S = "1"  # a queue slot frees as soon as any request finishes
_HEALTH_POLL_S = 1.0  # how often a waiting handler checks that the engine is still alive
_MIN_TEMPERATURE, _MIN_TOP_P = 1e-5, 1e-6  # see _params


class EngineFailure(Exception):
    """The engine stopped or a stream raised: the server answers 503 and /health turns 503."""


@dataclass
class Context:
    """What a handler needs: the engine and the app's shared pieces."""

    engine: Any  # an AsyncEngine (see baobab.serve.async_engine)
    metrics: ServerMetrics
    chat_template: ChatTemplate
    on_failure: Callable[[str], None]  # marks the server unhealthy


@dataclass
class _Choice:
    """One choice as it accumulates."""

    text: str = ""
    tokens: int = 0
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # echo + logprobs


# ---------------------------------------------------------------- requests -> engine


def _check_ids(ids: list[int], vocab: int, param: str) -> None:
    bad = next((i for i in ids if i >= vocab), None)
    if bad is not None:
        raise APIError(
            400, f"token id {bad} is outside the vocabulary (0..{vocab - 1})", param=param
        )


def _max_tokens(requested: int | None, prompt_tokens: int, context: int) -> int:
    if requested is not None:
        return requested
    if prompt_tokens >= context:  # not even one token fits
        raise _too_long(PromptTooLongError(prompt_tokens, 1, context))
    return context - prompt_tokens


def _too_long(err: PromptTooLongError) -> APIError:
    return APIError(400, str(err), param="max_tokens", code="context_length_exceeded")


def _params(
    req: p._Sampling, ctx: Context, max_tokens: int, logprobs: int | None
) -> SamplingParams:
    stop_ids = list(req.stop_token_ids or [])
    _check_ids(stop_ids, ctx.engine.tokenizer.vocab_size, "stop_token_ids")
    top_k = req.top_k if req.top_k and req.top_k > 0 else 0
    temperature = 1.0 if req.temperature is None else req.temperature
    top_p = 1.0 if req.top_p is None else req.top_p
    return SamplingParams(
        max_tokens=max_tokens,
        # The sampler's float32 math breaks on extreme values (logits / 1e-40 is inf; a top_p
        # of 1e-46 rounds to 0 and drops every token). As in vLLM, a temperature under 1e-5 is
        # greedy; a top_p under 1e-6 keeps only the likeliest token either way.
        temperature=0.0 if temperature < _MIN_TEMPERATURE else temperature,
        top_p=max(top_p, _MIN_TOP_P),
        top_k=min(top_k, ctx.engine.tokenizer.vocab_size),  # a larger k would mean "all" anyway
        seed=req.seed,
        stop=req.stop_list(),
        stop_token_ids=stop_ids,
        ignore_eos=bool(req.ignore_eos),
        logprobs=logprobs,
    )


async def _grammar(req: p._Sampling) -> str | None:
    """The grammar of the request's ``response_format`` (compiled in the tokenizer thread:
    a large schema takes a while), None for text; a 400 naming what llguidance refuses."""
    if req.response_format is None or req.response_format.type == "text":
        return None
    response_format = req.response_format.model_dump(by_alias=True)
    try:
        return await prompts.off_loop(grammar_for, response_format)
    except UnsupportedSchemaError as err:
        raise APIError(400, str(err), param=err.param) from None


def _submit(ctx: Context, rid: str, prompt: list[int], params: SamplingParams, n: int) -> list:
    """Add the ``n`` engine requests of one HTTP request, all or none, in one admission check
    (``EngineClient.add_requests``): a refusal leaves nothing in the engine."""
    choices = []
    for i in range(n):
        seed = None if params.seed is None else (params.seed + i) % p.SEED_MODULUS
        choices.append((f"{rid}-{i}", prompt, dataclasses.replace(params, seed=seed)))
    try:
        streams = ctx.engine.add_requests(choices)
    except BaseException as err:
        raise _admission_error(err, ctx) from None
    ctx.metrics.prompt_tokens(len(prompt) * n)
    return streams


def _admission_error(err: BaseException, ctx: Context) -> BaseException:
    if isinstance(err, PromptTooLongError):
        ctx.metrics.rejected("too_long")
        return _too_long(err)
    if isinstance(err, QueueFullError):
        ctx.metrics.rejected("queue_full")
        message = "the server's request queue is full; retry shortly"
        return APIError(429, message, code="queue_full", headers={"Retry-After": RETRY_AFTER_S})
    if isinstance(err, ValueError):  # TooManyChoicesError names its field: n
        return APIError(400, str(err), param=getattr(err, "param", None))
    if isinstance(err, RuntimeError):  # "the engine is shutting down"
        ctx.metrics.rejected("unavailable")
        return APIError(503, f"{err}; the request was not started", code="unavailable")
    return err


async def _merged(ctx: Context, rid: str, streams: list, arrival: float):
    """(choice index, output) from all streams as they arrive; aborts the unfinished on exit."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream) -> None:
        try:
            async for out in stream:
                queue.put_nowait((i, out))
        except Exception as err:  # the engine failed this request
            queue.put_nowait((i, err))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    open_ = set(range(len(streams)))
    last: dict[int, float] = {}
    try:
        while open_:
            # Not asyncio.wait_for: before Python 3.12 it can swallow a cancellation that
            # arrives as the queue hands over an item, and a cancelled (disconnected)
            # request would then run to the end instead of being aborted.
            getter = asyncio.ensure_future(queue.get())
            try:
                await asyncio.wait({getter}, timeout=_HEALTH_POLL_S)
            finally:
                getter.cancel()  # a no-op once it is done
            if not getter.done() or getter.cancelled():
                if not ctx.engine.healthy:
                    raise EngineFailure("the engine stopped while generating") from None
                continue
            arrived = [getter.result()]
            while not queue.empty():  # fell behind: what waits goes out as one event per choice
                arrived.append(queue.get_nowait())
            for i, out in _coalesced(arrived):
                now = time.monotonic()
                if out.token_ids:
                    if i not in last:
                        ctx.metrics.first_token(now - arrival)
                    ctx.metrics.tokens(len(out.token_ids), now - last[i] if i in last else None)
                    last[i] = now
                if out.finished:
                    open_.discard(i)
                    ctx.metrics.finished(out.finish_reason or "stop", now - arrival)
                yield i, out
    finally:
        # Client gone, handler cancelled or engine failure: free the KV cache now.
        for i in open_:
            ctx.engine.abort(f"{rid}-{i}")
            ctx.metrics.finished("abort", time.monotonic() - arrival)
        for task in tasks:
            task.cancel()


def _coalesced(arrived: list[tuple[int, Any]]) -> list[tuple[int, RequestOutput]]:
    """(choice index, output) pairs that were waiting together, one merged output per
    choice, in order of first arrival; EngineFailure if an engine error is among them (the
    request is lost anyway)."""
    runs: dict[int, list[RequestOutput]] = {}
    for i, out in arrived:
        if isinstance(out, Exception):
            raise EngineFailure(f"the engine failed: {out}") from None
        runs.setdefault(i, []).append(out)
    return [(i, merge_outputs(outs)) for i, outs in runs.items()]


async def _collect(ctx: Context, rid: str, streams: list, arrival: float) -> list[_Choice]:
    choices = [_Choice() for _ in streams]
    async for i, out in _merged(ctx, rid, streams, arrival):
        c = choices[i]
        c.text += out.text
        c.tokens += len(out.token_ids)
        c.logprobs += out.logprobs or []
        if out.prompt_logprobs is not None:
            c.prompt_logprobs = out.prompt_logprobs
        if out.finished:
            c.finish_reason = out.finish_reason
    return choices


async def _unless_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Run ``work``; cancel it (its engine requests are aborted) if the client goes away."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            # cancel() only requests it: until the task has run its cleanup (aborting its
            # engine requests), it is neither cancelled() nor has a result().
            await asyncio.wait({task})
    if task.cancelled():
        raise APIError(400, "the client disconnected before the answer was ready")
    return task.result()


async def _run(ctx: Context, request: Request, work: Coroutine[Any, Any, T]) -> T:
    try:
        return await _unless_disconnected(request, work)
    except EngineFailure as err:
        ctx.on_failure(str(err))
        raise APIError(503, str(err), code="engine_failure") from None


def _sse(body: BaseModel) -> str:
    return f"data: {body.model_dump_json()}\n\n"


def _event_stream(ctx: Context, events: AsyncIterator[str]) -> StreamingResponse:
    async def guarded() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield event
        except EngineFailure as err:
            ctx.on_failure(str(err))  # headers are sent: the error travels as an event
            yield _sse(error_body(503, str(err), code="engine_failure"))
        yield "data: [DONE]\n\n"

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(guarded(), media_type="text/event-stream", headers=headers)


def _usage(prompt: int, completion: int) -> p.Usage:
    return p.Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


# ---------------------------------------------------------------- /v1/completions


def _legacy_logprobs(
    lps: list[TokenLogprob], offset: int, out: p.CompletionLogprobs | None = None
) -> p.CompletionLogprobs:
    """``lps`` in the legacy shape, appended to ``out`` (or a new one); ``offset``: where
    the first token's text starts in the choice's text."""
    out = out or p.CompletionLogprobs()
    for lp in lps:
        out.tokens.append(lp.token)
        out.token_logprobs.append(p.finite(lp.logprob))
        out.top_logprobs.append({t: p.finite(v) for t, v in lp.top.items()})
        out.text_offset.append(offset)
        offset += len(lp.token)
    return out


def _echoed_logprobs(lps: list[TokenLogprob | None], first: str) -> p.CompletionLogprobs:
    """The echoed prompt's logprobs: its first token (text ``first``) has none, as nothing
    precedes it (OpenAI's nulls); the engine scored the others (``lps[1:]``)."""
    out = p.CompletionLogprobs(
        tokens=[first], token_logprobs=[None], top_logprobs=[None], text_offset=[0]
    )
    return _legacy_logprobs(lps[1:], len(first), out)


async def completion(ctx: Context, req: p.CompletionRequest, request: Request):
    """POST /v1/completions."""
    arrival, engine = time.monotonic(), ctx.engine
    tok = engine.tokenizer
    if isinstance(req.prompt, str):
        prompts.refuse_unfittable([req.prompt], tok, req.max_tokens, engine.context_length)
        # An empty prompt starts a document.
        prompt = await prompts.off_loop(tok.encode, req.prompt) or [tok.eot_id]
        prompt_text = req.prompt
    else:
        _check_ids(req.prompt, tok.vocab_size, "prompt")
        prompt, prompt_text = req.prompt, await prompts.off_loop(tok.decode, req.prompt)
    max_tokens = _max_tokens(req.max_tokens, len(prompt), engine.context_length)
    params = _params(req, ctx, max_tokens, req.logprobs)
    first_token = ""
    if req.echo and req.logprobs is not None:  # the prompt's logprobs too
        params = dataclasses.replace(params, prompt_logprobs=req.logprobs)
        first_token = tok.decode(prompt[:1])
    params.grammar = await _grammar(req)
    rid, created, n = f"cmpl-{uuid.uuid4().hex}", int(time.time()), req.n or 1
    streams = _submit(ctx, rid, prompt, params, n)
    prefix = prompt_text if req.echo else ""

    def choice_logprobs(
        lps: list[TokenLogprob], prompt_lps: list | None, offset: int
    ) -> p.CompletionLogprobs | None:
        if req.logprobs is None:
            return None
        if prompt_lps is None:
            return _legacy_logprobs(lps, offset)
        # Offsets run on from the prompt's token texts, as vLLM's do.
        echoed = _echoed_logprobs(prompt_lps, first_token)
        return _legacy_logprobs(lps, sum(map(len, echoed.tokens)), echoed)

    def response(choices: list[p.CompletionChoice], usage: p.Usage | None = None):
        return p.CompletionResponse(
            id=rid, created=created, model=engine.model_name, choices=choices, usage=usage
        )

    if not req.stream:
        done = await _run(ctx, request, _collect(ctx, rid, streams, arrival))
        choices = []
        for i, c in enumerate(done):
            lp = choice_logprobs(c.logprobs, c.prompt_logprobs, len(prefix))
            choices.append(
                p.CompletionChoice(
                    index=i, text=prefix + c.text, logprobs=lp, finish_reason=c.finish_reason
                )
            )
        return response(choices, _usage(len(prompt), sum(c.tokens for c in done)))

    async def events() -> AsyncIterator[str]:
        offsets, generated = [len(prefix)] * n, 0
        echo_pending = [bool(prefix)] * n
        async for i, out in _merged(ctx, rid, streams, arrival):
            generated += len(out.token_ids)
            text = out.text
            if echo_pending[i]:
                text, echo_pending[i] = prefix + text, False
            if not (text or out.finished or out.logprobs or out.prompt_logprobs):
                continue  # the detokenizer holds back a partial character
            # OpenAI streams the echoed prompt, and its logprobs, in a choice's first chunk.
            lp = choice_logprobs(out.logprobs or [], out.prompt_logprobs, offsets[i])
            if lp is not None and lp.tokens:
                offsets[i] = lp.text_offset[-1] + len(lp.tokens[-1])
            reason = out.finish_reason if out.finished else None
            choice = p.CompletionChoice(index=i, text=text, logprobs=lp, finish_reason=reason)
            yield _sse(response([choice]))
        if req.stream_options and req.stream_options.include_usage:
            yield _sse(response([], _usage(len(prompt), generated)))

    return _event_stream(ctx, events())


# ---------------------------------------------------------------- /v1/chat/completions


def _chat_logprobs(lps: list[TokenLogprob]) -> p.ChatLogprobs:
    def top(token: str, logprob: float) -> p.TopLogprob:
        # A piece of a multi-byte character decodes to U+FFFD: its real bytes are unknown here.
        raw = None if "\ufffd" in token else list(token.encode())
        return p.TopLogprob(token=token, logprob=p.finite(logprob), bytes=raw)

    return p.ChatLogprobs(
        content=[
            p.TokenLogprobEntry(
                **top(lp.token, lp.logprob).model_dump(),
                top_logprobs=[top(t, v) for t, v in lp.top.items()],
            )
            for lp in lps
        ]
    )


async def chat_completion(ctx: Context, req: p.ChatCompletionRequest, request: Request):
    """POST /v1/chat/completions."""
    arrival, engine = time.monotonic(), ctx.engine
    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    requested = (
        req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    )
    contents = [m["content"] for m in messages]
    prompts.refuse_unfittable(contents, engine.tokenizer, requested, engine.context_length)
    try:
        # In the tokenizer thread, like every encode here (see prompts.off_loop).
        encode = ctx.chat_template.encode
        prompt = await prompts.off_loop(encode, messages, engine.tokenizer)
    except ChatTemplateError as err:
        raise APIError(400, str(err), param="messages") from None
    if not prompt:
        raise APIError(
            400, "the chat template rendered these messages as an empty prompt", param="messages"
        )
    max_tokens = _max_tokens(requested, len(prompt), engine.context_length)
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    params = _params(req, ctx, max_tokens, logprobs)
    params.grammar = await _grammar(req)
    rid, created, n = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), req.n or 1
    streams = _submit(ctx, rid, prompt, params, n)

    if not req.stream:
        done = await _run(ctx, request, _collect(ctx, rid, streams, arrival))
        return p.ChatCompletionResponse(
            id=rid,
            created=created,
            model=engine.model_name,
            choices=[
                p.ChatChoice(
                    index=i,
                    message=p.AssistantMessage(content=c.text),
                    logprobs=_chat_logprobs(c.logprobs) if req.logprobs else None,
                    finish_reason=c.finish_reason,
                )
                for i, c in enumerate(done)
            ],
            usage=_usage(len(prompt), sum(c.tokens for c in done)),
        )

    def chunk(choices: list[p.ChatChunkChoice], usage: p.Usage | None = None) -> str:
        return _sse(
            p.ChatCompletionChunk(
                id=rid, created=created, model=engine.model_name, choices=choices, usage=usage
            )
        )

    async def events() -> AsyncIterator[str]:
        for i in range(n):  # OpenAI opens each choice with its role
            yield chunk(
                [p.ChatChunkChoice(index=i, delta=p.ChatDelta(role="assistant", content=""))]
            )
        generated = 0
        async for i, out in _merged(ctx, rid, streams, arrival):
            generated += len(out.token_ids)
            if not (out.text or out.finished or out.logprobs):
                continue
            choice = p.ChatChunkChoice(
                index=i,
                delta=p.ChatDelta(content=out.text),
                logprobs=_chat_logprobs(out.logprobs or []) if req.logprobs else None,
                finish_reason=out.finish_reason if out.finished else None,
            )
            yield chunk([choice])
        if req.stream_options and req.stream_options.include_usage:
            yield chunk([], _usage(len(prompt), generated))

    return _event_stream(ctx, events())
