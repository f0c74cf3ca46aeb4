"""Parallelism applied from outside a finished model: device mesh, plans, ``parallelize``.

``parallelize(model, mesh, cfg)`` runs pipeline split -> tensor parallel -> (activation
checkpointing, compile) -> FSDP2/DDP, in that order, with torch's own engines (DeviceMesh,
DTensor, FSDP2, DDP, torch.distributed.pipelining), on a meta-built model;
``materialize_parallel`` then allocates and initialises each rank's shards.
"""

from baobab.parallel.blocks import AC_MODES, BlockOptions, apply_block_options
from baobab.parallel.clip import clip_grad_norm_parallel
from baobab.parallel.config import ParallelConfig
from baobab.parallel.materialize import copy_shard, materialize_parallel
from baobab.parallel.mesh import build_mesh, dp_mesh, dp_rank_and_size, pp_group
from baobab.parallel.parallelize import ParallelModel, parallelize
from baobab.parallel.pipeline import build_schedule, split_for_pipeline
from baobab.parallel.tp_plans import TP_PLANS

__all__ = [
    "AC_MODES",
    "TP_PLANS",
    "BlockOptions",
    "ParallelConfig",
    "ParallelModel",
    "apply_block_options",
    "build_mesh",
    "build_schedule",
    "clip_grad_norm_parallel",
    "copy_shard",
    "dp_mesh",
    "dp_rank_and_size",
    "materialize_parallel",
    "parallelize",
    "pp_group",
    "split_for_pipeline",
]
