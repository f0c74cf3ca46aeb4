"""Prefix caching: content-hashed full blocks kept after their request, least recently used
evicted first, reused by a new request whose prompt starts the same, and outputs that are
the same bits with the cache on or off."""

from __future__ import annotations

import random

import pytest
from engine_helpers import (
    LLAMA,
    export_gpt,
    one_torch_thread,  # noqa: F401 (autouse)
    random_gpt,
    run_to_completion,
)
from serving import metric_values

from baobab.serve import EngineConfig, SamplingParams, load_served_model
from baobab.serve.prefix_cache import PrefixCache, block_hashes
from baobab.serve.scheduler import SchedRequest, Scheduler

BLOCK, CHUNK = 4, 8


def test_a_block_hash_names_the_whole_prefix():
    a = block_hashes(list(range(10)), 4)
    assert len(a) == 2  # full blocks only
    assert block_hashes(list(range(10)) + [7, 7], 4) == block_hashes(list(range(12)), 4)[:2] + [
        block_hashes(list(range(8)) + [8, 9, 7, 7], 4)[2]
    ]
    changed = block_hashes([99, *range(1, 12)], 4)
    assert all(x != y for x, y in zip(changed, block_hashes(list(range(12)), 4)))
    assert block_hashes(list(range(12)), 4, limit=8) == block_hashes(list(range(12)), 4)[:2]


def request(rid: str, ids: list[int], max_tokens: int = 4, cache: PrefixCache | None = None):
    hashes = block_hashes(ids, BLOCK, cache.cacheable_tokens(len(ids))) if cache is not None else []
    return SchedRequest(rid, len(ids), max_tokens, block_hashes=hashes)


def run(scheduler: Scheduler, r: SchedRequest) -> list:
    """Admit and prefill ``r`` to its end; the plan's (start, tokens) pieces."""
    scheduler.add(r)
    pieces = []
    while r.is_prefill:
        plan = scheduler.schedule()
        pieces += [(s.start, s.num_tokens) for s in plan if s.request is r]
        scheduler.update(plan)
    return pieces


def scheduler(num_blocks: int = 32, caching: bool = True) -> Scheduler:
    return Scheduler(num_blocks, BLOCK, 8, 64, CHUNK, 8, prefix_caching=caching)


def test_a_prompt_starting_like_a_finished_one_prefills_only_its_new_whole_chunks():
    s = scheduler()
    first = request("a", list(range(30)), cache=s.prefix)
    assert run(s, first) == [(0, 30)]
    s.finish(first)
    # 3 whole chunks (24 tokens, 6 blocks) were computed: cached, unreferenced, not free.
    assert s.prefix.num_cached == 6 and s.blocks_used == 0 and s.blocks.used == 6
    second = request("b", list(range(21)) + [99] * 9, cache=s.prefix)
    assert run(s, second) == [(16, 14)]  # blocks 0-4 match; whole chunks: 16 tokens
    assert s.take_copies() == [(first_blocks := [0, 1, 2, 3], second.block)]
    assert second.block not in first_blocks
    assert (s.prefix.queries, s.prefix.hits) == (60, 16)
    # The prompt's last token is always computed: an equal prompt of 24 reuses 16.
    third = request("c", list(range(24)), cache=s.prefix)
    assert run(s, third) == [(16, 8)]


def test_blocks_are_shared_while_their_owner_runs_and_evicted_least_recently_used():
    s = scheduler(num_blocks=16)
    owner = request("a", list(range(17)), max_tokens=7, cache=s.prefix)  # 6 blocks
    run(s, owner)
    reader = request("b", list(range(17)), max_tokens=3, cache=s.prefix)
    assert run(s, reader) == [(16, 1)]  # copied from the running owner
    s.take_copies()
    s.finish(reader)  # its copies were its own, not cached: all freed
    s.finish(owner)  # its 4 cached blocks stay
    assert s.prefix.num_cached == 4 and s.blocks.used == 4 and s.blocks_used == 0
    other = request("c", [200 + i for i in range(17)], max_tokens=3, cache=s.prefix)
    run(s, other)
    s.finish(other)
    assert s.prefix.num_cached == 8 and s.blocks.free_run_lengths() == [8]
    again = request("e", list(range(17)), max_tokens=3, cache=s.prefix)
    assert run(s, again) == [(16, 1)]  # "a"'s blocks are now the most recently used
    s.take_copies()
    s.finish(again)
    # 12 blocks fit once the 4 cached blocks after "a"'s go: the least recently used.
    big = SchedRequest("d", 40, 8)
    run(s, big)
    assert s.prefix.num_cached == 4 and (big.block, big.num_blocks) == (4, 12)
    assert s.prefix.lookup(block_hashes(list(range(17)), BLOCK), 17) == [0, 1, 2, 3]
    assert not s.prefix.lookup(block_hashes([200 + i for i in range(17)], BLOCK), 17)


def test_off_nothing_is_cached_and_nothing_reused():
    s = scheduler(caching=False)
    first = SchedRequest("a", 30, 4)
    run(s, first)
    s.finish(first)
    assert s.prefix is None and s.blocks.used == 0
    assert run(s, SchedRequest("b", 30, 4)) == [(0, 30)]


def test_a_request_that_cannot_fit_evicts_nothing():
    s = scheduler(num_blocks=8)
    r = request("a", list(range(16)), max_tokens=4, cache=s.prefix)
    run(s, r)
    s.finish(r)
    held = SchedRequest("b", 12, 4)  # 4 blocks, beside "a"'s 4 cached ones
    run(s, held)
    s.add(SchedRequest("c", 16, 4))  # 5 blocks: no run that long even with "a"'s evicted
    assert [x.request for x in s.schedule()] == [held]  # a decode; "c" waits
    assert s.prefix.num_cached == 4 and s.free_slots() == 0
    s.finish(held)
    assert s.schedule()[0].num_tokens == 16 and s.prefix.num_cached == 0  # now it evicts


# ------------------------------------------------------------------ the engine, for real
@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return export_gpt(tmp_path_factory.mktemp("prefix"), random_gpt(seed=3, **LLAMA))


def serve_in_turn(export, caching: bool, requests):
    engine = load_served_model(
        export,
        EngineConfig(kv_cache_memory_gib=0.004, max_num_batched_tokens=32, prefill_chunk_size=8,
                     block_size=4, separate_process=False, prefix_caching=caching),
    ).engine  # fmt: skip
    outs = {}
    for wave in requests:  # each wave runs together; later waves find earlier prefixes
        for rid, ids in wave.items():
            params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=2)
            engine.add_request(rid, ids, params)
        outs |= run_to_completion(engine)
    return outs, engine.stats()


def test_greedy_outputs_and_logprobs_are_the_same_bits_with_the_cache_on_or_off(export):
    rng = random.Random(0)
    system = [rng.randrange(256) for _ in range(37)]
    waves = [
        {f"w0-{i}": system + [rng.randrange(256) for _ in range(rng.randrange(1, 12))] for i in range(3)},
        {f"w1-{i}": system[: 8 * i + 5] + [7] * i for i in range(1, 5)},
        {"w2": system + [1, 2, 3], "w2-copy": system + [1, 2, 3]},
    ]  # fmt: skip
    on, stats_on = serve_in_turn(export, True, waves)
    off, stats_off = serve_in_turn(export, False, waves)
    assert stats_on.prefix_cache_hits > 0 and stats_off.prefix_cache_hits == 0
    for rid in off:
        got = [(o.token_ids, [(lp.logprob, lp.top) for lp in o.logprobs]) for o in on[rid]]
        want = [(o.token_ids, [(lp.logprob, lp.top) for lp in o.logprobs]) for o in off[rid]]
        assert got == want, rid


def test_metrics_count_prefix_cache_queries_and_hits(lm_server):
    prompt = "A shared system prompt, long enough to fill more than one whole chunk. " * 2
    with lm_server.client() as http:

        def hits_and_queries():
            text = http.get("/metrics").text
            return [sum(metric_values(text, f"baobab_prefix_cache_{name}_total").values())
                    for name in ("hits", "queries")]  # fmt: skip

        before = hits_and_queries()
        for question in ("one?", "two?"):
            body = {"prompt": prompt + question, "max_tokens": 1, "temperature": 0}
            assert http.post("/v1/completions", json=body).status_code == 200
        after = hits_and_queries()
    hits, queries = after[0] - before[0], after[1] - before[1]
    assert queries == 2 * (len(prompt) + 4) and hits == 128  # byte tokens; chunks of 64
