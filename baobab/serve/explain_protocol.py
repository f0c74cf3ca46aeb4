"""``POST /v1/explain`` (extension): the request, and the response, which is the JSON that
``baobab explain`` writes (``TextExplanation.to_json()``) plus ``object`` and ``model``.

Requests are parsed as strictly as the OpenAI routes' (``protocol.py``). The bounds in the
schema (``ig_steps``, ``top_k``) keep one request's shape sane; the server's real bound is
on tokens × integration steps (``EngineConfig.explain_max_work``), checked once the text is
tokenized (a 400 naming both numbers).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from baobab.serve.protocol import Text, _int, _refused, _Request

MAX_IG_STEPS = 2048  # integration points per explanation (baobab explain's default: 512)
MAX_TOP_K = 20  # logit-lens tokens per layer and position

Method = Literal["ig", "grad_x_input", "occlusion"]  # baobab.explain.types.METHODS


class ExplainRequest(_Request):
    """POST /v1/explain: why the served model gives ``target`` (or its own next token, or
    each token of a ``completion`` it produced) after ``prompt``."""

    model: str | None = Field(
        None, description="The served model's id; omitted or empty: the served model."
    )
    prompt: Text = Field(min_length=1, description="The context whose tokens are attributed.")
    target: Text | None = Field(
        None,
        description="A continuation whose log-probability is explained; with neither target "
        "nor completion, the model's own (greedy) next token.",
    )
    completion: Text | None = Field(
        None,
        description="A completion the model produced (sent back by the client: the server "
        "keeps none); each of its tokens is explained in turn.",
    )
    contrast: Text | None = Field(
        None, description="Explain log p(target) - log p(contrast): why this rather than that."
    )
    methods: list[Method] = Field(
        default_factory=lambda: ["ig"],
        min_length=1,
        max_length=3,
        description="Attribution methods: integrated gradients, gradient x input, occlusion.",
    )
    ig_steps: _int(ge=1, le=MAX_IG_STEPS) = Field(
        512,
        description="Integration points integrated gradients may spend (piece by piece "
        "where the path is rough; they stop once the delta is within max_delta).",
    )
    max_delta: float = Field(
        0.05,
        gt=0,
        le=1e6,
        description="Refuse (400) an integrated-gradients result whose convergence delta is "
        "larger; raise ig_steps.",
    )
    top_k: _int(ge=1, le=MAX_TOP_K) = Field(5, description="Logit-lens tokens per position.")

    @model_validator(mode="after")
    def _target_or_completion(self) -> ExplainRequest:
        if self.target is not None and self.completion is not None:
            raise _refused(
                "completion", "send 'target' or 'completion', not both (neither: the next token)"
            )
        if self.contrast is not None and self.completion is not None:
            raise _refused(
                "contrast", "a 'contrast' explains one target; it cannot go with a 'completion'"
            )
        return self


# ---------------------------------------------------------------- the response
# Mirrors baobab.explain.types (to_json: non-finite floats become null).

Score = float | None


class _Out(BaseModel):
    model_config = ConfigDict(extra="allow")


class AttributionOut(_Out):
    method: str
    scores: list[Score] = Field(description="One per context token.")
    delta: Score = Field(None, description="Integrated gradients' convergence delta.")


class TokenStepOut(_Out):
    position: int
    context_ids: list[int]
    context: list[str]
    target_ids: list[int]
    target: str
    logprob: Score
    attributions: list[AttributionOut]
    contrast_ids: list[int] | None = None
    contrast: str | None = None
    contrast_logprob: Score = None


class AttentionMapsOut(_Out):
    tokens: list[str]
    weights: list[list[list[list[Score]]]] = Field(description="(layers, heads, T, T).")


class LogitLensOut(_Out):
    tokens: list[str]
    top_ids: list[list[list[int]]] = Field(description="[layer][position][k].")
    top_tokens: list[list[list[str]]]
    top_probs: list[list[list[Score]]]


class ExplainResponse(_Out):
    """An explanation: what ``baobab explain --out DIR`` writes as JSON."""

    object: Literal["explanation"] = "explanation"
    model: str
    kind: Literal["text"] = "text"
    family: str
    prompt: str
    steps: list[TokenStepOut]
    attention: AttentionMapsOut | None = None
    logit_lens: LogitLensOut | None = None
    methods: list[str]
    ig_steps: int
