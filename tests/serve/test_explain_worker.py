"""The explanation worker's slicing, with a fake work function on a fake clock: it never
computes while the core is not waiting for it, each slice stops at the first pause past its
budget, and the token bucket gives it ``share`` of the step time over many rounds."""

from __future__ import annotations

import pytest

from baobab.explain.types import ExplainError
from baobab.serve.explain_worker import Explanations, SlicedWorker
from baobab.serve.messages import ExplainSpec


class FakeClock:
    """Time that moves only when the fake work says so: each unit of work takes ``unit``."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Core:
    """Records whether the core thread is waiting inside ``run_for``: the only time the
    worker may compute."""

    def __init__(self) -> None:
        self.waiting = False
        self.violations = 0


def fake_work(core: Core, clock: FakeClock, units: int, unit: float = 1.0, result="done"):
    """A work function of ``units`` passes, each ``unit`` seconds, reporting progress."""

    def work(progress) -> str:
        for _ in range(units):
            if not core.waiting:
                core.violations += 1
            clock.now += unit
            progress(1)
        return result

    return work


def run_sliced(core: Core, worker: SlicedWorker, budget: float) -> list[float]:
    """Slices of ``budget`` until the work ends; the seconds each took."""
    spent = []
    while not worker.done:
        core.waiting = True
        spent.append(worker.run_for(budget))
        core.waiting = False
    return spent


def test_the_worker_runs_only_inside_its_slices_and_stops_at_the_budget():
    clock, core = FakeClock(), Core()
    worker = SlicedWorker(fake_work(core, clock, units=10), clock)
    spent = run_sliced(core, worker, budget=2.5)
    # A slice runs passes until one ends at or past its budget: 3 passes of 1 s each.
    assert spent == [3.0, 3.0, 3.0, 1.0]
    assert core.violations == 0
    assert worker.result == "done" and worker.error is None


def test_on_the_real_clock_the_worker_never_overlaps_the_core():
    """time.perf_counter and passes of real (torch) work: whatever the slice ends on, every
    pass runs while the core waits in run_for."""
    import time

    import torch

    core = Core()

    def work(progress) -> int:
        for _ in range(200):
            if not core.waiting:
                core.violations += 1
            torch.randn(32, 32).matmul(torch.randn(32, 32))
            progress(1)
        return 200

    worker = SlicedWorker(work, time.perf_counter)
    spent = run_sliced(core, worker, budget=1e-4)
    assert worker.result == 200 and core.violations == 0 and len(spent) > 1


def test_cancel_stops_the_work_at_its_next_pause():
    clock, core = FakeClock(), Core()
    worker = SlicedWorker(fake_work(core, clock, units=100), clock)
    core.waiting = True
    worker.run_for(2.0)
    worker.cancel()
    assert worker.done and type(worker.error).__name__ == "Cancelled"
    assert clock.now == 2.0  # two passes reached the budget; none ran after the pause
    assert core.violations == 0


def explanations(core: Core, clock: FakeClock, units: int, unit: float, share: float):
    """An Explanations queue whose runner is the fake work."""

    def runner(spec: ExplainSpec, progress) -> dict:
        return {"prompt": spec.prompt, "out": fake_work(core, clock, units, unit)(progress)}

    return Explanations(runner, share, idle_slice=1e9, clock=clock)


@pytest.mark.parametrize("unit", [0.5, 3.0])  # passes shorter and longer than one round's credit
def test_the_budget_gives_share_of_the_step_time(unit):
    clock, core = FakeClock(), Core()
    queue = explanations(core, clock, units=10_000, unit=unit, share=0.1)
    queue.submit("a", ExplainSpec(prompt="p"))
    step, rounds, explained = 10.0, 300, 0.0
    for _ in range(rounds):
        clock.now += step  # the engine's step
        queue.grant(step)
        before = clock.now
        core.waiting = True
        assert queue.run() == []
        core.waiting = False
        explained += clock.now - before
    # share x the step time, within one pass either way (a pass may overrun: debt).
    assert abs(explained - 0.1 * step * rounds) <= unit
    assert core.violations == 0


def test_idle_rounds_get_a_slice_and_the_queue_runs_in_order():
    clock, core = FakeClock(), Core()
    queue = explanations(core, clock, units=4, unit=1.0, share=0.1)
    queue.idle_slice = 2.0
    queue.submit("a", ExplainSpec(prompt="first"))
    queue.submit("b", ExplainSpec(prompt="second"))
    assert queue.pending == 2
    done = []
    while queue.pending:
        queue.grant(None)  # no request running
        core.waiting = True
        done += queue.run()
        core.waiting = False
    assert [(d.request_id, d.kind, d.result["prompt"]) for d in done] == [
        ("a", "ok", "first"),
        ("b", "ok", "second"),
    ]
    assert clock.now == 8.0 and core.violations == 0


def test_abort_and_errors_come_back_as_their_kinds():
    clock, core = FakeClock(), Core()
    queue = explanations(core, clock, units=100, unit=1.0, share=0.1)

    def refuse(spec, progress):
        progress(1)
        raise ExplainError("integrated gradients did not converge; raise ig_steps.")

    queue.submit("running", ExplainSpec(prompt="x"))
    queue.submit("queued", ExplainSpec(prompt="y"))
    queue.grant(None)
    queue.idle_slice = 2.0
    queue.grant(None)
    core.waiting = True
    queue.run()
    assert [d.kind for d in queue.abort("queued")] == ["aborted"]
    assert [d.kind for d in queue.abort("running")] == ["aborted"]
    assert queue.abort("unknown") == [] and queue.pending == 0
    queue.runner = refuse
    queue.submit("bad", ExplainSpec(prompt="z"))
    queue.grant(None)
    [done] = queue.run()
    assert done.kind == "invalid" and done.message.endswith("raise ig_steps")
    queue.submit("s1", ExplainSpec(prompt="z"))
    queue.submit("s2", ExplainSpec(prompt="z"))
    assert {d.request_id for d in queue.abort_all()} == {"s1", "s2"}
