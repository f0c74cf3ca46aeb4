"""``explain(model, tokenizer, ...)``: why a finished model said what it said.

Nothing in ``baobab/models`` knows about explanations: Captum and forward hooks wrap the
finished model (``text.py`` for language models, ``vision.py`` for image and vector
models, ``inside.py`` for attention maps and the logit lens). This module picks the one
that fits the model's family and task and checks the request.

Work is counted in units of "one integration step of one explained token" (a gradient ×
input pass is one step, occlusion one per occluded position): ``progress(n)`` is called
with the units each forward pass finished, which drives the CLI's progress bar and the
server's time slicing (it is the one place an explanation may pause).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from baobab.data.tokenizer import Tokenizer
from baobab.explain.paths import max_rows
from baobab.explain.types import METHODS, ExplainError, Explanation, TextExplanation

Progress = Callable[[int], None]


def _noop(units: int) -> None:
    del units


def family_name(model: nn.Module) -> str:
    """The model's family name ("gpt", "bert", "lstm", "resnet", "mlp")."""
    from baobab.models import family_of

    return family_of(model.cfg).name


def check_methods(methods: Sequence[str] | str) -> list[str]:
    """Methods as a list of known names (a comma-separated string is split)."""
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    methods = list(dict.fromkeys(methods))
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ExplainError(
            f"unknown attribution method {', '.join(unknown) or '(none)'}; "
            f"choose among {', '.join(METHODS)}."
        )
    return methods


def explain(
    model: nn.Module,
    tokenizer: Tokenizer | None = None,
    *,
    prompt: str | None = None,
    target: str | None = None,
    contrast: str | None = None,
    completion: str | None = None,
    max_tokens: int = 0,
    inputs: torch.Tensor | None = None,
    labels: Sequence[int] | None = None,
    methods: Sequence[str] | str = ("ig",),
    ig_steps: int = 512,
    max_delta: float = 0.05,
    top_k: int = 5,
    internal_batch_size: int = 16,
    progress: Progress | None = None,
) -> Explanation:
    """Explain ``model``'s output; returns a typed result with ``to_json()``.

    Language models (gpt, lstm, bert) take ``prompt`` and one of: ``target`` (a text whose
    log-probability is explained), ``completion`` (a text the model produced, each token
    explained in turn), ``max_tokens`` (that many greedy tokens generated and explained in
    turn) or nothing (the model's own next token). ``contrast`` explains
    log p(target) - log p(contrast) instead. A bert prompt holds the tokenizer's mask
    token; the prediction at the (first) mask is explained. Image and vector models (resnet,
    mlp) take ``inputs`` (N, ...) and explain class ``labels`` (default: the predicted ones)
    or, for regression, the output.

    Integrated gradients interpolate from a zero baseline with at most ``ig_steps``
    integration points (Gauss-Legendre, piece by piece where the path is rough: see
    ``paths.py``); an explanation whose convergence delta still exceeds ``max_delta`` is
    refused (ExplainError: raise ig_steps). ``top_k`` sizes the logit lens. ``progress(units)`` is
    called after each forward pass (see the module docstring).

    The model is put in eval mode and must be on the device the explanation runs on.
    """
    methods = check_methods(methods)
    if ig_steps < 1 or internal_batch_size < 1 or top_k < 1:
        raise ExplainError("ig_steps, internal_batch_size and top_k must be at least 1.")
    if not max_delta > 0:
        raise ExplainError(f"max_delta must be positive; got {max_delta}.")
    model.eval()
    progress = progress or _noop
    family = family_name(model)
    options = dict(
        methods=methods,
        ig_steps=ig_steps,
        max_delta=max_delta,
        internal_batch_size=internal_batch_size,
        progress=progress,
    )
    if family in ("gpt", "lstm", "bert"):
        if inputs is not None or labels is not None:
            raise ExplainError(f"a {family} model is explained from a prompt, not from inputs.")
        if tokenizer is None or prompt is None:
            raise ExplainError(f"a {family} model needs a prompt and its tokenizer to explain.")
        from baobab.explain.text import explain_text

        return explain_text(
            model,
            tokenizer,
            family,
            prompt=prompt,
            target=target,
            contrast=contrast,
            completion=completion,
            max_tokens=max_tokens,
            top_k=top_k,
            **options,
        )
    if prompt is not None or target is not None or completion is not None or max_tokens:
        raise ExplainError(f"a {family} model is explained from inputs, not from a prompt.")
    if inputs is None:
        raise ExplainError(f"a {family} model needs inputs to explain.")
    from baobab.explain.vision import explain_inputs

    return explain_inputs(model, family, inputs, labels, **options)


def planned_units(methods: Sequence[str], ig_steps: int, context_lengths: Sequence[int]) -> int:
    """The units ``progress`` reports for explaining one prediction per context length, at
    most (a progress bar's total): integrated gradients at most ig_steps rows plus two per
    piece of the path for its delta (``paths.py``; a smooth path stops early), gradient ×
    input one, occlusion one per token plus the unperturbed one. A contrast doubles nothing
    (its sequence shares each forward's rows)."""
    ig = max_rows(ig_steps)
    per_row = {"ig": lambda p: ig, "grad_x_input": lambda p: 1, "occlusion": lambda p: p + 1}
    return sum(per_row[m](p) for m in check_methods(list(methods)) for p in context_lengths)


def text_work(prompt_tokens: int, target_tokens: int, ig_steps: int) -> int:
    """The bound ``/v1/explain`` checks: tokens × integration steps."""
    return (prompt_tokens + target_tokens) * ig_steps


__all__ = [
    "Progress",
    "TextExplanation",
    "check_methods",
    "explain",
    "family_name",
    "planned_units",
    "text_work",
]
