"""The scheduler alone (no model, no torch): admission, chunked prefill, decodes, abort, FIFO."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from baobab.serve.scheduler import BlockAllocator, SchedRequest, Scheduler
from baobab.serve.types import QueueFullError


def make(blocks=64, block_size=4, seqs=8, budget=32, chunk=8, queue=16) -> Scheduler:
    return Scheduler(blocks, block_size, seqs, budget, chunk, queue)


def step(s: Scheduler, sampled: bool = True) -> dict[str, tuple[int, int, bool]]:
    """One step as the engine runs it: {id: (start, n, sample)}; sampling adds a token."""
    plan = s.schedule()
    s.update(plan)
    for p in plan:
        if p.sample and sampled:
            p.request.num_tokens += 1
    return {p.request.request_id: (p.start, p.num_tokens, p.sample) for p in plan}


def test_the_module_imports_no_torch():
    source = Path(__import__("baobab.serve.scheduler").serve.scheduler.__file__).read_text()
    imported = {
        (n.module if isinstance(n, ast.ImportFrom) else a.name).split(".")[0]
        for n in ast.walk(ast.parse(source))
        if isinstance(n, (ast.Import, ast.ImportFrom))
        for a in n.names
    }
    assert "torch" not in imported


def test_admission_reserves_prompt_plus_max_tokens_and_frees_on_finish():
    s = make(blocks=4, block_size=4)
    for i in range(3):
        s.add(SchedRequest(f"r{i}", prompt_len=4, max_tokens=3))  # 7 tokens: 2 blocks
    assert set(step(s)) == {"r0", "r1"}
    assert (s.num_running, s.num_waiting, s.blocks_used) == (2, 1, 4)
    assert (s.get("r0").block, s.get("r1").block) == (0, 2)
    s.finish(s.get("r0"))
    assert s.blocks_used == 2
    plan = step(s)
    assert plan["r2"] == (0, 4, True) and plan["r1"] == (4, 1, True)
    assert s.get("r2").block == 0  # the freed run is reused


def test_block_allocator_first_fit_and_merging():
    a = BlockAllocator(10)
    assert [a.allocate(n) for n in (3, 3, 3)] == [0, 3, 6]
    assert a.allocate(2) is None and a.used == 9
    a.free(3, 3)
    assert a.allocate(4) is None  # 4 free blocks in all, but not in one run
    a.free(0, 3)  # merges with 3..5
    assert a.allocate(5) == 0 and a.allocate(1) == 5
    a.free(6, 3)
    a.free(0, 5)
    a.free(5, 1)  # every run merged back into one
    assert a.used == 0 and a.allocate(10) == 0


def test_a_request_waits_for_a_long_enough_run_of_blocks():
    s = make(blocks=6, block_size=4)
    for rid in ("a", "b", "c"):
        s.add(SchedRequest(rid, prompt_len=4, max_tokens=4))  # 2 blocks each
    step(s)
    s.finish(s.get("a"))
    s.finish(s.get("c"))
    s.add(SchedRequest("big", prompt_len=8, max_tokens=8))  # 4 blocks: free are 0-1 and 4-5
    assert "big" not in step(s) and s.num_waiting == 1
    s.finish(s.get("b"))
    assert "big" in step(s)


def test_a_request_larger_than_the_cache_is_refused():
    s = make(blocks=4, block_size=4)
    with pytest.raises(ValueError, match="needs 20 tokens of KV cache but the cache holds 16"):
        s.add(SchedRequest("x", prompt_len=10, max_tokens=10))


def test_max_num_seqs_caps_running_requests():
    s = make(seqs=2)
    for i in range(4):
        s.add(SchedRequest(f"r{i}", prompt_len=2))
    step(s)
    assert s.num_running == 2 and s.num_waiting == 2


def test_prefill_advances_by_whole_chunks_within_the_budget():
    s = make(budget=20, chunk=8)
    s.add(SchedRequest("long", prompt_len=50))
    spans = []
    while s.get("long").is_prefill:
        start, n, sample = step(s)["long"]
        spans.append((start, start + n, sample))
    # 20 tokens of budget are cut down to a chunk boundary; the last span ends the prompt
    assert spans == [(0, 16, False), (16, 32, False), (32, 50, True)]


def test_two_prompts_share_the_budget_oldest_first():
    s = make(budget=32, chunk=8)
    s.add(SchedRequest("a", prompt_len=20))
    s.add(SchedRequest("b", prompt_len=40))
    assert step(s) == {"a": (0, 20, True), "b": (0, 8, False)}
    assert step(s) == {"a": (20, 1, True), "b": (8, 32, True)}


def test_decodes_are_never_starved_by_a_long_prompt():
    s = make(budget=16, chunk=8)
    s.add(SchedRequest("short", prompt_len=3))
    step(s)  # short: prefilled, first token sampled
    s.add(SchedRequest("long", prompt_len=200))
    for _ in range(5):
        plan = step(s)
        assert plan["short"][1:] == (1, True)  # one decode token every step
        assert plan["long"][1] == 16  # the prompt takes only the prefill budget
    assert s.get("short").num_tokens == 3 + 6


def test_chunk_boundaries_do_not_depend_on_batch_mates():
    def spans(mates: int) -> list[tuple[int, int]]:
        s = make(budget=24, chunk=8)
        for i in range(mates):
            s.add(SchedRequest(f"m{i}", prompt_len=5 + 7 * i))
        s.add(SchedRequest("x", prompt_len=45))
        out = []
        while s.get("x").is_prefill:
            plan = step(s)
            if "x" in plan:
                out.append((plan["x"][0], plan["x"][0] + plan["x"][1]))
        return out

    for mates in (0, 1, 3):
        for start, end in spans(mates):
            assert start % 8 == 0 and (end % 8 == 0 or end == 45)


def test_abort_frees_the_blocks_at_once():
    s = make(blocks=2, block_size=4)
    s.add(SchedRequest("a", prompt_len=4, max_tokens=4))
    s.add(SchedRequest("b", prompt_len=4, max_tokens=4))
    step(s)
    assert s.blocks_used == 2 and s.num_waiting == 1
    assert s.abort("a").finished and s.blocks_used == 0 and s.get("a") is None
    assert s.abort("b").finished and s.num_waiting == 0  # a waiting one leaves the queue
    assert s.abort("nobody") is None
    assert s.schedule() == [] and not s.has_work()


def test_admission_is_first_come_first_served():
    s = make(budget=16, chunk=8)
    s.add(SchedRequest("big", prompt_len=100))
    s.add(SchedRequest("small", prompt_len=2))
    assert set(step(s)) == {"big"}  # the budget is spent: small waits, even though it fits
    order = []
    for i in range(5):
        s.add(SchedRequest(f"q{i}", prompt_len=1))
    while s.num_waiting:
        order += [r for r in step(s) if r.startswith("q")]
    assert order[:5] == [f"q{i}" for i in range(5)]


def test_queue_limit_and_duplicate_ids_are_refused():
    s = make(seqs=1, queue=2)  # holds 1 running + 2 waiting, whether yet admitted or not
    for rid in "abc":
        s.add(SchedRequest(rid, prompt_len=1))
    with pytest.raises(QueueFullError, match="queue is full"):
        s.add(SchedRequest("d", prompt_len=1))
    with pytest.raises(ValueError, match="already in use"):
        s.add(SchedRequest("a", prompt_len=1))


def test_chunk_larger_than_budget_is_refused():
    with pytest.raises(ValueError, match="prefill_chunk_size"):
        Scheduler(4, 4, 4, max_num_batched_tokens=8, prefill_chunk_size=16, max_queue=4)
