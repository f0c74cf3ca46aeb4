"""Evaluation: validation loss plus perplexity (language models) or accuracy."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

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
) -> dict[str, float]:
    """One in-order pass over ``loader`` (at most ``max_batches``, 0 = all), leaving the
    loader's training position untouched. Returns val_loss and val_ppl or val_acc."""
    was_training = model.training
    model.eval()
    total_loss, total_terms, correct = 0.0, 0, 0
    for i, (x, y) in enumerate(loader.iter_epoch()):
        if max_batches and i >= max_batches:
            break
        batch = objective.prepare(x.to(device), y.to(device), generator=generator)
        with autocast_context(device, precision):
            loss, extras = objective.loss(model, batch)
        total_loss += float(loss) * batch.count
        total_terms += batch.count
        correct += int(extras.get("correct", 0))
    model.train(was_training)
    if total_terms == 0:
        return {}
    val_loss = total_loss / total_terms
    result = {"val_loss": val_loss}
    if objective.metric == "perplexity":
        result["val_ppl"] = math.exp(min(val_loss, 50.0))
    elif objective.metric == "accuracy":
        result["val_acc"] = correct / total_terms
    return result
