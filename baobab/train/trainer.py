"""The single-device training loop.

One step is one optimizer update over ``grad_accum`` micro-batches. Each micro-batch's mean
loss is weighted by its share of the step's loss terms, so the step's gradient is that of
the mean over every term in the step (exact for unequal batches and for full-batch
gradient descent, where a step is a whole epoch).

Resume invariant: a checkpoint taken after step ``s`` holds everything later steps read
(weights, optimizer, schedule, data position, RNG), and evaluation draws from its own
generator, so resuming from it replays steps ``s+1..`` exactly on CPU.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from baobab.checkpoint import (
    checkpoint_dirs,
    latest_checkpoint,
    load_state,
    load_weights,
    save_checkpoint,
)
from baobab.optim import clip_gradients
from baobab.train.config import TrainerConfig
from baobab.train.device import autocast_context, peak_flops, pick_device
from baobab.train.evaluate import evaluate
from baobab.train.metrics import METRICS_FILE, MetricsLog, Progress
from baobab.train.objectives import Objective, build_objective


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. the loss stopped being finite); the message says why."""


@dataclass
class TrainResult:
    step: int
    loss: float
    val: dict[str, float] = field(default_factory=dict)
    checkpoint: Path | None = None
    losses: list[float] = field(default_factory=list)  # training loss of each step run here


class Trainer:
    """Trains ``model`` with ``optimizer`` on batches from ``train_loader``.

    ``train_loader`` and ``val_loader`` are :class:`baobab.data.DataLoader` objects (anything
    with ``next_batch``, ``iter_epoch``, ``batches_per_epoch``, ``epoch``, ``state_dict`` and
    ``load_state_dict``). ``flops_per_item`` (per token for language models, per sample
    otherwise) enables the MFU readout.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        train_loader: Any,
        *,
        cfg: TrainerConfig,
        objective: Objective | str = "regression",
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        val_loader: Any = None,
        grad_clip_norm: float | None = None,
        grad_clip_value: float | None = None,
        full_batch: bool = False,
        flops_per_item: float | None = None,
        meta: dict[str, Any] | None = None,
        tokenizer_file: str | Path | None = None,
    ):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.train_loader, self.val_loader, self.cfg = train_loader, val_loader, cfg
        self.objective = build_objective(objective) if isinstance(objective, str) else objective
        self.clip_norm, self.clip_value = grad_clip_norm, grad_clip_value
        self.flops_per_item, self.meta, self.tokenizer_file = (
            flops_per_item,
            meta or {},
            tokenizer_file,
        )
        self.run_dir = Path(cfg.run_dir)
        # Full-batch gradient descent: one update per pass over the whole training set.
        self.grad_accum = train_loader.batches_per_epoch if full_batch else cfg.grad_accum
        self.steps_per_epoch = max(1, train_loader.batches_per_epoch // self.grad_accum)
        if cfg.max_steps is None and cfg.max_epochs is None:
            raise ValueError(
                "set train.max_steps or train.max_epochs so the run knows when to stop"
            )
        limits = [cfg.max_steps] if cfg.max_steps else []
        if cfg.max_epochs:
            limits.append(cfg.max_epochs * self.steps_per_epoch)
        self.total_steps = min(limits)
        self.device = pick_device(cfg.device)
        self.step = 0
        self._eval_generator_seed = cfg.seed + 1  # evaluation never touches the training RNG

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "data": self.train_loader.state_dict(),
            "rng": rng,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.train_loader.load_state_dict(state["data"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])

    def save(self) -> Path:
        return save_checkpoint(
            self.run_dir,
            self.step,
            self.model,
            self.state_dict(),
            self.meta,
            self.tokenizer_file,
            self.cfg.keep_last,
        )

    def _prepare_run_dir(self) -> None:
        existing = checkpoint_dirs(self.run_dir)
        if self.cfg.resume:
            newest = latest_checkpoint(self.run_dir)
            if newest is None:
                raise ValueError(
                    f"train.resume is set but '{self.run_dir}' holds no checkpoint to resume from"
                )
            load_weights(newest, self.model)
            self.load_state_dict(load_state(newest))
        elif existing or (self.run_dir / METRICS_FILE).exists():
            if not self.cfg.overwrite:
                raise ValueError(
                    f"run directory '{self.run_dir}' already holds a run; pass --train.resume true to "
                    "continue it or --train.overwrite true to start over"
                )
            shutil.rmtree(self.run_dir / "checkpoints", ignore_errors=True)
            shutil.rmtree(self.run_dir / "tensorboard", ignore_errors=True)
            (self.run_dir / METRICS_FILE).unlink(missing_ok=True)

    # -- the loop -------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        """Train until max steps/epochs or the target loss; save and evaluate at the end."""
        cfg, model = self.cfg, self.model
        model.to(self.device)
        self._prepare_run_dir()
        log = MetricsLog(self.run_dir)
        peak = cfg.peak_flops or (
            peak_flops(self.device, cfg.precision) if self.flops_per_item else None
        )
        unit = "tok" if self.objective.metric == "perplexity" else "samples"
        if self.step:
            log.write({"event": "resume", "step": self.step})
        progress = Progress(self.total_steps, self.step, cfg.progress, unit)
        result = TrainResult(step=self.step, loss=math.nan)
        val: dict[str, float] = {}
        try:
            if self.step == 0 and self.val_loader is not None and cfg.eval_every:
                val = self._evaluate_and_report(log, progress)  # the start of the validation curve
            while self.step < self.total_steps:
                t0 = time.perf_counter()
                loss, grad_norm, items = self._train_step()
                elapsed = time.perf_counter() - t0
                if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                    kept = latest_checkpoint(self.run_dir)
                    where = (
                        f"the last good checkpoint is {kept}"
                        if kept
                        else "no checkpoint was written"
                    )
                    raise TrainingError(
                        f"the loss became non-finite ({loss}) at step {self.step + 1}; stopped, {where}"
                    )
                self.step += 1
                result.losses.append(loss)
                throughput = items / elapsed
                mfu = throughput * self.flops_per_item / peak if peak else None
                lr = self.optimizer.param_groups[0]["lr"]
                progress.update(loss, lr, throughput, mfu)
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    record = {
                        "step": self.step,
                        "epoch": self.train_loader.epoch,
                        "loss": loss,
                        "lr": lr,
                        "grad_norm": grad_norm,
                        f"{unit}_per_s": throughput,
                    }
                    if mfu is not None:
                        record["mfu"] = mfu
                    log.write(record)
                if self.scheduler is not None:
                    self.scheduler.step()
                reached = cfg.target_loss is not None and loss <= cfg.target_loss
                last = self.step == self.total_steps or reached
                if self.val_loader is not None and (
                    last or (cfg.eval_every and self.step % cfg.eval_every == 0)
                ):
                    val = self._evaluate_and_report(log, progress)
                if last or (cfg.save_every and self.step % cfg.save_every == 0):
                    result.checkpoint = self.save()
                if reached:
                    progress.write(
                        f"step {self.step}: loss {loss:.4f} reached train.target_loss {cfg.target_loss}"
                    )
                    break
        finally:
            progress.close()
            log.close()
        result.step, result.val = self.step, val
        result.loss = result.losses[-1] if result.losses else math.nan
        return result

    def _train_step(self) -> tuple[float, float, int]:
        """One optimizer update; returns (loss, grad norm, items processed)."""
        self.model.train()
        batches = [
            self.objective.prepare(*self._to_device(self.train_loader.next_batch()))
            for _ in range(self.grad_accum)
        ]
        total_terms = sum(b.count for b in batches)
        step_loss = torch.zeros((), device=self.device)
        for batch in batches:
            with autocast_context(self.device, self.cfg.precision):
                loss, _ = self.objective.loss(self.model, batch)
            weighted = loss * (batch.count / total_terms)
            weighted.backward()
            step_loss += weighted.detach()
        grad_norm = clip_gradients(self.model.parameters(), self.clip_norm, self.clip_value)
        loss_value, norm_value = step_loss.item(), float(grad_norm)
        if math.isfinite(loss_value) and math.isfinite(norm_value):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        items = sum(self.objective.items(b) for b in batches)
        return loss_value, norm_value, items

    def _to_device(
        self, batch: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(t.to(self.device, non_blocking=True) for t in batch)

    def _evaluate_and_report(self, log: MetricsLog, progress: Progress) -> dict[str, float]:
        val = self.evaluate()
        log.write({"step": self.step, **val})
        progress.write(f"step {self.step:>6}  " + "  ".join(f"{k} {v:.4f}" for k, v in val.items()))
        return val

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        generator = torch.Generator(device=self.device).manual_seed(self._eval_generator_seed)
        return evaluate(
            self.model,
            self.val_loader,
            self.objective,
            self.device,
            self.cfg.precision,
            self.cfg.eval_batches,
            generator,
        )
