"""The device mesh: every rank's coordinates along ("pp", "dp_replicate", "dp_shard", "tp").

Dims are laid out outermost first, so tp neighbours are adjacent global ranks (fastest
links) and pipeline stages are farthest apart. Size-1 dims are kept: ``mesh["tp"]`` and
friends work for every layout, and code never branches on whether a dim exists.
"""

from __future__ import annotations

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from baobab.parallel.config import ParallelConfig

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")


def build_mesh(cfg: ParallelConfig, device_type: str) -> DeviceMesh:
    """The 4-D mesh for ``cfg`` over the initialised default process group.

    ``device_type`` is "cpu" (gloo) or "cuda" (nccl). A config with dp_shard=-1 is
    resolved against the world size here.
    """
    if not dist.is_initialized():
        raise ValueError(
            "build_mesh needs torch.distributed initialised; call "
            "torch.distributed.init_process_group first (e.g. under torchrun)."
        )
    world_size = dist.get_world_size()
    cfg = cfg.resolved(world_size)
    shape = (cfg.pp, cfg.dp_replicate, cfg.dp_shard, cfg.tp)
    if cfg.pp * cfg.dp_replicate * cfg.dp_shard * cfg.tp != world_size:
        raise ValueError(
            f"parallel degrees dp_replicate={cfg.dp_replicate} × dp_shard={cfg.dp_shard} × "
            f"tp={cfg.tp} × pp={cfg.pp} = {cfg.pp * cfg.dp_replicate * cfg.dp_shard * cfg.tp} "
            f"must equal the world size {world_size}."
        )
    return init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIMS)


def dp_rank_and_size(mesh: DeviceMesh) -> tuple[int, int]:
    """(data-parallel rank, degree) for the data loader: ranks that share it see the same batch.

    rank = dp_replicate_rank × dp_shard + dp_shard_rank; tp and pp peers get the same rank.
    """
    shard = mesh.size(MESH_DIMS.index("dp_shard"))
    rank = mesh.get_local_rank("dp_replicate") * shard + mesh.get_local_rank("dp_shard")
    return rank, mesh.size(MESH_DIMS.index("dp_replicate")) * shard


def dp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The mesh data parallelism runs on: 1-D ("dp_shard") for FSDP, 1-D ("dp_replicate")
    for DDP, 2-D ("dp_replicate", "dp_shard") for HSDP and for replication composed with
    TP/PP (FSDP2 on a shard dim of size 1)."""
    replicate = mesh.size(MESH_DIMS.index("dp_replicate"))
    shard = mesh.size(MESH_DIMS.index("dp_shard"))
    if replicate > 1 and shard == 1 and mesh.size(0) * mesh.size(3) == 1:
        return mesh["dp_replicate"]
    if replicate == 1:
        return mesh["dp_shard"]
    return mesh["dp_replicate", "dp_shard"]


def pp_group(mesh: DeviceMesh) -> dist.ProcessGroup:
    """The process group of this rank's pipeline (same dp and tp coordinates)."""
    return mesh.get_group("pp")
