"""Launching a worker script as a real multi-process torch.distributed job (gloo, loopback).

Each rank runs ``cmd`` with RANK/LOCAL_RANK/WORLD_SIZE/MASTER_* set, its output to
``out/log{rank}.txt``, and reports by writing ``out/rank{rank}.json``. A hang is bounded by
``timeout_s`` for the whole launch, and a free port taken by someone else before rank 0
binds it is retried once.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_once(cmd: list[str], world: int, out: Path, env: dict, timeout_s: float) -> dict:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1", **env}  # fmt: skip
    for rank in range(world):  # nothing left from an earlier attempt
        (out / f"rank{rank}.json").unlink(missing_ok=True)
    procs = []
    for rank in range(world):
        log = open(out / f"log{rank}.txt", "w")  # noqa: SIM115 (closed below)
        rank_env = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}
        procs.append((subprocess.Popen(cmd, env=rank_env, stdout=log, stderr=subprocess.STDOUT), log))  # fmt: skip
    deadline = time.monotonic() + timeout_s
    for proc, log in procs:
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    results = {}
    for rank in range(world):
        path, logs = out / f"rank{rank}.json", (out / f"log{rank}.txt").read_text()[-3000:]
        results[rank] = json.loads(path.read_text()) if path.exists() else {}
        results[rank]["_log"] = logs  # the tail of the rank's output, for failure messages
    return results


def launch_ranks(
    cmd: list[str], world: int, out: Path, env: dict | None = None, timeout_s: float = 240
) -> dict[int, dict]:
    """rank -> what the rank wrote to ``out/rank{rank}.json`` (empty if nothing), plus
    ``"_log"``: the last 3000 characters of its output."""
    out.mkdir(parents=True, exist_ok=True)
    for _ in range(2):  # the free port may be taken before rank 0 binds it: retry once
        results = _launch_once(cmd, world, out, env or {}, timeout_s)
        if "address already in use" not in str(results).lower():
            break
    return results
