"""The report's PNG figures, drawn with matplotlib (Agg) from a typed explanation.

Text: one heat strip per attribution method (a row per explained token, a cell per context
token, red for evidence for the target and blue against), the attention maps of every
layer and head (gpt), and the logit lens (gpt). Images: one PNG per image (the input,
Grad-CAM over it, a pixel map per method). Vectors: a bar chart per input.

Each figure is drawn on a ``matplotlib.figure.Figure`` of a size fixed by what it shows
(``*_inches`` below; never ``bbox_inches="tight"``), so its pixel size is known in advance:
``round(inches * DPI)``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch

from baobab.explain.types import (
    Explanation,
    FeatureExplanation,
    ImageExplanation,
    TextExplanation,
)

DPI = 100
MAX_INCHES = 24.0  # no side of a figure is drawn larger (wide prompts get narrower cells)
CELL_TEXT_MAX = 60  # cells (tokens) above which a strip no longer writes each token in it


@dataclass
class Figure:
    """One rendered figure."""

    name: str
    """File name in the output directory (e.g. "attributions-ig.png")."""
    caption: str
    png: bytes
    size: tuple[int, int]
    """(width, height) in pixels."""


def token_label(token: str, width: int = 12) -> str:
    """A token as a figure label: whitespace made visible, other control characters as
    escapes (no font has glyphs for them), ``$`` kept out of mathtext, cut to ``width``
    characters."""
    shown = token.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥").replace("\r", "␍")
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in shown)
    shown = shown if len(shown) <= width else shown[: width - 1] + "…"
    return shown.replace("$", r"\$") or "∅"


def _render(fig, name: str, caption: str) -> Figure:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    width, height = fig.get_size_inches()
    return Figure(name, caption, buf.getvalue(), (round(width * DPI), round(height * DPI)))


def _new(width: float, height: float):
    from matplotlib.figure import Figure as MplFigure

    return MplFigure(figsize=(min(width, MAX_INCHES), min(height, MAX_INCHES)), dpi=DPI)


def _scores(scores) -> np.ndarray:
    return np.asarray(torch.as_tensor(scores, dtype=torch.float32).cpu(), dtype=np.float64)


# -- text ---------------------------------------------------------------------------------


def strip_inches(columns: int, rows: int) -> tuple[float, float]:
    """Size of an attribution strip of ``rows`` explained tokens over ``columns`` tokens."""
    return 2.2 + 0.55 * columns, 1.3 + 0.45 * rows


def attention_inches(layers: int, heads: int) -> tuple[float, float]:
    """Size of the attention grid: one square panel per (layer, head)."""
    panel = min(1.8, (MAX_INCHES - 1.0) / heads, (MAX_INCHES - 1.0) / layers)
    return 1.0 + panel * heads, 1.0 + panel * layers


def lens_inches(layers: int, positions: int) -> tuple[float, float]:
    """Size of the logit-lens table of ``layers`` rows over ``positions`` columns."""
    return 1.6 + 0.8 * positions, 1.4 + 0.4 * layers


def attribution_strip(result: TextExplanation, method: str) -> Figure:
    """Rows: explained tokens; columns: context positions; colour: the method's score,
    scaled per row so that the row's largest |score| is full colour."""
    steps = [s for s in result.steps if any(a.method == method for a in s.attributions)]
    columns = max(len(s.context) for s in steps)
    grid = np.full((len(steps), columns), np.nan)  # NaN: a position the row's context lacks
    for row, step in enumerate(steps):
        scores = _scores(next(a.scores for a in step.attributions if a.method == method))
        peak = np.abs(scores).max()
        grid[row, : len(scores)] = scores / peak if peak > 0 else scores
    fig = _new(*strip_inches(columns, len(steps)))
    ax = fig.add_axes(
        (
            1.6 / fig.get_figwidth(),
            0.55 / fig.get_figheight(),
            1 - 2.0 / fig.get_figwidth(),
            1 - 1.05 / fig.get_figheight(),
        )
    )
    from matplotlib import colormaps

    cmap = colormaps["RdBu_r"].with_extremes(bad="#eeeeee")  # grey: not in this row's context
    ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=-1, vmax=1, aspect="auto")
    longest = max(steps, key=lambda s: len(s.context))
    if columns <= CELL_TEXT_MAX:
        for row, step in enumerate(steps):
            for col, token in enumerate(step.context):
                dark = abs(grid[row, col]) > 0.6
                ax.text(
                    col,
                    row,
                    token_label(token, 6),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if dark else "black",
                )
    ax.set_xticks(range(columns), [str(i) for i in range(columns)], fontsize=6)
    labels = []
    for step in steps:
        label = "→ " + token_label(step.target, 10)
        if step.contrast is not None:
            label += " ≠ " + token_label(step.contrast, 8)
        labels.append(label)
    ax.set_yticks(range(len(steps)), labels, fontsize=7)
    ax.set_xlabel(
        "context position (red: for the target, blue: against; per-row scale)", fontsize=7
    )
    delta = [a.delta for s in steps for a in s.attributions if a.method == method and a.delta]
    value = "log p(target)"
    if any(s.contrast is not None for s in steps):
        value += " - log p(contrast)"
    title = f"{method} attributions of {value} over {len(longest.context)} tokens"
    if delta:
        title += f" (largest |delta| {max(abs(d) for d in delta):.2g})"
    ax.set_title(title, fontsize=8)
    caption = f"{method}: each row is one explained token; cells are context tokens."
    return _render(fig, f"attributions-{method}.png", caption)


def attention_grid(result: TextExplanation) -> Figure:
    """Every (layer, head) attention map over the same tokens; row = query, column = key."""
    maps = result.attention
    weights = maps.weights.float().cpu().numpy()  # (L, H, T, T)
    layers, heads, tokens = weights.shape[0], weights.shape[1], weights.shape[2]
    fig = _new(*attention_inches(layers, heads))
    grid = fig.add_gridspec(
        layers,
        heads,
        left=0.7 / fig.get_figwidth(),
        right=0.98,
        bottom=0.6 / fig.get_figheight(),
        top=1 - 0.4 / fig.get_figheight(),
        wspace=0.08,
        hspace=0.08,
    )
    labels = [token_label(t, 5) for t in maps.tokens]
    show_tokens = tokens <= 16
    for layer in range(layers):
        for head in range(heads):
            ax = fig.add_subplot(grid[layer, head])
            ax.imshow(weights[layer, head], cmap="viridis", vmin=0.0, aspect="equal")
            ax.set_xticks([])
            ax.set_yticks([])
            if head == 0:
                ax.set_ylabel(f"layer {layer}", fontsize=7)
            if layer == layers - 1:
                ax.set_xlabel(f"head {head}", fontsize=7)
            if show_tokens and head == 0 and layer == 0:
                ax.set_yticks(range(tokens), labels, fontsize=5)
            if show_tokens and head == 0 and layer == layers - 1:
                ax.set_xticks(range(tokens), labels, fontsize=5, rotation=90)
    fig.suptitle(f"attention (row: query, column: key) over {tokens} tokens", fontsize=8)
    caption = "Attention weights per layer (rows) and head (columns), recomputed from q and k."
    return _render(fig, "attention.png", caption)


def logit_lens_table(result: TextExplanation) -> Figure:
    """Colour: the top-1 probability each layer's residual stream gives at each position;
    text: that token."""
    lens = result.logit_lens
    layers, positions = len(lens.top_probs), len(lens.tokens)
    probs = np.array([[pos[0] for pos in layer] for layer in lens.top_probs])  # (L, T)
    fig = _new(*lens_inches(layers, positions))
    ax = fig.add_axes(
        (
            1.0 / fig.get_figwidth(),
            0.75 / fig.get_figheight(),
            1 - 1.3 / fig.get_figwidth(),
            1 - 1.2 / fig.get_figheight(),
        )
    )
    ax.imshow(probs, cmap="Greens", vmin=0.0, vmax=1.0, aspect="auto")
    if positions <= CELL_TEXT_MAX:
        for layer in range(layers):
            for pos in range(positions):
                ax.text(
                    pos,
                    layer,
                    token_label(lens.top_tokens[layer][pos][0], 6),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if probs[layer, pos] > 0.6 else "black",
                )
    ax.set_xticks(range(positions), [token_label(t, 6) for t in lens.tokens], fontsize=7)
    ax.set_yticks(range(layers), [f"layer {i}" for i in range(layers)], fontsize=7)
    ax.set_xlabel("input token (the lens predicts the token after it)", fontsize=7)
    ax.set_title("logit lens: top-1 next token per layer (colour: its probability)", fontsize=8)
    caption = "Logit lens: each layer's residual stream read through the final norm and head."
    return _render(fig, "logit-lens.png", caption)


def text_figures(result: TextExplanation) -> list[Figure]:
    figures = [attribution_strip(result, method) for method in result.methods]
    if result.attention is not None:
        figures.append(attention_grid(result))
    if result.logit_lens is not None:
        figures.append(logit_lens_table(result))
    return figures


# -- images and vectors -------------------------------------------------------------------

IMAGE_PANEL = 2.4  # inches per panel of an image figure


def image_inches(panels: int) -> tuple[float, float]:
    """Size of one image's figure of ``panels`` square panels side by side."""
    return IMAGE_PANEL * panels, IMAGE_PANEL + 0.5


def _rgb(image: np.ndarray) -> np.ndarray:
    """(C, H, W) in [0, 1] -> (H, W, 3) for imshow."""
    image = np.clip(image, 0.0, 1.0)
    return (
        np.repeat(image[0][..., None], 3, -1) if image.shape[0] == 1 else image.transpose(1, 2, 0)
    )


def image_overlay(result: ImageExplanation, index: int) -> Figure:
    """The image, Grad-CAM over it, and each method's pixel map (summed over channels)."""
    item = result.items[index]
    image = _rgb(result.images[item.index].float().cpu().numpy())
    panels = [("input", None)]
    if result.gradcam is not None:
        panels.append(("Grad-CAM", result.gradcam[item.index].float().cpu().numpy()))
    for attribution in item.attributions:
        panels.append((attribution.method, _scores(attribution.scores).sum(0)))  # (H, W)
    fig = _new(*image_inches(len(panels)))
    for i, (title, heat) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(title, fontsize=8)
        if heat is None:
            ax.imshow(image, interpolation="nearest")
        elif title == "Grad-CAM":
            ax.imshow(image.mean(-1), cmap="gray", interpolation="nearest")
            ax.imshow(heat, cmap="jet", alpha=0.5, interpolation="bilinear")
        else:
            peak = float(np.abs(heat).max()) or 1.0
            ax.imshow(heat, cmap="RdBu_r", vmin=-peak, vmax=peak, interpolation="nearest")
    name = item.label_name if item.label_name is not None else item.label
    what = f"class {name}" if item.label is not None else "output"
    prob = f", p={item.probability:.3f}" if item.probability is not None else ""
    fig.suptitle(f"input {item.index}: {what} (value {item.value:.3g}{prob})", fontsize=8)
    caption = f"Input {item.index}, explained for {what}{prob}."
    return _render(fig, f"image-{item.index}.png", caption)


def feature_inches(items: int, features: int) -> tuple[float, float]:
    """Size of the feature bar chart: one panel per explained input."""
    return 7.0, 0.4 + items * (0.8 + 0.22 * features)


def feature_bars(result: FeatureExplanation) -> Figure:
    """Per input, each feature's score, one bar per method."""
    items, features = len(result.items), len(result.feature_names)
    fig = _new(*feature_inches(items, features))
    methods = result.methods or [a.method for a in result.items[0].attributions]
    height = 0.8 / max(len(methods), 1)
    for row, item in enumerate(result.items):
        ax = fig.add_subplot(items, 1, row + 1)
        for k, attribution in enumerate(item.attributions):
            offsets = np.arange(features) - 0.4 + height * (k + 0.5)
            ax.barh(offsets, _scores(attribution.scores), height=height, label=attribution.method)
        ax.axvline(0.0, color="black", linewidth=0.5)
        ax.set_yticks(
            range(features), [token_label(n, 14) for n in result.feature_names], fontsize=7
        )
        ax.invert_yaxis()
        ax.tick_params(axis="x", labelsize=7)
        what = f"class {item.label_name or item.label}" if item.label is not None else "output"
        ax.set_title(f"input {item.index}: {what} = {item.value:.4g}", fontsize=8)
        if row == 0:
            ax.legend(fontsize=7, loc="lower right")
    fig.subplots_adjust(
        left=0.2,
        right=0.97,
        hspace=0.6,
        top=1 - 0.3 / fig.get_figheight(),
        bottom=0.3 / fig.get_figheight(),
    )
    return _render(fig, "features.png", "Per-feature attributions of each input's output.")


def figures_for(result: Explanation) -> list[Figure]:
    """Every figure of ``result``, in the report's order."""
    if isinstance(result, TextExplanation):
        return text_figures(result)
    if isinstance(result, ImageExplanation):
        return [image_overlay(result, i) for i in range(len(result.items))]
    if isinstance(result, FeatureExplanation):
        return [feature_bars(result)]
    raise TypeError(f"no figures for a {type(result).__name__}")


__all__ = ["DPI", "Figure", "figures_for", "token_label"]
