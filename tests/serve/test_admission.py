"""Admission (issue 13, item 1): what counts against ``max_queue`` is only what the engine
could not start now; a request's ``n`` choices are admitted in one check; ``n`` beyond what
the engine can ever hold is a 400 naming both numbers; a refusal leaves nothing behind.

The server runs the engine in its own process (the served default), where the wrongful
429s were seen: 4 sequence slots and a queue of 8 hold 12 requests.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
from serving import MODEL_CONTEXT, metric_values, poll, serve_in_thread, served_app

from baobab.serve import EngineConfig, QueueFullError, SamplingParams, load_served_model
from baobab.serve.engine_process import ProcessEngine
from baobab.serve.scheduler import SchedRequest, Scheduler

SEQS, QUEUE = 4, 8
CAPACITY = SEQS + QUEUE
# Holds SEQS running + QUEUE waiting for its whole lifetime (closed by the test).
LONG = {"prompt": "x", "max_tokens": MODEL_CONTEXT - 8, "ignore_eos": True, "stream": True}


@pytest.fixture(scope="module")
def server(lm_export):
    with serve_in_thread(served_app(lm_export, max_num_seqs=SEQS, max_queue=QUEUE)) as srv:
        assert isinstance(srv.state.served, ProcessEngine)
        yield srv


def counter(srv, name: str, **labels: str) -> float:
    values = metric_values(httpx.get(f"{srv.url}/metrics").text, name)
    return sum(v for k, v in values.items() if set(labels.items()) <= set(k))


def test_n_within_what_the_engine_holds_is_served_and_beyond_it_is_a_400(server):
    with server.client() as http:
        # n=9 > max_queue 8 on an idle server: 4 choices start at once, 5 wait.
        r = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "n": 9})
        assert r.status_code == 200, r.text
        assert sorted(c["index"] for c in r.json()["choices"]) == list(range(9))
        r = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "n": CAPACITY})
        assert r.status_code == 200, r.text
        body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "n": 13}
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == "n" and "13" in error["message"] and "12" in error["message"]
        assert error["type"] == "invalid_request_error"


def test_a_burst_the_engine_can_hold_is_never_refused_and_a_refusal_leaves_nothing(server):
    served = server.state.served
    rejected = counter(server, "baobab_requests_rejected_total", reason="queue_full")
    aborted = counter(server, "baobab_requests_finished_total", finish_reason="abort")

    async def burst() -> None:
        limits = httpx.Limits(max_connections=4 * CAPACITY)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as http:

            async def open_stream(body: dict) -> httpx.Response:
                request = http.build_request("POST", "/v1/completions", json=body)
                return await http.send(request, stream=True)

            # All at once: admitted before the engine process has seen any of them.
            held = await asyncio.gather(*(open_stream(LONG) for _ in range(CAPACITY)))
            try:
                assert [r.status_code for r in held] == [200] * CAPACITY
                for n in (1, 2):  # the engine holds SEQS running + QUEUE waiting: full
                    r = await http.post("/v1/completions", json={**LONG, "stream": False, "n": n})
                    assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
                    assert int(r.headers["Retry-After"]) >= 1
                r = await http.post("/v1/completions", json={**LONG, "n": CAPACITY + 1})
                assert r.status_code == 400 and r.json()["error"]["param"] == "n"
                # Nothing of the refused requests reached the engine: it holds the 12 only.
                assert poll(lambda: served.stats().running == SEQS, timeout=10)
                stats = served.stats()
                assert (stats.waiting, len(served._streams)) == (QUEUE, CAPACITY)
            finally:
                for r in held:
                    await r.aclose()

    asyncio.run(burst())
    assert poll(lambda: served.stats().running + served.stats().waiting == 0, timeout=10)
    assert served.stats().kv_cache_blocks_used == 0 and not served._streams
    assert counter(server, "baobab_requests_rejected_total", reason="queue_full") == rejected + 2
    assert poll(
        lambda: (
            counter(server, "baobab_requests_finished_total", finish_reason="abort")
            == aborted + CAPACITY
        ),
        timeout=10,
    )


def test_free_slots_stop_at_the_first_request_the_kv_cache_cannot_hold():
    s = Scheduler(
        8, 4, max_num_seqs=4, max_num_batched_tokens=64, prefill_chunk_size=8, max_queue=2
    )
    assert s.free_slots() == 4
    s.add(SchedRequest("a", prompt_len=4, max_tokens=16))  # 5 of 8 blocks
    s.add(SchedRequest("b", prompt_len=1, max_tokens=3))  # 1 block
    assert s.free_slots() == 4  # both fit: 2 slots are left for new requests
    s.schedule()
    s.add(SchedRequest("c", prompt_len=4, max_tokens=12))  # 4 blocks: 2 are free
    s.add(SchedRequest("d", prompt_len=1, max_tokens=1))  # fits, but comes after c
    assert (s.num_running, s.num_waiting, s.free_slots()) == (2, 2, 0)
    s.abort("a")
    assert s.free_slots() == 3  # c and d now fit, and one slot is left for a new request


def test_requests_that_wait_for_kv_cache_count_against_the_queue(lm_export):
    """In process (the engine thread): with the cache full, only max_queue may wait, though
    sequence slots are free."""
    gib = 40 * 16 * 512 / 2**30  # 40 blocks of 16 tokens of the reciter's 512 B/token
    config = EngineConfig(
        kv_cache_memory_gib=gib, max_num_seqs=8, max_queue=2, separate_process=False
    )
    served = load_served_model(lm_export, config)
    long = SamplingParams(max_tokens=500, temperature=0, ignore_eos=True)  # 32 blocks
    short = SamplingParams(max_tokens=2, temperature=0)

    async def main() -> None:
        served.start()
        first = served.add_request("a", [1], long)
        await first.__anext__()  # "a" runs (for 500 steps) and holds 32 of 40 blocks
        served.add_request("b", [1], long)  # no run of 32 blocks is free: it waits
        for _ in range(3000):  # until the engine has taken "b" in (a bounded wait)
            if served.stats().free_slots == 0:
                break
            await asyncio.sleep(0.01)
        assert (served.stats().running, served.stats().waiting) == (1, 1)
        served.add_request("c", [1], short)  # waits behind "b": the queue's second place
        with pytest.raises(QueueFullError):
            served.add_request("d", [1], short)
        await served.shutdown(timeout=0)

    asyncio.run(main())
