"""An optimizer update that a verdict on the device can cancel without the host reading it.

AMP's ``GradScaler`` skips the update of a step whose gradients overflowed by handing the
fused optimizers a ``found_inf`` tensor: the kernel then leaves parameters and state as they
were, and the optimizer takes its step counter back. The training loop's guard
(``baobab.train.faults.StepGuard``) needs the same for every optimizer baobab builds, and
one of three ways applies to each (for ``MuonWithAdamW``, to each half):

- **native**: fused Adam, AdamW, SGD and Adagrad take ``found_inf`` (in torch 2.13 only
  their fused path does). Costs nothing.
- **masked**: any other optimizer whose parameters and state all live on the verdict's
  device (every optimizer on a CPU; capturable ones on a GPU). What the step writes
  (parameters with a gradient and their state) is copied into buffers kept for the
  purpose, the step runs, and ``torch.where`` puts the copies back if the verdict says
  skip; state that the step created (a first step) is put back to zero, the value each
  of these optimizers creates it with, so the next step starts it afresh. Costs one copy
  of those tensors per step and their size in memory.
- **host**: otherwise (torch keeps the step counter of a non-capturable, non-fused
  optimizer in host memory, which a GPU-side verdict cannot reach): the verdict is read
  on the host, one synchronisation per step.

On CUDA, ``SkippableStep`` first moves an optimizer to a sync-free way where torch allows
it: ``implementation: auto`` becomes fused (torchtitan's default) where a fused kernel
exists, and others become capturable (step counters on the device).
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor
from torch.optim import SGD, Adagrad, Adam, AdamW, Optimizer

from baobab.optim.muon import MuonWithAdamW

NATIVE = (Adam, AdamW, SGD, Adagrad)  # fused kernels with found_inf


def _leaves(optimizer: Optimizer) -> list[Optimizer]:
    if isinstance(optimizer, MuonWithAdamW):
        return optimizer._inner()
    return [optimizer]


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard: masking is elementwise, so each rank masks what it holds."""
    return t.to_local() if isinstance(t, DTensor) else t


def _has_step_counter(opt: Optimizer) -> bool:
    muon = getattr(torch.optim, "Muon", None)
    return not (isinstance(opt, SGD) or (muon is not None and isinstance(opt, muon)))


def _prefer_device_state(opt: Optimizer, device: torch.device) -> None:
    """On CUDA: fused where torch has a kernel and the implementation was left to torch
    (``auto``), else capturable; step counters already made move to the device."""
    for group in opt.param_groups:
        auto = group.get("foreach") is None and not group.get("fused")
        floating = all(torch.is_floating_point(p) for p in group["params"])
        if isinstance(opt, NATIVE) and auto and floating and not group.get("differentiable"):
            group["fused"] = True
        elif "capturable" in group and not group.get("fused"):
            group["capturable"] = True
        if group.get("fused") or group.get("capturable"):
            for p in group["params"]:
                step = opt.state.get(p, {}).get("step")
                if torch.is_tensor(step) and step.device != p.device:
                    opt.state[p]["step"] = step.to(device=p.device, dtype=torch.float32)


class SkippableStep:
    """``step(skip)``: ``optimizer.step()``, undone on the device where ``skip`` (a 0-dim
    bool tensor on the parameters' device) is true. ``mode`` names the way per optimizer
    half (``native``, ``masked`` or ``host``; see the module docstring)."""

    def __init__(self, optimizer: Optimizer, device: torch.device):
        self.optimizer = optimizer
        if device.type == "cuda":
            for opt in _leaves(optimizer):
                _prefer_device_state(opt, device)
        self._buffers: list[torch.Tensor] = []
        self._used = 0

    def modes(self, device: torch.device) -> list[str]:
        return [self._mode(opt, device) for opt in _leaves(self.optimizer)]

    @staticmethod
    def _mode(opt: Optimizer, device: torch.device) -> str:
        if isinstance(opt, NATIVE) and all(g.get("fused") for g in opt.param_groups):
            return "native"
        on_host = device.type != "cpu" and _has_step_counter(opt)
        if on_host and not all(g.get("capturable") for g in opt.param_groups):
            return "host"
        return "masked"

    @torch.no_grad()
    def step(self, skip: torch.Tensor) -> None:
        leaves = [(opt, self._mode(opt, skip.device)) for opt in _leaves(self.optimizer)]
        if any(mode == "host" for _, mode in leaves):
            if bool(skip):  # the one synchronisation of this way
                return
            self.optimizer.step()
            return
        found_inf = skip.to(torch.float32)
        self._used = 0  # buffers handed out this step
        masked: list[tuple[Optimizer, list[torch.Tensor], list[torch.Tensor], dict]] = []
        for opt, mode in leaves:
            if mode == "native":
                self._prepare_native(opt)
                opt.grad_scale, opt.found_inf = None, found_inf
            else:
                masked.append(self._snapshot(opt))
        try:
            self.optimizer.step()
        finally:
            for opt, mode in leaves:
                if mode == "native":
                    del opt.grad_scale, opt.found_inf
        for opt, tensors, copies, before in masked:
            for t, saved in zip(tensors, copies):
                torch.where(skip, saved, t, out=t)
            for p, keys in before.items():  # state this step created starts afresh
                for key, value in opt.state.get(p, {}).items():
                    if key not in keys and torch.is_tensor(value):
                        _local(value).masked_fill_(skip, 0)

    @staticmethod
    def _prepare_native(opt: Optimizer) -> None:
        """Fused SGD's first step with momentum would leave its buffers unset if skipped;
        zero buffers make the first step the same update (0 * momentum + grad)."""
        if isinstance(opt, SGD):
            for group in opt.param_groups:
                if group["momentum"] != 0:
                    for p in group["params"]:
                        if p.grad is not None and "momentum_buffer" not in opt.state[p]:
                            opt.state[p]["momentum_buffer"] = torch.zeros_like(p)

    def _snapshot(self, opt: Optimizer):
        """Copies of what ``opt.step()`` may write: parameters with a gradient and their
        state tensors (local shards), into buffers reused from step to step."""
        tensors, before = [], {}
        for group in opt.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = opt.state.get(p, {})
                before[p] = set(state)
                tensors.append(_local(p))
                tensors.extend(_local(v) for v in state.values() if torch.is_tensor(v))
        copies = [self._buffer(t) for t in tensors]
        if tensors:
            torch._foreach_copy_(copies, tensors)
        return opt, tensors, copies, before

    def _buffer(self, like: torch.Tensor) -> torch.Tensor:
        i = self._used
        self._used += 1
        if i < len(self._buffers):
            b = self._buffers[i]
            if b.shape == like.shape and b.dtype == like.dtype and b.device == like.device:
                return b
            self._buffers[i] = torch.empty_like(like)
        else:
            self._buffers.append(torch.empty_like(like))
        return self._buffers[i]
