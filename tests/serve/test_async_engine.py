"""The in-process engine on its thread under asyncio: concurrency, abort, drain, failure."""

from __future__ import annotations

import asyncio
import threading

import pytest
from engine_helpers import (
    export_gpt,
    one_torch_thread,  # noqa: F401 (autouse)
    random_gpt,
    run_to_completion,
    tokens_of,
)

from baobab.serve import (
    AsyncEngine,
    EngineConfig,
    EngineDeadError,
    QueueFullError,
    SamplingParams,
    load_served_model,
)


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return export_gpt(tmp_path_factory.mktemp("async"), random_gpt(seed=4))


def load(export, **options) -> AsyncEngine:
    options = {"kv_cache_memory_gib": 0.05, "max_num_batched_tokens": 64,
               "prefill_chunk_size": 16, "separate_process": False, **options}  # fmt: skip
    return load_served_model(export, EngineConfig(**options))


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)


async def collect(stream) -> list:
    return [out async for out in stream]


def test_32_concurrent_streams_complete_like_one_at_a_time(export):
    prompts = {f"r{i}": [(7 * i + j) % 256 for j in range(1 + i % 13)] for i in range(32)}
    served = load(export, max_num_seqs=32)

    async def main():
        served.start()
        streams = {
            rid: served.add_request(rid, ids, greedy(6 + len(ids))) for rid, ids in prompts.items()
        }
        results = await asyncio.gather(*(collect(s) for s in streams.values()))
        await served.shutdown(timeout=5)
        return dict(zip(streams, results))

    together = asyncio.run(main())
    engine = load(export).engine  # the same export, served synchronously one at a time
    for rid, ids in prompts.items():
        engine.add_request(rid, ids, greedy(6 + len(ids)))
        alone = run_to_completion(engine)[rid]
        assert tokens_of(together[rid]) == tokens_of(alone)
        assert together[rid][-1].finished and together[rid][-1].finish_reason == "length"
        assert sum(o.finished for o in together[rid]) == 1


def test_abort_from_another_thread_ends_the_stream_and_frees_the_cache(export):
    served = load(export, max_num_seqs=2)

    async def main():
        served.start()
        stream = served.add_request("a", [1, 2, 3], greedy(120))
        first = await stream.__anext__()
        assert not first.finished and served.stats().kv_cache_blocks_used == 8  # 123 tokens
        thread = threading.Thread(target=served.abort, args=("a",))
        thread.start()
        thread.join()
        rest = await collect(stream)
        assert rest[-1].finish_reason == "abort"
        assert served.stats().kv_cache_blocks_used == 0  # freed by the step that saw it
        served.abort("a")  # already gone: ignored
        await served.shutdown(timeout=1)

    asyncio.run(main())


def test_shutdown_drains_in_flight_requests_then_refuses_new_ones(export):
    served = load(export)

    async def main():
        served.start()
        streams = [served.add_request(f"r{i}", [i + 1] * 5, greedy(10)) for i in range(4)]
        tasks = [asyncio.ensure_future(collect(s)) for s in streams]
        await asyncio.sleep(0)
        await served.shutdown(timeout=30)
        results = await asyncio.gather(*tasks)
        assert [r[-1].finish_reason for r in results] == ["length"] * 4
        with pytest.raises(RuntimeError, match="shutting down"):
            served.add_request("late", [1], greedy(1))

    asyncio.run(main())


def test_shutdown_timeout_aborts_the_rest(export):
    served = load(export)

    async def main():
        served.start()
        stream = served.add_request("long", [1, 2], greedy(100))
        await stream.__anext__()
        await served.shutdown(timeout=0)
        assert (await collect(stream))[-1].finish_reason == "abort"

    asyncio.run(main())


def test_queue_limit_and_validation_answer_at_once(export):
    served = load(export, max_queue=2, max_num_seqs=1)

    async def main():  # not started: requests stay queued; one slot + two queue places
        for rid in "abc":
            served.add_request(rid, [1], greedy(2))
        with pytest.raises(QueueFullError):
            served.add_request("c2", [1], greedy(2))
        with pytest.raises(ValueError, match="already in use"):
            served.add_request("a", [1], greedy(2))
        with pytest.raises(ValueError, match="outside the vocabulary"):
            served.add_request("d", [999], greedy(2))
        await served.shutdown(timeout=5)

    asyncio.run(main())
    with pytest.raises(RuntimeError):  # no running event loop
        served.add_request("e", [1], greedy(2))


def test_a_dead_engine_thread_fails_its_streams_and_reports_unhealthy(export):
    served = load(export)
    served.engine.runner.cache.k.clear()  # the next forward pass fails (IndexError)

    async def main():
        served.start()
        stream = served.add_request("a", [1, 2], greedy(3))
        with pytest.raises(EngineDeadError, match="IndexError"):
            await collect(stream)
        assert not served.healthy
        with pytest.raises(RuntimeError, match="stopped after an error"):
            served.add_request("b", [1], greedy(1))

    asyncio.run(main())


def test_metadata_for_the_server(export):
    served = load(export)
    assert served.model_name == "gpt-nano" and served.context_length == 128
    assert served.eos_token_id == served.tokenizer.eot_id == 256
    stats = served.stats()
    assert (stats.running, stats.waiting, stats.kv_cache_blocks_used) == (0, 0, 0)
    assert stats.kv_cache_blocks_total >= 1 and served.healthy
