"""``baobab plan``'s memory model: what one rank of a run holds, by part.

The memory model is written once, here, in bytes per rank, by part:

- **parameters**: this rank's shards (tensor-parallel plan, then FSDP's dim-0 shard with its
  padding), fp32 master weights in every precision;
- **gradients**: the trainable parameters' shards, fp32;
- **optimizer**: state tensors per trainable element by optimizer (``OPTIMIZER_STATES``),
  and the step guard's copies of parameters and state where no fused kernel takes its
  verdict (every optimizer on a CPU; ``_guard_copies``);
- **activations**: what the forward saves for backward at the moment backward starts (the
  microbatches a pipeline schedule holds in flight), from a GPT block's saved tensors
  (``block_activation_bytes``); other families are counted on a meta-device forward;
- **buffers**: communication memory: FSDP's gathered units in flight (in backward the root
  unit, the block computing, its unsharded gradients, the next block's all-gather and the
  previous block's reduce-scatter; at forward's start the root unit and its all-gather
  buffer), DDP's gradient buckets, pipeline send/receive buffers;
- **temporaries**: the largest short-lived allocation: the loss gradient over the
  vocabulary, one checkpointed block recomputed, the optimizer step's scratch, FSDP's
  full-size root gradients before their reduce-scatter.

The peak is the largest of four moments (backward starts, a checkpointed block recomputes,
FSDP's last reduce-scatter, the optimizer step), each a sum of the parts alive then; it was
checked against torch's ``MemTracker`` under FSDP, TP and PP with and without activation
checkpointing (tests/train/test_plan.py). Not modelled: dropout masks (dropout > 0), the CUDA
context and allocator fragmentation.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from baobab import models
from baobab.models.lora import LoRAConfig, apply_lora
from baobab.optim import OptimConfig
from baobab.parallel import BlockOptions, ParallelConfig
from baobab.parallel.pipeline import stage_layer_ranges

FP32 = 4
# Optimizer state tensors per trainable element, by optimizer name (muon: its Muon half;
# the AdamW half is "adamw"); those in _STEP_COUNTERS also keep one fp32 ``step`` per tensor.
OPTIMIZER_STATES = {
    "gd": 0,
    "sgd": 0,
    "momentum": 1,
    "adagrad": 1,
    "rmsprop": 1,
    "adam": 2,
    "adamw": 2,
    "muon": 1,
}
_STEP_COUNTERS = ("adagrad", "rmsprop", "adam", "adamw")


@dataclass
class RankMemory:
    """Bytes one rank holds, by part; ``peak`` is the largest moment, not the sum."""

    pp_rank: int
    parameters: int
    gradients: int
    optimizer: int
    activations: int
    buffers: int
    temporaries: int
    peak: int

    def parts(self) -> dict[str, int]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "pp_rank"}


@dataclass
class _Param:
    name: str  # blocks as in block 0: "layers.0.attention.wq.weight"
    shape: tuple[int, ...]  # on one tensor-parallel rank
    trainable: bool
    muon: bool  # a hidden matrix Muon updates (the rest stays on AdamW)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class _Shapes:
    root: list[_Param]  # parameters outside the blocks (FSDP's root unit)
    block: list[_Param]  # one block's (every block is alike)
    n_layer: int  # 0: no ``layers`` blocks, everything is root
    full_embedding: int  # elements of the whole token embedding (the TP gradient, see below)


@dataclass(frozen=True)
class RunShape:
    """What a run is, as far as memory and time go."""

    model_cfg: Any
    batch_size: int  # per data-parallel rank and micro-step
    seq_len: int
    grad_accum: int
    precision: str  # fp32, bf16 (autocast) or bf16-params (FSDP mixed precision)
    optim: OptimConfig
    blocks: BlockOptions
    lora: LoRAConfig | None = None


def _tp_shape(module: nn.Module, pname: str, shape: tuple[int, ...], style: Any, tp: int):
    """The local shape of one parameter under a tensor-parallel style (torch's rules)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    embedding = isinstance(module, nn.Embedding)
    dim = None
    if isinstance(style, ColwiseParallel):
        dim = 1 if embedding else 0  # Linear weight (out, in) and bias (out,): output units
    elif isinstance(style, RowwiseParallel):
        dim = 0 if embedding else (1 if pname == "weight" else None)  # a row-wise bias stays
    if dim is None or dim >= len(shape):
        return shape
    return (*shape[:dim], -(-shape[dim] // tp), *shape[dim + 1 :])


@functools.lru_cache(maxsize=32)
def param_shapes(cfg: Any, lora: LoRAConfig | None, tp: int, sequence_parallel: bool) -> _Shapes:
    """Parameter shapes on one tp rank, from a meta-device model (one block when it has blocks)."""
    from baobab.parallel.tp_plans import TP_PLANS, plan_for_module

    n_layer = getattr(cfg, "n_layer", 0)
    probe_cfg = dataclasses.replace(cfg, n_layer=1) if n_layer else cfg
    with torch.device("meta"):
        model = models.build_model(probe_cfg, device="meta")
        if not isinstance(getattr(model, "layers", None), nn.ModuleDict):
            model, n_layer = models.build_model(cfg, device="meta"), 0
        if lora is not None:
            apply_lora(model, lora)
    family = models.family_of(cfg).name
    styles = plan_for_module(TP_PLANS[family](cfg, sequence_parallel), model) if tp > 1 else {}
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    head = linears[-1] if linears else ""
    root, block, full_embedding = [], [], 0
    for name, p in model.named_parameters():
        owner, _, pname = name.rpartition(".")
        shape = _tp_shape(model.get_submodule(owner), pname, tuple(p.shape), styles.get(owner), tp)
        muon = p.ndim == 2 and id(p) not in embedding_ids and owner != head
        param = _Param(name, shape, p.requires_grad, muon)
        (block if n_layer and name.startswith("layers.") else root).append(param)
        if name.startswith("tok_embeddings.") or name.startswith("word_embeddings."):
            full_embedding = p.numel()
    return _Shapes(root, block, n_layer, full_embedding)


def _fsdp_numel(param: _Param, shards: int) -> int:
    """Elements of FSDP2's local shard: dim 0 split in ``shards``, padded to equal rows."""
    if shards == 1 or not param.shape:
        return param.numel
    rows = -(-param.shape[0] // shards)
    return rows * math.prod(param.shape[1:])


def _stage_params(shapes: _Shapes, stages: list[int], n_stages: int) -> tuple[list, int]:
    """Root parameters and number of blocks held by the given pipeline stages."""
    if n_stages == 1:
        return shapes.root, shapes.n_layer
    ranges = stage_layer_ranges(shapes.n_layer, n_stages)
    first = [p for p in shapes.root if "embeddings" in p.name]
    last = [p for p in shapes.root if "embeddings" not in p.name]
    root = (first if 0 in stages else []) + (last if n_stages - 1 in stages else [])
    return root, sum(len(ranges[s]) for s in stages)


def uses_fsdp(layout: ParallelConfig) -> bool:
    """Whether ``parallelize`` applies FSDP2 (everything data-parallel but plain DDP)."""
    plain_ddp = layout.dp_shard == 1 and layout.tp == 1 and layout.pp == 1
    return layout.dp_size > 1 and not plain_ddp


def _optimizer_bytes(params: list[tuple[_Param, int]], optim: OptimConfig) -> int:
    """State bytes over (parameter, local elements) pairs of trainable parameters."""
    total = 0
    for param, numel in params:
        name = optim.name
        if name == "muon" and not param.muon:
            name = "adamw"
        states = OPTIMIZER_STATES[name]
        if name == "rmsprop" and optim.rmsprop_momentum > 0:
            states += 1
        total += states * numel * FP32 + (FP32 if name in _STEP_COUNTERS else 0)
    return total


# Optimizers torch has fused kernels for, which also take the step guard's ``found_inf``.
_FUSED = ("gd", "sgd", "momentum", "adagrad", "adam", "adamw")


def _kernels(name: str, optim: OptimConfig, device: str) -> str:
    """fused, foreach or for-loop: what the run's optimizer (half) ``name`` steps with. On
    CUDA the trainer makes ``auto`` fused where torch has the kernel (baobab.optim.skip)."""
    impl = optim.implementation
    if impl == "auto":
        if device == "cuda":
            return "fused" if name in _FUSED else "foreach"
        return "for-loop"
    return impl


def _optimizer_scratch(params: list[tuple[_Param, int]], optim: OptimConfig, device: str) -> int:
    """The optimizer step's temporaries: for-loop kernels allocate per tensor (adam: sqrt
    and divide of one state), foreach ones for all tensors at once, fused ones none."""
    if not params or optim.name in ("gd", "sgd", "momentum"):
        return 0
    impl = _kernels("adamw" if optim.name == "muon" else optim.name, optim, device)
    largest = max(numel for _, numel in params) * FP32
    scratch = {"fused": 0, "foreach": sum(n for _, n in params) * FP32}.get(impl, 2 * largest)
    if optim.name == "muon":  # Newton-Schulz on one matrix at a time: X, X Xᵀ and a product
        hidden = [numel for p, numel in params if p.muon]
        scratch += 3 * max(hidden, default=0) * FP32
    return scratch


def _guard_copies(params: list[tuple[_Param, int]], optim: OptimConfig, device: str) -> int:
    """Bytes of the copies the training loop's step guard keeps to cancel a bad update
    (``baobab.optim.skip.SkippableStep``): none where a fused kernel takes the verdict,
    otherwise each trainable parameter and its state, kept from step to step."""
    total = 0
    for param, numel in params:
        name = "adamw" if optim.name == "muon" and not param.muon else optim.name
        if _kernels(name, optim, device) == "fused" and name in _FUSED:
            continue
        total += numel * FP32 + _optimizer_bytes([(param, numel)], optim)
    return total


def resolve_precision(precision: str, device: str) -> str:
    """``auto`` is bf16 autocast on CUDA and fp32 elsewhere, as the trainer decides."""
    if precision == "auto":
        return "bf16" if device == "cuda" else "fp32"
    return precision


def activation_dtypes(precision: str) -> tuple[int, int]:
    """(bytes of a matmul activation, bytes of a norm/residual activation)."""
    if precision == "bf16-params":  # FSDP casts the parameters: everything runs in bf16
        return 2, 2
    return (2, FP32) if precision == "bf16" else (FP32, FP32)


def _norm_bytes(cfg: Any, seq: float, res: int, device: str) -> float:
    """Bytes per token one norm saves: its input and statistics (RMSNorm: rstd; LayerNorm:
    mean and rstd); a decomposed RMSNorm (CPU) also keeps ``x * rstd``."""
    if cfg.norm == "layernorm":
        return seq * (cfg.d_model * res + 2 * FP32)
    if device in ("cuda", "mps"):  # fused RMSNorm kernel
        return seq * (cfg.d_model * res + FP32)
    return seq * (2 * cfg.d_model * res + FP32)


def block_activation_bytes(
    cfg: Any, tokens: int, tp: int, sequence_parallel: bool, precision: str, device: str
) -> tuple[int, int]:
    """(bytes one GPT block saves for backward, bytes it saves when checkpointed) for
    ``tokens`` tokens on one rank, read off the tensors autograd keeps (torch 2.13):

    - both norms (``_norm_bytes``), on the rank's sequence slice under sequence parallelism;
    - each projection group keeps its input, the norm output (whole: all-gathered under TP);
    - attention keeps q, k, v after RoPE (heads split over tp), the output (H·D) and the
      log-sum-exp per head (fp32): flash-style SDPA, no (T, T) matrix;
    - SwiGLU keeps w1 x, w3 x, silu(w1 x) and their product (4·F, split over tp); the GELU
      MLP keeps w1 x and its GELU (2·F);
    - a checkpointed block keeps only its input (the residual stream slice).
    """
    act, res = activation_dtypes(precision)
    seq = 1 / tp if (sequence_parallel and tp > 1) else 1.0  # residual layout under SP
    C, H, Hkv, D, F = cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.ffn_hidden
    attention = C * act + (2 * H + 2 * Hkv) * D * act / tp + H * FP32 / tp
    mlp = C * act + (4 if cfg.mlp == "swiglu" else 2) * F * act / tp
    full = tokens * (2 * _norm_bytes(cfg, seq, res, device) + attention + mlp)
    return int(full), int(tokens * seq * C * res)


def head_activation_bytes(
    cfg: Any, tokens: int, tp: int, sequence_parallel: bool, precision: str, device: str
) -> tuple[int, int]:
    """(bytes the final norm, output projection and loss save; the loss gradient's
    temporaries) for ``tokens`` tokens: log-softmax keeps fp32 (tokens, V) log-probabilities
    (whole under TP: the plan gathers the logits) and backward starts with two more of that
    size (their gradient, then the logits')."""
    act, res = activation_dtypes(precision)
    seq = 1 / tp if (sequence_parallel and tp > 1) else 1.0
    norm = _norm_bytes(cfg, seq, res, device)
    saved = tokens * (norm + cfg.d_model * act + cfg.vocab_size * FP32)
    return int(saved), 2 * tokens * cfg.vocab_size * FP32


@functools.lru_cache(maxsize=32)
def _generic_activations(cfg: Any, batch: int, seq_len: int) -> tuple[int, int]:
    """(bytes autograd saves, output bytes) of a forward on the meta device, for families
    without a written-down formula (views of one tensor counted once)."""
    family = models.family_of(cfg)
    saved: dict[int, torch.Tensor] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        if not isinstance(base, nn.Parameter) and not base.requires_grad or base.grad_fn:
            saved[id(base)] = base
        return t

    with torch.device("meta"):
        model = family.model_cls(cfg).train()
        x = family.example_input(cfg, batch, seq_len)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(x)
    nbytes = sum(t.numel() * t.element_size() for t in saved.values())
    return nbytes, 2 * out.numel() * FP32


def _inflight(layout: ParallelConfig, pp_rank: int, stage: int) -> int:
    """Microbatches (chunks, for interleaved) a pipeline rank holds when backward starts."""
    n, pp, v = layout.pp_microbatches, layout.pp, layout.pp_stages_per_rank
    if pp == 1:
        return 1
    if layout.pp_schedule == "gpipe":
        return n
    if layout.pp_schedule == "1f1b":
        return min(n, pp - stage)
    rounds = max(1, n // pp)
    warmup = (v - 1) * (n // rounds) + 2 * (pp - 1 - pp_rank)  # torch's _get_warmup_ops
    return min(warmup, n * v) + 1


def _activations(
    run: RunShape, layout: ParallelConfig, stages: list[int], pp_rank: int, device: str
) -> tuple[int, int, int, int]:
    """(activations held when backward starts, those held at a later backward, one
    checkpointed block's recomputation, the loss gradient's temporaries) on one rank."""
    cfg, tp, sp = run.model_cfg, layout.tp, layout.sequence_parallel
    precision = resolve_precision(run.precision, device)
    micro = max(1, run.batch_size // layout.pp_microbatches) if layout.pp > 1 else run.batch_size
    tokens = micro * run.seq_len
    if models.family_of(cfg).name != "gpt":
        saved, loss = _generic_activations(cfg, micro, run.seq_len)
        return saved // tp, saved // tp, 0, loss
    n_stages = layout.pp * layout.pp_stages_per_rank
    ranges = stage_layer_ranges(cfg.n_layer, n_stages)
    full, kept = block_activation_bytes(cfg, tokens, tp, sp, precision, device)
    mode, every = run.blocks.activation_checkpointing, run.blocks.ac_every
    chunks, loss = [], 0
    for stage in stages:
        n = len(ranges[stage])
        # apply_block_options counts positions within a stage: selective keeps 0, every, ...
        ckpt = n if mode == "full" else (-(-n // every) if mode == "selective" else 0)
        chunk = ckpt * kept + (n - ckpt) * full
        if stage == 0:
            chunk += tokens * 8  # the int64 token ids the embedding keeps
        if stage == n_stages - 1:
            saved, loss = head_activation_bytes(cfg, tokens, tp, sp, precision, device)
            chunk += saved
        if n_stages > 1:  # the schedule keeps each chunk's stage output until its backward:
            last = stage == n_stages - 1  # fp32 logits (tokens, V), or the residual stream
            chunk += tokens * (
                cfg.vocab_size * FP32 if last else cfg.d_model * activation_dtypes(precision)[1]
            )
        chunks.append((_inflight(layout, pp_rank, stage), chunk))
    if layout.pp_schedule == "interleaved_1f1b" and layout.pp > 1:
        count = chunks[0][0]  # chunks of this rank's stages, taken at their mean size
        one = sum(c for _, c in chunks) // len(chunks)
        held = count * one
    else:
        count, one = chunks[0][0], max(c for _, c in chunks)
        held = sum(n * c for n, c in chunks)
    # At a later backward (gradients present) the rank holds one chunk fewer, unless more
    # microbatches wait than it keeps in flight (then it is full again).
    waiting = layout.pp_microbatches * layout.pp_stages_per_rank > count
    later = held if layout.pp == 1 or waiting else max(one, held - one)
    recompute = full - kept if mode != "none" else 0
    return held, later, recompute, loss


def rank_memory(run: RunShape, layout: ParallelConfig, pp_rank: int, device: str) -> RankMemory:
    """Bytes one rank of pipeline rank ``pp_rank`` holds (every rank of it is alike)."""
    shapes = param_shapes(run.model_cfg, run.lora, layout.tp, layout.sequence_parallel)
    n_stages = layout.pp * layout.pp_stages_per_rank
    stages = [pp_rank + k * layout.pp for k in range(layout.pp_stages_per_rank)]
    root, n_blocks = _stage_params(shapes, stages, n_stages)
    fsdp = uses_fsdp(layout)
    shards = layout.dp_shard if fsdp else 1
    local = [(p, _fsdp_numel(p, shards)) for p in root]
    local += [(p, _fsdp_numel(p, shards)) for p in shapes.block for _ in range(n_blocks)]
    trainable = [(p, n) for p, n in local if p.trainable]
    params = sum(n for _, n in local) * FP32
    grads = sum(n for _, n in trainable) * FP32
    if layout.tp > 1 and layout.dp_size == 1 and 0 in stages:
        # Measured (torch 2.13): without FSDP, the tensor-parallel token embedding's
        # gradient comes out Replicate, the whole (V, C) table on every tp rank.
        embed = [n for p, n in trainable if "embeddings" in p.name and "tok" in p.name]
        grads += (shapes.full_embedding - sum(embed)) * FP32 if embed else 0
    optimizer = _optimizer_bytes(trainable, run.optim)
    optimizer += _guard_copies(trainable, run.optim, device)
    held, later, recompute, loss = _activations(run, layout, stages, pp_rank, device)
    precision = resolve_precision(run.precision, device)
    unsharded = 2 if precision == "bf16-params" else FP32
    R = sum(p.numel for p in root) * unsharded  # the root unit, gathered
    U = sum(p.numel for p in shapes.block) * unsharded if n_blocks else 0  # one block, gathered
    persistent, fwd_end, in_flight, end = 0, 0, 0, 0
    if fsdp:
        resharded = layout.fsdp_reshard_after_forward
        # Root gathered all step; the block computing, its unsharded gradients, the next
        # block's all-gather and the previous one's reduce-scatter (measured: FSDPMemTracker).
        in_flight = R + (4 * U if resharded else (n_blocks + 2) * U)
        # ... unless forward's start is more: the root gathered, its all-gather buffer not
        # yet freed and the first block's all-gather (a root-heavy model: R > 3U).
        in_flight = max(in_flight, 2 * R + U)
        fwd_end = R + (2 * U if resharded else (n_blocks + 1) * U)
        end = 3 * R  # the root's full gradients, twice, and its reduce-scatter input
    elif layout.dp_size > 1:
        persistent = grads  # DDP's gradient buckets, a second copy of the gradients
    if layout.pp > 1:  # send/receive buffers: activations forward, their gradients back
        micro = max(1, run.batch_size // layout.pp_microbatches)
        act, _ = activation_dtypes(precision)
        persistent += 2 * len(stages) * micro * run.seq_len * run.model_cfg.d_model * act
    accumulating = layout.pp > 1 or run.grad_accum > 1
    accumulate = max((n for _, n in trainable), default=0) * FP32 if accumulating else 0
    scratch = _optimizer_scratch(trainable, run.optim, device)
    base = params + optimizer + persistent
    root_grads = sum(n for p, n in local[: len(root)] if p.trainable) * FP32
    moments = [  # backward starts (again, with gradients, when accumulating)
        base + fwd_end + loss + max(held, grads + later + accumulate if accumulating else 0),
        base + held + recompute + in_flight,  # a checkpointed block recomputes
        base + grads - root_grads + end,  # FSDP reduce-scatters the root unit
        base + grads + scratch,  # the optimizer step
    ]
    temporaries = max(loss, recompute, scratch, end, accumulate)
    return RankMemory(
        pp_rank,
        params,
        grads,
        optimizer,
        held,
        persistent + in_flight,
        temporaries,
        max(moments),
    )
