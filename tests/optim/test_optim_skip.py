"""A skipped update leaves weights and optimizer state as they were, for every optimizer
baobab builds and each implementation, without the host reading the verdict."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from baobab.optim import OptimConfig, build_optimizer
from baobab.optim.skip import SkippableStep

CASES = [
    (name, impl)
    for name in ("adam", "adamw", "sgd", "momentum", "adagrad", "rmsprop", "muon")
    for impl in ("auto", "foreach", "fused")
    if not (impl == "fused" and name == "rmsprop")
]


class HostReads(TorchDispatchMode):
    """Counts reads of a tensor's value by the host, except of the optimizer step counters
    (torch keeps those in host memory unless fused or capturable, on every device)."""

    def __init__(self, opt: torch.optim.Optimizer):
        super().__init__()
        self.opt, self.count = opt, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            steps = {s["step"].data_ptr() for s in self.opt.state.values() if "step" in s}
            self.count += args[0].data_ptr() not in steps
        return func(*args, **(kwargs or {}))


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(11, 8), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def grads(net: nn.Module, seed: int, bad: bool = False) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in net.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    if bad:
        next(net.parameters()).grad[0, 0] = float("nan")


def state(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v.clone() for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]


@pytest.mark.parametrize(("name", "impl"), CASES)
def test_a_skipped_step_changes_nothing_and_the_run_continues_as_if_it_never_came(name, impl):
    cfg = OptimConfig(name=name, lr=0.01, weight_decay=0.1, implementation=impl)
    net, ref = model(), model()
    opt, ref_opt = build_optimizer(net, cfg), build_optimizer(ref, cfg)
    stepper = SkippableStep(opt, torch.device("cpu"))
    no, yes = torch.tensor(False), torch.tensor(True)
    # A skipped first step (state not made yet), a good one, a skipped one, a good one.
    for seed, skip in ((1, yes), (2, no), (3, yes), (4, no)):
        grads(net, seed, bad=skip is yes)
        before = (copy.deepcopy(net.state_dict()), state(opt))
        with HostReads(opt) as reads:
            stepper.step(skip)
        assert reads.count == 0
        if skip is yes:
            for key, value in net.state_dict().items():
                assert torch.equal(value, before[0][key]), key
            after = state(opt)
            if before[1]:
                assert all(torch.equal(a, b) for a, b in zip(after, before[1], strict=True))
            else:  # made by a skipped first step: zero, as the optimizer makes it
                assert all(not a.any() for a in after)
        else:
            grads(ref, seed)
            ref_opt.step()
        for a, b in zip(net.parameters(), ref.parameters()):
            assert torch.equal(a, b), (name, impl, seed)
    if impl == "fused":  # found_inf reaches the fused kernel (muon: its AdamW half)
        assert "native" in stepper.modes(torch.device("cpu"))
    for (ka, a), (_, b) in zip(
        sorted(opt.state_dict()["state"].items()), sorted(ref_opt.state_dict()["state"].items())
    ):
        for key in a:
            assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), (ka, key)
