"""Gradient clipping with the true global norm over shards, tensor-parallel slices and stages."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor


def _group_by_mesh(params: list[nn.Parameter]) -> list[list[nn.Parameter]]:
    """Parameters with a gradient, grouped so each group's grads live on one mesh.

    One torch norm/foreach call cannot mix DTensors of different meshes (FSDP's 1-D mesh,
    FSDP×TP's 2-D mesh) or DTensors with plain tensors, which a layout can produce (e.g.
    bert's replicated LayerNorms beside its TP linears).
    """
    groups: dict[object, list[nn.Parameter]] = {}
    for p in params:
        if p.grad is None:
            continue
        key = p.grad.device_mesh if isinstance(p.grad, DTensor) else None
        groups.setdefault(key, []).append(p)
    return list(groups.values())


@torch.no_grad()
def clip_grad_norm_parallel(
    parts: Iterable[nn.Module],
    max_norm: float | None,
    max_value: float | None,
    pp_group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Clip by value, then by the global L2 norm; return that norm, equal on every rank.

    The norm covers every parameter of the whole model: DTensor gradients (FSDP shards,
    TP slices) count through their full tensor, plain gradients (replicated by DDP or
    computed identically on every TP rank) count once, and with ``pp_group`` the squared
    norms of all pipeline stages are summed. It is measured after value clipping and
    before norm clipping, computed even when ``max_norm`` is None, and returned as a plain
    float32 tensor. A non-finite norm is returned as is; the caller decides to skip the step.
    """
    if max_norm is not None and not max_norm > 0:
        raise ValueError(f"max_norm must be > 0 or None; got {max_norm!r}.")
    if max_value is not None and not max_value > 0:
        raise ValueError(f"max_value must be > 0 or None; got {max_value!r}.")
    seen: set[int] = set()
    params = []
    for part in parts:
        for p in part.parameters():
            if id(p) not in seen:  # a tied parameter counts once
                seen.add(id(p))
                params.append(p)
    groups = _group_by_mesh(params)
    if max_value is not None:
        for group in groups:
            for p in group:
                p.grad.clamp_(-max_value, max_value)  # elementwise: local shards suffice
    device = params[0].device if params else torch.device("cpu")
    squared = torch.zeros((), dtype=torch.float32, device=device)
    for group in groups:
        norm = torch.nn.utils.get_total_norm([p.grad for p in group], error_if_nonfinite=False)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()  # Partial norm -> reduced over the group's mesh
        squared += norm.to(device=device, dtype=torch.float32).square()
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        dist.all_reduce(squared, group=pp_group)  # stages hold disjoint parameters
    total = squared.sqrt()
    if max_norm is not None:
        for group in groups:
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total
