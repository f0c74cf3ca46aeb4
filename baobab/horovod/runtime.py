"""Process bookkeeping for ``baobab.horovod``: init, shutdown and the rank/size queries.

Launched by torchrun, ``init()`` builds the default torch.distributed process group from
torchrun's environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``,
``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``GROUP_RANK``, ``GROUP_WORLD_SIZE``). Without those
variables it runs as one process of size 1 and every collective is answered locally, so the
same script also runs alone with ``python script.py``.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

_NOT_INITIALIZED = "baobab.horovod is not initialized; call hvd.init() first."


@dataclass
class _Topology:
    """Where this process sits; Horovod's cross ranks are node indices (same local rank)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    cross_rank: int = 0
    cross_size: int = 1
    distributed: bool = False  # True when collectives go through a process group
    owns_group: bool = False  # True when init() created the group, so shutdown() destroys it


_topology: _Topology | None = None


def default_backend() -> str:
    """gloo for CPU tensors, plus nccl for CUDA tensors when this machine has CUDA."""
    if torch.cuda.is_available() and dist.is_nccl_available():
        return "cpu:gloo,cuda:nccl"
    return "gloo"


def init(comm: object = None, process_sets: object = None, *, backend: str | None = None) -> None:
    """Start baobab.horovod: join torchrun's process group, or run alone as size 1.

    ``comm`` and ``process_sets`` exist for Horovod signature compatibility and must be None;
    ``backend`` overrides the torch.distributed backend (default: :func:`default_backend`).
    """
    global _topology
    if comm is not None or process_sets is not None:
        raise ValueError(
            "baobab.horovod.init() takes no MPI communicator or process sets; launch with torchrun instead."
        )
    if _topology is not None:
        return
    env = os.environ
    owns = False
    if not dist.is_initialized() and "RANK" in env and "WORLD_SIZE" in env:
        # Imported before the group exists, on purpose: importing torch._dynamo once a group
        # exists (an optimizer step does) leaves that group referenced inside torch, so
        # destroy_process_group cannot stop its gloo threads. A gloo thread still freeing a
        # collective's tensors during interpreter exit then aborts the process ("terminate
        # called without an active exception"). Imported first, shutdown() stops them.
        import torch._dynamo  # noqa: F401

        dist.init_process_group(backend=backend or default_backend())
        owns = True
    if not dist.is_initialized():
        _topology = _Topology(local_rank=int(env.get("LOCAL_RANK", 0)))
        return
    rank, size = dist.get_rank(), dist.get_world_size()
    if "LOCAL_RANK" in env and "LOCAL_WORLD_SIZE" in env:
        local_rank, local_size = int(env["LOCAL_RANK"]), int(env["LOCAL_WORLD_SIZE"])
        cross_rank = int(env.get("GROUP_RANK", rank // local_size))
        cross_size = int(env.get("GROUP_WORLD_SIZE", max(1, size // local_size)))
    else:  # a group made by someone else (e.g. mpirun + env://): derive nodes from host names
        local_rank, local_size, cross_rank, cross_size = _topology_from_hostnames(rank, size)
    _topology = _Topology(
        rank, size, local_rank, local_size, cross_rank, cross_size, True, owns_group=owns
    )


def _topology_from_hostnames(rank: int, size: int) -> tuple[int, int, int, int]:
    hosts: list[str] = [""] * size
    dist.all_gather_object(hosts, socket.gethostname())
    nodes = list(dict.fromkeys(hosts))  # first-seen order == node index
    mine = hosts[rank]
    local_rank = sum(1 for h in hosts[:rank] if h == mine)
    return local_rank, hosts.count(mine), nodes.index(mine), len(nodes)


def shutdown() -> None:
    """Leave baobab.horovod; destroys the process group only if ``init()`` created it."""
    global _topology
    if _topology is not None and _topology.owns_group and dist.is_initialized():
        # Every rank's collectives are done before any rank tears its group down (and the
        # gloo threads that destroy_process_group joins are idle by then; see init()).
        if _topology.distributed:
            dist.barrier()
        dist.destroy_process_group()
    _topology = None


def is_initialized() -> bool:
    """True between ``init()`` and ``shutdown()``."""
    return _topology is not None


def topology() -> _Topology:
    """The current topology; raises ValueError before ``init()``."""
    if _topology is None:
        raise ValueError(_NOT_INITIALIZED)
    return _topology


def distributed() -> bool:
    """True when collectives must go through torch.distributed (more than a lone process)."""
    return topology().distributed


def size() -> int:
    """Number of processes in the job."""
    return topology().size


def rank() -> int:
    """Rank of this process in the job, 0 ≤ rank < size."""
    return topology().rank


def local_size() -> int:
    """Number of processes on this node."""
    return topology().local_size


def local_rank() -> int:
    """Rank of this process on its node: the CUDA device index it should use."""
    return topology().local_rank


def cross_size() -> int:
    """Number of nodes (processes sharing this local rank across nodes)."""
    return topology().cross_size


def cross_rank() -> int:
    """Index of this process's node among the nodes."""
    return topology().cross_rank


def is_homogeneous() -> bool:
    """True when every node runs the same number of processes (always so under torchrun)."""
    t = topology()
    return t.local_size * t.cross_size == t.size


def mpi_threads_supported() -> bool:
    """No MPI underneath: always False."""
    return False


def mpi_built() -> bool:
    return False


def mpi_enabled() -> bool:
    return False


def gloo_built() -> bool:
    return dist.is_gloo_available()


def gloo_enabled() -> bool:
    """True when CPU tensors travel over gloo (any multi-process run started by ``init()``)."""
    return distributed() and "gloo" in str(dist.get_backend())


def nccl_built() -> bool:
    return dist.is_nccl_available()


def cuda_built() -> bool:
    return torch.version.cuda is not None


def rocm_built() -> bool:
    return getattr(torch.version, "hip", None) is not None


def ddl_built() -> bool:
    return False


def ccl_built() -> bool:
    return False
