"""Request and response bodies of the OpenAI-compatible HTTP API, as pydantic models.

Requests are parsed strictly (no "1" for 1, no NaN) and every range is in the schema, so
``/openapi.json`` states exactly what the server accepts and answers; out-of-range values
are refused with a 400 before anything reaches the engine. Fields that OpenAI defines but
this server does not implement are refused when set to a non-default value rather than
silently ignored (see :data:`UNSUPPORTED`). Extensions beyond OpenAI follow vLLM's names
(``top_k``, ``ignore_eos``, ``stop_token_ids``). Every string of a request, in any field,
must be valid Unicode (JSON can spell a lone surrogate, ``"\\udfff"``, which is not), and
text is capped at :data:`MAX_TEXT_CHARS` characters.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    model_validator,
)
from pydantic_core import PydanticCustomError

MAX_N = 16  # choices per request
MAX_LOGPROBS = 20  # alternatives per token
MAX_STOP = 4  # stop strings per request (OpenAI's limit)
MAX_IMAGES = 64  # images per classification request
SEED_MODULUS = 2**63  # seeds live in [0, 2**63); choice i uses (seed + i) % 2**63
# Characters in a prompt string, in one chat message's content, and in all of a request's
# messages together (the body-size limit, ``limits.py``, caps every other string).
MAX_TEXT_CHARS = 1_000_000
MAX_PROMPT_IDS = 1_000_000  # token ids in a prompt list

# Fields of the OpenAI API this server does not implement, with the values that mean "unset"
# (null always does).
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "suffix": (),
    "best_of": (1,),
    "logit_bias": ({},),
    "presence_penalty": (0,),
    "frequency_penalty": (0,),
    "tools": ([],),
    "functions": ([],),
}


def _refused(param: str, message: str) -> PydanticCustomError:
    """A whole-request validation error that still names the field (the 400's ``param``)."""
    return PydanticCustomError("refused", message, {"param": param})


def _is_unicode(text: str) -> bool:
    """False when ``text`` holds a lone UTF-16 surrogate (JSON's ``"\\udfff"``): Python's
    json module decodes one, but it is no character, and UTF-8 (hence the tokenizer and
    every response) cannot carry it."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _key(part: Any) -> str:
    """A path part as an error message echoes it: short, a lone surrogate written ``\\udfff``."""
    part = str(part) if len(str(part)) <= 40 else str(part)[:40] + "..."
    return part.encode("utf-8", "backslashreplace").decode("utf-8")


_SCALARS = {int, float, bool, type(None)}


def _surrogate_path(body: Any) -> str | None:
    """The dotted path (``messages.0.content``) of the first string or key in ``body`` that
    is not valid Unicode, or None. Iterative: JSON nests deeper than Python's recursion."""
    stack: list[tuple[Any, tuple]] = [(body, ())]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            if not _is_unicode(value):
                return ".".join(_key(p) for p in path)
        elif isinstance(value, dict):
            for key, item in reversed(value.items()):  # reversed: popped in document order
                if isinstance(key, str) and not _is_unicode(key):
                    return ".".join(_key(p) for p in (*path, key))
                stack.append((item, (*path, key)))
        elif isinstance(value, list):
            if set(map(type, value)) <= _SCALARS:  # a million token ids: no loop in Python
                continue
            stack.extend((item, (*path, i)) for i, item in reversed(list(enumerate(value))))
    return None


class _Request(BaseModel):
    # Strict: a string is not a number and a number is not a bool; extra fields are kept so
    # that UNSUPPORTED ones can be refused by name, the rest are ignored like OpenAI does.
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _refuse_invalid_unicode(cls, data: Any) -> Any:
        # Before any field is read: every string field, known or not, is checked alike.
        param = _surrogate_path(data)
        if param is not None:
            raise _refused(
                param,
                f"'{param}' is not valid Unicode text: it contains a lone UTF-16 surrogate "
                "(an unpaired \\ud800-\\udfff escape)",
            )
        return data

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> _Request:
        for name, value in (self.model_extra or {}).items():
            if name in UNSUPPORTED and value is not None and value not in UNSUPPORTED[name]:
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
Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS)]


def _what(item: Any) -> str:
    """What a JSON value is, for an error message (user strings are not echoed)."""
    if isinstance(item, bool) or item is None:
        return {True: "true", False: "false", None: "null"}[item]
    if isinstance(item, int | float):
        return repr(item)
    return {str: "a string", list: "a list", dict: "an object"}.get(type(item), "not a number")


def _prompt_problem(value: Any) -> str | None:
    """What is wrong with a prompt that is not text, or None if nothing is."""
    if isinstance(value, str):
        return None
    if not isinstance(value, list):
        return f"the prompt must be a string or a list of token ids, not {_what(value)}"
    if not value:
        return "the list is empty; send the prompt's text or at least one token id"
    if len(value) > MAX_PROMPT_IDS:
        return f"the list has {len(value)} token ids; at most {MAX_PROMPT_IDS} fit"
    for i, item in enumerate(value):
        integral = isinstance(item, int) or (isinstance(item, float) and item.is_integer())
        if isinstance(item, bool) or not integral or item < 0:
            batch = isinstance(item, str | list)
            hint = "; batches of prompts are not supported: send one per request" if batch else ""
            what = _what(item)
            return f"a list prompt holds token ids (integers >= 0), but item {i} is {what}{hint}"
    return None


def _prompt(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """pydantic's own validation (in Rust: quick on a million ids); when it fails, a message
    that names what is wrong with a list (its union says "Input should be a valid string")."""
    # Token ids: checked here ~40x quicker than by a validator call per id (seconds for a
    # million, on the event loop).
    ids = type(value) is list and 0 < len(value) <= MAX_PROMPT_IDS
    if ids and set(map(type, value)) == {int} and min(value) >= 0:
        return value
    try:
        return handler(value)
    except ValidationError:
        problem = _prompt_problem(value)
        if problem is None:
            raise
        raise PydanticCustomError("prompt", problem) from None


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = Field(
        False, description="Send a last chunk with usage and no choices before [DONE]."
    )


class JsonSchema(BaseModel):
    # populate_by_name: the field is ``schema_`` in Python (``schema`` is a BaseModel
    # method) and ``schema`` in JSON.
    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)
    name: Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")] = Field(
        description="The schema's name (letters, digits, _ and -; at most 64)."
    )
    description: str | None = None
    schema_: dict[str, Any] = Field(
        alias="schema", description="The JSON Schema every choice's text must match."
    )
    strict: bool | None = Field(
        None, description="Accepted; the schema is always enforced (strict or not)."
    )


class ResponseFormat(BaseModel):
    """OpenAI's ``response_format``: one model rather than a union, so that an error's path
    is the request's own (``response_format.json_schema.name``)."""

    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text", "json_object", "json_schema"] = Field(
        description="text (the default), any JSON object, or JSON matching json_schema."
    )
    json_schema: JsonSchema | None = Field(None, description="Needed by type json_schema.")

    @model_validator(mode="after")
    def _schema_for_json_schema(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs a 'json_schema' object")
        return self


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
    response_format: ResponseFormat | None = Field(
        None,
        description="Structured output: text (default), json_object or json_schema "
        "(OpenAI's shape); the output is constrained token by token.",
    )

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_Sampling):
    """POST /v1/completions."""

    prompt: Annotated[
        Text | Annotated[list[NonNegInt], Field(min_length=1, max_length=MAX_PROMPT_IDS)],
        WrapValidator(_prompt),
    ] = Field(description="The text to continue, or its token ids.")
    max_tokens: _int(ge=0) | None = Field(
        16, description="At most this many new tokens; 0 (with echo): the prompt alone."
    )
    logprobs: _int(ge=0, le=MAX_LOGPROBS) | None = Field(
        None,
        description="Return each token's logprob and k alternatives (with echo: the prompt's "
        "too, the first token's null).",
    )
    echo: bool | None = Field(False, description="Prepend the prompt to each choice's text.")

    @model_validator(mode="after")
    def _no_tokens_needs_echo(self) -> CompletionRequest:
        # As vLLM: max_tokens 0 is OpenAI's legacy way to score a prompt (echo + logprobs).
        if self.max_tokens == 0 and not self.echo:
            raise _refused(
                "max_tokens",
                "'max_tokens' must be at least 1 unless 'echo' is true (0 then returns the "
                "prompt alone)",
            )
        return self


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart] | None = Field(description="Text, or a list of text parts.")
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

    @model_validator(mode="after")
    def _bounded_text(self) -> ChatCompletionRequest:
        total = sum(len(m.text()) for m in self.messages)
        if total > MAX_TEXT_CHARS:
            raise _refused(
                "messages",
                f"the messages hold {total} characters of content; at most {MAX_TEXT_CHARS} "
                "are accepted",
            )
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
    """The legacy completions shape: parallel lists, one entry per token of the choice's
    text (with echo: the prompt's, whose first token has null logprobs, then the
    generated ones)."""

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
