"""The contract between the serving engine and the HTTP layer.

The engine (``engine.py``, ``scheduler.py``, ``kv_cache.py``, ``runner.py``) takes token ids
and :class:`SamplingParams` and produces :class:`RequestOutput` increments; the HTTP layer
(``server.py``) only translates OpenAI requests into these and back (DESIGN principle 7).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "abort"]


class QueueFullError(RuntimeError):
    """The engine cannot admit a request now: ``max_queue`` requests already wait for
    something other than a free sequence slot (see ``EngineClient._admit``); the server
    answers 429."""


class TooManyChoicesError(ValueError):
    """A request asks for more sequences at once (its ``n`` choices) than the engine can ever
    hold, ``max_num_seqs`` running + ``max_queue`` waiting; the server answers 400.

    The message names both numbers; ``param`` names the request field at fault.
    """

    param = "n"

    def __init__(self, n: int, max_num_seqs: int, max_queue: int) -> None:
        self.n, self.capacity = n, max_num_seqs + max_queue
        super().__init__(
            f"n is {n}, but this server holds at most {self.capacity} sequences at once "
            f"({max_num_seqs} running + {max_queue} waiting); ask for n <= {self.capacity}"
        )


class PromptTooLongError(ValueError):
    """prompt tokens + max_tokens exceed the model's context; the server answers 400.

    The message names both numbers and the context length.
    """

    def __init__(self, prompt_tokens: int, max_tokens: int, context: int) -> None:
        self.prompt_tokens, self.max_tokens, self.context = prompt_tokens, max_tokens, context
        super().__init__(
            f"this model's maximum context length is {context} tokens, but the request asks for "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt and "
            f"{max_tokens} for the completion); shorten the prompt or lower max_tokens"
        )


@dataclass
class SamplingParams:
    """How one sequence is sampled. Validated by the HTTP layer's schema; the engine trusts it.

    ``n`` > 1 is handled above the engine: the server submits ``n`` requests, the i-th with
    seed ``seed + i`` when a seed is given.
    """

    max_tokens: int = 16
    temperature: float = 1.0  # 0 is greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None  # same seed + same prompt -> same tokens, whatever else runs
    stop: list[str] = field(default_factory=list)  # stop strings, not included in the text
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False  # benchmarks: always produce max_tokens tokens
    logprobs: int | None = None  # None: no logprobs; k >= 0: sampled token's + top-k
    # None: none; k >= 0: each prompt token's logprob + top-k, on the first output (vLLM's
    # name). With max_tokens 0 the prompt is only scored: nothing is sampled.
    prompt_logprobs: int | None = None
    # Structured output: an llguidance grammar (JSON text, structured.grammar_for) the
    # completion must match; None: free text.
    grammar: str | None = None


@dataclass
class TokenLogprob:
    token_id: int
    token: str  # the token's text (may be a partial UTF-8 piece, shown with replacement chars)
    logprob: float
    top: dict[str, float] = field(default_factory=dict)  # top-k alternatives: text -> logprob


@dataclass
class RequestOutput:
    """One engine step's increment for one request.

    Invariants: the concatenation of ``text`` over a request's outputs is its completion
    text (stop string excluded); ``text`` never ends inside a multi-byte UTF-8 character;
    exactly one output per request has ``finished`` True and it is the last.
    """

    request_id: str
    token_ids: list[int]  # tokens new in this increment
    text: str  # text new in this increment
    finished: bool = False
    finish_reason: FinishReason | None = None
    logprobs: list[TokenLogprob] | None = None  # one per token in token_ids, when asked
    prompt_tokens: int = 0
    completion_tokens: int = 0  # total so far
    # One per prompt token, the first None (nothing precedes it); on a request's first
    # output only, when SamplingParams.prompt_logprobs asks for them.
    prompt_logprobs: list[TokenLogprob | None] | None = None


def merge_outputs(outputs: list[RequestOutput]) -> RequestOutput:
    """Consecutive increments of one request as one increment (the invariants hold): what a
    stream that fell behind sends instead of one event per increment, as vLLM does."""
    last = outputs[-1]
    if len(outputs) == 1:
        return last
    logprobs = [lp for out in outputs for lp in out.logprobs or []]
    return RequestOutput(
        request_id=last.request_id,
        token_ids=[t for out in outputs for t in out.token_ids],
        text="".join(out.text for out in outputs),
        finished=last.finished,
        finish_reason=last.finish_reason,
        logprobs=logprobs if any(out.logprobs is not None for out in outputs) else None,
        prompt_tokens=last.prompt_tokens,
        completion_tokens=last.completion_tokens,
        prompt_logprobs=outputs[0].prompt_logprobs,
    )


@dataclass
class SpecStats:
    """Speculative decoding since start-up: verify steps, tokens proposed, tokens accepted."""

    drafts: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def tokens_per_step(self) -> float:
        """Tokens a verify step emits on average: the accepted ones plus one."""
        return (self.accepted_tokens + self.drafts) / self.drafts if self.drafts else 0.0


@dataclass
class EngineStats:
    """Gauges the server exports on /metrics."""

    running: int  # requests holding KV cache
    waiting: int  # requests queued for admission
    kv_cache_usage: float  # fraction of KV cache blocks/slots in use, 0..1
    kv_cache_blocks_total: int
    kv_cache_blocks_used: int
    # Requests that could start running now, waiting ones first: the free sequence slots
    # (max_num_seqs - running), or, when a waiting request finds no run of free KV-cache
    # blocks, the waiting requests ahead of it. What admission counts as room beside
    # max_queue (see EngineClient._admit); 0 is the safe default (room = max_queue only).
    free_slots: int = 0
    # Prefix caching, since start-up: prompt tokens looked up at admission, and found cached.
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    spec: SpecStats = field(default_factory=SpecStats)
    # /v1/explain: explanations queued or running in the engine core, and those handed
    # over that it has not taken in yet (filled in by EngineClient.stats()).
    explanations: int = 0
