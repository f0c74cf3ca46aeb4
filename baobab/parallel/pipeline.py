"""Pipeline parallelism: cut a model into stages and drive them with a torch schedule.

A stage is a deep copy of the whole model with the other stages' blocks deleted, so
parameter names (``layers.5.attention.wq.weight``) are the same as in the full model and
checkpoints need no renaming. The model's forward passes hidden states (B, T, C) through
when ``tok_embeddings`` (first stage only) or ``norm``/``output`` (last stage only) is None.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
)

from baobab.parallel.config import ParallelConfig


def stage_layer_ranges(n_layer: int, n_stages: int) -> list[range]:
    """Contiguous layer indices of each stage, balanced by layer count.

    Rule: every stage gets n_layer // n_stages layers and the first n_layer % n_stages
    stages one more; the first stage also embeds and the last one runs the (usually
    heavier) output head, so extra layers go to the front.
    """
    base, extra = divmod(n_layer, n_stages)
    ranges, start = [], 0
    for s in range(n_stages):
        stop = start + base + (1 if s < extra else 0)
        ranges.append(range(start, stop))
        start = stop
    return ranges


def stage_ids(pp_rank: int, pp_size: int, stages_per_rank: int) -> list[int]:
    """Stage indices of one rank, "loop" style: stage s lives on rank s % pp_size."""
    return [pp_rank + k * pp_size for k in range(stages_per_rank)]


def split_for_pipeline(
    model: nn.Module, pp_rank: int, pp_size: int, stages_per_rank: int
) -> list[tuple[int, nn.Module]]:
    """(stage index, stage module) for every stage on ``pp_rank``, in stage order.

    ``model`` must have ``layers`` (a ModuleDict keyed by index), ``tok_embeddings``,
    ``norm`` and ``output`` attributes, as baobab's GPT does. It is not modified.
    """
    n_stages = pp_size * stages_per_rank
    keys = list(model.layers.keys())
    if n_stages > len(keys):
        raise ValueError(
            f"parallel.pp={pp_size} × pp_stages_per_rank={stages_per_rank} = {n_stages} "
            f"stages exceeds the model's {len(keys)} layers; use at most one stage per layer."
        )
    ranges = stage_layer_ranges(len(keys), n_stages)
    parts = []
    for stage in stage_ids(pp_rank, pp_size, stages_per_rank):
        part = copy.deepcopy(model)
        keep = {keys[i] for i in ranges[stage]}
        for key in keys:
            if key not in keep:
                del part.layers[key]
        if stage > 0:
            part.tok_embeddings = None
            if getattr(part, "pos_embeddings", None) is not None:  # learned positions (GPT-2)
                part.pos_embeddings = None
        if stage < n_stages - 1:
            part.norm = None
            part.output = None
        parts.append((stage, part))
    return parts


def build_schedule(
    stages: list[tuple[int, nn.Module]],
    cfg: ParallelConfig,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    pp_group: dist.ProcessGroup,
    device: torch.device | str,
) -> Any:
    """The ``cfg.pp_schedule`` schedule over this rank's (already parallelised) stages.

    ``loss_fn(output, target)`` returns the mean loss of one microbatch. The schedule scales
    gradients by 1 / pp_microbatches (torch's ``scale_grads=True``), so after ``step`` the
    gradients are those of the mean over the microbatches.
    """
    n_stages = cfg.pp * cfg.pp_stages_per_rank
    device = torch.device(device)
    pipeline_stages = [
        PipelineStage(module, index, n_stages, device, group=pp_group) for index, module in stages
    ]
    n = cfg.pp_microbatches
    if cfg.pp_schedule == "interleaved_1f1b":
        return ScheduleInterleaved1F1B(pipeline_stages, n, loss_fn=loss_fn)
    if len(pipeline_stages) != 1:
        raise ValueError(
            f"parallel.pp_stages_per_rank must be 1 for pp_schedule {cfg.pp_schedule!r}; "
            "use interleaved_1f1b for several stages per rank."
        )
    cls = ScheduleGPipe if cfg.pp_schedule == "gpipe" else Schedule1F1B
    return cls(pipeline_stages[0], n, loss_fn=loss_fn)
