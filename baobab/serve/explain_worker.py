"""Explanations inside the engine core, sliced between decode steps.

``/v1/explain`` runs ``baobab.explain.explain`` in the engine core's process (thread or
child process), never in the HTTP event loop, and never at the same time as a decode step:

- :class:`SlicedWorker` runs one explanation on its own thread, but only while the core
  thread waits in :meth:`SlicedWorker.run_for` (a baton passed back and forth under one
  condition variable). The explanation's ``progress`` callback (after each forward pass)
  and hooks on the model's blocks (before each block's forward and backward) are its
  pause points: once the slice's time is spent it hands the baton back and blocks. So
  torch work of decoding and of explaining never overlaps, and Captum runs
  unchanged. The worker thread runs with autograd on (the core's ``inference_mode`` is
  thread-local and does not reach it).
- :class:`Explanations` is the core's queue (one explanation runs, the rest wait in
  order) and its budget, a token bucket: while requests are running each round grants
  ``share`` × that round's ``engine.step()`` time; the worker runs while the credit is
  positive, a forward pass started in time runs to its end, and the overrun is debt that
  later rounds pay back (so on average running streams lose ``share`` of their pace, at
  worst one pass per pause). While nothing runs each round grants :data:`IDLE_SLICE_S`
  (debt forgiven), short enough that a new request starts promptly.
- :class:`ExplainModel` is what runs: the first explanation opens the export's own
  unquantized float32 model on the engine's device (the served model's modules are
  inference-only kernels, maybe quantized or bf16: no gradients flow through them) and
  keeps it for the next ones.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from baobab.data.tokenizer import Tokenizer
from baobab.explain.types import ExplainError
from baobab.serve.messages import ExplainDone, ExplainSpec

logger = logging.getLogger(__name__)

IDLE_SLICE_S = 0.02  # seconds of explanation per round while no request runs: a new request
# waits at most this (and one block of the explanation) for its first step
Progress = Callable[[int], None]
Clock = Callable[[], float]


class Cancelled(Exception):
    """Raised at an explanation's next pause once it was aborted."""


class SlicedWorker:
    """``work(progress)`` on its own thread, run only inside :meth:`run_for` calls.

    Invariant: the worker thread computes only while ``_worker_turn`` is true, and the
    thread that called ``run_for`` is then blocked waiting for it to turn false.
    """

    def __init__(self, work: Callable[[Progress], Any], clock: Clock = time.perf_counter):
        self._work = work
        self._clock = clock
        self._cv = threading.Condition()
        self._worker_turn = False
        self._deadline = 0.0
        self._cancelled = False
        self._thread: threading.Thread | None = None
        self.done = False
        self.result: Any = None
        self.error: BaseException | None = None

    def run_for(self, seconds: float) -> float:
        """Let the work run until its first pause ``seconds`` from now, or its end; the
        seconds it took (a pass started in time runs to its end, so possibly more)."""
        if self.done:
            return 0.0
        start = self._clock()
        with self._cv:
            self._deadline = start + seconds
            self._worker_turn = True
            if self._thread is None:  # started holding the baton
                self._thread = threading.Thread(
                    target=self._main, name="baobab-explain", daemon=True
                )
                self._thread.start()
            self._cv.notify_all()
            while self._worker_turn:
                self._cv.wait()
        return self._clock() - start

    def cancel(self) -> None:
        """End the work: it raises :class:`Cancelled` at its next pause (this call runs it
        until then), or never starts."""
        self._cancelled = True
        if self._thread is None:
            self.done, self.error = True, Cancelled()
        while not self.done:
            self.run_for(0.0)

    def _main(self) -> None:
        try:
            self.result = self._work(self._pause)
        except BaseException as err:  # handed to the core, which reports it
            self.error = err
        with self._cv:
            self.done = True
            self._worker_turn = False
            self._cv.notify_all()

    def _pause(self, units: int) -> None:
        """The work's progress callback: hand the baton back once the slice is spent."""
        del units  # slices are timed, not counted
        if not self._cancelled and self._clock() < self._deadline:
            return
        with self._cv:
            self._worker_turn = False
            self._cv.notify_all()
            while not self._worker_turn:
                self._cv.wait()
        if self._cancelled:
            raise Cancelled


Run = Callable[[ExplainSpec, Progress], dict[str, Any]]


class Explanations:
    """The core's explanation queue and time budget (see the module docstring); only the
    core thread calls it."""

    def __init__(
        self,
        run: Run,
        share: float,
        idle_slice: float = IDLE_SLICE_S,
        clock: Clock = time.perf_counter,
        sync: Callable[[], None] = lambda: None,
    ) -> None:
        """``sync``: waits for the device's queued work (CUDA: the explanation's kernels
        run within its slice, not beside the next step)."""
        self.runner, self.share, self.idle_slice, self._clock = run, share, idle_slice, clock
        self._sync = sync
        self._queue: deque[tuple[str, ExplainSpec]] = deque()
        self._current: tuple[str, SlicedWorker] | None = None
        self.credit = 0.0  # seconds the worker may still run; negative: debt

    @property
    def pending(self) -> int:
        """Explanations queued or running."""
        return len(self._queue) + (self._current is not None)

    def submit(self, request_id: str, spec: ExplainSpec) -> None:
        self._queue.append((request_id, spec))

    def grant(self, step_seconds: float | None) -> None:
        """A round's credit: ``share`` × its step's seconds, or (``None``: no request ran)
        an idle slice; capped at an idle slice so that no burst builds up."""
        if not self.pending:
            self.credit = 0.0
        elif step_seconds is None:
            self.credit = self.idle_slice
        else:
            self.credit = min(self.credit + self.share * step_seconds, self.idle_slice)

    def run(self) -> list[ExplainDone]:
        """Run explanations while credit lasts; those that ended."""
        ended: list[ExplainDone] = []
        while self.credit > 0 and self.pending:
            if self._current is None:
                request_id, spec = self._queue.popleft()
                self._current = (request_id, SlicedWorker(_bind(self.runner, spec), self._clock))
            request_id, worker = self._current
            start = self._clock()
            worker.run_for(self.credit)
            self._sync()
            self.credit -= self._clock() - start
            if worker.done:
                self._current = None
                ended.append(_outcome(request_id, worker))
        return ended

    def abort(self, request_id: str) -> list[ExplainDone]:
        """Drop one explanation (a running one stops at its next pause); [] if unknown."""
        for entry in self._queue:
            if entry[0] == request_id:
                self._queue.remove(entry)
                return [ExplainDone(request_id, "aborted", message="the explanation was aborted")]
        if self._current is not None and self._current[0] == request_id:
            worker, self._current = self._current[1], None
            worker.cancel()
            return [_outcome(request_id, worker)]
        return []

    def abort_all(self) -> list[ExplainDone]:
        """Drop every explanation (shutdown)."""
        ids = [request_id for request_id, _ in self._queue]
        if self._current is not None:
            ids.insert(0, self._current[0])
        return [done for request_id in ids for done in self.abort(request_id)]


def _bind(run: Run, spec: ExplainSpec) -> Callable[[Progress], dict[str, Any]]:
    return lambda progress: run(spec, progress)


def _outcome(request_id: str, worker: SlicedWorker) -> ExplainDone:
    err = worker.error
    if err is None:
        return ExplainDone(request_id, "ok", result=worker.result)
    if isinstance(err, Cancelled):
        return ExplainDone(request_id, "aborted", message="the explanation was aborted")
    if isinstance(err, ExplainError):  # the explanation cannot be given as asked
        return ExplainDone(request_id, "invalid", message=str(err).rstrip("."))
    logger.error("an explanation failed", exc_info=err)
    return ExplainDone(request_id, "failed", message=f"the explanation failed: {err!r}")


class ExplainModel:
    """Runs an :class:`ExplainSpec` on the export's own float32 model, opened on first use
    (in the worker thread: its tensors must not be inference tensors) and kept.

    Captum's progress calls come once per forward pass over a batch of integration steps,
    which on a CPU can take longer than many decode steps; so the model also pauses before
    each block's forward and before each block's backward (a hook on the model's blocks and
    a tensor hook on their outputs): a slice ends within one block of its budget.
    """

    def __init__(self, export_dir: Path | None, tokenizer: Tokenizer, device: str) -> None:
        self.export_dir, self.tokenizer, self.device = export_dir, tokenizer, device
        self._model: torch.nn.Module | None = None
        self._pause: Progress = _no_pause  # the running explanation's pause

    def model(self) -> torch.nn.Module:
        if self._model is None:
            from baobab.export.artifact import read_config
            from baobab.export.open import open_model

            if self.export_dir is None:
                raise ExplainError(
                    "this engine was not started from an export directory, so it has no "
                    "unquantized model to explain with"
                )
            if read_config(self.export_dir).get("quantization"):
                raise ExplainError(
                    "explanations need the unquantized export; this server serves a quantized "
                    "one (serve the export it was quantized from to explain)"
                )
            model = open_model(self.export_dir).model.to(self.device, torch.float32).eval()
            for block in _blocks(model):
                block.register_forward_pre_hook(self._before_forward)
                block.register_forward_hook(self._after_forward)
            self._model = model
        return self._model

    def _before_forward(self, module: torch.nn.Module, args: tuple) -> None:
        self._pause(0)

    def _after_forward(self, module: torch.nn.Module, args: tuple, out: Any) -> None:
        if isinstance(out, torch.Tensor) and out.requires_grad:
            pause = self._pause
            out.register_hook(lambda grad: pause(0))  # before this block's backward

    def __call__(self, spec: ExplainSpec, progress: Progress) -> dict[str, Any]:
        from baobab.explain import explain

        self._pause = progress
        try:
            with torch.enable_grad():  # whatever this thread inherited: gradients are the point
                result = explain(
                    self.model(),
                    self.tokenizer,
                    prompt=spec.prompt,
                    target=spec.target,
                    completion=spec.completion,
                    contrast=spec.contrast,
                    methods=list(spec.methods),
                    ig_steps=spec.ig_steps,
                    max_delta=spec.max_delta,
                    top_k=spec.top_k,
                    progress=progress,
                )
            return sliced_json(result, progress)
        finally:
            self._pause = _no_pause


def sliced_json(value: Any, pause: Progress) -> Any:
    """``to_json(value)`` (``baobab.explain.types``) with a pause before each dataclass and
    each row of a tensor: an explanation's attention maps are (L, H, T, T) floats, whose
    conversion would otherwise hold the engine for a while in one piece."""
    import dataclasses

    from baobab.explain.types import to_json

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        pause(0)
        return {
            f.name: sliced_json(getattr(value, f.name), pause) for f in dataclasses.fields(value)
        }
    if isinstance(value, torch.Tensor) and value.dim() > 2:  # (L, H, T, T): a (T, T) at a time
        pause(0)
        return [sliced_json(row, pause) for row in value.detach().cpu()]
    if isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
        return [sliced_json(item, pause) for item in value]
    return to_json(value)


def _no_pause(units: int) -> None:
    del units


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks: the items of its ModuleDicts and ModuleLists."""
    return [
        block
        for module in model.modules()
        if isinstance(module, torch.nn.ModuleDict | torch.nn.ModuleList)
        for block in (module.values() if isinstance(module, torch.nn.ModuleDict) else module)
    ]
