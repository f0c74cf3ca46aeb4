"""Run a script under ``torchrun --standalone`` (its ``localhost:0`` rendezvous takes a free
port) or alone without torchrun's variables, with a bounded timeout, optionally with other
kernels than this process's (``KERNELS`` of tests/numerics.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from numerics import KERNELS

HERE = Path(__file__).parent
TORCHRUN_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
)


def _env(kernels: str = "inherited") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    return {**env, "OMP_NUM_THREADS": "1", **KERNELS[kernels]}


def torchrun(
    script: str, *args: str, nproc: int = 2, timeout: int = 120, kernels: str = "inherited"
) -> None:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
    ]
    done = subprocess.run(
        [*cmd, str(HERE / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(kernels),
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def alone(script: str, *args: str, timeout: int = 120) -> None:
    done = subprocess.run(
        [sys.executable, str(HERE / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(),
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
