"""Request and response bodies of the OpenAI-compatible HTTP API, as pydantic models.

Requests are parsed strictly (no "1" for 1, no NaN) and every range is in the schema, so
``/openapi.json`` states exactly what the server accepts and answers; out-of-range values
are refused with a 400 before anything reaches the engine. Fields that OpenAI defines but
this server does not implement are refused when set to a non-default value rather than
silently ignored (see :data:`UNSUPPORTED`). Extensions beyond OpenAI follow vLLM's names
(``top_k``, ``ignore_eos``, ``stop_token_ids``).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

MAX_N = 16  # choices per request
MAX_LOGPROBS = 20  # alternatives per token
MAX_STOP = 4  # stop strings per request (OpenAI's limit)
MAX_IMAGES = 64  # images per classification request
SEED_MODULUS = 2**63  # seeds live in [0, 2**63); choice i uses (seed + i) % 2**63

# Fields of the OpenAI API this server does not implement, with the value that means "unset".
UNSUPPORTED: dict[str, Any] = {
    "suffix": None,
    "best_of": 1,
    "logit_bias": {},
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "tools": [],
    "functions": [],
    "response_format": None,
}


def _refused(param: str, message: str) -> PydanticCustomError:
    """A whole-request validation error that still names the field (the 400's ``param``)."""
    return PydanticCustomError("refused", message, {"param": param})


class _Request(BaseModel):
    # Strict: a string is not a number and a number is not a bool; extra fields are kept so
    # that UNSUPPORTED ones can be refused by name, the rest are ignored like OpenAI does.
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="allow")

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> _Request:
        for name, value in (self.model_extra or {}).items():
            if name in UNSUPPORTED and value not in (UNSUPPORTED[name], None):
                raise _refused(name, f"'{name}' is not supported by this server")
        return self


def _integral(value: Any) -> Any:
    # JSON Schema counts 3.0 as an integer; strict pydantic would not. Strings stay refused.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _int(**bounds: int) -> Any:
    """An integer type within ``bounds`` (ge, le, lt) that accepts integral floats."""
    return Annotated[int, Field(**bounds), BeforeValidator(_integral)]


NonNegInt = _int(ge=0)
StopString = Annotated[str, Field(min_length=1)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = Field(
        False, description="Send a last chunk with usage and no choices before [DONE]."
    )


class _Sampling(_Request):
    """Sampling fields shared by completions and chat completions."""

    model: str | None = Field(
        None,
        description="The served model's id (GET /v1/models); omitted or empty: the served model.",
    )
    temperature: float | None = Field(1.0, ge=0, le=2, description="0 is greedy.")
    top_p: float | None = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: _int(ge=-1, le=1_000_000) | None = Field(
        0, description="Keep the k most likely tokens; 0 or -1: all."
    )
    n: _int(ge=1, le=MAX_N) | None = Field(1, description="Number of choices to generate.")
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)] | None = Field(
        None, description="Up to 4 strings that end the completion (not included in the text)."
    )
    stop_token_ids: Annotated[list[NonNegInt], Field(max_length=64)] | None = Field(
        None, description="Token ids that end the completion (extension)."
    )
    seed: _int(ge=0, lt=SEED_MODULUS) | None = Field(
        None,
        description="Same seed and request give the same choices; choice i uses seed + i.",
    )
    stream: bool | None = Field(False, description="Answer with server-sent events.")
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = Field(
        False, description="Keep generating past the end-of-text token (benchmarks; extension)."
    )
    user: str | None = None

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_Sampling):
    """POST /v1/completions."""

    prompt: (
        Annotated[str, Field(max_length=1_000_000)]
        | Annotated[list[NonNegInt], Field(min_length=1, max_length=1_000_000)]
    ) = Field(description="The text to continue, or its token ids.")
    max_tokens: _int(ge=1) | None = Field(16, description="At most this many new tokens.")
    logprobs: _int(ge=0, le=MAX_LOGPROBS) | None = Field(
        None, description="Return the sampled token's and k alternatives."
    )
    echo: bool | None = Field(False, description="Prepend the prompt to each choice's text.")

    @model_validator(mode="after")
    def _echo_logprobs(self) -> CompletionRequest:
        if self.echo and self.logprobs is not None:
            raise _refused(
                "echo", "'echo' with 'logprobs' is not supported: prompt logprobs are not computed"
            )
        return self


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = Field(description="Text, or a list of text parts.")
    name: str | None = Field(None, description="Accepted and ignored.")

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=10_000)]
    max_tokens: _int(ge=1) | None = Field(
        None, description="At most this many new tokens (default: the rest of the context)."
    )
    max_completion_tokens: _int(ge=1) | None = Field(None, description="Same as max_tokens.")
    logprobs: bool | None = Field(False, description="Return the sampled tokens' logprobs.")
    top_logprobs: _int(ge=0, le=MAX_LOGPROBS) | None = Field(
        None, description="Alternatives per token; needs logprobs."
    )

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise _refused("top_logprobs", "'top_logprobs' needs 'logprobs' set to true")
        return self


class ClassifyRequest(_Request):
    """POST /v1/classify (extension): classify base64-encoded images."""

    model: str | None = None
    images: Annotated[
        list[Annotated[str, Field(max_length=20_000_000)]],
        Field(min_length=1, max_length=MAX_IMAGES),
    ] = Field(description="Encoded images (PNG, JPEG, ...) as base64 or data: URLs.")
    top_k: _int(ge=1, le=1000) = Field(5, description="Labels per image, most likely first.")


# ---------------------------------------------------------------- responses


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "baobab"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """The legacy completions shape: parallel lists, one entry per generated token."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


FinishReason = Literal["stop", "length", "abort"]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class CompletionResponse(BaseModel):
    """A completion; streamed chunks have the same shape with partial text."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprobEntry(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[TokenLogprobEntry] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class LabelScore(BaseModel):
    label: str
    score: float = Field(description="Probability of the label, 0..1.")


class Classification(BaseModel):
    index: int
    labels: list[LabelScore]


class ClassifyResponse(BaseModel):
    id: str
    object: Literal["classification"] = "classification"
    created: int
    model: str
    data: list[Classification]


class HealthResponse(BaseModel):
    """GET /health when serving (otherwise a 503 error says why not)."""

    status: Literal["ok"] = "ok"


def finite(logprob: float) -> float:
    """A logprob JSON can carry: -inf (a token sampling ruled out) becomes -9999.0, as in vLLM."""
    return logprob if math.isfinite(logprob) else -9999.0
