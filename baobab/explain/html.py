"""The report as one self-contained HTML page: inline CSS, figures as base64 ``data:`` URIs,
no script, font, stylesheet or request of any kind (its Content-Security-Policy forbids
them, so a browser could not fetch one even if a token held a URL).

Text explanations show every context token as a coloured ``<span class="tok">`` holding
the token's own text (escaped, whitespace kept), one line per method and explained token;
red is evidence for the target, blue against, scaled per line. The numbers are in
``explanation.json`` beside it; the page shows the ones a reader needs.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from typing import Any

import torch

from baobab.explain.figures import Figure
from baobab.explain.types import (
    Attribution,
    Explanation,
    FeatureExplanation,
    ImageExplanation,
    TextExplanation,
    TokenStep,
)

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 72em; color: #222;
       padding: 0 1em; line-height: 1.4; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0; }
td, th { border: 1px solid #ddd; padding: 0.2em 0.5em; text-align: left; vertical-align: top; }
code, .tok, .lens td { font-family: ui-monospace, monospace; }
.tokens { margin: 0.3em 0 0.8em; line-height: 2.1; }
.tok { white-space: pre; padding: 0.15em 0.05em; border: 1px solid #ccc; border-radius: 3px;
       margin-right: 1px; }
.tok.target { border: 2px solid #222; }
.nl::before { content: "\\21B5"; color: #888; } .nl-char { display: none; }
code { white-space: pre-wrap; }
.method { display: inline-block; min-width: 8em; color: #555; font-size: 0.85em; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.85em; }
.note { color: #555; font-size: 0.9em; }
"""
POSITIVE, NEGATIVE = (214, 39, 40), (31, 119, 180)  # red: for the target, blue: against


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: float | None, digits: int = 4) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.{digits}g}"


def _colour(score: float, peak: float) -> str:
    if peak <= 0 or not math.isfinite(score):
        return "transparent"
    rgb = POSITIVE if score >= 0 else NEGATIVE
    return f"rgba({rgb[0]}, {rgb[1]}, {rgb[2]}, {min(abs(score) / peak, 1.0) * 0.85:.3f})"


def token_spans(tokens: Sequence[str], scores: Sequence[float], mark: int | None = None) -> str:
    """One ``<span class="tok">`` per token, its text escaped and kept whole; its
    background is its score over the line's largest |score|."""
    peak = max((abs(s) for s in scores if math.isfinite(s)), default=0.0)
    spans = []
    for i, (token, score) in enumerate(zip(tokens, scores)):
        cls = "tok target" if i == mark else "tok"
        spans.append(
            f'<span class="{cls}" data-i="{i}" data-score="{score:.6g}" '
            f'title="#{i} {_e(repr(token))}: {score:.4g}" '
            f'style="background:{_colour(score, peak)}">{_token_text(token)}</span>'
        )
    return "".join(spans)


def _token_text(token: str) -> str:
    """A token's exact text, escaped; each newline sits in a hidden span after a visible
    mark (drawn by CSS, so not text), keeping the line of tokens on one line while the
    span's text (``textContent``) stays the token's own."""
    parts = [_e(part) for part in token.split("\n")]
    return '<span class="nl"></span><span class="nl-char">\n</span>'.join(parts)


def _scores(attribution: Attribution) -> list[float]:
    return [float(s) for s in torch.as_tensor(attribution.scores, dtype=torch.float64).flatten()]


def _step_html(index: int, step: TokenStep, masked: bool) -> str:
    value = f"log p = {_num(step.logprob)}"
    if step.contrast is not None:
        value += (
            f", rather than <code>{_e(repr(step.contrast))}</code> "
            f"(log p = {_num(step.contrast_logprob)}): explained value {_num(step.value)}"
        )
    parts = [f"<h3>{index + 1}. &rarr; <code>{_e(repr(step.target))}</code> ({value})</h3>"]
    for attribution in step.attributions:
        delta = "" if attribution.delta is None else f" delta {_num(attribution.delta, 3)}"
        mark = step.position if masked else None
        spans = token_spans(step.context, _scores(attribution), mark)
        parts.append(
            f'<div class="tokens" data-method="{_e(attribution.method)}">'
            f'<span class="method">{_e(attribution.method)}{delta}</span> {spans}</div>'
        )
    return f'<section class="step" data-step="{index}">{"".join(parts)}</section>'


def _lens_table(result: TextExplanation) -> str:
    lens = result.logit_lens
    head = "".join(f"<th>{_e(repr(t))}</th>" for t in lens.tokens)
    rows = []
    for layer, (tokens, probs) in enumerate(zip(lens.top_tokens, lens.top_probs)):
        cells = "".join(
            f'<td title="{_e(", ".join(f"{t!r} {p:.3f}" for t, p in zip(top, pr)))}">'
            f"{_e(repr(top[0]))} {pr[0]:.2f}</td>"
            for top, pr in zip(tokens, probs)
        )
        rows.append(f"<tr><th>layer {layer}</th>{cells}</tr>")
    return (
        '<table class="lens"><tr><th>top-1 after</th>' + head + "</tr>" + "".join(rows) + "</table>"
    )


def _text_body(result: TextExplanation) -> str:
    masked = result.family == "bert"
    what = "the masked token" if masked else "each explained token"
    parts = [
        f"<p>Prompt: <code>{_e(repr(result.prompt))}</code></p>",
        f'<p class="note">Attributions of the log-probability of {what} over the context '
        "tokens: red pushes towards it, blue away, scaled per line. Hover a token for its "
        "score.</p>",
    ]
    parts += [_step_html(i, step, masked) for i, step in enumerate(result.steps)]
    if result.logit_lens is not None:
        parts += ["<h2>Logit lens</h2>", _lens_table(result)]
    return "".join(parts)


def _image_body(result: ImageExplanation) -> str:
    rows = []
    for item in result.items:
        label = item.label_name if item.label_name is not None else item.label
        prob = _num(item.probability) if item.probability is not None else "n/a"
        rows.append(f"<tr><td>{item.index}</td><td>{_e(label)}</td><td>{_num(item.value)}</td>"
                    f"<td>{prob}</td></tr>")  # fmt: skip
    layer = f"; Grad-CAM at <code>{_e(result.gradcam_layer)}</code>" if result.gradcam_layer else ""
    return (
        f'<p class="note">{len(result.items)} input(s){layer}.</p>'
        "<table><tr><th>input</th><th>explained class</th><th>logit</th><th>p</th></tr>"
        + "".join(rows)
        + "</table>"
    )


def _feature_body(result: FeatureExplanation) -> str:
    tables = []
    for item in result.items:
        head = "".join(f"<th>{_e(a.method)}</th>" for a in item.attributions)
        scores = [_scores(a) for a in item.attributions]
        rows = "".join(
            f"<tr><td>{_e(name)}</td><td>{_num(float(result.inputs[item.index, f]))}</td>"
            + "".join(f"<td>{_num(s[f])}</td>" for s in scores)
            + "</tr>"
            for f, name in enumerate(result.feature_names)
        )
        what = f"class {_e(item.label_name or item.label)}" if item.label is not None else "output"
        tables.append(
            f"<h3>input {item.index}: {what} = {_num(item.value)}</h3>"
            f"<table><tr><th>feature</th><th>value</th>{head}</tr>{rows}</table>"
        )
    return "".join(tables)


def _figure(figure: Figure) -> str:
    data = base64.b64encode(figure.png).decode("ascii")
    width, height = figure.size
    return (
        f'<figure><img src="data:image/png;base64,{data}" width="{width}" height="{height}" '
        f'alt="{_e(figure.caption)}" data-name="{_e(figure.name)}">'
        f"<figcaption>{_e(figure.name)}: {_e(figure.caption)}</figcaption></figure>"
    )


def _meta_table(meta: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><th>{_e(key)}</th><td><code>{_e(value)}</code></td></tr>"
        for key, value in meta.items()
        if value is not None and not isinstance(value, dict)
    )
    return f'<table class="meta">{rows}</table>'


def render_html(result: Explanation, meta: dict[str, Any], figures: Sequence[Figure]) -> str:
    """The whole report page for ``result`` (see the module docstring)."""
    if isinstance(result, TextExplanation):
        body = _text_body(result)
    elif isinstance(result, ImageExplanation):
        body = _image_body(result)
    else:
        body = _feature_body(result)
    title = f"baobab explain: {meta.get('model_dir', result.family)}"
    methods = ", ".join(result.methods)
    steps = f", {result.ig_steps} integration steps" if "ig" in result.methods else ""
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        f"<title>{_e(title)}</title><style>{STYLE}</style></head><body>"
        f"<h1>{_e(title)}</h1>"
        f'<p class="note">A {_e(result.family)} model, explained with {_e(methods)}{steps}.</p>'
        f"{_meta_table(meta)}{body}<h2>Figures</h2>"
        + "".join(_figure(f) for f in figures)
        + "</body></html>\n"
    )


__all__ = ["render_html", "token_spans"]
