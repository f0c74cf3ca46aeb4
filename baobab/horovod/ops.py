"""Horovod's tensor collectives, each a thin layer over one torch.distributed call.

Horovod matches collectives across ranks by ``name``; torch.distributed matches them by call
order, so every rank must issue the same collectives in the same order (the usual SPMD
rule). ``name`` is accepted and ignored. An async call returns an int handle; the work runs
on torch.distributed's ``async_op`` machinery and ``synchronize(handle)`` waits for it, then
applies the post-processing (postscale, copy-back, trimming) and returns the result.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import torch
import torch.distributed as dist

from baobab.horovod.compression import Compression, Compressor
from baobab.horovod.runtime import distributed, rank, size

ADASUM_UNSUPPORTED = "Adasum is not supported by baobab.horovod; use hvd.Average or hvd.Sum."
_MAX_DIMS = 32  # allgather exchanges shapes as fixed-length vectors of this many dims


class ReduceOp(IntEnum):
    """Horovod's reduction ops, with Horovod's integer values."""

    Average = 0
    Sum = 1
    Adasum = 2
    Min = 3
    Max = 4
    Product = 5


Average, Sum, Adasum = ReduceOp.Average, ReduceOp.Sum, ReduceOp.Adasum
Min, Max, Product = ReduceOp.Min, ReduceOp.Max, ReduceOp.Product

# Average is a SUM whose postscale is divided by size(): gloo has no AVG.
_TORCH_OP = {
    Average: dist.ReduceOp.SUM,
    Sum: dist.ReduceOp.SUM,
    Min: dist.ReduceOp.MIN,
    Max: dist.ReduceOp.MAX,
    Product: dist.ReduceOp.PRODUCT,
}


@dataclass
class _Pending:
    works: list[Any] = field(default_factory=list)  # torch.distributed Work objects
    finish: Callable[[], Any] = lambda: None


_pending: dict[int, _Pending] = {}
_handle_ids = itertools.count(1)


def _register(works: Sequence[Any], finish: Callable[[], Any]) -> int:
    handle = next(_handle_ids)
    _pending[handle] = _Pending([w for w in works if w is not None], finish)
    return handle


def _lookup(handle: int) -> _Pending:
    if handle not in _pending:
        raise ValueError(f"handle {handle} is unknown or was already synchronized.")
    return _pending[handle]


def poll(handle: int) -> bool:
    """True when the async operation behind ``handle`` has finished."""
    return all(w.is_completed() for w in _lookup(handle).works)


def synchronize(handle: int) -> Any:
    """Wait for the async operation behind ``handle`` and return its result."""
    pending = _lookup(handle)
    del _pending[handle]
    for work in pending.works:
        work.wait()
    return pending.finish()


def resolve_op(op: int | None, average: bool | None = None) -> ReduceOp:
    """Horovod's rule: ``op`` wins, the deprecated ``average`` maps to Average/Sum, default Average."""
    if op is not None and average is not None:
        raise ValueError("pass either op or the deprecated average argument, not both.")
    if op is None:
        op = Average if average is None or average else Sum
    if op == Adasum:
        raise ValueError(ADASUM_UNSUPPORTED)
    if op not in _TORCH_OP:
        raise ValueError(
            f"op must be one of hvd.Average, hvd.Sum, hvd.Min, hvd.Max, hvd.Product, got {op!r}."
        )
    return ReduceOp(op)


def _scale_(tensor: torch.Tensor, factor: float) -> None:
    if factor == 1.0:
        return
    with torch.no_grad():
        if tensor.is_floating_point() or tensor.is_complex():
            tensor.mul_(factor)
        else:  # integers: scale in float64, then truncate toward zero like a C cast
            tensor.copy_(tensor.double().mul_(factor))


def _meta_device() -> torch.device:
    """Where small bookkeeping tensors (sizes, shapes) travel: CPU unless the group is nccl-only."""
    backend = str(dist.get_backend())
    if "gloo" in backend or "mpi" in backend or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _check_root(root_rank: int) -> None:
    if not 0 <= root_rank < size():
        raise ValueError(f"root_rank must be in [0, {size()}), got {root_rank}.")


# --- allreduce -------------------------------------------------------------------------


def allreduce_async_(
    tensor: torch.Tensor,
    average: bool | None = None,
    name: str | None = None,
    op: int | None = None,
    prescale_factor: float = 1.0,
    postscale_factor: float = 1.0,
) -> int:
    """Start reducing ``tensor`` in place across ranks; ``synchronize`` returns it reduced."""
    op = resolve_op(op, average)
    post = postscale_factor / size() if op == Average else postscale_factor
    buf = tensor.detach() if tensor.is_contiguous() else tensor.detach().contiguous()
    _scale_(buf, prescale_factor)
    work = dist.all_reduce(buf, op=_TORCH_OP[op], async_op=True) if distributed() else None

    def finish() -> torch.Tensor:
        _scale_(buf, post)
        if buf.data_ptr() != tensor.data_ptr():
            with torch.no_grad():
                tensor.copy_(buf)
        return tensor

    return _register([work], finish)


def allreduce_async(
    tensor: torch.Tensor,
    average: bool | None = None,
    name: str | None = None,
    op: int | None = None,
    prescale_factor: float = 1.0,
    postscale_factor: float = 1.0,
) -> int:
    """Start reducing a copy of ``tensor``; ``synchronize`` returns the new reduced tensor."""
    out = tensor.detach().clone(memory_format=torch.contiguous_format)
    return allreduce_async_(out, average, name, op, prescale_factor, postscale_factor)


def allreduce_(
    tensor: torch.Tensor,
    average: bool | None = None,
    name: str | None = None,
    op: int | None = None,
    prescale_factor: float = 1.0,
    postscale_factor: float = 1.0,
) -> torch.Tensor:
    """Reduce ``tensor`` in place across ranks (default op: Average) and return it."""
    return synchronize(
        allreduce_async_(tensor, average, name, op, prescale_factor, postscale_factor)
    )


class _DifferentiableAllreduce(torch.autograd.Function):
    """y = post·op_r(pre·x_r), so dL/dx_r = the same allreduce of the ranks' dL/dy."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, op: ReduceOp, pre: float, post: float):
        ctx.args = (op, pre, post)
        return synchronize(
            allreduce_async(tensor, op=op, prescale_factor=pre, postscale_factor=post)
        )

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        op, pre, post = ctx.args
        reduced = allreduce(grad, op=op, prescale_factor=pre, postscale_factor=post)
        return reduced, None, None, None


def allreduce(
    tensor: torch.Tensor,
    average: bool | None = None,
    name: str | None = None,
    compression: type[Compressor] = Compression.none,
    op: int | None = None,
    prescale_factor: float = 1.0,
    postscale_factor: float = 1.0,
) -> torch.Tensor:
    """Reduce ``tensor`` across ranks into a new tensor; differentiable for Average and Sum."""
    op = resolve_op(op, average)
    if tensor.requires_grad and torch.is_grad_enabled() and op in (Average, Sum):
        return _DifferentiableAllreduce.apply(tensor, op, prescale_factor, postscale_factor)
    compressed, ctx = compression.compress(tensor)
    handle = allreduce_async(compressed, None, name, op, prescale_factor, postscale_factor)
    return compression.decompress(synchronize(handle), ctx)


def grouped_allreduce(
    tensors: Sequence[torch.Tensor],
    average: bool | None = None,
    name: str | None = None,
    op: int | None = None,
    prescale_factor: float = 1.0,
    postscale_factor: float = 1.0,
) -> list[torch.Tensor]:
    """Reduce each tensor into a new tensor; all reductions are in flight together."""
    handles = [
        allreduce_async(t, average, name, op, prescale_factor, postscale_factor) for t in tensors
    ]
    return [synchronize(h) for h in handles]


def grouped_allreduce_(
    tensors: Sequence[torch.Tensor],
    average: bool | None = None,
    name: str | None = None,
    op: int | None = None,
    prescale_factor: float = 1.0,
    postscale_factor: float = 1.0,
) -> list[torch.Tensor]:
    """Reduce each tensor in place; all reductions are in flight together."""
    handles = [
        allreduce_async_(t, average, name, op, prescale_factor, postscale_factor) for t in tensors
    ]
    return [synchronize(h) for h in handles]


# --- allgather, broadcast, alltoall, reducescatter ---------------------------------------


def _gather_shapes(tensor: torch.Tensor) -> list[tuple[int, ...]]:
    if tensor.dim() > _MAX_DIMS:
        raise ValueError(f"allgather supports up to {_MAX_DIMS} dimensions, got {tensor.dim()}.")
    meta = torch.full((_MAX_DIMS + 1,), -1, dtype=torch.int64)
    meta[0] = tensor.dim()
    meta[1 : 1 + tensor.dim()] = torch.tensor(tensor.shape, dtype=torch.int64)
    meta = meta.to(_meta_device())
    metas = [torch.empty_like(meta) for _ in range(size())]
    dist.all_gather(metas, meta)
    return [tuple(m[1 : 1 + int(m[0])].tolist()) for m in metas]


def allgather_async(tensor: torch.Tensor, name: str | None = None) -> int:
    """Start concatenating every rank's ``tensor`` along dim 0 (first dims may differ)."""
    local = tensor.detach()
    if local.dim() == 0:
        local = local.reshape(1)
    if not distributed():
        out = local.clone()
        return _register([], lambda: out)
    shapes = _gather_shapes(local)  # (size,) shapes, exchanged synchronously
    if any(s[1:] != tuple(local.shape[1:]) for s in shapes):
        raise ValueError(
            f"allgather needs the same shape on every rank except dim 0, got {shapes}."
        )
    rows = [s[0] for s in shapes]
    longest = max(rows)
    padded = local.contiguous()
    if local.shape[0] < longest:  # all_gather needs equal shapes: pad to the longest, trim after
        pad = local.new_zeros((longest - local.shape[0], *local.shape[1:]))
        padded = torch.cat([local, pad])
    outs = [torch.empty_like(padded) for _ in rows]
    work = dist.all_gather(outs, padded, async_op=True)
    return _register([work], lambda: torch.cat([o[:n] for o, n in zip(outs, rows)]))


def allgather(tensor: torch.Tensor, name: str | None = None) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along dim 0 into a new tensor (not differentiable)."""
    return synchronize(allgather_async(tensor, name))


def broadcast_async_(tensor: torch.Tensor, root_rank: int, name: str | None = None) -> int:
    """Start overwriting ``tensor`` in place with ``root_rank``'s value."""
    _check_root(root_rank)
    buf = tensor.detach() if tensor.is_contiguous() else tensor.detach().contiguous()
    work = dist.broadcast(buf, src=root_rank, async_op=True) if distributed() else None

    def finish() -> torch.Tensor:
        if buf.data_ptr() != tensor.data_ptr():
            with torch.no_grad():
                tensor.copy_(buf)
        return tensor

    return _register([work], finish)


def broadcast_async(tensor: torch.Tensor, root_rank: int, name: str | None = None) -> int:
    """Start broadcasting ``root_rank``'s ``tensor`` into a new tensor."""
    out = tensor.detach().clone(memory_format=torch.contiguous_format)
    return broadcast_async_(out, root_rank, name)


def broadcast_(tensor: torch.Tensor, root_rank: int, name: str | None = None) -> torch.Tensor:
    """Overwrite ``tensor`` in place with ``root_rank``'s value and return it."""
    return synchronize(broadcast_async_(tensor, root_rank, name))


def broadcast(tensor: torch.Tensor, root_rank: int, name: str | None = None) -> torch.Tensor:
    """Return a new tensor holding ``root_rank``'s ``tensor`` (not differentiable)."""
    return synchronize(broadcast_async(tensor, root_rank, name))


def alltoall(
    tensor: torch.Tensor,
    splits: torch.Tensor | Sequence[int] | None = None,
    name: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Send ``splits[r]`` rows of ``tensor`` to rank r and concatenate what arrives.

    Without ``splits`` the rows are split evenly and only the output is returned; with
    ``splits`` the result is ``(output, received_splits)`` as in Horovod.
    """
    local, n = tensor.detach().contiguous(), size()
    if splits is None:
        if local.shape[0] % n:
            raise ValueError(
                f"alltoall without splits needs dim 0 divisible by {n}, got {local.shape[0]}."
            )
        send = [local.shape[0] // n] * n
    else:
        send = [int(s) for s in (splits.tolist() if torch.is_tensor(splits) else splits)]
        if len(send) != n or sum(send) != local.shape[0] or min(send) < 0:
            raise ValueError(
                f"splits must be {n} non-negative counts summing to {local.shape[0]}, got {send}."
            )
    if distributed():
        dev = _meta_device()
        recv_counts = torch.empty(n, dtype=torch.int64, device=dev)
        dist.all_to_all_single(recv_counts, torch.tensor(send, dtype=torch.int64, device=dev))
        recv = [int(c) for c in recv_counts.tolist()]
        out = local.new_empty((sum(recv), *local.shape[1:]))
        dist.all_to_all_single(out, local, output_split_sizes=recv, input_split_sizes=send)
    else:
        out, recv = local.clone(), send
    if splits is None:
        return out
    return out, torch.tensor(recv, dtype=torch.int32)


def reducescatter(
    tensor: torch.Tensor,
    op: int = Average,
    name: str | None = None,
    prescale_factor: float = 1.0,
    postscale_factor: float = 1.0,
) -> torch.Tensor:
    """Reduce ``tensor`` across ranks and keep this rank's slice of dim 0 (first ranks get extras)."""
    full = synchronize(allreduce_async(tensor, None, name, op, prescale_factor, postscale_factor))
    return torch.tensor_split(full, size())[rank()].clone()


# --- control ---------------------------------------------------------------------------


def barrier() -> None:
    """Block until every rank reaches this call."""
    if distributed():
        dist.barrier()


def join(device: int = -1) -> int:
    """Block until every rank has joined and return the rank that joined last.

    Unlike Horovod, ranks that joined early do not stand in for collectives of ranks still
    training: every rank must issue the same collectives (e.g. DistributedSampler keeps
    shards equal). ``device`` is accepted for compatibility and ignored.
    """
    if not distributed():
        return 0
    stamp = torch.tensor([time.time()], dtype=torch.float64, device=_meta_device())
    stamps = [torch.empty_like(stamp) for _ in range(size())]
    dist.all_gather(stamps, stamp)
    return int(torch.cat(stamps).argmax())
