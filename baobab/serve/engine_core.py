"""The engine's round, written once: :class:`EngineCore` (vLLM V1's "engine core").

A round takes the messages that arrived (``messages.py``: adds, explanations, aborts, a
shutdown) in order, steps the engine once if it holds unfinished requests, lets a queued
explanation run for its share of the round (``explain_worker.py``: sliced between steps,
never beside one), and reports a :class:`~baobab.serve.messages.RoundOutput`;
:meth:`EngineCore.run` repeats rounds, blocking for messages while the engine and the
explanations are idle, until a Shutdown. Two transports drive the
same core and differ only in how messages arrive and where round outputs go:

- :class:`~baobab.serve.async_engine.AsyncEngine`: a thread in the serving process; an
  inbox in, ``EngineClient._receive`` out;
- the engine process (``engine_process.py``): the pipe in and out; the parent's reader
  thread hands each RoundOutput to ``EngineClient._receive``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from baobab.serve.engine import Engine
from baobab.serve.explain_worker import ExplainModel, Explanations
from baobab.serve.messages import (
    Abort,
    AddRequests,
    Explain,
    ExplainDone,
    Ready,
    Refused,
    RoundOutput,
    Shutdown,
    ToCore,
)
from baobab.serve.types import QueueFullError, RequestOutput


class EngineCore:
    """An :class:`Engine` driven by messages, one round at a time (single-threaded)."""

    def __init__(
        self,
        engine: Engine,
        export_dir: Path | None = None,
        explanations: Explanations | None = None,
    ) -> None:
        """``export_dir``: where the engine's model was loaded from, whose unquantized
        model explains (``/v1/explain``); ``explanations``: a queue to use instead (tests)."""
        self.engine = engine
        self.adds_seen = 0  # AddRequest taken in since start: RoundOutput.adds_seen
        self.explains_seen = 0  # Explain taken in since start: RoundOutput.explains_seen
        self.stopped = False  # a Shutdown arrived: the last round has run
        if explanations is None:
            config = engine.config
            run = ExplainModel(export_dir, engine.tokenizer, config.device)
            cuda = torch.device(config.device).type == "cuda"
            sync = torch.cuda.synchronize if cuda else (lambda: None)
            explanations = Explanations(run, config.explain_share, sync=sync)
        self.explanations = explanations

    def ready(self) -> Ready:
        """What a client needs before its first request: limits and gauges."""
        engine = self.engine
        return Ready(engine.context_length, engine.vocab_size, engine.stats())

    def round(self, messages: Sequence[ToCore]) -> RoundOutput:
        """Fold ``messages`` into the engine in arrival order, then step once (or, after a
        Shutdown, abort whatever is left instead); the outputs, refusals and gauges."""
        engine = self.engine
        outputs: list[RequestOutput] = []
        failed: list[Refused] = []
        explained: list[ExplainDone] = []
        explanations = self.explanations
        for message in messages:
            if isinstance(message, AddRequests):
                for add in message.requests:
                    self.adds_seen += 1
                    try:
                        engine.add_request(add.request_id, add.prompt_ids, add.params)
                    except (ValueError, QueueFullError) as err:  # raced past the client's checks
                        failed.append(Refused.of(add.request_id, err))
            elif isinstance(message, Explain):
                self.explains_seen += 1
                explanations.submit(message.request_id, message.spec)
            elif isinstance(message, Abort):
                out = engine.abort(message.request_id)
                if out is not None:
                    outputs.append(out)
                explained += explanations.abort(message.request_id)
            elif isinstance(message, Shutdown):
                self.stopped = True
            else:
                raise TypeError(f"the engine core cannot handle {type(message).__name__}.")
        if self.stopped:
            outputs += [engine.abort(request_id) for request_id in engine.request_ids]
            explained += explanations.abort_all()
        else:
            if engine.has_unfinished():
                start = time.perf_counter()
                outputs += engine.step()
                explanations.grant(time.perf_counter() - start)
            else:
                explanations.grant(None)
            explained += explanations.run()
        # stats, busy and adds_seen as of the same moment: EngineClient._admit relies on it.
        return RoundOutput(
            outputs,
            failed,
            engine.stats(),
            engine.has_unfinished() or explanations.pending > 0,
            self.adds_seen,
            explained,
            explanations.pending,
            self.explains_seen,
        )

    def run(
        self,
        receive: Callable[[bool], list[ToCore]],
        send: Callable[[RoundOutput], None],
    ) -> None:
        """Rounds until a Shutdown: ``receive(block)`` gives the messages that arrived
        (``block``: the engine and the explanations are idle, so wait for at least one),
        ``send`` takes each round's output. Exceptions propagate: the transport reports
        them. (``inference_mode`` is this thread's: the explanation worker's is not.)"""
        with torch.inference_mode():
            while not self.stopped:
                idle = not self.engine.has_unfinished() and not self.explanations.pending
                send(self.round(receive(idle)))
