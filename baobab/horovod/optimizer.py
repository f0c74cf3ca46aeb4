"""``hvd.DistributedOptimizer``: the user's optimizer class, with gradients all-reduced in ``step()``.

Design choice: the reduction happens at step time, not in gradient hooks. ``step()`` (or an
explicit ``synchronize()``) walks the parameters in ``param_groups`` order, which is the same
on every rank, packs their gradients into a few flat buckets per (device, dtype) and
all-reduces the buckets together. Horovod launches one allreduce per gradient from hooks as
backward produces them, which overlaps communication with backward; torch.distributed needs
the same collective order on every rank and hooks fire in an order that data-dependent
graphs can change, so doing it at step time trades that overlap for a fixed order and few,
large messages. It also makes ``backward_passes_per_step`` exact for free: gradients simply
accumulate in ``.grad`` (summed, as in plain PyTorch) over however many backward passes run
before ``step()``, and one reduction follows.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from baobab.horovod.compression import Compression, Compressor
from baobab.horovod.functions import flat_collective
from baobab.horovod.ops import Average, allreduce_async_, resolve_op
from baobab.horovod.runtime import size

_STEP_AFTER_SYNC = (
    "optimizer.step() was called after optimizer.synchronize() without the "
    "optimizer.skip_synchronize() context, so the gradients were not reduced a second time."
)


class _DistributedOptimizer:
    """Placed before the user's optimizer class in the dynamic subclass, so ``super()`` is it."""

    def _hvd_setup(
        self,
        named_parameters: Iterable[tuple[str, torch.Tensor]] | None,
        compression: type[Compressor],
        backward_passes_per_step: int,
        op: int,
        gradient_predivide_factor: float,
    ) -> None:
        params = [p for group in self.param_groups for p in group["params"]]
        if named_parameters is None:
            named = [(f"allreduce.noname.{i}", p) for i, p in enumerate(params)]
        else:
            named = list(named_parameters)
        if any(not (isinstance(item, tuple) and len(item) == 2) for item in named):
            raise ValueError(
                "named_parameters must be (name, parameter) pairs, as model.named_parameters() gives."
            )
        names = [name for name, _ in named]
        dups = sorted({n for n in names if names.count(n) > 1})
        if dups:
            raise ValueError(
                f"parameter names in named_parameters must be unique, got duplicates {dups}."
            )
        unnamed = {id(p) for p in params} - {id(p) for _, p in named}
        if unnamed:
            raise ValueError(
                f"named_parameters was given but {len(unnamed)} optimizer parameters are not in it."
            )
        self._parameter_names = {id(p): name for name, p in named}
        self._compression = compression
        self.op = resolve_op(op)
        if gradient_predivide_factor != 1.0 and self.op != Average:
            raise ValueError("gradient_predivide_factor is only supported with op=hvd.Average.")
        self.gradient_predivide_factor = float(gradient_predivide_factor)
        self.set_backward_passes_per_step(backward_passes_per_step)
        self._synchronized = False
        self._should_synchronize = True

    def set_backward_passes_per_step(self, passes: int) -> None:
        """Backward passes expected per ``step()``; informational, as any number accumulates."""
        if int(passes) < 1:
            raise ValueError(f"backward_passes_per_step must be >= 1, got {passes}.")
        self.backward_passes_per_step = int(passes)

    def synchronize(self) -> None:
        """All-reduce every gradient now (call before clipping, then step in skip_synchronize())."""
        if size() > 1:
            self._reduce_gradients()
        self._synchronized = True

    def _reduce_gradients(self) -> None:
        params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        # Average: pre 1/f, post f/size (Horovod's split, keeping fp16 sums in range).
        pre, post = 1.0, 1.0
        if self.op == Average:
            pre, post = 1.0 / self.gradient_predivide_factor, self.gradient_predivide_factor
        compressed, contexts = [], []
        for p in params:
            if p.grad is None:  # another rank may have a gradient for it: take part with zeros
                p.grad = torch.zeros_like(p, memory_format=torch.preserve_format)
            elif p.grad.is_sparse:  # reduced densely
                p.grad = p.grad.to_dense()
            c, ctx = self._compression.compress(p.grad)
            compressed.append(c if c.data_ptr() != p.grad.data_ptr() else c.detach())
            contexts.append(ctx)

        def start(flat: torch.Tensor) -> int:
            return allreduce_async_(flat, op=self.op, prescale_factor=pre, postscale_factor=post)

        flat_collective(compressed, start)()
        with torch.no_grad():
            for p, c, ctx in zip(params, compressed, contexts):
                if c.data_ptr() != p.grad.data_ptr():
                    p.grad.copy_(self._compression.decompress(c, ctx))

    @contextmanager
    def skip_synchronize(self) -> Iterator[None]:
        """Inside this context ``step()`` applies the gradients without reducing them."""
        self._should_synchronize = False
        try:
            yield
        finally:
            self._should_synchronize = True

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        if self._should_synchronize:
            if self._synchronized:
                warnings.warn(_STEP_AFTER_SYNC, stacklevel=2)
            else:
                self.synchronize()
        self._synchronized = False
        return super().step(closure)  # type: ignore[misc]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._synchronized = False
        self._should_synchronize = True
        super().load_state_dict(state_dict)  # type: ignore[misc]


def DistributedOptimizer(
    optimizer: torch.optim.Optimizer,
    named_parameters: Iterable[tuple[str, torch.Tensor]] | None = None,
    compression: type[Compressor] = Compression.none,
    backward_passes_per_step: int = 1,
    op: int = Average,
    gradient_predivide_factor: float = 1.0,
    num_groups: int = 0,
    groups: Any = None,
    sparse_as_dense: bool = False,
) -> torch.optim.Optimizer:
    """Return ``optimizer`` as an instance of a subclass of its own class whose ``step()``
    first all-reduces the gradients (default: averaged over ranks).

    The result shares ``param_groups`` and ``state`` with ``optimizer`` (nothing is copied).
    ``num_groups``, ``groups`` and ``sparse_as_dense`` are accepted for compatibility: the
    gradients always travel in flat buckets and sparse gradients are reduced densely.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}."
        )
    if isinstance(optimizer, _DistributedOptimizer):
        raise ValueError("optimizer is already a DistributedOptimizer.")
    base = type(optimizer)
    cls = type(base.__name__, (_DistributedOptimizer, base), {"__qualname__": base.__qualname__})
    wrapped = cls.__new__(cls)
    state = dict(vars(optimizer))
    state.pop("step", None)  # an LR scheduler's per-instance wrapper bound to the old object
    wrapped.__dict__.update(state)
    wrapped._hvd_setup(
        named_parameters, compression, backward_passes_per_step, op, gradient_predivide_factor
    )
    return wrapped
