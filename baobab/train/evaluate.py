"""Evaluation: validation loss plus perplexity (language models) or accuracy.

What is evaluated: the whole validation split in order, or, with ``max_batches``, a fixed
sample of ``max_batches`` global batches spread over the whole split
(``baobab.data.sampler.spread_sample``). The first batches of a split are not a fair
sample: a token corpus stores its files one after another, so they all come from the first
few files. The sample depends only on the split's size, the global batch size
(``batch_size * world_size``) and ``seed``, so every evaluation of a run sees the same
samples (its curve is comparable from point to point) and any data-parallel layout with
the same global batch size evaluates the same samples, each rank its share.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from baobab.data.sampler import spread_sample
from baobab.train import distributed as bdist
from baobab.train.device import autocast_context
from baobab.train.objectives import Objective

# Objectives whose data is token windows: their size is reported in tokens, not samples.
TOKEN_OBJECTIVES = ("causal_lm", "masked_lm")


def evaluation_indices(
    num_samples: int, global_batch: int, max_batches: int, seed: int, whole_batches: bool
) -> np.ndarray:
    """The global order of one evaluation's samples, int64.

    ``max_batches`` 0 (or at least the split) is the whole split in order; otherwise a
    ``spread_sample`` of ``max_batches * global_batch`` samples. ``whole_batches`` (a
    parallel layout, whose collectives need every rank on equal batches) keeps only whole
    global batches: the split's tail short of one global batch is never evaluated then.
    """
    usable = num_samples // global_batch * global_batch if whole_batches else num_samples
    count = min(max_batches * global_batch, usable) if max_batches else usable
    if count == usable:
        return np.arange(usable, dtype=np.int64)
    return spread_sample(num_samples, count, seed)


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
    seed: int = 0,
) -> dict[str, float]:
    """One pass over ``loader``'s split (all of it, or with ``max_batches`` a sample of that
    many global batches spread over it, drawn with ``seed``: see the module docstring),
    leaving the loader's training position untouched. Returns val_loss, val_ppl or val_acc,
    and val_tokens (language models) or val_samples: how much data the figures cover.

    Under a parallel layout (``parallel``, a ParallelModel) every rank walks its share of
    the data; a pipeline runs its schedule's ``eval`` and the last stage scores the output.
    Sums are taken once per model replica.
    """
    parts = parallel.parts if parallel is not None else [model]
    modes = [part.training for part in parts]
    for part in parts:
        part.eval()
    sampler = loader.sampler
    indices = evaluation_indices(
        len(loader.dataset),
        sampler.batch_size * sampler.world_size,
        max_batches,
        seed,
        whole_batches=parallel is not None,
    )
    total_loss, total_terms, correct, items = 0.0, 0, 0, 0
    for x, y in loader.iter_epoch(indices=indices):
        batch = objective.prepare(x.to(device), y.to(device), generator=generator)
        with autocast_context(device, precision):
            if parallel is not None and parallel.schedule is not None:
                loss, extras = parallel.pipeline_step(batch.inputs, batch.targets, train=False), {}
            else:
                loss, extras = objective.loss(model, batch)
        count = int(batch.count)  # a tensor for masked LM
        total_loss += float(loss) * count
        total_terms += count
        correct += int(extras.get("correct", 0))
        items += objective.items(batch)
    for part, mode in zip(parts, modes):
        part.train(mode)
    contributes = parallel is None or parallel.reports
    total_loss, total_terms, correct, items = bdist.global_sum(
        [total_loss, total_terms, correct, items], contributes, device
    )
    if total_terms == 0:
        return {}
    val_loss = total_loss / total_terms
    result = {"val_loss": val_loss}
    if objective.metric == "perplexity":
        result["val_ppl"] = math.exp(min(val_loss, 50.0))
    elif objective.metric == "accuracy":
        result["val_acc"] = correct / total_terms
    size_key = "val_tokens" if objective.name in TOKEN_OBJECTIVES else "val_samples"
    result[size_key] = int(items)
    return result
