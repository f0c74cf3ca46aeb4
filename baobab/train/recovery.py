"""Where a run starts: fresh, resumed on request, or resumed by itself after a restart.

Rank 0 alone looks at the run directory and decides; every rank receives the decision
(:class:`StartPlan`) by broadcast, so ranks on different nodes never disagree.

Elastic restarts (``baobab train --max-restarts N``): torchrun's agent restarts the
workers after any failure, with ``TORCHELASTIC_RESTART_COUNT`` > 0 (on the nodes whose
agent restarted; a replaced node starts at 0, hence the maximum over ranks). A run
directory belongs to the torchrun job whose first attempt started in it: ``job.json``
holds torchrun's run id (``--rdzv-id``, or a fresh id per ``--standalone`` launch). A
restart of that job resumes by itself from the newest checkpoint that verifies
(``baobab.checkpoint.verify``: every file against the checksum meta.json records), or from
scratch when none does; incomplete and damaged checkpoints are passed over, set aside and
reported (a checkpoint from before checksums is used, and its load warns); the metrics log loses the records of the
steps to be redone and gains a ``restart`` record (time, restart number, cause, step
resumed from). Any other start follows ``train.resume``/``train.overwrite`` as before,
so a restart never adopts another job's directory.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from baobab.checkpoint import checkpoint_dirs, newest_loadable, read_meta, recover_interrupted
from baobab.checkpoint.layout import checkpoint_root, set_aside
from baobab.train import distributed as bdist
from baobab.train.config import TrainerConfig
from baobab.train.faults import (
    TrainingError,
    clear_notes,
    read_notes,
    summarize_notes,
)
from baobab.train.metrics import METRICS_FILE, read_metrics, rewind_metrics

JOB_FILE = "job.json"
RUN_ID_ENV, RESTART_ENV = "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT"


@dataclass
class StartPlan:
    """What every rank does before the first step."""

    checkpoint: str | None = None  # load this one (None: start from scratch)
    restart: int = 0  # this is the n-th restart of the job (0: not a restart)
    cause: str = ""  # why the previous attempt ended, as its ranks reported it
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)
    recovered: list[str] = field(default_factory=list)  # publishes a crash cut short
    error: tuple[str, str] | None = None  # (kind, message), raised on every rank

    def record(self, step: int) -> dict:
        """The metrics record of this start (restart or resume)."""
        record: dict = {"event": "restart" if self.restart else "resume", "step": step}
        if self.restart:
            record["restart"] = self.restart
        if self.cause:
            record["cause"] = self.cause
        record["checkpoint"] = Path(self.checkpoint).name if self.checkpoint else None
        if self.ignored:
            record["ignored"] = [{"checkpoint": n, "reason": r} for n, r in self.ignored]
        if self.recovered:
            record["recovered"] = self.recovered
        return record

    def report(self, step: int) -> list[str]:
        """Lines for the person watching: what was passed over and where the run resumes."""
        lines = [f"ignored checkpoint {name}: {reason}" for name, reason in self.ignored]
        lines += [f"recovered checkpoint {name} (its publish was interrupted)" for name in self.recovered]  # fmt: skip
        where = f"step {step} ({Path(self.checkpoint).name})" if self.checkpoint else "scratch"
        if self.restart:
            lines.append(f"restart {self.restart}: resuming from {where}; cause: {self.cause}")
        return lines


def plan_start(run_dir: Path, cfg: TrainerConfig) -> StartPlan:
    """Decide on rank 0 how this attempt starts; collective, every rank gets the plan."""
    restarted = bdist.max_int(int(os.environ.get(RESTART_ENV, "0") or 0)) > 0
    plan = None
    if bdist.is_main():
        try:
            plan = _plan(run_dir, cfg, restarted)
        except Exception as err:  # every rank raises it, none waits for a plan forever
            plan = StartPlan(error=(type(err).__name__, str(err)))
    plan = bdist.broadcast_object(plan)
    if plan.error is not None:
        kind, message = plan.error
        known = {"TrainingError": TrainingError, "ValueError": ValueError, "FileNotFoundError": FileNotFoundError}  # fmt: skip
        raise known.get(kind, RuntimeError)(message)
    return plan


def _plan(run_dir: Path, cfg: TrainerConfig, restarted: bool) -> StartPlan:
    job = os.environ.get(RUN_ID_ENV)
    if restarted and job is not None and _job_of(run_dir) == job:
        notes = read_notes(run_dir)
        fatal = [n for n in notes if n.get("fatal")]
        if fatal:  # notes stay, so every later restart stops here too
            raise TrainingError(
                f"not restarting: rank {fatal[0]['rank']} stopped the run for good: {fatal[0]['cause']}"
            )
        return _resume(run_dir, _restarts_so_far(run_dir) + 1, summarize_notes(notes))
    if cfg.resume:
        notes = read_notes(run_dir)
        plan = _resume(run_dir, 0, summarize_notes(notes) if notes else "")
        if plan.checkpoint is None:
            raise ValueError(
                f"train.resume is set but '{run_dir}' holds no complete checkpoint to resume from"
            )
        _claim(run_dir, job)
        return plan
    if checkpoint_dirs(run_dir) or (run_dir / METRICS_FILE).exists():
        if not cfg.overwrite:
            raise ValueError(
                f"run directory '{run_dir}' already holds a run; pass --train.resume true to "
                "continue it or --train.overwrite true to start over"
            )
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)
        (run_dir / METRICS_FILE).unlink(missing_ok=True)
        clear_notes(run_dir)
    _claim(run_dir, job)
    return StartPlan()


def _resume(run_dir: Path, restart: int, cause: str) -> StartPlan:
    """Pick the newest checkpoint that verifies; set damaged newer ones aside; rewind the
    metrics to it (to nothing when no checkpoint is complete yet)."""
    recovered = recover_interrupted(checkpoint_root(run_dir))
    newest, passed = newest_loadable(run_dir)
    ignored = []
    for path, reason in passed:
        if path.name.startswith("step_"):  # damaged after its publish: out of the way
            path = set_aside(path)
        ignored.append((path.name, reason))
    step = int(read_meta(newest)["step"]) if newest is not None else 0
    rewind_metrics(run_dir, step)
    clear_notes(run_dir)
    checkpoint = str(newest) if newest is not None else None
    return StartPlan(checkpoint, restart, cause, ignored, recovered)


def _restarts_so_far(run_dir: Path) -> int:
    if not (run_dir / METRICS_FILE).is_file():
        return 0
    return sum(1 for r in read_metrics(run_dir) if r.get("event") == "restart")


def _job_of(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / JOB_FILE).read_text()).get("job")
    except (OSError, ValueError, AttributeError):
        return None


def _claim(run_dir: Path, job: str | None) -> None:
    """Mark ``run_dir`` as this torchrun job's, so that its restarts resume by themselves."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / JOB_FILE
    if job is None:
        path.unlink(missing_ok=True)
        return
    part = path.with_name(f"{JOB_FILE}.part")
    part.write_text(json.dumps({"job": job}) + "\n")
    os.replace(part, path)
