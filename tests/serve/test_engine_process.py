"""The engine in its own process (the served default): same outputs as in process, abort,
drain, a dead engine process, and no process left behind.

One engine process per test costs ~2 s (spawn + import torch), so the tests are few and
each checks several things.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal

import pytest
from engine_helpers import (
    export_gpt,
    one_torch_thread,  # noqa: F401 (autouse)
    random_gpt,
    run_to_completion,
    tokens_of,
)

from baobab.serve import EngineConfig, EngineDeadError, QueueFullError, SamplingParams
from baobab.serve import load_served_model as load_model
from baobab.serve.engine_process import ProcessEngine

OPTIONS = {"kv_cache_memory_gib": 0.05, "max_num_batched_tokens": 64, "prefill_chunk_size": 16}


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return export_gpt(tmp_path_factory.mktemp("process"), random_gpt(seed=5))


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)


async def collect(stream) -> list:
    return [out async for out in stream]


def test_concurrent_outputs_abort_and_drain_match_the_in_process_engine(export):
    served = load_model(export, EngineConfig(**OPTIONS, max_num_seqs=16, max_queue=24))
    assert isinstance(served, ProcessEngine) and served.healthy
    prompts = {f"r{i}": [(5 * i + j) % 256 for j in range(1 + i % 11)] for i in range(16)}
    seeded = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=7)

    async def main():
        served.start()
        with pytest.raises(ValueError, match="outside the vocabulary"):
            served.add_request("bad", [999], greedy(2))
        streams = {rid: served.add_request(rid, ids, greedy(8 + len(ids)))
                   for rid, ids in prompts.items()}  # fmt: skip
        streams["seeded"] = served.add_request("seeded", [1, 2, 3], seeded)
        long = served.add_request("long", [4, 5], greedy(110))
        with pytest.raises(ValueError, match="already in use"):
            served.add_request("long", [1], greedy(2))
        results = await asyncio.gather(*(collect(s) for s in streams.values()))
        first = await long.__anext__()
        assert not first.finished and served.stats().kv_cache_blocks_used >= 7  # 112 tokens
        served.abort("long")
        assert (await collect(long))[-1].finish_reason == "abort"
        assert served.stats().kv_cache_blocks_used == 0  # freed by the step that saw it
        drained = served.add_request("drained", [9] * 5, greedy(10))
        task = asyncio.ensure_future(collect(drained))
        await asyncio.sleep(0)
        await served.shutdown(timeout=30)
        assert (await task)[-1].finish_reason == "length"
        with pytest.raises(RuntimeError, match="shutting down"):
            served.add_request("late", [1], greedy(1))
        return dict(zip(streams, results))

    together = asyncio.run(main())
    assert not served._process.is_alive()  # joined by shutdown
    options = {**OPTIONS, "separate_process": False}
    engine = load_model(export, EngineConfig(**options)).engine
    for rid, ids in prompts.items():
        engine.add_request(rid, ids, greedy(8 + len(ids)))
        alone = run_to_completion(engine)[rid]
        assert tokens_of(together[rid]) == tokens_of(alone)
        assert sum(o.finished for o in together[rid]) == 1
    engine.add_request("seeded", [1, 2, 3], seeded)
    assert tokens_of(together["seeded"]) == tokens_of(run_to_completion(engine)["seeded"])


def test_queue_limit_and_a_killed_engine_process(export):
    served = load_model(export, EngineConfig(**OPTIONS, max_num_seqs=1, max_queue=1))

    async def main():
        served.start()
        streams = [served.add_request("a", [1], greedy(100))]
        while served.stats().running == 0:  # "a" runs, the queue is empty
            await asyncio.sleep(0.01)
        streams.append(served.add_request("b", [1], greedy(2)))
        with pytest.raises(QueueFullError):
            served.add_request("c", [1], greedy(2))
        os.kill(served._process.pid, signal.SIGKILL)
        for stream in streams:
            with pytest.raises(EngineDeadError, match="exited unexpectedly"):
                await collect(stream)
        assert not served.healthy
        with pytest.raises(RuntimeError, match="stopped after an error"):
            served.add_request("d", [1], greedy(1))
        await served.shutdown(timeout=1)

    asyncio.run(main())
    assert not served._process.is_alive()


def test_a_load_failure_is_one_message_and_leaves_no_process(tmp_path, export):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in os.listdir(export):
        (broken / name).write_bytes((export / name).read_bytes())
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    before = set(multiprocessing.active_children())  # a session's shared server may hold one
    with pytest.raises(RuntimeError, match="the model could not be loaded"):
        load_model(broken, EngineConfig(**OPTIONS))
    assert set(multiprocessing.active_children()) <= before
