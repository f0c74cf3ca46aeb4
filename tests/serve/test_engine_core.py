"""One engine core (issue 14, part 5): the round (add, abort, step, report) is written once,
in EngineCore, and drives both transports (the engine thread and the engine process) over
typed messages; the serving modules import each other without a cycle."""

from __future__ import annotations

import ast
import asyncio
import multiprocessing
import pickle
from pathlib import Path

import pytest
from engine_helpers import one_torch_thread  # noqa: F401 (autouse)

import baobab.serve
from baobab.serve import (
    AsyncEngine,
    EngineConfig,
    EngineCore,
    ProcessEngine,
    QueueFullError,
    SamplingParams,
    load_served_model,
)
from baobab.serve.loader import load_engine
from baobab.serve.messages import (
    Abort,
    AddRequest,
    AddRequests,
    Failed,
    Ready,
    Refused,
    RoundOutput,
    Shutdown,
)
from baobab.serve.types import (
    EngineStats,
    PromptTooLongError,
    RequestOutput,
    TokenLogprob,
    merge_outputs,
)

SERVE = Path(baobab.serve.__file__).parent
# One intra-op thread everywhere (the engine process too): outputs compared bit for bit.
OPTIONS = {"kv_cache_memory_gib": 0.01, "max_num_batched_tokens": 64, "prefill_chunk_size": 16,
           "threads": 1}  # fmt: skip
STATS = EngineStats(2, 1, 0.25, 40, 10, free_slots=3)


def test_every_message_round_trips_through_a_pipe():
    params = SamplingParams(max_tokens=5, temperature=0.7, seed=3, stop=["é"], logprobs=2)
    logprob = TokenLogprob(104, "h", -0.25, {"h": -0.25, "🌳": -1.5})
    out = RequestOutput("a-0", [104], "h", True, "length", [logprob], 3, 5)
    messages = [
        AddRequests([AddRequest("a-0", [1, 2, 3], params), AddRequest("a-1", [4], params)]),
        Abort("a-1"),
        Shutdown(),
        Ready(512, 259, STATS),
        RoundOutput(
            [out],
            [Refused("b", "queue_full", "full"), Refused("c", "invalid", "x")],
            STATS,
            busy=True,
            adds_seen=7,
        ),
        Failed("RuntimeError('boom')"),
    ]
    sender, receiver = multiprocessing.Pipe()
    try:
        for message in messages:
            sender.send(message)
            received = receiver.recv()
            assert type(received) is type(message) and received == message
    finally:
        sender.close()
        receiver.close()


def test_a_refusal_crosses_as_data_and_raises_the_right_error():
    # Why Refused exists: an error with its own constructor arguments does not unpickle.
    with pytest.raises(TypeError):
        pickle.loads(pickle.dumps(PromptTooLongError(500, 100, 512)))
    full = Refused.of("a", QueueFullError("the queue is full"))
    bad = Refused.of("b", PromptTooLongError(500, 100, 512))
    assert isinstance(full.error(), QueueFullError) and str(full.error()) == "the queue is full"
    assert type(bad.error()) is ValueError and "600 tokens" in str(bad.error())


def test_a_round_folds_messages_in_order_then_steps_once(lm_export):
    core = EngineCore(load_engine(lm_export, EngineConfig(**OPTIONS, max_num_seqs=4)))
    greedy = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    adds = AddRequests([AddRequest(rid, [104, 105], greedy) for rid in ("a", "b")])

    first = core.round([adds, Abort("b"), Abort("unknown")])
    assert [(o.request_id, o.finish_reason) for o in first.outputs] == [("b", "abort"), ("a", None)]
    assert (first.busy, first.adds_seen, first.stats.running, first.failed) == (True, 2, 1, [])

    second = core.round([AddRequests([AddRequest("a", [1], greedy)])])  # "a" is still running
    assert [(r.request_id, r.kind) for r in second.failed] == [("a", "invalid")]
    assert second.adds_seen == 3 and [o.request_id for o in second.outputs] == ["a"]

    last = core.round([Shutdown()])  # aborts what is left instead of stepping
    assert [(o.request_id, o.finish_reason) for o in last.outputs] == [("a", "abort")]
    assert core.stopped and not last.busy and last.stats.kv_cache_blocks_used == 0
    with pytest.raises(TypeError, match="cannot handle"):
        core.round([("add", "c", [1], greedy)])  # the untyped tuples of old


def _requests() -> list[AddRequest]:
    """Sampled (seeded), greedy and logprob requests of several lengths."""
    requests = []
    for i in range(6):
        params = SamplingParams(
            max_tokens=6 + 3 * i,
            temperature=0 if i % 3 == 0 else 1.0,
            top_p=0.9,
            seed=11 + i,
            logprobs=2 if i % 2 else None,
            ignore_eos=True,
        )
        requests.append(AddRequest(f"r{i}", [104 + j for j in range(1 + 2 * i)], params))
    return requests


def _merged(outputs: list[RequestOutput]) -> dict[str, RequestOutput]:
    by_id: dict[str, list[RequestOutput]] = {}
    for out in outputs:
        by_id.setdefault(out.request_id, []).append(out)
    assert all(sum(o.finished for o in outs) == 1 for outs in by_id.values())
    return {rid: merge_outputs(outs) for rid, outs in by_id.items()}


def _direct(lm_export: Path) -> dict[str, RequestOutput]:
    """The core run by hand: a list of messages in, a list of round outputs out."""
    core = EngineCore(load_engine(lm_export, EngineConfig(**OPTIONS)))
    inbox = [[AddRequests(_requests())], [Shutdown()]]
    rounds: list[RoundOutput] = []
    core.run(lambda block: inbox.pop(0) if block else [], rounds.append)
    assert not inbox and rounds[-1].adds_seen == len(_requests()) and not rounds[-1].busy
    return _merged([o for r in rounds for o in r.outputs])


def _served(served) -> dict[str, RequestOutput]:
    async def main():
        served.start()
        streams = served.add_requests([(a.request_id, a.prompt_ids, a.params) for a in _requests()])
        outputs = [out for stream in streams async for out in stream]
        await served.shutdown(timeout=5)
        return outputs

    return _merged(asyncio.run(main()))


def test_the_same_core_drives_the_thread_and_the_process_alike(lm_export):
    thread = load_served_model(lm_export, EngineConfig(**OPTIONS, separate_process=False))
    assert isinstance(thread, AsyncEngine) and isinstance(thread.core, EngineCore)
    process = load_served_model(lm_export, EngineConfig(**OPTIONS))
    assert isinstance(process, ProcessEngine)
    direct = _direct(lm_export)
    assert _served(thread) == direct
    assert _served(process) == direct
    assert {o.finish_reason for o in direct.values()} == {"length"}
    assert direct["r1"].logprobs and len(direct["r1"].logprobs) == len(direct["r1"].token_ids)


def _calls(tree: ast.AST, name: str) -> int:
    return sum(
        isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == name
        for n in ast.walk(tree)
    )


def test_the_round_is_written_once():
    """Only EngineCore steps an Engine: neither transport has a round of its own."""
    stepping = sorted(
        path.name for path in SERVE.glob("*.py") if _calls(ast.parse(path.read_text()), "step")
    )
    assert stepping == ["engine_core.py"]


def test_the_serving_modules_import_each_other_without_a_cycle():
    """Imports anywhere in a module (function bodies too) count: a cycle broken only by a
    deferred import (loader <-> engine_process, before) is still a cycle."""
    modules = {path.stem for path in SERVE.glob("*.py")} - {"__init__"}
    graph: dict[str, set[str]] = {}
    for name in modules:
        deps = set()
        for node in ast.walk(ast.parse((SERVE / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "baobab.serve":
                deps |= {alias.name for alias in node.names} & modules
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "baobab.serve."
            ):
                deps.add(node.module.split(".")[2])
            elif isinstance(node, ast.Import):
                deps |= {
                    a.name.split(".")[2] for a in node.names if a.name.startswith("baobab.serve.")
                }
        graph[name] = deps

    def cycle_from(start: str, path: list[str]) -> list[str] | None:
        for dep in sorted(graph[path[-1]]):
            if dep == start:
                return [*path, dep]
            if dep not in path and (found := cycle_from(start, [*path, dep])):
                return found
        return None

    cycles = [c for m in sorted(modules) if (c := cycle_from(m, [m]))]
    assert not cycles, f"import cycle among baobab/serve modules: {' -> '.join(cycles[0])}"
