"""The scheduler: plain Python that decides how many tokens each request advances per step.

No torch here (DESIGN principle 7): the scheduler sees token counts and KV-cache blocks
only, so it is tested without a model. Each engine step it returns a list of :class:`ScheduledSeq`
(request, first position, token count); the runner computes those tokens, the engine
samples where ``sample`` is set, then calls :meth:`Scheduler.update`.

Policy, in order, within one step:

1. Every running request past its prompt decodes one token (decodes are never starved).
2. Running requests still in their prompt advance, oldest first, within the prefill budget
   of ``max_num_batched_tokens`` tokens.
3. Waiting requests are admitted in arrival order while fewer than ``max_num_seqs`` run, a
   contiguous run of free blocks holds their prompt + max_tokens, and their first chunk fits
   the budget left. The blocks are reserved whole at admission, so a running request never
   runs out of cache and nothing is ever preempted.

With prefix caching (``prefix_cache.py``), admission first looks up the prompt's cached
full blocks: a hit sets the request's ``num_computed`` past them, its plan starts there,
and the copies into its run are handed to the engine (:meth:`Scheduler.take_copies`)
before the step runs. Cached blocks nobody references are evicted, least recently used
first, only when a reservation cannot be placed otherwise.

A prompt advances only to a multiple of ``prefill_chunk_size`` (or to its end): its chunk
boundaries are then the same whatever else is scheduled, so its numerics are too. A
request that cannot advance this step blocks those behind it (first come, first served).
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field
from itertools import islice
from typing import NamedTuple

from baobab.serve.prefix_cache import PrefixCache
from baobab.serve.types import QueueFullError


@dataclass(eq=False)
class SchedRequest:
    """What the scheduler knows of a request: counts, never token values.

    Invariant: ``num_computed <= num_tokens``; the tokens ``[num_computed, num_tokens)``
    still need their keys and values computed. While ``num_computed < prompt_len`` the
    request is prefilling; afterwards ``num_tokens - num_computed`` is 1 (the last sampled
    token) until it finishes.
    """

    request_id: str
    prompt_len: int
    max_tokens: int = 1  # the cache reserved is prompt_len + max_tokens tokens
    num_tokens: int = -1  # prompt + generated so far; -1: prompt_len
    num_computed: int = 0
    block: int | None = None  # first block of its run while it holds cache
    num_blocks: int = 0
    finished: bool = field(default=False)
    # Prefix caching: the chained hashes of the prompt's blocks that lie in whole chunks,
    # whether it may start from cached blocks (not when every prompt row's logits are
    # wanted), and which blocks of its own run it put in the cache.
    block_hashes: list[bytes] = field(default_factory=list)
    reuse_prefix: bool = True
    cached_blocks: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.num_tokens < 0:
            self.num_tokens = self.prompt_len

    @property
    def is_prefill(self) -> bool:
        return self.num_computed < self.prompt_len


class ScheduledSeq(NamedTuple):
    """One request's share of a step: tokens ``[start, start + num_tokens)``."""

    request: SchedRequest
    start: int
    num_tokens: int
    sample: bool  # the last token's logits give the next token


class BlockAllocator:
    """Contiguous runs of KV-cache blocks, first fit; a freed run merges with its neighbours.

    Deterministic: the same sequence of calls gives the same runs.
    """

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.used = 0
        self._free: list[list[int]] = [[0, num_blocks]]  # [start, length], sorted by start

    def allocate(self, n: int) -> int | None:
        """The first block of a free run of ``n`` blocks, or None if no run is long enough."""
        for i, (start, length) in enumerate(self._free):
            if length >= n:
                if length == n:
                    del self._free[i]
                else:
                    self._free[i] = [start + n, length - n]
                self.used += n
                return start
        return None

    def free_run_lengths(self) -> list[int]:
        """Lengths of the free runs in the order ``allocate`` tries them."""
        return [length for _, length in self._free]

    def free_runs(self) -> list[list[int]]:
        """The free runs as [start, length], by start."""
        return [list(run) for run in self._free]

    def free(self, start: int, n: int) -> None:
        i = bisect.bisect_left(self._free, [start, 0])
        self._free.insert(i, [start, n])
        self.used -= n
        if i + 1 < len(self._free) and start + n == self._free[i + 1][0]:
            self._free[i][1] += self._free.pop(i + 1)[1]
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == start:
            self._free[i - 1][1] += self._free.pop(i)[1]


class Scheduler:
    """Admission, chunked prefill, finishing and abort over a fixed pool of KV-cache blocks."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        prefill_chunk_size: int,
        max_queue: int,
        prefix_caching: bool = False,
    ) -> None:
        if prefill_chunk_size > max_num_batched_tokens:
            raise ValueError(
                f"prefill_chunk_size ({prefill_chunk_size}) must be at most "
                f"max_num_batched_tokens ({max_num_batched_tokens})."
            )
        self.blocks = BlockAllocator(num_blocks)
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.chunk = prefill_chunk_size
        self.max_queue = max_queue
        self.waiting: deque[SchedRequest] = deque()
        self.running: list[SchedRequest] = []  # in admission order
        self._by_id: dict[str, SchedRequest] = {}
        self.prefix = PrefixCache(block_size, prefill_chunk_size) if prefix_caching else None
        self._copies: list[tuple[list[int], int]] = []  # (cached blocks, first block to fill)

    # ------------------------------------------------------------------ requests in and out
    def add(self, request: SchedRequest) -> None:
        """Queue a request; QueueFullError when ``max_num_seqs + max_queue`` requests are held
        (running or waiting): the most the admission rule in front of the engine
        (``EngineClient._admit``) ever lets in, so this only guards direct users."""
        if self.blocks_needed(request) > self.blocks.num_blocks:
            raise ValueError(
                f"the request needs {request.prompt_len + request.max_tokens} tokens of KV cache "
                f"but the cache holds {self.blocks.num_blocks * self.block_size}."
            )
        if request.request_id in self._by_id:
            raise ValueError(f"request id {request.request_id!r} is already in use.")
        if len(self.running) + len(self.waiting) >= self.max_num_seqs + self.max_queue:
            raise QueueFullError(
                f"the engine's queue is full ({self.num_running} requests running and "
                f"{self.num_waiting} waiting); retry later"
            )
        self.waiting.append(request)
        self._by_id[request.request_id] = request

    def get(self, request_id: str) -> SchedRequest | None:
        return self._by_id.get(request_id)

    def abort(self, request_id: str) -> SchedRequest | None:
        """Drop a waiting or running request and free its blocks; None if unknown."""
        request = self._by_id.get(request_id)
        if request is None:
            return None
        if request.block is None:
            self.waiting.remove(request)
            self._release(request)
        else:
            self.finish(request)
        return request

    def finish(self, request: SchedRequest) -> None:
        """A running request is done: its blocks are free for the next step, but those it
        put in the prefix cache, which stay there unreferenced until evicted."""
        self.running.remove(request)
        start, end = request.block, request.block + request.num_blocks
        if request.cached_blocks:
            self.prefix.release(request.cached_blocks)
            for block in request.cached_blocks:  # the runs between cached blocks
                if block > start:
                    self.blocks.free(start, block - start)
                start = block + 1
        if end > start:
            self.blocks.free(start, end - start)
        self._release(request)

    def blocks_needed(self, request: SchedRequest) -> int:
        return -(-(request.prompt_len + request.max_tokens) // self.block_size)

    def _release(self, request: SchedRequest) -> None:
        request.block = None
        request.finished = True
        del self._by_id[request.request_id]

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------------- the plan
    def _prefill_span(self, request: SchedRequest, budget: int) -> int:
        """Prompt tokens ``request`` may advance with ``budget`` left: to its prompt's end or
        to a chunk boundary (a multiple of ``chunk``); 0 when not even one chunk fits."""
        start = request.num_computed
        end = min(request.prompt_len, start + budget)
        if end < request.prompt_len:
            end = end // self.chunk * self.chunk
        return max(0, end - start)

    def schedule(self) -> list[ScheduledSeq]:
        """This step's work; admits waiting requests (reserving their blocks)."""
        plan = [
            ScheduledSeq(r, r.num_computed, r.num_tokens - r.num_computed, True)
            for r in self.running
            if not r.is_prefill
        ]
        budget = self.max_num_batched_tokens
        for r in self.running:
            if r.is_prefill:
                n = self._prefill_span(r, budget)
                if n == 0:
                    return plan  # first come, first served: nothing overtakes r
                plan.append(self._prefill(r, n))
                budget -= n
        while self.waiting and len(self.running) < self.max_num_seqs:
            r = self.waiting[0]
            hits = self._lookup(r)
            r.num_computed = len(hits) * self.block_size
            n = self._prefill_span(r, budget)
            block = self._allocate(self.blocks_needed(r), hits) if n else None
            if block is None:  # no budget, or no run of free blocks long enough yet:
                r.num_computed = 0  # r waits, and so do the rest
                break
            self.waiting.popleft()
            r.block, r.num_blocks = block, self.blocks_needed(r)
            self.running.append(r)
            plan.append(self._prefill(r, n))
            budget -= n
            if self.prefix is not None and r.reuse_prefix:
                self.prefix.queries += r.prompt_len
                self.prefix.hits += r.num_computed
            if hits:  # referenced until the engine has copied them
                self.prefix.acquire(hits)
                self._copies.append((hits, block))
        return plan

    def _lookup(self, r: SchedRequest) -> list[int]:
        if self.prefix is None or not r.reuse_prefix:
            return []
        return self.prefix.lookup(r.block_hashes, r.prompt_len)

    def _allocate(self, n: int, keep: list[int]) -> int | None:
        """The first block of a run of ``n`` blocks, evicting unreferenced cached blocks (least
        recently used first; never ``keep``, whose copies are pending) when no free run is
        long enough but one would be; None when not even that would be."""
        block = self.blocks.allocate(n)
        if block is not None or self.prefix is None or not self.prefix.num_evictable:
            return block
        self.prefix.acquire(keep)  # referenced: not evictable
        try:
            if max(self._run_lengths(), default=0) < n:
                return None
            while block is None:
                self.blocks.free(self.prefix.evict(), 1)
                block = self.blocks.allocate(n)
            return block
        finally:
            self.prefix.release(keep)

    def take_copies(self) -> list[tuple[list[int], int]]:
        """The copies admission planned: each (cached blocks, first block of the run they
        go to, in order). The engine makes them before the step's forward."""
        copies, self._copies = self._copies, []
        for hits, _ in copies:  # copied before anything else runs: the engine is one thread
            self.prefix.release(hits)
        return copies

    @staticmethod
    def _prefill(r: SchedRequest, n: int) -> ScheduledSeq:
        # The prompt's last token yields the first sampled token.
        return ScheduledSeq(r, r.num_computed, n, r.num_computed + n == r.num_tokens)

    def update(self, plan: list[ScheduledSeq]) -> None:
        """The planned tokens' keys and values are now in the cache; prompt blocks that now
        lie in whole computed chunks go into the prefix cache."""
        for s in plan:
            r = s.request
            was = r.num_computed
            r.num_computed = s.start + s.num_tokens
            if self.prefix is not None and was < r.prompt_len and r.block_hashes:
                done = self.prefix.cacheable_tokens(min(r.num_computed, r.prompt_len))
                first = self.prefix.cacheable_tokens(was) // self.block_size
                for i in range(first, min(done // self.block_size, len(r.block_hashes))):
                    if self.prefix.register(r.block_hashes[i], r.block + i):
                        r.cached_blocks.append(r.block + i)

    # ------------------------------------------------------------------------- gauges
    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def blocks_used(self) -> int:
        """Blocks that requests hold or whose copies are pending (cached blocks nobody
        references count as free: they are evicted as soon as the room is needed)."""
        return self.blocks.used - (self.prefix.num_evictable if self.prefix is not None else 0)

    def _run_lengths(self) -> list[int]:
        """Lengths of the free runs, in block order, counting unreferenced cached blocks as
        free (``free_run_lengths`` when nothing is cached)."""
        if self.prefix is None or not self.prefix.num_evictable:
            return self.blocks.free_run_lengths()
        spans = sorted(
            [*self.blocks.free_runs(), *([b, 1] for b in self.prefix.evictable_blocks())]
        )
        runs: list[list[int]] = []
        for start, length in spans:
            if runs and runs[-1][0] + runs[-1][1] == start:
                runs[-1][1] += length
            else:
                runs.append([start, length])
        return [length for _, length in runs]

    def free_slots(self) -> int:
        """Requests that could start running now, the waiting ones first (they go first):
        ``max_num_seqs - num_running`` while the waiting requests, in arrival order, would
        each find a run of free blocks for prompt + max_tokens; else the number of waiting
        requests ahead of the first one that would not. The prefill budget is not counted
        (it delays a request by a few steps, it does not keep it out)."""
        slots = self.max_num_seqs - len(self.running)
        runs = self._run_lengths()  # first fit, as allocate() does
        for started, request in enumerate(islice(self.waiting, slots)):
            need = self.blocks_needed(request)
            i = next((i for i, length in enumerate(runs) if length >= need), None)
            if i is None:
                return started
            runs[i] -= need
        return slots
