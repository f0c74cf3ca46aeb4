"""Evaluation: validation loss plus perplexity (language models) or accuracy."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from baobab.train import distributed as bdist
from baobab.train.device import autocast_context
from baobab.train.objectives import Objective


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Any,
    objective: Objective,
    device: torch.device,
    precision: str = "auto",
    max_batches: int = 0,
    generator: torch.Generator | None = None,
    parallel: Any = None,
) -> dict[str, float]:
    """One in-order pass over ``loader`` (at most ``max_batches``, 0 = all), leaving the
    loader's training position untouched. Returns val_loss and val_ppl or val_acc.

    Under a parallel layout (``parallel``, a ParallelModel) every rank walks its share of
    the data; a pipeline runs its schedule's ``eval`` and the last stage scores the output.
    Sums are taken once per model replica.
    """
    parts = parallel.parts if parallel is not None else [model]
    modes = [part.training for part in parts]
    for part in parts:
        part.eval()
    if parallel is not None:
        # Collectives inside forward need every rank on the same number of equal batches.
        sampler = loader.sampler
        full = len(loader.dataset) // (sampler.batch_size * sampler.world_size)
        limit = min(max_batches, full) if max_batches else full
    else:
        limit = max_batches or None
    total_loss, total_terms, correct = 0.0, 0, 0
    for i, (x, y) in enumerate(loader.iter_epoch()):
        if limit is not None and i >= limit:
            break
        batch = objective.prepare(x.to(device), y.to(device), generator=generator)
        with autocast_context(device, precision):
            if parallel is not None and parallel.schedule is not None:
                loss, extras = parallel.pipeline_step(batch.inputs, batch.targets, train=False), {}
            else:
                loss, extras = objective.loss(model, batch)
        total_loss += float(loss) * batch.count
        total_terms += batch.count
        correct += int(extras.get("correct", 0))
    for part, mode in zip(parts, modes):
        part.train(mode)
    contributes = parallel is None or parallel.reports
    total_loss, total_terms, correct = bdist.global_sum(
        [total_loss, total_terms, correct], contributes, device
    )
    if total_terms == 0:
        return {}
    val_loss = total_loss / total_terms
    result = {"val_loss": val_loss}
    if objective.metric == "perplexity":
        result["val_ppl"] = math.exp(min(val_loss, 50.0))
    elif objective.metric == "accuracy":
        result["val_acc"] = correct / total_terms
    return result
