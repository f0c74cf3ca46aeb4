"""``baobab plan``: what a run will need per device, and how long its steps will take.

A plan reads the same ``RunConfig`` as ``baobab train`` (a plan is one word away from a
run) and the world size, and answers per rank: memory by part (``plan_memory``), FLOPs
per step, an estimated step time and the MFU ceiling that time allows. ``search`` tries
every layout of the world size (pp × dp_replicate × dp_shard × tp, with each activation
checkpointing mode), refuses the impossible ones with ``ParallelConfig.validate``'s
sentence and ranks those that fit by estimated step time.

Time model (per optimizer step, on the slowest rank):

- compute: the step's model FLOPs (``models.training_flops_per_token``, the formula of the
  progress bar's MFU) over the world, plus one forward of every checkpointed block, at the
  device peak, stretched by the pipeline bubble (m + pp - 1) / m for m microbatch chunks;
- communication: bytes each rank moves in ring collectives (an all-gather or
  reduce-scatter of S bytes over n ranks moves S (n - 1) / n), at the intra-node bandwidth
  when the mesh dimension's ranks sit in one node (dims are laid out pp, dp_replicate,
  dp_shard, tp, tp innermost) and at the inter-node bandwidth otherwise. The bandwidths
  are assumptions, flags of ``baobab plan``: ``--intra-node-gbps`` (default 200 GB/s per
  rank, NVLink-class bus bandwidth) and ``--inter-node-gbps`` (default 25 GB/s, one
  200 Gb/s NIC per GPU). Data-parallel
  traffic (FSDP's gathers and reduce-scatters, DDP's all-reduce) overlaps the compute and
  counts only beyond it; tensor- and pipeline-parallel traffic sits on the critical path.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from typing import Any

from baobab import models
from baobab.parallel import AC_MODES, ParallelConfig
from baobab.train import device as bdevice
from baobab.train.plan_memory import (
    FP32,
    RankMemory,
    RunShape,
    activation_dtypes,
    param_shapes,
    rank_memory,
    resolve_precision,
    uses_fsdp,
)

MESH_ORDER = ("pp", "dp_replicate", "dp_shard", "tp")  # outermost first, as build_mesh lays it


@dataclass(frozen=True)
class Hardware:
    """The device a plan is for, and the links between devices."""

    device_type: str
    """cuda, cpu or mps: decides fused norms and the optimizer's default kernels."""
    memory: int
    """Bytes of memory per device (per rank)."""
    peak_flops: float
    """FLOP/s of one device at the run's compute dtype (the MFU denominator)."""
    nproc_per_node: int = 1
    """Ranks per node: a mesh dimension within a node uses the intra-node link."""
    intra_node_bandwidth: float = 200e9
    """Bytes/s one rank moves in a collective within a node (NVLink-class bus bandwidth)."""
    inter_node_bandwidth: float = 25e9
    """Bytes/s one rank moves in a collective across nodes (a 200 Gb/s NIC per GPU)."""


@dataclass
class Plan:
    """One layout's per-rank memory and step-time estimate."""

    layout: ParallelConfig  # resolved
    activation_checkpointing: str
    ranks: list[RankMemory]  # one per pipeline rank (the ranks of one pp rank are alike)
    device_memory: int
    batch_size: int  # samples per data-parallel rank and micro-step
    flops_per_step: float  # model FLOPs of one optimizer step over all ranks
    tokens_per_step: int  # tokens (samples, for non-sequence models) per optimizer step
    compute_time: float  # seconds at the device peak, recomputation and bubble included
    comm_time: float  # seconds of communication on the critical path
    step_time: float
    mfu_ceiling: float  # the MFU this step time allows: nothing real does better
    notes: list[str] = field(default_factory=list)

    @property
    def worst(self) -> RankMemory:
        return max(self.ranks, key=lambda r: r.peak)

    @property
    def fits(self) -> bool:
        return self.worst.peak <= self.device_memory

    @property
    def name(self) -> str:
        ac = self.activation_checkpointing
        return self.layout.strategy_name + ("" if ac == "none" else f" + AC {ac}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "layout": {k: getattr(self.layout, k) for k in _LAYOUT_KEYS},
            "name": self.name,
            "activation_checkpointing": self.activation_checkpointing,
            "fits": self.fits,
            "peak_bytes": self.worst.peak,
            "device_memory_bytes": self.device_memory,
            "batch_size": self.batch_size,
            "ranks": [dataclasses.asdict(r) for r in self.ranks],
            "flops_per_step": self.flops_per_step,
            "tokens_per_step": self.tokens_per_step,
            "compute_time_s": self.compute_time,
            "comm_time_s": self.comm_time,
            "step_time_s": self.step_time,
            "mfu_ceiling": self.mfu_ceiling,
            "notes": self.notes,
        }


_LAYOUT_KEYS = ("pp", "dp_replicate", "dp_shard", "tp", "pp_schedule", "pp_microbatches")


@functools.lru_cache(maxsize=16)
def flops_per_token(cfg: Any, seq_len: int) -> float:
    """``models.training_flops_per_token`` (the progress bar's MFU formula). Counting a
    forward of llama-8b on the meta device takes seconds, so for a model of identical
    blocks it is counted at one and two blocks and extended linearly, which is exact."""
    n_layer = getattr(cfg, "n_layer", 0)
    if n_layer <= 2 or models.family_of(cfg).name != "gpt":
        return models.training_flops_per_token(cfg, seq_len)
    one, two = (
        models.training_flops_per_token(dataclasses.replace(cfg, n_layer=n), seq_len)
        for n in (1, 2)
    )
    return one + (n_layer - 1) * (two - one)


def _bandwidth(layout: ParallelConfig, dim: str, hw: Hardware) -> float:
    """Bandwidth along mesh dimension ``dim``: intra-node when it and the dims inside it fit
    in one node."""
    sizes = {d: getattr(layout, d) for d in MESH_ORDER}
    span = math.prod(sizes[d] for d in MESH_ORDER[MESH_ORDER.index(dim) :])
    return hw.intra_node_bandwidth if span <= hw.nproc_per_node else hw.inter_node_bandwidth


def _ring(nbytes: float, n: int) -> float:
    """Bytes one rank sends in an all-gather or reduce-scatter of ``nbytes`` over n ranks."""
    return nbytes * (n - 1) / n if n > 1 else 0.0


def _times(run: RunShape, layout: ParallelConfig, hw: Hardware) -> tuple[float, float, float, int]:
    """(model FLOPs per step, compute seconds, critical communication seconds, tokens)."""
    cfg, tp, world = run.model_cfg, layout.tp, hw_world(layout)
    sequence = models.task_of(cfg) in ("causal_lm", "masked_lm")
    per_sample = run.seq_len if sequence else 1
    tokens = run.batch_size * layout.dp_size * run.grad_accum * per_sample
    flops = flops_per_token(cfg, run.seq_len) * tokens
    precision = resolve_precision(run.precision, hw.device_type)
    act, _ = activation_dtypes(precision)
    # Recomputation: one more forward of each checkpointed block (3 forwards = a step).
    mode, n_layer = run.blocks.activation_checkpointing, getattr(cfg, "n_layer", 0)
    share = {"none": 0.0, "full": 1.0}.get(mode, 1 / run.blocks.ac_every)
    head = 2 * cfg.d_model * cfg.vocab_size if hasattr(cfg, "d_model") else 0  # per token
    recompute = share * max(0.0, flops / 3 - head * tokens) if n_layer else 0.0
    chunks = layout.pp_microbatches * layout.pp_stages_per_rank
    bubble = (chunks + layout.pp - 1) / chunks if layout.pp > 1 else 1.0
    compute = (flops + recompute) / world / hw.peak_flops * bubble
    # Communication of one rank per step.
    shapes = param_shapes(cfg, run.lora, tp, layout.sequence_parallel)
    stage_params = (
        sum(p.numel for p in shapes.root) + shapes.n_layer * sum(p.numel for p in shapes.block)
    ) / layout.pp
    # Forward/backward passes per step: each gathers FSDP's parameters again; gradients are
    # reduced once per micro-step (a pipeline syncs only on its last microbatch).
    passes = run.grad_accum * (layout.pp_microbatches if layout.pp > 1 else 1)
    unsharded = 2 if precision == "bf16-params" else FP32
    if uses_fsdp(layout):
        gathers = 2 if layout.fsdp_reshard_after_forward else 1
        shard = layout.dp_shard
        sent = passes * _ring(stage_params * gathers * unsharded, shard)
        sent += run.grad_accum * _ring(stage_params * FP32, shard)  # reduce-scatter, fp32
        # HSDP: the shards' gradients are all-reduced over the replicas (2 ring passes).
        across = run.grad_accum * 2 * _ring(stage_params * FP32 / shard, layout.dp_replicate)
        dp_time = sent / _bandwidth(layout, "dp_shard", hw) + across / _bandwidth(
            layout, "dp_replicate", hw
        )
    else:  # DDP: one all-reduce of the gradients per micro-step
        sent = run.grad_accum * 2 * _ring(stage_params * FP32, layout.dp_replicate)
        dp_time = sent / _bandwidth(layout, "dp_replicate", hw)
    micro = max(1, run.batch_size // layout.pp_microbatches) if layout.pp > 1 else run.batch_size
    mb_tokens = micro * (run.seq_len if sequence else 1)
    tp_time = pp_time = 0.0
    if tp > 1 and hasattr(cfg, "d_model"):
        # Each block: 4 gathers/reduce-scatters of (tokens, C) forward, 4 backward; the
        # head gathers the logits (tokens, V), fp32.
        blocks = n_layer / layout.pp
        per_pass = blocks * 8 * _ring(mb_tokens * cfg.d_model * act, tp)
        per_pass += _ring(mb_tokens * cfg.vocab_size * FP32, tp) / layout.pp
        per_pass += 4 * _ring(mb_tokens * cfg.d_model * act, tp) / layout.pp
        tp_time = passes * per_pass / _bandwidth(layout, "tp", hw)
    if layout.pp > 1:  # each chunk's activations forward and their gradients back
        sends = 2 * chunks * run.grad_accum * mb_tokens * cfg.d_model * act
        pp_time = sends / _bandwidth(layout, "pp", hw)
    critical = max(0.0, dp_time - compute) + tp_time + pp_time
    return flops, compute, critical, tokens


def hw_world(layout: ParallelConfig) -> int:
    return layout.pp * layout.dp_replicate * layout.dp_shard * layout.tp


def plan_layout(run: RunShape, layout: ParallelConfig, hw: Hardware) -> Plan:
    """The plan of one resolved, validated layout."""
    ranks = [rank_memory(run, layout, r, hw.device_type) for r in range(layout.pp)]
    flops, compute, comm, tokens = _times(run, layout, hw)
    step = compute + comm
    # baobab's one MFU definition (the progress bar's, metrics.jsonl's, the benchmarks').
    mfu = bdevice.mfu(flops / step, hw.peak_flops, hw_world(layout)) if step > 0 else 0.0
    notes = []
    cfg = run.model_cfg
    if getattr(cfg, "dropout", 0.0) > 0:
        notes.append("dropout masks are not counted (dropout > 0 adds about 2 (B, T, C) per block)")
    if uses_fsdp(layout) and ranks[0].buffers:
        notes.append(
            "FSDP gathers the root unit (embeddings, final norm, output head) whole for "
            "the step; it dominates the communication buffers of large-vocabulary models"
        )
    if layout.tp > 1 and layout.dp_size == 1:
        notes.append("under TP without FSDP the token embedding's gradient is the whole table")
    return Plan(
        layout=layout,
        activation_checkpointing=run.blocks.activation_checkpointing,
        ranks=ranks,
        device_memory=hw.memory,
        batch_size=run.batch_size,
        flops_per_step=flops,
        tokens_per_step=tokens,
        compute_time=compute,
        comm_time=comm,
        step_time=step,
        mfu_ceiling=mfu,
        notes=notes,
    )


def factorisations(world: int) -> list[tuple[int, int, int, int]]:
    """Every (pp, dp_replicate, dp_shard, tp) whose product is ``world``."""
    divisors = [d for d in range(1, world + 1) if world % d == 0]
    out = []
    for pp in divisors:
        for rep in divisors:
            for tp in divisors:
                if world % (pp * rep * tp) == 0:
                    out.append((pp, rep, world // (pp * rep * tp), tp))
    return out


def search(
    run: RunShape,
    parallel: ParallelConfig,
    world: int,
    hw: Hardware,
    check: Any = None,
) -> tuple[list[Plan], list[tuple[str, str]]]:
    """(plans of every valid layout and AC mode, fitting first by step time, then the rest
    by peak; [(layout, why it cannot run)] for the impossible ones).

    Every layout trains on the same global batch: ``run.batch_size`` per data-parallel rank
    under ``parallel`` (or over all ranks when ``parallel`` does not fit ``world``), split
    anew over each layout's data-parallel ranks. ``check(layout)`` may refuse a layout with
    a ValueError (the run's feature checks).
    """
    try:
        given = parallel.resolved(world).dp_size
    except ValueError:
        given = world
    global_batch = run.batch_size * given
    plans, refused = [], []
    seq = run.seq_len if models.task_of(run.model_cfg) in ("causal_lm", "masked_lm") else None
    for pp, rep, shard, tp in factorisations(world):
        candidate = dataclasses.replace(parallel, pp=pp, dp_replicate=rep, dp_shard=shard, tp=tp)
        if global_batch % (rep * shard):
            refused.append((candidate.strategy_name, (
                f"the global batch of {global_batch} samples does not split evenly over "
                f"{rep * shard} data-parallel ranks."
            )))  # fmt: skip
            continue
        local = dataclasses.replace(run, batch_size=global_batch // (rep * shard))
        try:
            layout = candidate.validate(
                world, run.model_cfg, seq_len=seq, local_batch_size=local.batch_size
            )
            if check is not None:
                check(layout)
        except ValueError as err:
            refused.append((candidate.strategy_name, str(err)))
            continue
        modes = AC_MODES if getattr(run.model_cfg, "n_layer", 0) else ("none",)
        for mode in modes:
            blocks = dataclasses.replace(run.blocks, activation_checkpointing=mode)
            plans.append(plan_layout(dataclasses.replace(local, blocks=blocks), layout, hw))
    plans.sort(key=lambda p: (not p.fits, p.step_time if p.fits else p.worst.peak))
    return plans, refused


def not_fitting(plan: Plan) -> str:
    """One sentence: why ``plan`` does not fit."""
    worst = plan.worst
    where = f" (pipeline rank {worst.pp_rank})" if plan.layout.pp > 1 else ""
    biggest = max(
        (k for k in worst.parts() if k != "peak"), key=lambda k: getattr(worst, k)
    ).replace("_", " ")
    return (
        f"{plan.name} needs {size(worst.peak)} per rank{where}, more than the device's "
        f"{size(plan.device_memory)}; its largest part is {biggest} "
        f"({size(getattr(worst, biggest.replace(' ', '_')))})."
    )


UNITS = (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))


def unit_for(nbytes: float) -> tuple[str, int]:
    """The largest binary unit ``nbytes`` reaches (bytes below 1 KiB)."""
    return next(((name, scale) for name, scale in UNITS if nbytes >= scale), ("B", 1))


def size(nbytes: float) -> str:
    """``1.50 GiB``, ``12.00 MiB``, ``512 B``."""
    name, scale = unit_for(nbytes)
    return f"{nbytes / scale:.2f} {name}" if scale > 1 else f"{nbytes:.0f} B"


def parse_bytes(text: str) -> int:
    """``80GiB``, ``80GB``, ``512MiB``, ``1.5e9``: a memory size in bytes."""
    units = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "KIB": 2**10, "M": 10**6, "MB": 10**6,
             "MIB": 2**20, "G": 10**9, "GB": 10**9, "GIB": 2**30, "T": 10**12, "TB": 10**12,
             "TIB": 2**40}  # fmt: skip
    value = str(text).strip().upper().replace(" ", "")
    number = value.rstrip("KMGTIB")
    unit = value[len(number) :]
    try:
        size = float(number) * units[unit]
    except (ValueError, KeyError):
        raise ValueError(
            f"device memory {text!r} is not a size; write it like 80GiB, 40GB or 512MiB"
        ) from None
    if not size > 0:
        raise ValueError(f"device memory must be positive, got {text!r}")
    return int(size)
