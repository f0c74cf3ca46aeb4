"""Counts the host's reads of tensor values in each training step and each read of the
loss: ``python tests/train/host_syncs_worker.py OUT.json baobab-train-args...`` (under
torchrun for a parallel layout; each rank writes OUT.json with its rank in the name).

A read of a value is what makes the host wait for a GPU: ``.item()``, ``float()``,
``bool()`` and ``int()`` of a tensor reach the dispatcher as ``aten._local_scalar_dense``;
``tolist()`` and ``numpy()`` read memory without an aten op, so they are counted by a
wrapper that calls through. Reads of an optimizer's step counter are not counted: torch
keeps it in host memory, on every device, unless the optimizer is fused or capturable.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class HostReads(TorchDispatchMode):
    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        super().__init__()
        self.optimizers, self.count = optimizers, 0

    def _counters(self) -> set[int]:
        return {
            s["step"].data_ptr()
            for opt in self.optimizers
            for s in opt.state.values()
            if torch.is_tensor(s.get("step")) and s["step"].device.type == "cpu"
        }

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += args[0].data_ptr() not in self._counters()
        return func(*args, **(kwargs or {}))


@contextmanager
def counting(optimizers: list[torch.optim.Optimizer]):
    reads = HostReads(optimizers)
    originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}

    def wrap(name, original):
        def counted(self, *args, **kwargs):
            reads.count += 1
            return original(self, *args, **kwargs)

        return counted

    for name, original in originals.items():
        setattr(torch.Tensor, name, wrap(name, original))
    try:
        with reads:
            yield reads
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def instrument(trainer) -> dict[str, list[int]]:
    """Per call of the trainer's step and of its read of the loss: the host reads in it."""
    counts: dict[str, list[int]] = {"_train_step": [], "_read": []}
    for name, calls in counts.items():
        method = getattr(trainer, name, None)
        if method is None:  # a trainer that reads every step has no separate read
            continue

        def counted(*args, _method=method, _calls=calls, **kwargs):
            with counting(trainer.optimizers) as reads:
                result = _method(*args, **kwargs)
            _calls.append(reads.count)
            return result

        setattr(trainer, name, counted)
    return counts


def main() -> None:
    from baobab.cli import parse_run_config
    from baobab.train import build_trainer

    out, args = Path(sys.argv[1]), sys.argv[2:]
    trainer = build_trainer(parse_run_config(args))
    counts = instrument(trainer)
    trainer.fit()
    rank = int(os.environ.get("RANK", "0"))
    out.with_name(f"{out.stem}.rank{rank}.json").write_text(json.dumps(counts))


if __name__ == "__main__":
    main()
