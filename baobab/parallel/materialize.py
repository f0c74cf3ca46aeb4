"""Allocate and initialise a model that was parallelised on the meta device, shard by shard.

torchtitan's order: build on meta, ``parallelize`` (parameters become meta DTensors laid
out as FSDP/TP want), then ``to_empty`` on the device and initialise. DTensor's random ops
do not run on CPU meshes (torch 2.13), and they would make the init depend on the layout;
instead ``baobab.models.common.init.fill`` creates one *full* parameter at a time from a
generator seeded by ``(seed, name)`` and ``copy_shard`` keeps the part this rank holds.
Every rank of every layout therefore starts from the single-process weights, and no rank
holds more than its shards plus one full parameter.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from baobab.models.common.init import materialize


def _local_view(full: torch.Tensor, target: DTensor) -> torch.Tensor | None:
    """This rank's chunk of ``full`` as a view, for Shard/Replicate placements (None for
    others, e.g. FSDP's _StridedShard over a TP shard of the same dim).

    DTensor's rule, mesh dim by mesh dim: ``Shard(d)`` keeps chunk ``coordinate`` of
    ``torch.chunk`` along d (a rank past the last chunk holds an empty one).
    """
    mesh, coordinate = target.device_mesh, target.device_mesh.get_coordinate()
    local = full
    for mesh_dim, placement in enumerate(target.placements):
        if isinstance(placement, Replicate):
            continue
        if type(placement) is not Shard:
            return None
        chunks = torch.chunk(local, mesh.size(mesh_dim), dim=placement.dim)
        index = coordinate[mesh_dim]
        local = chunks[index] if index < len(chunks) else local.narrow(placement.dim, 0, 0)
    return local


@torch.no_grad()
def copy_shard(target: torch.Tensor, full: torch.Tensor) -> None:
    """Write this rank's part of ``full`` (the whole tensor) into ``target``.

    For a DTensor the local chunk is cut from ``full`` as its placements say (FSDP's
    Shard(0), TP's Shard(0)/Shard(1), Replicate keeps it all), as a view: nothing but the
    target shard is written. Other placements go through ``distribute_tensor`` with
    ``src_data_rank=None`` (a local split, no communication, one transient copy of the
    chunk): every rank holds the same ``full``, which seeding by name guarantees.
    """
    if not isinstance(target, DTensor):
        target.copy_(full)
        return
    local = _local_view(full, target)
    if local is None:
        local = distribute_tensor(
            full, target.device_mesh, target.placements, src_data_rank=None
        ).to_local()
    target.to_local().copy_(local)


def materialize_parallel(
    parts: Sequence[nn.Module],
    seed: int,
    device: torch.device | str,
    weights: Mapping[str, torch.Tensor] | None = None,
    observe: Callable[[str, torch.Tensor], None] | None = None,
) -> None:
    """``to_empty`` each part (a rank's model or pipeline stages, from ``parallelize``) on
    ``device`` and fill it: names in ``weights`` (full tensors, e.g. a ``--model.init``
    base) are copied from there, every other tensor by its init rule under ``seed``.
    ``observe(name, full)`` sees each full tensor (tests count them)."""
    for part in parts:
        materialize(part, seed, device, copy=copy_shard, weights=weights, observe=observe)
