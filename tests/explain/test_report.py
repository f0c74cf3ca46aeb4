"""The report directory: JSON with every number, PNGs of the sizes they claim, one
self-contained HTML page that headless Chromium renders with no network, and a directory
that is replaced whole or not at all.

Results are built here from the typed dataclasses (no model), so these tests pin the
report's own behaviour; tests/explain/test_explain_cli.py runs it on real models.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from baobab.explain import (
    AttentionMaps,
    Attribution,
    ExplainError,
    FeatureExplanation,
    ImageExplanation,
    InputItem,
    LogitLens,
    TextExplanation,
    TokenStep,
)
from baobab.explain.figures import (
    DPI,
    attention_inches,
    feature_inches,
    image_inches,
    lens_inches,
    strip_inches,
)
from baobab.explain.report import HTML_FILE, JSON_FILE, write_report

# Tokens a page could get wrong: markup, an entity, quotes, spaces, a newline, non-ASCII.
PROMPT_TOKENS = ["def", " f", "(x", "<b>", " &amp;", ' "q"', "\n", "  ", "é", "$y"]


def text_result(methods=("ig", "occlusion"), steps: int = 2) -> TextExplanation:
    """Two explained tokens over a growing context, with attention maps and a logit lens."""
    gen = torch.Generator().manual_seed(0)
    made = []
    for i in range(steps):
        context = PROMPT_TOKENS + ["x"] * i
        attributions = [
            Attribution(m, torch.randn(len(context), generator=gen).tolist(), 1e-5 if m == "ig" else None)
            for m in methods
        ]  # fmt: skip
        made.append(
            TokenStep(
                len(context) - 1,
                list(range(len(context))),
                context,
                [7],
                "x",
                -1.5 - i,
                attributions,
            )  # fmt: skip
        )
    tokens = made[-1].context
    layers, heads, t = 2, 3, len(tokens)
    scores = torch.randn(layers, heads, t, t, generator=gen)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    weights = scores.masked_fill(~causal, float("-inf")).softmax(-1)  # (L, H, T, T)
    lens = LogitLens(
        tokens,
        [[[1, 2]] * t for _ in range(layers)],
        [[["a", "<b>"]] * t for _ in range(layers)],
        [[[0.7, 0.2]] * t for _ in range(layers)],
    )
    return TextExplanation(
        "gpt", "".join(PROMPT_TOKENS), made, AttentionMaps(tokens, weights), lens,
        list(methods), 32,
    )  # fmt: skip


def image_result() -> ImageExplanation:
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(2, 1, 8, 8, generator=gen)
    items = [
        InputItem(i, 3, "three", 2.5, 0.6, [Attribution("ig", torch.randn(1, 8, 8, generator=gen))])
        for i in range(2)
    ]  # fmt: skip
    gradcam = torch.rand(2, 8, 8, generator=gen)
    return ImageExplanation("resnet", images, items, gradcam, "layer2", ["ig"], 16)


def feature_result() -> FeatureExplanation:
    gen = torch.Generator().manual_seed(2)
    inputs = torch.randn(3, 10, generator=gen)
    items = [
        InputItem(i, None, None, 0.3 * i, None,
                  [Attribution(m, torch.randn(10, generator=gen)) for m in ("ig", "grad_x_input")])
        for i in range(3)
    ]  # fmt: skip
    names = [f"x{i}" for i in range(10)]
    return FeatureExplanation("mlp", inputs, names, items, ["ig", "grad_x_input"], 16)


def png_image(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def assert_drawn(path: Path, size: tuple[float, float]) -> None:
    """``path`` is a PNG of ``size`` inches at DPI with more than one colour in it."""
    image = png_image(path.read_bytes())
    assert image.format == "PNG"
    assert image.size == (round(size[0] * DPI), round(size[1] * DPI)), path.name
    colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 10, f"{path.name} is nearly blank"


@pytest.fixture(scope="module")
def text_report(tmp_path_factory) -> tuple[TextExplanation, Path]:
    """One text result and the report written from it (drawn once for the module)."""
    result = text_result()
    out = tmp_path_factory.mktemp("report") / "out"
    return result, write_report(result, out, {"model_dir": "m", "family": "gpt"})


def test_text_report_holds_every_number_and_figure(text_report) -> None:
    result, out = text_report
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([JSON_FILE, HTML_FILE, "attributions-ig.png",
                            "attributions-occlusion.png", "attention.png", "logit-lens.png"])  # fmt: skip
    doc = json.loads((out / JSON_FILE).read_text())
    assert doc["kind"] == "text" and doc["meta"] == {"model_dir": "m", "family": "gpt"}
    for step, stored in zip(result.steps, doc["steps"]):
        for attribution, kept in zip(step.attributions, stored["attributions"]):
            assert kept["scores"] == pytest.approx(attribution.scores, abs=0)
    assert np.allclose(doc["attention"]["weights"], result.attention.weights.numpy(), atol=0)
    t = len(result.steps[-1].context)
    assert_drawn(out / "attributions-ig.png", strip_inches(t, 2))
    assert_drawn(out / "attention.png", attention_inches(2, 3))
    assert_drawn(out / "logit-lens.png", lens_inches(2, t))


def test_image_and_feature_figures_have_their_sizes(tmp_path) -> None:
    out = write_report(image_result(), tmp_path / "images", {"model_dir": "m"})
    for i in range(2):
        assert_drawn(out / f"image-{i}.png", image_inches(3))  # input, Grad-CAM, ig
    assert json.loads((out / JSON_FILE).read_text())["gradcam_layer"] == "layer2"
    out = write_report(feature_result(), tmp_path / "features", {"model_dir": "m"})
    assert_drawn(out / "features.png", feature_inches(3, 10))
    page = (out / HTML_FILE).read_text()
    assert all(f"<td>x{i}</td>" in page for i in range(10))


def test_the_page_is_self_contained(text_report) -> None:
    _, out = text_report
    page = (out / HTML_FILE).read_text()
    sources = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r"<script|<link|@import|url\(|https?://", page, flags=re.I)
    assert "default-src 'none'" in page  # the page's CSP forbids any fetch
    assert len(re.findall(r"<img ", page)) == len(list(out.glob("*.png")))


class _Spans(HTMLParser):
    """The text of each ``<span class="tok">`` per ``<div class="tokens">`` line."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[list[str]] = []
        self.depth = 0  # spans open inside a token span, itself included

    def handle_starttag(self, tag, attrs) -> None:
        classes = (dict(attrs).get("class") or "").split()
        if tag == "div" and "tokens" in classes:
            self.lines.append([])
        elif tag == "span" and "tok" in classes:
            self.lines[-1].append("")
            self.depth = 1
        elif tag == "span" and self.depth:
            self.depth += 1

    def handle_endtag(self, tag) -> None:
        if tag == "span" and self.depth:
            self.depth -= 1

    def handle_data(self, data) -> None:
        if self.depth:
            self.lines[-1][-1] += data


def test_token_spans_hold_each_token_verbatim(text_report) -> None:
    result, out = text_report
    parser = _Spans()
    parser.feed((out / HTML_FILE).read_text())
    expected = [step.context for step in result.steps for _ in step.attributions]
    assert parser.lines == expected


def test_an_earlier_report_is_replaced_whole_and_a_failed_write_keeps_it(tmp_path) -> None:
    out = write_report(image_result(), tmp_path / "out", {"model_dir": "m"})
    write_report(feature_result(), out, {"model_dir": "m"})
    assert sorted(p.name for p in out.iterdir()) == [JSON_FILE, "features.png", HTML_FILE]
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(TypeError):  # meta that JSON cannot hold: fails after writing began
        write_report(feature_result(), out, {"model_dir": "m", "bad": {1, 2}})
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary left


@pytest.mark.parametrize("kind", ["other files", "a file", "the model", "a run"])
def test_out_that_is_not_a_report_is_refused(tmp_path, kind: str) -> None:
    model = tmp_path / "model"
    model.mkdir()
    out = {"other files": tmp_path / "other", "a file": tmp_path / "f", "the model": model,
           "a run": tmp_path / "run" / "explain"}[kind]  # fmt: skip
    if kind == "other files":
        out.mkdir()
        (out / "notes.txt").write_text("keep me")
    elif kind == "a file":
        out.write_text("keep me")
    elif kind == "a run":
        (tmp_path / "run" / "checkpoints" / "step_00000001").mkdir(parents=True)
    with pytest.raises(ExplainError, match="--out"):
        write_report(feature_result(), out, {"model_dir": str(model)})
    assert not (tmp_path / "run" / "explain").exists()


def _chromium() -> str | None:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is not installed; .ci/run installs it (apt-get install chromium)")
        pytest.skip("chromium is not installed (CI installs it)")
    return found


def test_chromium_renders_every_prompt_token_with_no_network(text_report, tmp_path) -> None:
    chromium = _chromium()
    if (
        shutil.which("unshare") is None
        or subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode
    ):
        if os.environ.get("CI") == "true":
            pytest.fail("unshare -n (a network namespace) is not permitted here")
        pytest.skip("unshare -n (a network namespace) is not permitted here")
    _, out = text_report
    browser = [
        "unshare", "-n",  # a network namespace with no network: nothing can be fetched
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,1600",
    ]  # fmt: skip
    url = (out / HTML_FILE).resolve().as_uri()
    dom = subprocess.run(browser + ["--dump-dom", url], capture_output=True, text=True, timeout=60)
    assert dom.returncode == 0, dom.stderr[-2000:]
    parser = _Spans()
    parser.feed(dom.stdout)
    assert parser.lines, "the rendered DOM holds no token spans"
    assert parser.lines[0] == PROMPT_TOKENS  # every prompt token, as text, in order
    shot = tmp_path / "report.png"  # for people: what the page looks like
    run = subprocess.run(browser + [f"--screenshot={shot}", url], capture_output=True, timeout=60)
    assert run.returncode == 0, run.stderr[-2000:]
    image = png_image(shot.read_bytes())
    assert image.size == (1200, 1600)
    assert len(image.convert("RGB").getcolors(maxcolors=1 << 20) or ()) > 10
