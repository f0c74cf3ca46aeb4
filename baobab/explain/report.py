"""Write an explanation as a directory: ``explanation.json``, PNG figures, ``report.html``.

The directory appears whole or not at all: everything is written into a temporary
directory beside it, which then takes its place in one rename, so a failed or interrupted
run leaves the previous report (or nothing) where it was. An existing directory is
replaced only when it is an earlier report (it holds ``explanation.json``) or empty; a
run, a checkpoint, a corpus, a model or any other directory is refused, in one sentence.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from baobab.explain.figures import figures_for
from baobab.explain.html import render_html
from baobab.explain.types import ExplainError, Explanation
from baobab.export.atomic import protected_kind, replaced_directory

JSON_FILE, HTML_FILE = "explanation.json", "report.html"


def check_out_dir(out: str | Path, sources: Iterable[str | Path] = ()) -> Path:
    """``out`` as a Path once it is safe to (re)place with a report (module docstring);
    ExplainError otherwise. ``sources`` (the model directory) must not be, or lie inside, it."""
    out = Path(out)
    target = out.resolve()
    for place in (target, *target.parents):
        kind = protected_kind(place)
        if kind is not None:
            raise ExplainError(
                f"--out '{out}' is or lies inside the {kind} '{place}'; choose an --out outside it."
            )
    for source in sources:
        src = Path(source).resolve()
        if target == src or target in src.parents:
            raise ExplainError(f"--out '{out}' would replace the model '{source}'; choose another.")
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise ExplainError(f"--out '{out}' is a file, not a directory; choose another --out.")
        if any(out.iterdir()) and not (out / JSON_FILE).is_file():
            raise ExplainError(
                f"--out '{out}' already holds files that are not an explanation; choose an "
                "empty or new --out."
            )
    return out


def document(result: Explanation, meta: dict[str, Any]) -> dict[str, Any]:
    """``explanation.json``: the result's own JSON (what ``/v1/explain`` returns), plus
    ``meta`` (the model directory, its family, the command's arguments)."""
    return {**result.to_json(), "meta": meta}


def write_report(result: Explanation, out_dir: str | Path, meta: dict[str, Any]) -> Path:
    """Write ``result`` into ``out_dir`` (replacing an earlier report there); returns it."""
    sources = [meta["model_dir"]] if meta.get("model_dir") else []
    out = check_out_dir(out_dir, sources)
    figures = figures_for(result)
    page = render_html(result, meta, figures)
    with replaced_directory(out, "explanation") as tmp:
        text = json.dumps(document(result, meta), indent=1, allow_nan=False)
        (tmp / JSON_FILE).write_text(text + "\n")
        for figure in figures:
            (tmp / figure.name).write_bytes(figure.png)
        (tmp / HTML_FILE).write_text(page, encoding="utf-8")
    return out


__all__ = ["HTML_FILE", "JSON_FILE", "check_out_dir", "document", "write_report"]
