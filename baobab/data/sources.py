"""Raw inputs: finding files and streaming documents out of them.

A document is one string that ends with an end-of-text token once encoded:
a whole text file, one line of a .jsonl file, or one row of a .parquet file.
"""

from __future__ import annotations

import json
import os
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path

DEFAULT_EXTENSIONS = (".txt", ".jsonl", ".parquet")
# Directory names skipped by `stdlib_files`: installed packages and the test suites.
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def find_files(
    inputs: Sequence[str | Path], extensions: Sequence[str] = DEFAULT_EXTENSIONS
) -> list[Path]:
    """Files to read: files as given, directories walked recursively for `extensions`.

    Returns the non-empty files, sorted and deduplicated. Hidden files and directories
    (names starting with ".") are skipped while walking.
    """
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    if not inputs:
        raise ValueError("no inputs were given; pass at least one file or directory")
    exts = tuple(e.lower() for e in extensions)
    seen: dict[Path, Path] = {}  # resolved -> as found, so duplicates collapse
    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise FileNotFoundError(f"input '{item}' does not exist")
        if path.is_dir():
            for root, dirs, names in os.walk(path):
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                for name in names:
                    if not name.startswith(".") and name.lower().endswith(exts):
                        found = Path(root) / name
                        seen.setdefault(found.resolve(), found)
        else:
            seen.setdefault(path.resolve(), path)
    if not seen:
        raise ValueError(
            f"no input files with extensions {', '.join(exts)} were found in "
            f"{', '.join(repr(str(i)) for i in inputs)}"
        )
    files = sorted((p for p in seen.values() if p.stat().st_size > 0), key=str)
    if not files:
        raise ValueError(f"all {len(seen)} input files are empty; there is nothing to prepare")
    return files


def iter_documents(path: str | Path, text_key: str = "text") -> Iterator[str]:
    """Documents of one file: .jsonl by line, .parquet by row, anything else whole.

    Empty documents are skipped. Text is decoded as UTF-8 with invalid bytes replaced.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _iter_jsonl(path, text_key)
    elif suffix == ".parquet":
        yield from _iter_parquet(path, text_key)
    else:
        text = path.read_text(encoding="utf-8", errors="replace")
        if text:
            yield text


def _iter_jsonl(path: Path, text_key: str) -> Iterator[str]:
    with path.open(encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{path} line {lineno} is not valid JSON") from None
            if not isinstance(record, dict) or text_key not in record:
                raise ValueError(f"{path} line {lineno} has no '{text_key}' field")
            text = record[text_key]
            if not isinstance(text, str):
                raise ValueError(
                    f"{path} line {lineno} has a '{text_key}' field that is "
                    f"{type(text).__name__}, not a string"
                )
            if text:
                yield text


def _iter_parquet(path: Path, text_key: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    columns = pf.schema_arrow.names
    if text_key not in columns:
        raise ValueError(f"{path} has no column '{text_key}' (columns: {', '.join(columns)})")
    # Batches keep memory bounded for large files.
    for batch in pf.iter_batches(batch_size=1024, columns=[text_key]):
        for text in batch.column(0).to_pylist():
            if text is None:
                continue
            if not isinstance(text, str):
                raise ValueError(
                    f"{path} column '{text_key}' holds {type(text).__name__}, not strings"
                )
            if text:
                yield text


def stdlib_files() -> list[Path]:
    """The running interpreter's standard-library .py files, without tests or packages.

    Sorted by path relative to the stdlib root, so the list (and a corpus built from
    it) is the same on every run with the same Python.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"the standard library directory '{root}' does not exist")
    found: list[tuple[str, Path]] = []
    for dirpath, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _STDLIB_SKIP_DIRS and not d.startswith(".")]
        for name in names:
            if name.endswith(".py") and not name.startswith("test_"):
                p = Path(dirpath) / name
                found.append((p.relative_to(root).as_posix(), p))
    found.sort()
    return [p for _, p in found]
