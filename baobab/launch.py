"""Multi-process launch through torchrun (torch.distributed.run); never a home-made launcher.

``baobab train --nproc-per-node 4 --recipe quickstart`` becomes
``torchrun --standalone --nproc-per-node 4 --run-path --start-method forkserver
baobab/worker.py train --recipe quickstart``: the workers are forked from a forkserver
that has imported torch and baobab once, so a start, and above all a restart, skips
seconds of imports per worker (``torchrun -m baobab train ...`` works too, slower). The
multi-node flags (``--nnodes``, ``--node-rank``, ``--rdzv-endpoint``, ``--rdzv-id``,
``--rdzv-backend``, ``--rdzv-conf``, ``--local-addr``, ``--master-addr``, ``--master-port``)
and ``--max-restarts`` pass through unchanged, so everything torchrun documents applies.

``--max-restarts N`` lets torchrun's elastic agent restart the workers up to N times after
any failure (a killed worker, a lost node, a hang the watchdog ended); each restart
resumes from the newest complete checkpoint by itself (``baobab/train/recovery.py``).
The launcher sets ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (unless already set): with the
agent's shared TCPStore, restarted workers can read the previous attempt's addresses and
fail to connect (pytorch/pytorch#135712); each attempt's rank 0 then hosts a fresh store.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

SHARE_STORE_ENV = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"
WORKER_SCRIPT = Path(__file__).with_name("worker.py")

# torchrun flag -> takes a value
LAUNCH_FLAGS = {
    "--nproc-per-node": True,
    "--nnodes": True,
    "--node-rank": True,
    "--rdzv-endpoint": True,
    "--rdzv-id": True,
    "--rdzv-backend": True,
    "--rdzv-conf": True,
    "--local-addr": True,
    "--max-restarts": True,
    "--master-addr": True,
    "--master-port": True,
    "--standalone": False,
}


def in_worker() -> bool:
    """True inside a process that torchrun started."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def split_launch_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate torchrun's flags (``--nproc-per-node 2`` or ``--nproc_per_node=2``) from the rest."""
    launch, rest = [], []
    args = list(argv)
    i = 0
    while i < len(args):
        flag, _, inline = args[i].partition("=")
        flag = flag.replace("_", "-") if flag.startswith("--") else flag
        if flag in LAUNCH_FLAGS:
            launch.append(flag)
            if LAUNCH_FLAGS[flag]:
                if inline:
                    launch.append(inline)
                elif i + 1 < len(args):
                    launch.append(args[i + 1])
                    i += 1
                else:
                    raise ValueError(f"{flag} needs a value")
        else:
            rest.append(args[i])
        i += 1
    return launch, rest


def world_size(launch: list[str]) -> int | None:
    """The job's world size when the flags fix it (``--nproc-per-node N`` [``--nnodes M``])."""
    values = dict(zip(launch, launch[1:]))
    try:
        nproc = int(values.get("--nproc-per-node", "1"))
        nnodes = int(values.get("--nnodes", "1"))  # "1:4" elastic ranges are left to torchrun
    except ValueError:
        return None
    return nproc * nnodes


def torchrun_args(launch: list[str], command: list[str]) -> list[str]:
    """The torchrun argument list that runs ``baobab <command>`` in every worker."""
    multi_node = any(flag in launch for flag in ("--nnodes", "--rdzv-endpoint", "--master-addr"))
    standalone = [] if multi_node or "--standalone" in launch else ["--standalone"]
    entry = ["--run-path", "--start-method", "forkserver", str(WORKER_SCRIPT)]
    return [*standalone, *launch, *entry, *command]


def launch(launch: list[str], command: list[str]) -> int:
    """Run ``baobab <command>`` under torchrun; returns the job's exit code. A failed worker is
    named by its rank (torchrun's summary above gives its traceback or message)."""
    import multiprocessing

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    os.environ.setdefault(SHARE_STORE_ENV, "1")  # restarts need a fresh store per attempt
    # The forkserver imports these once; never "__main__" (the launcher itself).
    multiprocessing.set_forkserver_preload(["baobab.cli"])
    try:
        run(get_args_parser().parse_args(torchrun_args(launch, command)))
    except ChildFailedError as err:
        # err.failures maps each failed worker's global rank to its ProcessFailure.
        failed = ", ".join(
            f"rank {rank} (exit code {f.exitcode})" for rank, f in sorted(err.failures.items())
        )
        print(f"error: the distributed job failed: {failed}", flush=True)
        return 1
    return 0
