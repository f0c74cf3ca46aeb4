"""What an explanation is: typed results that the CLI, the report and the server serialise.

Every result has a ``kind`` ("text", "image", "features") and ``to_json()``, a dict of
plain values (lists, floats, strings) holding every number; the report and ``/v1/explain``
write exactly that dict.

Shapes: T tokens of a context, L layers, H heads, K top-k.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

METHODS = ("ig", "grad_x_input", "occlusion")
"""Attribution methods, by flag name: integrated gradients, gradient × input, occlusion."""


class ExplainError(ValueError):
    """An explanation that cannot be given as asked (one sentence: what to change)."""


@dataclass
class Attribution:
    """One method's scores: one per attributed input unit (a context token, a feature, a
    pixel), each the unit's share of the explained value (a log-probability, a logit)."""

    method: str
    """"ig", "grad_x_input" or "occlusion"."""
    scores: list[float] | torch.Tensor
    """One score per unit (a list over tokens; a tensor of the input's shape for an image
    (C, H, W) or a vector (F,)); for integrated gradients they sum to
    f(input) - f(baseline) up to ``delta``."""
    delta: float | None = None
    """Integrated gradients' convergence delta: sum(scores) - (f(input) - f(baseline))."""


@dataclass
class TokenStep:
    """One explained prediction of a language model.

    Causal LMs: the model saw ``context_ids`` (the attributed tokens) followed by all but
    the last of ``target_ids``; the explained value is log p(target | context), minus
    log p(contrast | context) when a contrast is given. Masked LMs: ``context_ids`` is the
    whole sequence and ``position`` the masked position whose prediction is explained.
    """

    position: int
    """Index in ``context_ids`` whose prediction is explained (the last for a causal LM,
    the masked one for a masked LM)."""
    context_ids: list[int]
    context: list[str]
    """Each context token decoded on its own."""
    target_ids: list[int]
    target: str
    logprob: float
    """log p(target | context), summed over the target's tokens (nats)."""
    attributions: list[Attribution]
    """One per method, each with len(context_ids) scores."""
    contrast_ids: list[int] | None = None
    contrast: str | None = None
    contrast_logprob: float | None = None

    @property
    def value(self) -> float:
        """The explained value: logprob, or logprob - contrast_logprob."""
        if self.contrast_logprob is None:
            return self.logprob
        return self.logprob - self.contrast_logprob


@dataclass
class AttentionMaps:
    """Attention weights of every layer and head over one context, recomputed from each
    layer's own query/key projections (the model's SDPA never materialises them)."""

    tokens: list[str]
    weights: torch.Tensor
    """(L, H, T, T) float32: row t is what query t attends to; rows sum to 1, the causal
    upper triangle is 0."""


@dataclass
class LogitLens:
    """What each layer's residual stream predicts at each position, read through the final
    norm and the output head."""

    tokens: list[str]
    """The input tokens (positions)."""
    top_ids: list[list[list[int]]]
    """[layer][position][k]: the k most likely next-token ids; layer L-1 is the model's
    own output."""
    top_tokens: list[list[list[str]]]
    top_probs: list[list[list[float]]]


@dataclass
class TextExplanation:
    """An explanation of a language model's output (gpt, bert, lstm)."""

    family: str
    prompt: str
    steps: list[TokenStep]
    """One per explained prediction: a target, or each generated (completion) token in turn."""
    attention: AttentionMaps | None = None
    """Over the last step's context plus its target (gpt only)."""
    logit_lens: LogitLens | None = None
    """Over the same tokens as ``attention`` (gpt only)."""
    methods: list[str] = field(default_factory=list)
    ig_steps: int = 0
    kind: str = "text"

    def to_json(self) -> dict[str, Any]:
        return to_json(self)


@dataclass
class InputItem:
    """One explained input of an image or vector model."""

    index: int
    """Its row in the explained inputs."""
    label: int | None
    """The explained class (None for a regression output)."""
    label_name: str | None
    value: float
    """The explained output: the label's logit, or the regression output."""
    probability: float | None
    """softmax probability of ``label`` (classification)."""
    attributions: list[Attribution]
    """One per method, scores shaped like one input."""


@dataclass
class ImageExplanation:
    """An explanation of an image classifier (resnet, or an mlp over flattened pixels)."""

    family: str
    images: torch.Tensor
    """(N, C, H, W) float32 in [0, 1], as explained."""
    items: list[InputItem]
    gradcam: torch.Tensor | None = None
    """(N, H, W) Grad-CAM heat-maps upsampled to the image size, or None where the model
    has no layer with a feature map of at least 2x2 (an mlp, or a too-small image)."""
    gradcam_layer: str | None = None
    """The module whose output Grad-CAM read."""
    methods: list[str] = field(default_factory=list)
    ig_steps: int = 0
    kind: str = "image"

    def to_json(self) -> dict[str, Any]:
        return to_json(self)


@dataclass
class FeatureExplanation:
    """An explanation of a model over feature vectors (the seed's regression mlp)."""

    family: str
    inputs: torch.Tensor
    """(N, F) float32, as explained."""
    feature_names: list[str]
    items: list[InputItem]
    methods: list[str] = field(default_factory=list)
    ig_steps: int = 0
    kind: str = "features"

    def to_json(self) -> dict[str, Any]:
        return to_json(self)


Explanation = TextExplanation | ImageExplanation | FeatureExplanation


def to_json(value: Any) -> Any:
    """A result as plain JSON values: dataclasses as dicts, tensors as nested lists,
    non-finite floats as None (JSON has no NaN)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, torch.Tensor):
        return to_json(value.detach().cpu().tolist())
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
