"""Increments merged for a stream that fell behind keep RequestOutput's invariants, and the
handlers merge only what was waiting together, per choice, in order."""

from __future__ import annotations

import asyncio

import pytest
from engine_helpers import export_gpt, one_torch_thread, random_gpt  # noqa: F401 (autouse)

from baobab.serve import EngineConfig, SamplingParams, load_served_model
from baobab.serve.handlers import Context, EngineFailure, _coalesced, _merged
from baobab.serve.metrics import ServerMetrics
from baobab.serve.types import RequestOutput, TokenLogprob, merge_outputs


def _out(ids: list[int], text: str, finished: bool = False, logprobs: bool = False, done=0):
    lps = [TokenLogprob(t, str(t), -0.5) for t in ids] if logprobs else None
    return RequestOutput("r", ids, text, finished, "length" if finished else None, lps, 5, done)


def test_merged_increments_concatenate_and_end_like_the_last():
    parts = [_out([1], "a", done=1), _out([], "", done=1), _out([2, 3], "bé", True, done=3)]
    merged = merge_outputs(parts)
    assert (merged.token_ids, merged.text) == ([1, 2, 3], "abé")
    assert (merged.finished, merged.finish_reason) == (True, "length")
    assert (merged.prompt_tokens, merged.completion_tokens, merged.logprobs) == (5, 3, None)
    assert merge_outputs(parts[:1]) is parts[0]


def test_merged_logprobs_keep_one_entry_per_token():
    merged = merge_outputs([_out([1], "a", logprobs=True), _out([2, 3], "bc", logprobs=True)])
    assert [lp.token_id for lp in merged.logprobs] == [1, 2, 3]


def test_waiting_outputs_merge_per_choice_in_order_of_arrival():
    arrived = [(1, _out([7], "x")), (0, _out([1], "a")), (1, _out([8], "y", True)),
               (0, _out([2], "b"))]  # fmt: skip
    merged = _coalesced(arrived)
    assert [(i, out.text, out.token_ids, out.finished) for i, out in merged] == [
        (1, "xy", [7, 8], True),
        (0, "ab", [1, 2], False),
    ]
    with pytest.raises(EngineFailure, match="the engine failed: boom"):
        _coalesced([(0, _out([1], "a")), (0, RuntimeError("boom"))])


def test_a_handler_that_fell_behind_gets_one_merged_output(tmp_path):
    served = load_served_model(
        export_gpt(tmp_path, random_gpt(seed=5)),
        EngineConfig(kv_cache_memory_gib=0.05, separate_process=False),
    )
    metrics = ServerMetrics(lambda: None)
    metrics.bind("m")
    ctx = Context(served, metrics, None, lambda message: None)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)

    async def main():
        # Both queued before the engine thread starts, so they run in the same steps: when
        # the first handler has its last output, every output of the second is already
        # waiting for a handler that has not read any yet.
        first, second = (served.add_request(f"{r}-0", [1, 2, 3], params) for r in "ab")
        served.start()
        eager = [out async for _, out in _merged(ctx, "a", [first], 0.0)]
        late = [out async for _, out in _merged(ctx, "b", [second], 0.0)]
        await served.shutdown(timeout=5)
        return eager, late

    eager, late = asyncio.run(main())
    assert len(late) == 1
    assert late[0].token_ids == [t for out in eager for t in out.token_ids]
    assert late[0].text == "".join(out.text for out in eager)
    assert (late[0].finished, late[0].completion_tokens) == (True, 12)
