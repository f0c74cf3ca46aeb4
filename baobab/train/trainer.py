"""The training loop, on one device or under any parallel layout.

One step is one optimizer update over ``grad_accum`` micro-batches (or one pipeline
schedule run over ``pp_microbatches``). Each micro-batch's mean loss is weighted by its
share of the step's loss terms across all data-parallel ranks, so the step's gradient is
that of the mean over every term in the global batch: exact for unequal batches, for
full-batch gradient descent (a step is a whole epoch) and under data parallelism, whose
gradient reduction averages over ``dp`` ranks (hence the ``dp`` factor in the weight).

Resume invariant: a checkpoint taken after step ``s`` holds everything later steps read
(weights, optimizer, schedule, data position, RNG, the bad-step guard), and evaluation
draws from its own generator, so resuming from it replays steps ``s+1..`` exactly on CPU.

Faults (``faults.py``, ``watchdog.py``, ``recovery.py``): a step whose global loss or
gradient norm is non-finite (or spikes) skips its update, which leaves weights and
optimizer state as they were; the step still counts, its data is consumed and the schedule
advances. Every phase of a step is announced to the hang watchdog. Where a run starts
(fresh, resumed, restarted) is decided by ``recovery.plan_start``.

The host waits for the device once per logging step, not once per step: the loss, the
gradient norm and the guard's verdict stay on the device (the verdict masks the optimizer
step there, ``baobab.optim.skip``), and each step leaves a row of them that the host reads,
for all the steps since the last read, on logging, evaluation and checkpoint steps (every
step with ``train.target_loss``, which needs the loss). Skipped updates are reported then,
in order; the run stops at the step that exhausted ``fault.max_skipped_steps`` (later
updates are held on the device until it is read). Throughput and MFU are measured over the
steps between two reads, when the device has finished them.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from baobab.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    wait_for_checkpoint,
)
from baobab.data.loader import Prefetcher
from baobab.diskspace import writing
from baobab.optim import clip_gradients
from baobab.optim.skip import SkippableStep
from baobab.parallel import ParallelModel, clip_grad_norm_parallel
from baobab.train import distributed as bdist
from baobab.train.config import FaultConfig, TrainerConfig
from baobab.train.device import PeakMeter, autocast_context, compute_dtype, mfu, pick_device
from baobab.train.evaluate import evaluate
from baobab.train.faults import (
    FaultInjector,
    StepGuard,
    TrainingError,
    describe_error,
    write_note,
)
from baobab.train.metrics import MetricsLog, Progress, format_values
from baobab.train.objectives import Batch, Objective, build_objective
from baobab.train.recovery import StartPlan, plan_start
from baobab.train.watchdog import Watchdog

__all__ = ["TrainResult", "Trainer", "TrainingError"]


@dataclass
class TrainResult:
    step: int
    loss: float
    val: dict[str, float] = field(default_factory=dict)
    checkpoint: Path | None = None
    losses: list[float] = field(default_factory=list)  # training loss of each step run here


@dataclass
class _Pending:
    """A step whose numbers the host has not read yet."""

    step: int
    row: torch.Tensor  # (loss, grad norm, verdict, recent mean), float64 on the device
    items: int | torch.Tensor  # items of the global batch (a device tensor when all-reduced)
    lr: float
    epoch: int


class Trainer:
    """Trains a model with its optimizer on batches from ``train_loader``.

    ``model`` is an ``nn.Module`` or a :class:`baobab.parallel.ParallelModel` (its parts each
    have an optimizer in ``optimizer``, given as a list). ``train_loader`` and ``val_loader``
    are :class:`baobab.data.DataLoader` objects for this rank. ``flops_per_item`` (per token
    for language models, per sample otherwise) enables the MFU readout. ``fault`` sets the
    hang watchdog and the bad-step guard (defaults when omitted).
    """

    def __init__(
        self,
        model: nn.Module | ParallelModel,
        optimizer: torch.optim.Optimizer | list[torch.optim.Optimizer],
        train_loader: Any,
        *,
        cfg: TrainerConfig,
        objective: Objective | str = "regression",
        scheduler: Any = None,
        val_loader: Any = None,
        grad_clip_norm: float | None = None,
        grad_clip_value: float | None = None,
        full_batch: bool = False,
        flops_per_item: float | None = None,
        meta: dict[str, Any] | None = None,
        tokenizer_file: str | Path | None = None,
        device: torch.device | None = None,
        fault: FaultConfig | None = None,
    ):
        self.parallel = model if isinstance(model, ParallelModel) else None
        self.parts: list[nn.Module] = self.parallel.parts if self.parallel else [model]
        self.model = self.parts[0]
        self.optimizers = list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
        self.schedulers = (
            list(scheduler)
            if isinstance(scheduler, (list, tuple))
            else [scheduler]
            if scheduler
            else []
        )
        self.train_loader, self.val_loader, self.cfg = train_loader, val_loader, cfg
        self.objective = build_objective(objective) if isinstance(objective, str) else objective
        self.clip_norm, self.clip_value = grad_clip_norm, grad_clip_value
        self.flops_per_item, self.meta, self.tokenizer_file = (
            flops_per_item,
            meta or {},
            tokenizer_file,
        )
        self.run_dir = Path(cfg.run_dir)
        self.pipelined = self.parallel is not None and self.parallel.schedule is not None
        # Full-batch gradient descent: one update per pass over the whole training set.
        self.grad_accum = train_loader.batches_per_epoch if full_batch else cfg.grad_accum
        if self.pipelined and self.grad_accum > 1:
            raise ValueError(
                "pipeline parallelism accumulates through parallel.pp_microbatches; set train.grad_accum 1"
            )
        if cfg.max_steps is None and cfg.max_epochs is None:
            raise ValueError(
                "set train.max_steps or train.max_epochs so the run knows when to stop"
            )
        self.steps_per_epoch = max(1, train_loader.batches_per_epoch // self.grad_accum)
        limits = [cfg.max_steps] if cfg.max_steps else []
        if cfg.max_epochs:
            limits.append(cfg.max_epochs * self.steps_per_epoch)
        self.total_steps = min(limits)
        self.device = device or pick_device(cfg.device)
        self.dp_size = self.parallel.cfg.dp_size if self.parallel else 1
        # One rank per model replica reports sums (see baobab.train.distributed).
        self.contributes = self.parallel is None or self.parallel.reports
        self.step = 0
        self._eval_generator_seed = cfg.seed + 1  # evaluation never touches the training RNG
        self.fault = fault or FaultConfig()
        self.guard = StepGuard(self.fault)
        self.watchdog = Watchdog(self.fault.hang_timeout, self.run_dir)
        self.injector = FaultInjector.from_env()  # None unless BAOBAB_FAULT_INJECT is set
        # The next batch is drawn (and pinned for a GPU) while a step runs.
        self.batches = Prefetcher(train_loader, self.device, pin=self.device.type == "cuda")
        self._steppers: list[SkippableStep] | None = None  # made at the first step
        self.peak: PeakMeter | None = None  # what MFU divides by, made when fit() starts
        if self.injector and self.pipelined and (self.injector.nan or self.injector.spike):
            raise ValueError("BAOBAB_FAULT_INJECT nan/spike do not work under pipeline parallelism")

    # -- state ----------------------------------------------------------------------------
    def trainer_state(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        return {
            "step": self.step,
            "schedulers": [s.state_dict() for s in self.schedulers],
            "data": self.batches.state_dict(),
            "rng": rng,
            "guard": self.guard.state_dict(),
        }

    def load_trainer_state(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        for scheduler, sd in zip(self.schedulers, state["schedulers"]):
            scheduler.load_state_dict(sd)
        self.batches.load_state_dict(state["data"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["rng"]["cuda"])
        if "guard" in state:  # checkpoints from before the guard start it afresh
            self.guard.load_state_dict(state["guard"])

    def save(self) -> Path:
        self.watchdog.phase(f"step {self.step}: checkpoint save")
        self._refuse_non_finite_weights()
        with writing(f"checkpoint step_{self.step:08d} in run directory '{self.run_dir}'", self.run_dir):  # fmt: skip
            return save_checkpoint(
                self.run_dir, self.step, self.parts, self.optimizers, self.trainer_state(), self.meta,
                tokenizer_file=self.tokenizer_file, keep_last=self.cfg.keep_last, async_save=self.cfg.async_save,
            )  # fmt: skip

    def _refuse_non_finite_weights(self) -> None:
        """A checkpoint must never hold bad weights (an update can overflow with a finite
        loss and gradient); collective, so every rank refuses alike."""
        local = [p.to_local() if isinstance(p, DTensor) else p for part in self.parts for p in part.parameters()]  # fmt: skip
        bad = bool(torch.stack([~torch.isfinite(p.detach()).all() for p in local]).any()) if local else False  # fmt: skip
        (total,) = bdist.global_sum([float(bad)], True, self.device)
        if total:
            raise TrainingError(
                f"the weights became non-finite by step {self.step}; stopped without saving, "
                f"{self._last_good()}"
            )

    def _last_good(self) -> str:
        kept = latest_checkpoint(self.run_dir)
        return f"the last good checkpoint is {kept}" if kept else "no checkpoint was written"

    # -- the loop -------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        """Train until max steps/epochs or the target loss; save and evaluate at the end."""
        for part in self.parts:
            part.to(self.device)
        self.watchdog.start()
        try:
            self.watchdog.phase("start: preparing the run directory")
            plan = plan_start(self.run_dir, self.cfg)
            try:
                return self._fit(plan)
            except Exception as err:  # the run dir is ours now: tell the next attempt why
                self.watchdog.hold()  # after a declared hang, its exit (and note) win
                cause = describe_error(err, bdist.rank())
                write_note(self.run_dir, bdist.rank(), cause, fatal=isinstance(err, TrainingError))
                raise
        finally:
            self.watchdog.stop()

    def _fit(self, plan: StartPlan) -> TrainResult:
        cfg = self.cfg
        if plan.checkpoint is not None:
            self.watchdog.phase("start: loading the checkpoint")
            self.load_trainer_state(load_checkpoint(plan.checkpoint, self.parts, self.optimizers))
        main = bdist.is_main()
        log = MetricsLog(self.run_dir) if main else None
        if self.flops_per_item:
            dtype = compute_dtype(self.device, cfg.precision)
            self.peak = PeakMeter(self.device, dtype, given=cfg.peak_flops)
        unit = "tok" if self.objective.metric == "perplexity" else "samples"
        if log and (plan.checkpoint or plan.restart):
            log.write(plan.record(self.step))
        if main:
            for line in plan.report(self.step):
                print(line, file=sys.stderr, flush=True)
        progress = Progress(self.total_steps, self.step, cfg.progress and main, unit)
        if self.peak is not None and cfg.progress and main:
            progress.write(f"mfu against {self.peak.value / 1e12:.3g} TFLOP/s ({self.peak.source})")
        result = TrainResult(step=self.step, loss=math.nan)
        val: dict[str, float] = {}
        pending: list[_Pending] = []
        try:
            if self.step == 0 and self.val_loader is not None and cfg.eval_every:
                val = self._evaluate_and_report(log, progress)  # the start of the validation curve
            self._window = time.perf_counter()  # throughput is measured from here
            while self.step < self.total_steps:
                _, _, items, row = self._train_step()
                self.step += 1
                lr = self.optimizers[0].param_groups[0]["lr"]
                pending.append(_Pending(self.step, row, items, lr, self.batches.epoch))
                progress.step()
                for scheduler in self.schedulers:
                    scheduler.step()
                step, at_end = self.step, self.step == self.total_steps
                evaluating = cfg.eval_every and step % cfg.eval_every == 0
                saving = cfg.save_every and step % cfg.save_every == 0
                read = at_end or step % cfg.log_every == 0 or evaluating or saving or cfg.target_loss is not None  # fmt: skip
                if read:  # the one host synchronisation, on these steps only
                    self._read(pending, result, log, progress, unit)
                reached = cfg.target_loss is not None and result.losses[-1] <= cfg.target_loss
                last = at_end or reached
                if self.val_loader is not None and (last or evaluating):
                    val = self._evaluate_and_report(log, progress)
                if last or saving:
                    result.checkpoint = self.save()
                if read:  # the next window starts after evaluation and saving
                    self._window = time.perf_counter()
                if reached:
                    if log:
                        progress.write(
                            f"step {self.step}: loss {result.losses[-1]:.4f} reached train.target_loss {cfg.target_loss}"
                        )
                    break
            if self.cfg.async_save:  # collective: publish the last background save
                self.watchdog.phase("end: finishing the last checkpoint")
                with writing(
                    f"the last checkpoint in run directory '{self.run_dir}'", self.run_dir
                ):
                    result.checkpoint = wait_for_checkpoint() or result.checkpoint
        finally:
            self.batches.close()
            progress.close()
            if log:
                log.close()
        result.step, result.val = self.step, val
        result.loss = result.losses[-1] if result.losses else math.nan
        return result

    def _read(
        self, pending: list[_Pending], result: TrainResult, log: MetricsLog | None,
        progress: Progress, unit: str,
    ) -> None:  # fmt: skip
        """Read the rows of the pending steps (one host synchronisation for all of them),
        then report each step in order: its loss, a skipped update, a metrics line."""
        self.watchdog.phase(f"step {self.step}: reading the loss")
        counts = [p.items for p in pending if isinstance(p.items, torch.Tensor)]
        flat = torch.cat([torch.stack([p.row for p in pending]).flatten(), *(c.view(1) for c in counts)])  # fmt: skip
        values = flat.tolist()
        rows, device_items = values[: 4 * len(pending)], iter(values[4 * len(pending) :])
        items = sum(next(device_items) if isinstance(p.items, torch.Tensor) else p.items for p in pending)  # fmt: skip
        throughput = items / max(time.perf_counter() - self._window, 1e-9)
        peak = self.peak.refresh() if self.peak is not None else None
        util = mfu(throughput * self.flops_per_item, peak, bdist.world_size()) if peak else None
        for i, p in enumerate(pending):
            row = rows[4 * i : 4 * i + 4]
            result.losses.append(row[0])
            reason = self.guard.account(row)
            if reason is not None:
                self._report_skipped(p.step, reason, log, progress)
            elif log and (p.step % self.cfg.log_every == 0 or p.step == self.total_steps):
                record = {"step": p.step, "epoch": p.epoch, "loss": row[0], "lr": p.lr,
                          "grad_norm": row[1], f"{unit}_per_s": throughput}  # fmt: skip
                if util is not None:
                    record["mfu"], record["peak_flops"] = util, peak
                if self.guard.skipped:
                    record["skipped_steps"] = self.guard.skipped
                log.write(record)
        progress.show(result.losses[-1], pending[-1].lr, throughput, util)
        pending.clear()

    def _report_skipped(
        self, step: int, reason: str, log: MetricsLog | None, progress: Progress
    ) -> None:
        """Count a skipped update in the metrics (always, whatever train.log_every); stop
        after ``fault.max_skipped_steps`` in a row."""
        guard = self.guard
        if log:
            log.write({"step": step, "event": "skipped_step", "reason": reason,
                       "skipped_steps": guard.skipped, "nonfinite_steps": guard.nonfinite,
                       "spike_steps": guard.spikes})  # fmt: skip
            progress.write(f"step {step}: update skipped: {reason}")
        if guard.exhausted:
            raise TrainingError(
                f"{guard.consecutive} updates in a row were skipped, the last for a {reason} at "
                f"step {step}; stopped, {self._last_good()}"
            )

    def _train_step(self) -> tuple[torch.Tensor, torch.Tensor, int | torch.Tensor, torch.Tensor]:
        """One optimizer update, read by the host nowhere; returns (global mean loss, grad
        norm, items processed globally, the guard's row), on the device but the items (a
        host int without a process group)."""
        step, phase = self.step + 1, self.watchdog.phase
        for part in self.parts:
            part.train()
        phase(f"step {step}: loading data")
        if self.injector:
            self.injector.maybe_hang(step, bdist.rank())
        batches = [
            self.objective.prepare(*self.batches.next_batch()) for _ in range(self.grad_accum)
        ]
        local_terms = sum(b.count for b in batches)  # an int, or a device tensor (masked LM)
        local_items = sum(self.objective.items(b) for b in batches)
        phase(f"step {step}: all-reduce of the batch size")
        total_terms, total_items = self._global_counts(local_terms, local_items)
        phase(f"step {step}: forward/backward")
        factor = self.injector.loss_factor(step) if self.injector else None
        if self.pipelined:
            local_loss = self._pipeline_step(batches[0])
        else:
            local_loss = torch.zeros((), device=self.device)
            for batch in batches:
                with autocast_context(self.device, self.cfg.precision):
                    loss, _ = self.objective.loss(self.model, batch)
                if factor is not None:  # BAOBAB_FAULT_INJECT: a real NaN or spike
                    loss = loss * factor
                # weight = this batch's share of the global terms, times dp for the dp-average
                (loss * _share(batch.count * self.dp_size, total_terms, loss.dtype)).backward()
                local_loss += loss.detach() * batch.count
        phase(f"step {step}: all-reduce of the loss")
        step_loss = self._global_sum(local_loss.double()) / total_terms  # float64, 0-dim
        phase(f"step {step}: gradient norm")
        grad_norm = self._clip()
        skip, row = self.guard.judge(step_loss, grad_norm)  # the same verdict on every rank
        phase(f"step {step}: optimizer")
        if self._steppers is None:  # after fit() moved the model and loaded a checkpoint
            self._steppers = [SkippableStep(opt, self.device) for opt in self.optimizers]
        for stepper in self._steppers:
            stepper.step(skip)
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        return step_loss, grad_norm, total_items, row

    def _global_counts(
        self, terms: int | torch.Tensor, items: int
    ) -> tuple[int | torch.Tensor, int | torch.Tensor]:
        """Loss terms and items summed over the replicas (see ``bdist.global_sum``), left
        on the device; unchanged without a process group."""
        if not dist.is_initialized():
            return terms, items
        if isinstance(terms, torch.Tensor):
            counts = torch.stack([terms.double(), terms.new_full((), items, dtype=torch.float64)])  # fmt: skip
        else:  # from page-locked memory, so the copy does not wait for the device
            pin = self.device.type == "cuda"
            host = torch.tensor([terms, items], dtype=torch.float64, pin_memory=pin)
            counts = host.to(self.device, non_blocking=True)
        if not self.contributes:
            counts = torch.zeros_like(counts)
        dist.all_reduce(counts)
        return counts[0], counts[1]

    def _global_sum(self, value: torch.Tensor) -> torch.Tensor:
        if not dist.is_initialized():
            return value
        value = value if self.contributes else torch.zeros_like(value)
        dist.all_reduce(value)
        return value

    def _pipeline_step(self, batch: Batch) -> torch.Tensor:
        """Run the pipeline schedule over the micro-batches of ``batch``; returns the mean
        micro-batch loss times the batch's terms. The schedule averages the micro-batch
        gradients; data parallelism then averages over replicas."""
        with autocast_context(self.device, self.cfg.precision):
            loss = self.parallel.pipeline_step(batch.inputs, batch.targets)
        return loss * batch.count

    def _clip(self) -> torch.Tensor:
        if self.parallel is not None:
            return clip_grad_norm_parallel(
                self.parts, self.clip_norm, self.clip_value, self.parallel.pp_group
            )
        return clip_gradients(self.model.parameters(), self.clip_norm, self.clip_value)

    def _evaluate_and_report(self, log: MetricsLog | None, progress: Progress) -> dict[str, float]:
        self.watchdog.phase(f"step {self.step}: evaluation")
        val = self.evaluate()
        if self.parallel is not None:
            self.parallel.reshard()  # free what an evaluation forward gathered (ZeRO-2 mode)
        if log:
            log.write({"step": self.step, **val})
        if log:  # rank 0 alone reports
            progress.write(f"step {self.step:>6}  {format_values(val)}")
        return val

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation figures on train.eval_batches global batches spread over the split
        (0: all of it), the same samples, and masks for masked LM, at every evaluation."""
        generator = torch.Generator(device=self.device).manual_seed(self._eval_generator_seed)
        return evaluate(
            self.model, self.val_loader, self.objective.for_evaluation(), self.device, self.cfg.precision, self.cfg.eval_batches,
            generator, parallel=self.parallel, seed=self.cfg.seed,
        )  # fmt: skip


def _share(part: int | torch.Tensor, total: int | torch.Tensor, dtype: torch.dtype) -> Any:
    """``part / total`` in float64 (as Python divides), cast to the loss's ``dtype`` when
    either is a tensor: the loss weight of a micro-batch, never read by the host."""
    if not isinstance(part, torch.Tensor) and not isinstance(total, torch.Tensor):
        return part / total
    part = part.double() if isinstance(part, torch.Tensor) else part
    return torch.div(part, total.double() if isinstance(total, torch.Tensor) else total).to(dtype)
