"""Bad numbers, fault notes and test-time fault injection.

- :class:`StepGuard` decides whether a step's update may be applied: a non-finite loss or
  gradient norm, or (optionally) a loss above ``fault.spike_factor`` times the mean of
  the recent good losses, skips the update; ``fault.max_skipped_steps`` consecutive skips
  stop the run. It decides on the device (the optimizer step is masked by the verdict,
  ``baobab.optim.skip``) and the host reads the verdicts with the loss, on logging steps.
  Every rank sees the same global loss and norm, so every rank decides alike. Its state
  travels in checkpoints, so a resumed run judges exactly as an uninterrupted one.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from baobab.train.config import FaultConfig

INJECT_ENV = "BAOBAB_FAULT_INJECT"
NOTES_DIR = "faults"
HANG_SECONDS = 3600.0
SPIKE_MULTIPLIER = 100.0
# A step's verdict, as StepGuard.judge writes it into the row the host reads.
NONFINITE_LOSS, NONFINITE_NORM, SPIKE, HELD = 1, 2, 3, 4


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. the loss stopped being finite); the message says why."""


class StepGuard:
    """Judges each step's global loss and gradient norm on the device, before the optimizer
    may use them; the host learns the verdicts later, in order (``account``).

    ``judge`` never reads a value on the host: it returns a 0-dim bool ``skip`` for
    ``baobab.optim.skip.SkippableStep`` and a row (loss, norm, verdict, recent mean) that
    the trainer reads with the loss, on logging steps. The window of recent good losses and
    the count of consecutive skips live on the device. Once ``fault.max_skipped_steps`` are
    skipped in a row, every later update is held (skipped too, verdict ``HELD``), so the
    weights stay those of the step the run stops at, however late the host reads it.
    """

    def __init__(self, cfg: FaultConfig):
        self.cfg = cfg
        self.consecutive = 0  # skipped updates in a row, up to the last accounted step
        self.nonfinite = 0  # totals over the whole run, up to the last accounted step
        self.spikes = 0
        self._loaded: list[float] = []  # last good losses of a checkpoint, oldest first
        self._recent: torch.Tensor | None = None  # (spike_window,) float64, newest last
        self._filled: torch.Tensor | None = None  # how many of _recent are losses, 0-dim
        self._run: torch.Tensor | None = None  # skips in a row on the device, 0-dim int64

    @property
    def skipped(self) -> int:
        return self.nonfinite + self.spikes

    @property
    def exhausted(self) -> bool:
        """True once ``fault.max_skipped_steps`` updates in a row were skipped."""
        return self.consecutive >= self.cfg.max_skipped_steps

    def _start(self, device: torch.device) -> None:
        window = self.cfg.spike_window
        recent = torch.zeros(window, dtype=torch.float64)
        if self._loaded:
            recent[window - len(self._loaded) :] = torch.tensor(self._loaded, dtype=torch.float64)
        self._recent = recent.to(device)
        self._filled = torch.tensor(len(self._loaded), device=device)
        self._run = torch.tensor(self.consecutive, device=device)

    def judge(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """(skip, row) for a step's global mean loss (0-dim float64) and gradient norm, both
        on the device and the same on every rank, so every rank decides alike."""
        if self._recent is None:
            self._start(loss.device)
        recent, filled, run, window = self._recent, self._filled, self._run, self.cfg.spike_window
        norm = grad_norm.detach().to(torch.float64)
        mean = recent.sum() / window  # the mean of the window once it is full
        verdict = torch.where(norm.isfinite(), 0, NONFINITE_NORM)
        if self.cfg.spike_factor is not None:
            spike = (filled >= window) & (loss > self.cfg.spike_factor * mean)
            verdict = torch.where(spike & (verdict == 0), SPIKE, verdict)
        verdict = torch.where(loss.isfinite(), verdict, NONFINITE_LOSS)
        verdict = torch.where(run >= self.cfg.max_skipped_steps, HELD, verdict)
        skip = verdict != 0
        # A good loss joins the window (the oldest leaves); a skip extends the run.
        recent.copy_(torch.where(skip, recent, torch.cat([recent[1:], loss.view(1)])))
        filled.copy_(torch.where(skip, filled, (filled + 1).clamp(max=window)))
        run.copy_(torch.where(skip, run + (verdict != HELD), 0))
        return skip, torch.stack([loss, norm, verdict.to(torch.float64), mean])

    def account(self, row: list[float]) -> str | None:
        """Take in one step's row as read by the host, in step order: None when the update
        went ahead, else why it was skipped (and counted)."""
        loss, norm, verdict, mean = row
        if verdict == 0:
            self.consecutive = 0
            return None
        if verdict == NONFINITE_LOSS:
            reason = f"non-finite loss ({loss})"
            self.nonfinite += 1
        elif verdict == NONFINITE_NORM:
            reason = f"non-finite gradient norm ({norm})"
            self.nonfinite += 1
        elif verdict == SPIKE:
            reason = (
                f"loss spike ({loss:.4g} is over {self.cfg.spike_factor:g} x the recent "
                f"mean {mean:.4g})"
            )
            self.spikes += 1
        else:  # HELD: after a run of skips that already stopped the run
            return "held after too many skipped updates"
        self.consecutive += 1
        return reason

    def state_dict(self) -> dict[str, Any]:
        """Valid once every judged step has been accounted (the trainer reads before saving)."""
        if self._recent is None:
            recent = list(self._loaded)
        else:
            filled = int(self._filled)
            recent = self._recent.tolist()[self.cfg.spike_window - filled :] if filled else []
        return {
            "recent": recent,
            "consecutive": self.consecutive,
            "nonfinite": self.nonfinite,
            "spikes": self.spikes,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._loaded = [float(x) for x in state["recent"]][-self.cfg.spike_window :]
        self.consecutive = int(state["consecutive"])
        self.nonfinite, self.spikes = int(state["nonfinite"]), int(state["spikes"])
        self._recent = self._filled = self._run = None  # rebuilt on the next judge


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
