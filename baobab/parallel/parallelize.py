"""``parallelize(model, mesh, cfg)``: apply every parallelism to a model, in order.

At scale the input is a model built on the meta device (``build_model(..., device="meta")``):
parallelize lays out its meta parameters (pipeline stages, DTensors), and
``baobab.parallel.materialize_parallel`` then allocates each rank's shards and initialises
them from the single-process init, one full parameter at a time, so no rank ever holds
the whole model. An allocated model (identical on every rank) is accepted too: its parts
are moved to the mesh's device and sharded from its values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._composable.replicate import replicate
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    PrepareModuleInput,
    PrepareModuleOutput,
    parallelize_module,
)

from baobab.parallel.blocks import BlockOptions, apply_block_options
from baobab.parallel.config import ParallelConfig, model_family
from baobab.parallel.mesh import dp_mesh
from baobab.parallel.mesh import pp_group as mesh_pp_group
from baobab.parallel.pipeline import build_schedule, split_for_pipeline
from baobab.parallel.tp_plans import TP_PLANS, plan_for_module


@dataclass
class ParallelModel:
    """What one rank holds after ``parallelize``.

    ``parts`` are this rank's modules (the whole model, or its pipeline stages in stage
    order), parameter names unchanged from the full model. ``schedule`` drives them when
    pp > 1 (see ``pipeline_step``); otherwise call ``parts[0]`` directly.
    """

    parts: list[nn.Module]
    schedule: Any | None
    is_first: bool  # holds stage 0: feeds inputs to the pipeline
    is_last: bool  # holds the last stage: gets targets, computes losses
    mesh: DeviceMesh | None
    cfg: ParallelConfig
    # torch's stages size their send/recv buffers from the first step: (B, T) is fixed.
    _batch_shape: tuple[int, ...] | None = field(default=None, init=False, repr=False)

    @property
    def pp_group(self) -> dist.ProcessGroup | None:
        """This rank's pipeline process group when pp > 1 (for clip_grad_norm_parallel)."""
        return mesh_pp_group(self.mesh) if self.schedule is not None else None

    @property
    def reports(self) -> bool:
        """Whether this rank speaks for its model replica: it holds the last pipeline stage
        (the loss) and is tp rank 0. Summing a quantity over the world from exactly these
        ranks counts each data-parallel replica once."""
        if self.mesh is None:
            return True
        return self.is_last and self.mesh.get_local_rank("tp") == 0

    def pipeline_step(
        self, inputs: torch.Tensor | None, targets: torch.Tensor | None, *, train: bool = True
    ) -> torch.Tensor:
        """Forward (and, with ``train``, backward) of this dp rank's batch through the pipeline.

        Every pipeline rank calls it with its dp rank's batch (inputs are read on the first
        stage, targets on the last; others may pass None). The batch is cut into
        ``pp_microbatches`` equal chunks along dim 0; gradients are those of the mean
        microbatch loss (torch scales each by 1 / pp_microbatches). Returns that mean,
        detached and all-reduced over the pipeline so every stage can log it. ``train=False``
        runs forward only (call it under ``torch.no_grad()``). Every call must use the
        batch shape of the first one (torch sizes the stage buffers then).
        """
        if self.schedule is None:
            raise ValueError("pipeline_step needs parallel.pp > 1; call parts[0] directly.")
        seen = inputs if self.is_first else targets if self.is_last else None
        if seen is not None:
            shape = tuple(seen.shape)
            if self._batch_shape is None:
                self._batch_shape = shape
            elif shape != self._batch_shape:
                raise ValueError(
                    f"pipeline batches must keep the shape of the first one, "
                    f"{self._batch_shape}, got {shape}; drop the last partial batch "
                    "(drop_last) and evaluate with the training batch shape."
                )
        losses: list[torch.Tensor] = []
        args = (inputs,) if self.is_first else ()
        run = self.schedule.step if train else self.schedule.eval
        if self.is_last:
            kwargs = {"return_outputs": False} if train else {}
            run(*args, target=targets, losses=losses, **kwargs)
            loss = torch.stack([x.detach().float() for x in losses]).mean()
        else:
            run(*args)
            loss = torch.zeros((), dtype=torch.float32)
        loss = loss.to(_mesh_device(self.mesh))
        dist.all_reduce(loss, group=self.pp_group)  # only the last stage adds non-zero
        return loss

    def reshard(self) -> None:
        """Free FSDP's gathered parameters, e.g. after a forward-only evaluation with
        ``fsdp_reshard_after_forward=False`` (training resharding happens after backward).

        Until then ``part.parameters()`` yields the unsharded plain tensors.
        """
        for part in self.parts:
            for module in part.modules():
                if isinstance(module, FSDPModule):
                    module.reshard()


def _mesh_device(mesh: DeviceMesh) -> torch.device:
    if mesh.device_type == "cpu":
        return torch.device("cpu")
    accelerator = getattr(torch, mesh.device_type)  # torch.cuda, torch.xpu, ...
    return torch.device(mesh.device_type, accelerator.current_device())


def parallelize(
    model: nn.Module,
    mesh: DeviceMesh | None,
    cfg: ParallelConfig,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    blocks: BlockOptions | None = None,
    param_dtype: torch.dtype | None = None,
) -> ParallelModel:
    """Spread ``model`` (with a ``.cfg``) over ``mesh`` as ``cfg`` says.

    ``loss_fn(output, target) -> mean loss of one microbatch`` is required when pp > 1.
    ``blocks`` (activation checkpointing, per-block compile) is applied at step 3 below.
    ``param_dtype`` (e.g. bf16) is FSDP's mixed precision: the sharded fp32 parameters stay
    the optimizer's master weights, forward and backward run on ``param_dtype`` copies and
    gradients are reduced in fp32; it needs FSDP (``dp_shard`` > 1).
    A meta model stays on meta: call ``materialize_parallel(pm.parts, seed, device)``
    before the first step. An allocated model's parts end up on the mesh's device (the
    current CUDA device for a "cuda" mesh), moved there after the pipeline split. With
    nothing parallel, the model is returned untouched as ``parts=[model]`` (``mesh`` may
    then be None).
    """
    world_size = mesh.size() if mesh is not None else 1
    cfg = cfg.validate(world_size, model.cfg)
    if not cfg.is_distributed:
        return ParallelModel(
            [apply_block_options(model, blocks or BlockOptions())], None, True, True, mesh, cfg
        )
    if mesh is None:
        raise ValueError(
            "parallelize needs a mesh when parallel degrees exceed 1; call build_mesh."
        )
    if blocks is not None and blocks.compile_model:
        raise ValueError(
            "blocks.compile_model works on one device; under a parallel layout use "
            "blocks.compile (per block)"
        )
    if param_dtype is not None and cfg.dp_shard == 1:
        raise ValueError(
            "bf16 parameters with fp32 master weights need FSDP; set parallel.dp_shard > 1"
        )
    if cfg.pp > 1 and loss_fn is None:
        raise ValueError(
            "parallelize needs loss_fn when parallel.pp > 1; pass loss_fn(output, target)."
        )

    # The order, and why (torchtitan's parallelize_llama + pipeline_llama):
    # 1. pipeline split: every later step works on the modules this rank holds, and
    #    deep-copying must happen before parameters become DTensors bound to hooks;
    # 2. tensor parallel: swaps parameters for DTensors on the tp mesh;
    # 3. activation checkpointing, then per-block compile: they wrap the TP'd blocks and
    #    must sit inside FSDP's per-block hooks;
    # 4. data parallel last: FSDP2 shards the final parameter objects (TP DTensors become
    #    2-D (dp_shard, tp) DTensors) and its hooks wrap everything above;
    # 5. the pipeline schedule is built over the finished stage modules.
    n_stages = cfg.pp * cfg.pp_stages_per_rank
    if cfg.pp > 1:
        stages = split_for_pipeline(
            model, mesh.get_local_rank("pp"), cfg.pp, cfg.pp_stages_per_rank
        )
    else:
        stages = [(0, model)]
    family = model_family(model.cfg)
    device = _mesh_device(mesh)
    on_meta = any(p.is_meta for p in model.parameters())
    for index, part in stages:
        if not on_meta:
            part.to(device)  # after the split: a GPU never holds the stages of other ranks
        if cfg.tp > 1:
            _apply_tp(part, family, mesh["tp"], cfg, index == 0, index == n_stages - 1)
        apply_block_options(part, blocks or BlockOptions())
        _apply_data_parallel(part, mesh, cfg, param_dtype)
    schedule = None
    if cfg.pp > 1:
        schedule = build_schedule(stages, cfg, loss_fn, mesh_pp_group(mesh), device)
    indices = [index for index, _ in stages]
    return ParallelModel(
        parts=[part for _, part in stages],
        schedule=schedule,
        is_first=0 in indices,
        is_last=n_stages - 1 in indices,
        mesh=mesh,
        cfg=cfg,
    )


def _tied_groups(module: nn.Module) -> list[list[str]]:
    """Names of parameters shared by several modules (e.g. embedding and output head)."""
    by_id: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def _set_param(module: nn.Module, name: str, param: nn.Parameter) -> None:
    owner, _, attr = name.rpartition(".")
    setattr(module.get_submodule(owner), attr, param)


def _apply_tp(
    part: nn.Module,
    family: str,
    tp_mesh: DeviceMesh,
    cfg: ParallelConfig,
    is_first_stage: bool,
    is_last_stage: bool,
) -> None:
    tied = _tied_groups(part)
    plan = plan_for_module(TP_PLANS[family](part.cfg, cfg.sequence_parallel), part)
    parallelize_module(part, tp_mesh, plan)
    # parallelize_module distributes each module's parameters separately, which unties
    # shared ones; the plans shard both users identically (Shard(0) of the vocab rows),
    # so pointing them back at one DTensor restores the tie exactly.
    for names in tied:
        first = part.get_parameter(names[0])
        for name in names[1:]:
            other = part.get_parameter(name)
            if getattr(other, "placements", None) != getattr(first, "placements", None):
                raise ValueError(
                    f"tensor-parallel plan shards tied parameters {names[0]} and {name} "
                    "differently; give them the same placement in the plan."
                )
            _set_param(part, name, first)
    if family == "gpt" and cfg.sequence_parallel and cfg.pp > 1:
        _sequence_parallel_stage_edges(part, tp_mesh, is_first_stage, is_last_stage)


def _sequence_parallel_stage_edges(
    part: nn.Module, tp_mesh: DeviceMesh, is_first_stage: bool, is_last_stage: bool
) -> None:
    """Send full-length (B, T, C) hidden states between stages under sequence parallelism.

    Inside a stage the residual stream is Shard(1) (B, T / tp, C). GPT.forward slices its
    RoPE tables by the input length, so a stage must receive all T positions: the last
    block of a non-final stage all-gathers its output, and the first block of a non-first
    stage keeps only its sequence slice of the input.
    """
    keys = list(part.layers.keys())
    if not is_first_stage:
        parallelize_module(
            part.layers[keys[0]],
            tp_mesh,
            PrepareModuleInput(
                input_layouts=(Replicate(), None, None),  # (x, cos, sin)
                desired_input_layouts=(Shard(1), None, None),
                use_local_output=True,
            ),
        )
    if not is_last_stage:
        parallelize_module(
            part.layers[keys[-1]],
            tp_mesh,
            PrepareModuleOutput(
                output_layouts=Shard(1), desired_output_layouts=Replicate(), use_local_output=True
            ),
        )


def _apply_data_parallel(
    part: nn.Module, mesh: DeviceMesh, cfg: ParallelConfig, param_dtype: torch.dtype | None
) -> None:
    if cfg.dp_size == 1:
        return
    mesh_dp = dp_mesh(mesh)
    if mesh_dp.ndim == 1 and mesh_dp.mesh_dim_names == ("dp_replicate",):
        # Pure DDP (no TP, no PP): torch's composable DDP keeps the module and its
        # parameter names as they are (no ``module.`` prefix, unlike wrapping in DDP).
        replicate(part, device_mesh=mesh_dp)
        return
    # FSDP2: 1-D mesh = FSDP; 2-D (replicate, shard) = HSDP. With TP or PP and
    # dp_shard == 1 this is the 2-D mesh with a shard dim of size 1, i.e. replication
    # through FSDP2, which composes with DTensor parameters and pipeline stages.
    options = {"mesh": mesh_dp, "reshard_after_forward": cfg.fsdp_reshard_after_forward}
    if param_dtype is not None:
        options["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=param_dtype, reduce_dtype=torch.float32
        )
    layers = getattr(part, "layers", None)
    if isinstance(layers, nn.ModuleDict):
        for block in layers.values():
            fully_shard(block, **options)
    fully_shard(part, **options)
