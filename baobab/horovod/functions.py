"""Horovod's helpers above the tensor collectives: objects, parameters, optimizer state.

Many small tensors are sent as few large ones: tensors are grouped by (device, dtype) into
flat buckets of at most ``BUCKET_BYTES``, each bucket is one collective, and the results are
copied back. Objects travel with torch.distributed's pickle-based object collectives, which
only ever unpickle what this job's own ranks sent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from baobab.horovod.ops import _check_root, broadcast_async_, synchronize
from baobab.horovod.runtime import distributed, rank, size

BUCKET_BYTES = 32 * 2**20


def buckets(tensors: list[torch.Tensor], cap_bytes: int = BUCKET_BYTES) -> list[list[int]]:
    """Indices of ``tensors`` grouped by (device, dtype), in order, each group ≤ ``cap_bytes``
    unless one tensor alone is larger. The order is the input order, so it matches on all ranks."""
    open_groups: dict[tuple[torch.device, torch.dtype], tuple[list[int], int]] = {}
    done: list[list[int]] = []
    for i, t in enumerate(tensors):
        key, nbytes = (t.device, t.dtype), t.numel() * t.element_size()
        members, used = open_groups.get(key, ([], 0))
        if members and used + nbytes > cap_bytes:
            done.append(members)
            members, used = [], 0
        members.append(i)
        open_groups[key] = (members, used + nbytes)
    return done + [members for members, _ in open_groups.values()]


def flat_collective(
    tensors: list[torch.Tensor], start: Callable[[torch.Tensor], int]
) -> Callable[[], None]:
    """Run ``start(flat)`` (an async collective returning a handle) on each flat bucket of
    ``tensors``; the returned function waits and writes the results back into ``tensors``."""
    launched = []
    for group in buckets(tensors):
        members = [tensors[i] for i in group]
        flat = torch.cat([t.detach().reshape(-1) for t in members])
        launched.append((members, flat, start(flat)))

    def finish() -> None:
        with torch.no_grad():
            for members, flat, handle in launched:
                synchronize(handle)
                offset = 0
                for t in members:
                    t.copy_(flat[offset : offset + t.numel()].view_as(t))
                    offset += t.numel()

    return finish


def broadcast_object(obj: Any, root_rank: int = 0, name: str | None = None) -> Any:
    """Return ``root_rank``'s ``obj`` on every rank (pickled by torch.distributed)."""
    _check_root(root_rank)
    if not distributed():
        return obj
    box = [obj if rank() == root_rank else None]
    dist.broadcast_object_list(box, src=root_rank)
    return obj if rank() == root_rank else box[0]


def allgather_object(obj: Any, name: str | None = None) -> list[Any]:
    """Return the list of every rank's ``obj``, in rank order."""
    if not distributed():
        return [obj]
    out: list[Any] = [None] * size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_parameters(params: Mapping[str, Any] | Iterable[Any], root_rank: int) -> None:
    """Overwrite, in place, every tensor in ``params`` with ``root_rank``'s value.

    ``params`` is a ``state_dict()`` (sent in sorted-key order), or a list/iterable of
    parameters or ``(name, parameter)`` pairs such as ``model.named_parameters()``.
    """
    if isinstance(params, Mapping):
        items = sorted(params.items(), key=lambda kv: str(kv[0]))
    elif isinstance(params, Iterable) and not isinstance(params, (torch.Tensor, str)):
        items = [p if isinstance(p, tuple) else (None, p) for p in params]
    else:
        raise ValueError(
            f"params must be a state_dict or a list of parameters or (name, parameter) pairs, got {type(params).__name__}."
        )
    _check_root(root_rank)
    tensors = [p for _, p in items if isinstance(p, torch.Tensor)]
    if distributed() and tensors:
        flat_collective(tensors, lambda flat: broadcast_async_(flat, root_rank))()


@dataclass(frozen=True)
class _Slot:
    """Stands for the ``index``-th state tensor while the state_dict's structure is pickled."""

    index: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    on_cpu: bool


def _strip(obj: Any, found: list[torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        found.append(obj)
        return _Slot(len(found) - 1, tuple(obj.shape), obj.dtype, obj.device.type == "cpu")
    if isinstance(obj, dict):
        return {k: _strip(v, found) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_strip(v, found) for v in obj)
    return obj


def _fill(obj: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(obj, _Slot):
        return tensors[obj.index]
    if isinstance(obj, dict):
        return {k: _fill(v, tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_fill(v, tensors) for v in obj)
    return obj


def broadcast_optimizer_state(
    optimizer: torch.optim.Optimizer, root_rank: int, model: torch.nn.Module | None = None
) -> None:
    """Make every rank's optimizer state and hyperparameters equal to ``root_rank``'s.

    The state_dict's structure (param groups, scalars) goes as one pickled object and its
    tensors as bucketed broadcasts; non-root ranks then ``load_state_dict`` it. An optimizer
    with no state yet stays without state (Horovod instead runs a zero-gradient step).
    ``model`` is accepted for compatibility and ignored.
    """
    _check_root(root_rank)
    if not distributed():
        return
    is_root = rank() == root_rank
    found: list[torch.Tensor] = []
    structure = None
    if is_root:  # tensors of param_groups (rare, e.g. a tensor lr) simply travel pickled
        structure = dict(optimizer.state_dict())
        structure["state"] = _strip(structure["state"], found)
    structure = broadcast_object(structure, root_rank)
    if is_root:
        tensors = found
    else:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        wanted: list[tuple[_Slot, torch.device]] = []
        for pid, entry in structure["state"].items():
            slots: list[_Slot] = []
            _walk_slots(entry, slots)
            wanted += [(s, params[pid].device) for s in slots]
        tensors = [  # on CPU where root kept them there (e.g. Adam's step)
            torch.empty(s.shape, dtype=s.dtype, device="cpu" if s.on_cpu else device)
            for s, device in sorted(wanted, key=lambda sd: sd[0].index)
        ]
    if tensors:
        flat_collective(tensors, lambda flat: broadcast_async_(flat, root_rank))()
    if not is_root:
        optimizer.load_state_dict(_fill(structure, tensors))


def _walk_slots(obj: Any, slots: list[_Slot]) -> None:
    if isinstance(obj, _Slot):
        slots.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _walk_slots(v, slots)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _walk_slots(v, slots)
