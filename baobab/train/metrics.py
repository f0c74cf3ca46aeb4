"""Where a run reports: metrics.jsonl (always), TensorBoard (when installed), a progress bar."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

METRICS_FILE = "metrics.jsonl"
# Records about the run itself rather than one of its steps: kept when a restart rewinds.
LIFECYCLE_EVENTS = ("restart", "resume")


class MetricsLog:
    """Appends one JSON object per line to ``run_dir/metrics.jsonl``; mirrors scalars to
    TensorBoard when the ``tensorboard`` package is importable."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True):
        self.path = Path(run_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", buffering=1)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError:
                self._tb = None

    def write(self, record: dict[str, Any]) -> None:
        record = {"time": round(time.time(), 3), **record}
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None and "step" in record:
            for key, value in record.items():
                if key not in ("step", "time", "event") and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"'{run_dir}' has no {METRICS_FILE}; is it a baobab run directory?")
    return _parse(path.read_text())


def _parse(text: str) -> list[dict[str, Any]]:
    """Every record; a line cut short by a crash (killed mid-write) is skipped."""
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def rewind_metrics(run_dir: str | Path, step: int) -> int:
    """Drop the records of steps after ``step`` (work a crash lost, to be done again) and a
    torn last line, keeping restart and resume records; returns how many were dropped.

    The file is replaced in one rename, so a crash meanwhile leaves the old one whole.
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return 0
    text = path.read_text()
    records = _parse(text)
    # From scratch (step 0) even the step-0 evaluation will be redone.
    kept = [
        r for r in records if r.get("event") in LIFECYCLE_EVENTS or 0 < r.get("step", 0) <= step
    ]
    dropped = len([line for line in text.splitlines() if line.strip()]) - len(kept)
    if dropped:
        part = path.with_name(f"{METRICS_FILE}.part")
        part.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(part, path)
    return dropped


def format_values(values: dict[str, Any]) -> str:
    """``key value`` pairs for a log line: floats to 4 decimals, counts (val_tokens) whole."""
    return "  ".join(
        f"{k} {v}" if isinstance(v, int) else f"{k} {v:.4f}" for k, v in values.items()
    )


class Progress:
    """A progress bar over optimizer steps showing loss, lr, throughput, MFU (tqdm adds ETA)."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True, unit: str = "tok"):
        self.unit = unit
        self._bar = tqdm(
            total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True
        )

    def step(self) -> None:
        """One more optimizer step done (the figures follow when the host reads them)."""
        self._bar.update(1)

    def show(self, loss: float, lr: float, throughput: float, mfu: float | None) -> None:
        """The figures of the last step read: loss and lr, throughput and MFU over the steps
        since the previous read."""
        postfix = {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}", f"{self.unit}/s": f"{throughput:,.0f}"}
        if mfu is not None:
            postfix["mfu"] = f"{100 * mfu:.1f}%"
        self._bar.set_postfix(postfix)

    def write(self, message: str) -> None:
        self._bar.write(message)

    def close(self) -> None:
        self._bar.close()
