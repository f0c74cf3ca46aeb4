"""Bad numbers, fault notes and test-time fault injection.

- :class:`StepGuard` decides whether a step's update may be applied: a non-finite loss or
  gradient norm, or (optionally) a loss above ``fault.spike_factor`` times the mean of
  the recent good losses, skips the update; ``fault.max_skipped_steps`` consecutive skips
  stop the run. Every rank sees the same global loss and norm, so every rank decides
  alike. Its state travels in checkpoints, so a resumed run judges exactly as an
  uninterrupted one.
- Fault notes: a rank that fails for a known reason (a hang, an exception) leaves one line
  in ``run_dir/faults/``; the next attempt of an elastic job reads them as the cause of its
  restart, and a note marked fatal (the run stopped on bad numbers) stops the restarts.
- ``BAOBAB_FAULT_INJECT`` (for tests and for rehearsing failures on a real cluster) makes
  real faults happen inside real steps; unset, it costs one ``if`` per step. A
  comma-separated list of:

  ``nan@STEPS``        the loss of those steps is multiplied by NaN before backward, so the
                       loss and every gradient are NaN;
  ``spike@STEPS``      the loss of those steps is multiplied by 100 before backward;
  ``hang@STEP[:RANK]`` that rank (default 0) sleeps for an hour inside the step, while
                       loading its data.

  ``STEPS`` is one step or a range ``a-b`` (1-based, as in the metrics). A fault fires each
  time the step runs, resumed attempts included. Not supported under pipeline parallelism.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from baobab.train.config import FaultConfig

INJECT_ENV = "BAOBAB_FAULT_INJECT"
NOTES_DIR = "faults"
HANG_SECONDS = 3600.0
SPIKE_MULTIPLIER = 100.0


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. the loss stopped being finite); the message says why."""


class StepGuard:
    """Judges each step's global loss and gradient norm before the optimizer may use them."""

    def __init__(self, cfg: FaultConfig):
        self.cfg = cfg
        self.recent: deque[float] = deque(maxlen=cfg.spike_window)  # last good losses
        self.consecutive = 0  # skipped updates in a row, up to now
        self.nonfinite = 0  # totals over the whole run
        self.spikes = 0

    @property
    def skipped(self) -> int:
        return self.nonfinite + self.spikes

    @property
    def exhausted(self) -> bool:
        """True once ``fault.max_skipped_steps`` updates in a row were skipped."""
        return self.consecutive >= self.cfg.max_skipped_steps

    def judge(self, loss: float, grad_norm: float) -> str | None:
        """None when the update may go ahead, else why it must be skipped (and counted)."""
        if not math.isfinite(loss):
            reason = f"non-finite loss ({loss})"
            self.nonfinite += 1
        elif not math.isfinite(grad_norm):
            reason = f"non-finite gradient norm ({grad_norm})"
            self.nonfinite += 1
        elif self._spiking(loss):
            mean = sum(self.recent) / len(self.recent)
            reason = (
                f"loss spike ({loss:.4g} is over {self.cfg.spike_factor:g} x the recent "
                f"mean {mean:.4g})"
            )
            self.spikes += 1
        else:
            self.recent.append(loss)
            self.consecutive = 0
            return None
        self.consecutive += 1
        return reason

    def _spiking(self, loss: float) -> bool:
        factor = self.cfg.spike_factor
        if factor is None or len(self.recent) < self.cfg.spike_window:
            return False
        return loss > factor * (sum(self.recent) / len(self.recent))

    def state_dict(self) -> dict[str, Any]:
        return {
            "recent": list(self.recent),
            "consecutive": self.consecutive,
            "nonfinite": self.nonfinite,
            "spikes": self.spikes,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.recent = deque(state["recent"], maxlen=self.cfg.spike_window)
        self.consecutive = int(state["consecutive"])
        self.nonfinite, self.spikes = int(state["nonfinite"]), int(state["spikes"])


# -- fault notes ------------------------------------------------------------------------------
def write_note(run_dir: str | Path, rank: int, cause: str, fatal: bool = False) -> None:
    """Leave ``cause`` for the next attempt (best effort: a failing disk must not hide the
    fault being reported)."""
    try:
        root = Path(run_dir) / NOTES_DIR
        root.mkdir(parents=True, exist_ok=True)
        note = {"time": round(time.time(), 3), "rank": rank, "cause": cause, "fatal": fatal}
        part = root / f".rank_{rank:05d}.part"
        part.write_text(json.dumps(note) + "\n")
        os.replace(part, root / f"rank_{rank:05d}.json")
    except OSError:
        pass


def read_notes(run_dir: str | Path) -> list[dict[str, Any]]:
    """The notes the previous attempt left, oldest first."""
    notes = []
    for path in sorted((Path(run_dir) / NOTES_DIR).glob("rank_*.json")):
        try:
            notes.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue  # a note cut short by the crash it reports
    return sorted(notes, key=lambda n: n.get("time", 0))


def clear_notes(run_dir: str | Path) -> None:
    shutil.rmtree(Path(run_dir) / NOTES_DIR, ignore_errors=True)


_SOURCE_LOCATION = re.compile(r"\[[^\]]*\.(?:cc|cpp|h|hpp):\d+\] ")


def describe_error(err: BaseException, rank: int) -> str:
    """One line for a note: the exception's first sentence, without C++ source locations."""
    text = _SOURCE_LOCATION.sub("", " ".join(str(err).split()))
    return f"rank {rank}: {type(err).__name__}: {text.split('. ')[0][:300]}"


def summarize_notes(notes: list[dict[str, Any]]) -> str:
    """One line for a restart record: the distinct causes the ranks reported."""
    if not notes:
        return (
            "no rank left a note: a worker was killed by a signal or its node was lost "
            "(the launcher's log has the exit codes)"
        )
    causes = list(dict.fromkeys(n["cause"] for n in notes))
    extra = f" (and {len(causes) - 3} more)" if len(causes) > 3 else ""
    return "; ".join(causes[:3]) + extra


# -- injection --------------------------------------------------------------------------------
_ENTRY = re.compile(r"(nan|spike|hang)@(\d+)(?:-(\d+))?(?::(\d+))?")


@dataclass
class FaultInjector:
    """The faults ``BAOBAB_FAULT_INJECT`` asks for (see the module docstring)."""

    nan: set[int] = field(default_factory=set)
    spike: set[int] = field(default_factory=set)
    hang: dict[int, int] = field(default_factory=dict)  # step -> rank

    @classmethod
    def parse(cls, spec: str) -> FaultInjector:
        injector = cls()
        for entry in filter(None, (e.strip() for e in spec.split(","))):
            match = _ENTRY.fullmatch(entry)
            if match is None:
                raise ValueError(
                    f"{INJECT_ENV} entry '{entry}' is not nan@STEPS, spike@STEPS or hang@STEP[:RANK]"
                )
            kind, first, last, rank = match.groups()
            steps = range(int(first), int(last or first) + 1)
            if kind == "hang":
                injector.hang.update(dict.fromkeys(steps, int(rank or 0)))
            elif rank is not None:
                raise ValueError(f"{INJECT_ENV} entry '{entry}': only hang takes a :RANK")
            else:
                getattr(injector, kind).update(steps)
        return injector

    @classmethod
    def from_env(cls) -> FaultInjector | None:
        spec = os.environ.get(INJECT_ENV, "")
        return cls.parse(spec) if spec.strip() else None

    def loss_factor(self, step: int) -> float | None:
        """What the loss of ``step`` is multiplied by before backward (None: nothing)."""
        if step in self.nan:
            return math.nan
        return SPIKE_MULTIPLIER if step in self.spike else None

    def maybe_hang(self, step: int, rank: int) -> None:
        if self.hang.get(step) == rank:
            print(f"rank {rank}: {INJECT_ENV}: hanging in step {step}", file=sys.stderr, flush=True)
            time.sleep(HANG_SECONDS)
