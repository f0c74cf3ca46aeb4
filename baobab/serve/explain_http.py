"""``POST /v1/explain``: check and bound the request, hand it to the engine core, answer
its result (``explain_protocol.py`` has the shapes; ``explain_worker.py`` runs it).

Everything that can be refused is refused here, before the engine sees it, with a 400 of
one sentence: an unknown method, a prompt of no tokens, text longer than the context, and
work (tokens × integration steps, ``baobab.explain.text_work``) above
``EngineConfig.explain_max_work``; a full explanation queue is a 429. What only the
explanation can find (integrated gradients that did not converge, a quantized export) comes
back from the engine as a 400 too.
"""

from __future__ import annotations

import asyncio
import time
import uuid

from fastapi import Request
from fastapi.responses import JSONResponse

from baobab.explain.api import check_methods, text_work
from baobab.explain.types import ExplainError
from baobab.serve import prompts
from baobab.serve.errors import APIError
from baobab.serve.explain_protocol import ExplainRequest
from baobab.serve.handlers import RETRY_AFTER_S, Context, EngineFailure, _run
from baobab.serve.messages import ExplainDone, ExplainSpec
from baobab.serve.types import QueueFullError

_HEALTH_POLL_S = 1.0  # how often a waiting handler checks that the engine is still alive


async def explanation(ctx: Context, req: ExplainRequest, request: Request) -> JSONResponse:
    """POST /v1/explain."""
    arrival, engine = time.monotonic(), ctx.engine
    try:
        methods = check_methods(req.methods)
    except ExplainError as err:
        raise APIError(400, str(err).rstrip("."), param="methods") from None
    spec = ExplainSpec(
        prompt=req.prompt,
        target=req.target,
        completion=req.completion,
        contrast=req.contrast,
        methods=tuple(methods),
        ig_steps=req.ig_steps,
        max_delta=req.max_delta,
        top_k=req.top_k,
    )
    await _check_size(ctx, spec)
    rid = f"explain-{uuid.uuid4().hex}"
    try:
        future = engine.explain(rid, spec)
    except QueueFullError:
        ctx.metrics.rejected("explain_queue_full")
        message = "the server's explanation queue is full; retry shortly"
        raise APIError(
            429, message, code="queue_full", headers={"Retry-After": RETRY_AFTER_S}
        ) from None
    except RuntimeError as err:  # shutting down, or dead
        raise APIError(503, f"{err}; the explanation was not started", code="unavailable") from None
    done = await _run(ctx, request, _answer(ctx, rid, future))
    ctx.metrics.explained(done.kind, time.monotonic() - arrival)
    if done.kind == "invalid":
        raise APIError(400, done.message)
    if done.kind != "ok":  # "aborted": the server is shutting down; "failed": logged there
        raise APIError(503, done.message, code="unavailable")
    body = {"object": "explanation", "model": engine.model_name, **done.result}
    return JSONResponse(body)


async def _check_size(ctx: Context, spec: ExplainSpec) -> None:
    """Refuse (400) text of no tokens, longer than the context, or too much work."""
    engine = ctx.engine
    tok = engine.tokenizer
    prompts.refuse_unfittable([spec.prompt], tok, 1, engine.context_length)  # huge: no encode
    prompt = len(await prompts.off_loop(tok.encode, spec.prompt))
    if prompt == 0:
        raise APIError(400, "'prompt' must hold at least one token", param="prompt")
    follow = spec.target if spec.target is not None else spec.completion
    param = "target" if spec.target is not None else "completion"
    target = 1 if follow is None else len(await prompts.off_loop(tok.encode, follow))
    if follow is not None and target == 0:
        raise APIError(400, f"'{param}' must hold at least one token", param=param)
    if spec.contrast is not None:
        contrast = len(await prompts.off_loop(tok.encode, spec.contrast))
        if contrast == 0:
            raise APIError(400, "'contrast' must hold at least one token", param="contrast")
        target = max(target, contrast)  # each is scored after the same prompt
    if prompt + target > engine.context_length:
        raise APIError(
            400,
            f"the prompt ({prompt} tokens) and the explained text ({target} tokens) do not fit "
            f"in the model's context of {engine.context_length} tokens",
            param="prompt",
            code="context_length_exceeded",
        )
    # A completion's tokens are explained in turn, each after the prompt and those before it.
    in_turn = spec.completion is not None
    work = text_work(prompt, target, spec.ig_steps, in_turn)
    tokens, limit = work // spec.ig_steps, engine.config.explain_max_work
    if work > limit:
        ctx.metrics.rejected("explain_too_large")
        each = f" (over the {target} completion tokens, each explained in turn)"
        raise APIError(
            400,
            f"the explanation asks for {tokens} tokens{each if in_turn else ''} x "
            f"{spec.ig_steps} integration steps = {work} units of work, over this server's "
            f"limit of {limit} (--engine.explain_max_work); shorten the text or lower ig_steps",
            param="ig_steps",
            code="explanation_too_large",
        )


async def _answer(ctx: Context, rid: str, future: asyncio.Future) -> ExplainDone:
    """The engine's answer; cancelled (the client went away): the explanation is aborted."""
    try:
        while True:
            await asyncio.wait({future}, timeout=_HEALTH_POLL_S)
            if future.done():
                break
            if not ctx.engine.healthy:
                raise EngineFailure("the engine stopped while explaining")
        try:
            return future.result()
        except Exception as err:  # EngineDeadError
            raise EngineFailure(str(err)) from None
    finally:
        if not future.done():
            ctx.engine.abort(rid)
