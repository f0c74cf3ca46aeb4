"""Hang detection: a rank that stops taking part makes every rank exit, naming it.

The training loop marks each phase it enters (``step 12: forward/backward``, ``step 12:
all-reduce of the loss``, ``step 20: checkpoint save``...) with :meth:`Watchdog.phase`: a
counter and a name, no I/O. Every rank enters the same phases in the same order, so the
counter says how far a rank got. A daemon thread per rank publishes (counter, name) to
the job's c10d store (at ``MASTER_ADDR:MASTER_PORT``) when it changes, and watches its own
rank: once one phase has lasted ``fault.hang_timeout`` seconds it reads every rank's
entry and names the ranks that are behind (and what they are doing) or, if none is, the
phase every rank is stuck in. It posts that sentence in the store, where every other
rank's thread finds it within one tick, so all ranks end with the same message and
:data:`HANG_EXIT_CODE`, the stalled one included, and torchrun's agent can restart the
job. Each rank lingers two ticks before exiting: a rank that left at once would break its
peers' collectives (and, as rank 0, take the store) before they had read the message.

The process group's timeout (a little longer, see :func:`process_group_timeout`) stays
as the backstop torch.distributed provides.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch.distributed as dist

from baobab.train.faults import write_note

HANG_EXIT_CODE = 124


def process_group_timeout(hang_timeout: float) -> float:
    """Seconds torch.distributed waits in one collective: the default 600, and always longer
    than the watchdog's timeout, whose message is the better one."""
    return max(600.0, hang_timeout + 60.0)


class Watchdog:
    """Per-rank hang detector; :meth:`phase` is cheap enough for the hot loop."""

    def __init__(self, timeout: float, run_dir: str | Path | None = None):
        self.timeout = timeout
        self.run_dir = run_dir
        # (counter, name, monotonic start), replaced whole so the thread never sees a mix.
        self._state: tuple[int, str, float] = (0, "start", time.monotonic())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._store: Any = None
        self._prefix = ""
        self._interval = min(1.0, max(0.05, timeout / 20))  # how often the thread looks
        self.rank, self.world = 0, 1
        self.fired = False  # set once this rank has declared a hang (and is exiting)

    def phase(self, name: str) -> None:
        """The calling rank now enters ``name``; the same sequence on every rank."""
        self._state = (self._state[0] + 1, name, time.monotonic())

    def start(self) -> None:
        """Start watching (collective: every rank calls it); a no-op without a process
        group, with one rank, or with ``timeout`` 0."""
        if self.timeout <= 0 or not dist.is_initialized() or dist.get_world_size() == 1:
            return
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        token = [uuid.uuid4().hex]  # keys of this attempt only: the store outlives attempts
        dist.broadcast_object_list(token, src=0)
        self._prefix = f"baobab/watchdog/{token[0]}/"
        self._store = _connect_store()
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, name="baobab-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def hold(self) -> None:
        """Wait for a fired watchdog to end the process (called by a main thread that
        failed meanwhile, e.g. because a peer already left): its exit code must win."""
        if self.fired and self._thread is not None:
            self._thread.join()

    # -- the thread ---------------------------------------------------------------------------
    def _watch(self) -> None:
        published: tuple[int, str] | None = None
        declared = f"{self._prefix}hang"  # the first rank to see a hang posts it here
        while not self._stop.wait(self._interval):
            count, name, since = self._state
            if self._store is not None:
                try:
                    if (count, name) != published:
                        self._store.set(f"{self._prefix}{self.rank}", json.dumps([count, name]))
                        published = (count, name)
                    if self._store.check([declared]):
                        self._exit(self._store.get(declared).decode())
                except Exception:  # the store may be gone: keep watching this rank anyway
                    pass
            elapsed = time.monotonic() - since
            if elapsed > self.timeout and not self._stop.is_set():
                self._fire(count, name, elapsed)

    def _peers(self) -> dict[int, tuple[int, str]] | None:
        """Every rank's last published (counter, phase); None when the store is unreachable."""
        if self._store is None:
            return None
        peers = {}
        try:
            for rank in range(self.world):
                key = f"{self._prefix}{rank}"
                if self._store.check([key]):
                    count, name = json.loads(self._store.get(key))
                    peers[rank] = (count, name)
        except Exception:
            return None
        return peers

    def _fire(self, count: int, name: str, elapsed: float) -> None:
        self.fired = True
        peers = self._peers()
        if peers is not None:
            peers[self.rank] = (count, name)  # this rank's own view is the freshest
        message = describe_hang(self.rank, self.world, name, elapsed, self.timeout, peers)
        if self._store is not None:
            with contextlib.suppress(Exception):  # if not, the others' own watchdogs fire
                self._store.set(f"{self._prefix}hang", message)
        self._exit(message)

    def _exit(self, message: str) -> None:
        self.fired = True
        print(f"rank {self.rank}: error: {message}", file=sys.stderr, flush=True)
        if self.run_dir is not None:  # a hung filesystem must not keep this rank alive
            writer = threading.Thread(
                target=write_note, args=(self.run_dir, self.rank, message), daemon=True
            )
            writer.start()
            writer.join(timeout=2)
        time.sleep(2 * self._interval)  # the others read the message before anyone leaves
        sys.stdout.flush()
        os._exit(HANG_EXIT_CODE)


def describe_hang(
    rank: int,
    world: int,
    name: str,
    elapsed: float,
    timeout: float,
    peers: dict[int, tuple[int, str]] | None,
) -> str:
    """One sentence naming the stalled ranks and operations, as seen from ``rank``."""
    waited = f"for {elapsed:.0f} s (fault.hang_timeout {timeout:g} s)"
    if peers is None:
        return (
            f"hang: this rank has been in '{name}' {waited} and could not reach the job's "
            "store to learn which rank stalled"
        )
    ahead = max(count for count, _ in peers.values())
    silent = [r for r in range(world) if r not in peers]
    behind = sorted(r for r, (count, _) in peers.items() if count < ahead)
    if not behind and not silent:
        return (
            f"hang: every rank has been in '{name}' {waited}: a collective in it is stuck, "
            "or the phase needs a longer fault.hang_timeout"
        )
    waiting = sorted(r for r, (count, _) in peers.items() if count == ahead)
    stalled = [f"rank {r} is in '{peers[r][1]}'" for r in behind]
    stalled += [f"rank {r} never reported" for r in silent]
    if len(stalled) > 4:
        stalled = [*stalled[:4], f"{len(stalled) - 4} more"]
    verb = "waits" if len(waiting) == 1 else "wait"
    return (
        f"hang: {_ranks(behind + silent)} stopped taking part in collectives "
        f"({', '.join(stalled)}) while {_ranks(waiting)} {verb} in '{peers[waiting[0]][1]}' "
        f"{waited}"
    )


def _ranks(ranks: list[int]) -> str:
    if len(ranks) > 8:
        return f"ranks {', '.join(map(str, ranks[:8]))} and {len(ranks) - 8} more"
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


def _connect_store() -> Any:
    """A client of the job's c10d store (torchrun's agent hosts it), or None without one."""
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not host or not port:
        return None
    try:
        return dist.TCPStore(
            host, int(port), is_master=False, timeout=timedelta(seconds=30), wait_for_workers=False
        )
    except Exception:  # hang detection still works for this rank, without naming others
        return None
