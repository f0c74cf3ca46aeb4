"""Process-group plumbing for the trainer: start-up, rank facts and global sums.

Every number the trainer reports (loss, token counts, evaluation sums) is summed once per
model replica: a rank contributes only if ``ParallelModel.reports`` (it holds the last
pipeline stage and is the first tensor-parallel rank of its group), so a plain SUM
all-reduce over the world counts each data-parallel replica exactly once.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


def init_distributed(device_name: str = "auto", timeout_s: float = 600.0) -> torch.device:
    """Join the torchrun job (gloo on CPU, NCCL on CUDA) and return this rank's device."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            timeout=timedelta(seconds=timeout_s),
            device_id=device if use_cuda else None,
        )
    return device


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def global_sum(values: list[float], contributes: bool, device: torch.device) -> list[float]:
    """Sum ``values`` over the ranks that contribute (one per model replica); every rank gets
    the result. Without a process group the values come back unchanged."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(
        values if contributes else [0.0] * len(values), dtype=torch.float64, device=device
    )
    dist.all_reduce(t)
    return t.tolist()


def broadcast_object(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (picklable; unchanged without a process group)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def max_int(value: int) -> int:
    """The largest ``value`` over all ranks (unchanged without a process group)."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.int64)  # on the CPU for gloo; NCCL wants the GPU
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())
