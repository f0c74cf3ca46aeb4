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
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from baobab.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    wait_for_checkpoint,
)
from baobab.diskspace import writing
from baobab.optim import clip_gradients
from baobab.parallel import ParallelModel, clip_grad_norm_parallel
from baobab.train import distributed as bdist
from baobab.train.config import FaultConfig, TrainerConfig
from baobab.train.device import autocast_context, peak_flops, pick_device
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
            "data": self.train_loader.state_dict(),
            "rng": rng,
            "guard": self.guard.state_dict(),
        }

    def load_trainer_state(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        for scheduler, sd in zip(self.schedulers, state["schedulers"]):
            scheduler.load_state_dict(sd)
        self.train_loader.load_state_dict(state["data"])
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
        peak = cfg.peak_flops or (
            peak_flops(self.device, cfg.precision) if self.flops_per_item else None
        )
        unit = "tok" if self.objective.metric == "perplexity" else "samples"
        if log and (plan.checkpoint or plan.restart):
            log.write(plan.record(self.step))
        if main:
            for line in plan.report(self.step):
                print(line, file=sys.stderr, flush=True)
        progress = Progress(self.total_steps, self.step, cfg.progress and main, unit)
        result = TrainResult(step=self.step, loss=math.nan)
        val: dict[str, float] = {}
        try:
            if self.step == 0 and self.val_loader is not None and cfg.eval_every:
                val = self._evaluate_and_report(log, progress)  # the start of the validation curve
            while self.step < self.total_steps:
                t0 = time.perf_counter()
                loss, grad_norm, items, skipped = self._train_step()
                elapsed = time.perf_counter() - t0
                self.step += 1
                result.losses.append(loss)
                throughput = items / elapsed
                mfu = (
                    throughput * self.flops_per_item / (peak * bdist.world_size()) if peak else None
                )
                lr = self.optimizers[0].param_groups[0]["lr"]
                progress.update(loss, lr, throughput, mfu)
                if skipped is not None:
                    self._report_skipped(skipped, log, progress)
                elif log and (self.step % cfg.log_every == 0 or self.step == self.total_steps):
                    record = {"step": self.step, "epoch": self.train_loader.epoch, "loss": loss, "lr": lr,
                              "grad_norm": grad_norm, f"{unit}_per_s": throughput}  # fmt: skip
                    if mfu is not None:
                        record["mfu"] = mfu
                    if self.guard.skipped:
                        record["skipped_steps"] = self.guard.skipped
                    log.write(record)
                for scheduler in self.schedulers:
                    scheduler.step()
                reached = cfg.target_loss is not None and loss <= cfg.target_loss
                last = self.step == self.total_steps or reached
                if self.val_loader is not None and (
                    last or (cfg.eval_every and self.step % cfg.eval_every == 0)
                ):
                    val = self._evaluate_and_report(log, progress)
                if last or (cfg.save_every and self.step % cfg.save_every == 0):
                    result.checkpoint = self.save()
                if reached:
                    if log:
                        progress.write(
                            f"step {self.step}: loss {loss:.4f} reached train.target_loss {cfg.target_loss}"
                        )
                    break
            if self.cfg.async_save:  # collective: publish the last background save
                self.watchdog.phase("end: finishing the last checkpoint")
                with writing(
                    f"the last checkpoint in run directory '{self.run_dir}'", self.run_dir
                ):
                    result.checkpoint = wait_for_checkpoint() or result.checkpoint
        finally:
            progress.close()
            if log:
                log.close()
        result.step, result.val = self.step, val
        result.loss = result.losses[-1] if result.losses else math.nan
        return result

    def _report_skipped(self, reason: str, log: MetricsLog | None, progress: Progress) -> None:
        """Count a skipped update in the metrics (always, whatever train.log_every); stop
        after ``fault.max_skipped_steps`` in a row."""
        guard = self.guard
        if log:
            log.write({"step": self.step, "event": "skipped_step", "reason": reason,
                       "skipped_steps": guard.skipped, "nonfinite_steps": guard.nonfinite,
                       "spike_steps": guard.spikes})  # fmt: skip
            progress.write(f"step {self.step}: update skipped: {reason}")
        if guard.exhausted:
            raise TrainingError(
                f"{guard.consecutive} updates in a row were skipped, the last for a {reason} at "
                f"step {self.step}; stopped, {self._last_good()}"
            )

    def _train_step(self) -> tuple[float, float, int, str | None]:
        """One optimizer update; returns (global mean loss, grad norm, items processed
        globally, why the update was skipped or None)."""
        step, phase = self.step + 1, self.watchdog.phase
        for part in self.parts:
            part.train()
        phase(f"step {step}: loading data")
        if self.injector:
            self.injector.maybe_hang(step, bdist.rank())
        batches = [
            self.objective.prepare(*self._to_device(self.train_loader.next_batch()))
            for _ in range(self.grad_accum)
        ]
        local_terms = sum(b.count for b in batches)
        local_items = sum(self.objective.items(b) for b in batches)
        phase(f"step {step}: all-reduce of the batch size")
        total_terms, total_items = bdist.global_sum(
            [local_terms, local_items], self.contributes, self.device
        )
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
                (loss * (batch.count * self.dp_size / total_terms)).backward()
                local_loss += loss.detach() * batch.count
        phase(f"step {step}: all-reduce of the loss")
        (loss_sum,) = bdist.global_sum([float(local_loss)], self.contributes, self.device)
        step_loss = loss_sum / total_terms
        phase(f"step {step}: gradient norm")
        grad_norm = self._clip()
        skipped = self.guard.judge(step_loss, grad_norm)  # the same verdict on every rank
        phase(f"step {step}: optimizer")
        if skipped is None:
            for opt in self.optimizers:
                opt.step()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        return step_loss, grad_norm, int(total_items), skipped

    def _pipeline_step(self, batch: Batch) -> torch.Tensor:
        """Run the pipeline schedule over the micro-batches of ``batch``; returns the mean
        micro-batch loss times the batch's terms. The schedule averages the micro-batch
        gradients; data parallelism then averages over replicas."""
        with autocast_context(self.device, self.cfg.precision):
            loss = self.parallel.pipeline_step(batch.inputs, batch.targets)
        return loss * batch.count

    def _clip(self) -> float:
        if self.parallel is not None:
            norm = clip_grad_norm_parallel(
                self.parts, self.clip_norm, self.clip_value, self.parallel.pp_group
            )
        else:
            norm = clip_gradients(self.model.parameters(), self.clip_norm, self.clip_value)
        return float(norm)

    def _to_device(
        self, batch: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(t.to(self.device, non_blocking=True) for t in batch)

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
