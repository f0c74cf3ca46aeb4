"""The baobab.horovod unit checks, run by every rank of one ``torchrun --nproc-per-node 2``.

Each ``check_*`` function asserts on this rank; the worker runs them all in order (the
same collectives on every rank) and writes ``OUT_DIR/rank{r}.json``: check name -> "ok"
or the error. test_horovod_ops.py turns each entry into a test.
"""

from __future__ import annotations

import copy
import json
import sys
import warnings
from pathlib import Path

import torch
from torch.testing import assert_close

import baobab.horovod as hvd


def check_topology():
    assert (hvd.size(), hvd.local_size(), hvd.cross_size(), hvd.cross_rank()) == (2, 2, 1, 0)
    assert hvd.local_rank() == hvd.rank() and hvd.is_initialized() and hvd.is_homogeneous()


def check_allreduce_ops():
    r = hvd.rank()
    t = torch.tensor([r + 1.0, 2.0 * (r + 1)])
    assert_close(hvd.allreduce(t), torch.tensor([1.5, 3.0]))
    assert_close(t, torch.tensor([r + 1.0, 2.0 * (r + 1)]))  # input untouched
    assert_close(hvd.allreduce(t, op=hvd.Sum), torch.tensor([3.0, 6.0]))
    assert_close(hvd.allreduce(t, average=False), torch.tensor([3.0, 6.0]))
    assert_close(hvd.allreduce(t, op=hvd.Min), torch.tensor([1.0, 2.0]))
    assert_close(hvd.allreduce(t, op=hvd.Max), torch.tensor([2.0, 4.0]))
    assert_close(hvd.allreduce(t, op=hvd.Product), torch.tensor([2.0, 8.0]))
    ints = torch.tensor([r + 1, 10], dtype=torch.int64)
    assert torch.equal(hvd.allreduce(ints, op=hvd.Sum), torch.tensor([3, 20]))
    assert torch.equal(hvd.allreduce_(ints, op=hvd.Max), torch.tensor([2, 10])) and ints[0] == 2


def check_prescale_postscale():
    t = torch.tensor([hvd.rank() + 1.0])
    assert_close(hvd.allreduce(t, op=hvd.Sum, prescale_factor=2.0), torch.tensor([6.0]))
    assert_close(hvd.allreduce(t, op=hvd.Sum, postscale_factor=0.5), torch.tensor([1.5]))
    assert_close(hvd.allreduce(t, prescale_factor=3.0, postscale_factor=2.0), torch.tensor([9.0]))


def check_inplace_noncontiguous():
    base = torch.arange(6.0).reshape(2, 3) * (hvd.rank() + 1)
    view = base.t()  # non-contiguous
    hvd.allreduce_(view, op=hvd.Sum)
    assert_close(base, torch.arange(6.0).reshape(2, 3) * 3)


def check_async_synchronize_poll():
    t = torch.full((4,), float(hvd.rank()))
    h1 = hvd.allreduce_async(t, op=hvd.Sum)
    h2 = hvd.allreduce_async_(t)
    h3 = hvd.allgather_async(torch.tensor([float(hvd.rank())]))
    h4 = hvd.broadcast_async(torch.tensor([hvd.rank()]), root_rank=1)
    assert_close(hvd.synchronize(h1), torch.ones(4))
    assert_close(hvd.synchronize(h2), torch.full((4,), 0.5))
    assert_close(t, torch.full((4,), 0.5))  # in place
    assert hvd.poll(h3) in (True, False)
    assert_close(hvd.synchronize(h3), torch.tensor([0.0, 1.0]))
    assert hvd.synchronize(h4).item() == 1
    try:
        hvd.synchronize(h1)
    except ValueError as e:
        assert "already synchronized" in str(e)
    else:
        raise AssertionError("a second synchronize of one handle must raise")


def check_allgather_unequal():
    r = hvd.rank()
    out = hvd.allgather(torch.full((r + 1, 3), float(r)))  # rank 0: 1 row, rank 1: 2 rows
    assert_close(out, torch.tensor([[0.0] * 3, [1.0] * 3, [1.0] * 3]))
    assert hvd.allgather(torch.tensor(r)).tolist() == [0, 1]  # 0-dim gathers as rows
    try:
        hvd.allgather(torch.zeros(1, 2 + r))
    except ValueError as e:
        assert "except dim 0" in str(e)
    else:
        raise AssertionError("mismatched trailing dims must raise")


def check_broadcast():
    r = hvd.rank()
    t = torch.tensor([r * 10.0, 1.0])
    assert_close(hvd.broadcast(t, root_rank=1), torch.tensor([10.0, 1.0]))
    assert_close(t, torch.tensor([r * 10.0, 1.0]))
    hvd.broadcast_(t, root_rank=0)
    assert_close(t, torch.tensor([0.0, 1.0]))


def check_objects():
    got = hvd.broadcast_object({"rank": hvd.rank(), "list": [1, 2]}, root_rank=1)
    assert got == {"rank": 1, "list": [1, 2]}
    assert hvd.allgather_object(("r", hvd.rank())) == [("r", 0), ("r", 1)]


def check_alltoall_reducescatter_grouped():
    r = hvd.rank()
    out = hvd.alltoall(torch.tensor([r * 10.0, r * 10.0 + 1]))
    assert_close(out, torch.tensor([r + 0.0, 10.0 + r]))
    sends = torch.arange(3.0) + 100 * r  # rank 0 sends 1 row to 0, 2 to 1; rank 1: 2 and 1
    got, recv = hvd.alltoall(sends, splits=[1, 2] if r == 0 else [2, 1])
    want = torch.tensor([0.0, 100.0, 101.0]) if r == 0 else torch.tensor([1.0, 2.0, 102.0])
    assert_close(got, want)
    assert recv.tolist() == ([1, 2] if r == 0 else [2, 1])
    mine = hvd.reducescatter(torch.arange(3.0), op=hvd.Sum)  # rows split 2 + 1
    assert_close(mine, torch.tensor([0.0, 2.0]) if r == 0 else torch.tensor([4.0]))
    a, b = hvd.grouped_allreduce([torch.tensor([r + 0.0]), torch.tensor([2.0 * r])], op=hvd.Sum)
    assert a.item() == 1.0 and b.item() == 2.0


def check_differentiable_allreduce():
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    hvd.allreduce(x * (hvd.rank() + 1), op=hvd.Sum).sum().backward()
    assert_close(x.grad, torch.full((2,), 2.0 * (hvd.rank() + 1)))  # dL/dy summed over 2 ranks


def check_broadcast_parameters():
    torch.manual_seed(hvd.rank())
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    hvd.broadcast_parameters(a.state_dict(), root_rank=0)
    hvd.broadcast_parameters(list(b.named_parameters()), root_rank=1)
    for model in (a, b):
        for p in model.parameters():
            gathered = hvd.allgather(p.detach().unsqueeze(0))
            assert torch.equal(gathered[0], gathered[1])


def check_broadcast_optimizer_state():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.01 * (hvd.rank() + 1))
    for _ in range(hvd.rank() + 1):  # different state on each rank
        model(torch.randn(4, 3)).pow(2).mean().backward()
        opt.step()
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    assert opt.param_groups[0]["lr"] == 0.01
    for state in opt.state.values():
        assert state["step"].item() == 1.0 and state["step"].device.type == "cpu"
        for key in ("exp_avg", "exp_avg_sq"):
            both = hvd.allgather(state[key].unsqueeze(0))
            assert torch.equal(both[0], both[1])


def _shards(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of ``step`` (8 rows) and this rank's half of it."""
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)
    half = slice(4 * hvd.rank(), 4 * hvd.rank() + 4)
    return (x, y), (x[half], y[half])


def _mse(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.mean((model(x) - y) ** 2)


def _dist_vs_plain(passes: int, **kwargs) -> None:
    torch.manual_seed(7)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    plain = copy.deepcopy(model)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = hvd.DistributedOptimizer(
        opt, named_parameters=model.named_parameters(), backward_passes_per_step=passes, **kwargs
    )
    assert type(opt).__name__ == "SGD" and isinstance(opt, torch.optim.SGD)
    for step in range(3):
        opt.zero_grad()
        plain_opt.zero_grad()
        for k in range(passes):  # local accumulation, one reduction at step()
            (gx, gy), (x, y) = _shards(10 * step + k)
            _mse(model, x, y).backward()
            _mse(plain, gx, gy).backward()  # full batch: mean of the two equal halves
        opt.step()
        plain_opt.step()
    tol = 2e-3 if kwargs.get("compression") is hvd.Compression.fp16 else 1e-6
    for p, q in zip(model.parameters(), plain.parameters()):
        assert_close(p, q, rtol=0, atol=tol)


def check_distributed_optimizer_average():
    _dist_vs_plain(1)


def check_backward_passes_per_step_2():
    _dist_vs_plain(2)


def check_predivide_and_fp16():
    _dist_vs_plain(1, gradient_predivide_factor=2.0)
    _dist_vs_plain(1, compression=hvd.Compression.fp16)


def check_synchronize_skip_synchronize():
    model = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.ones_(model.weight)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=1.0))
    model(torch.full((1, 2), float(hvd.rank() + 1))).sum().backward()  # grad = rank + 1
    opt.synchronize()
    assert_close(model.weight.grad, torch.full((1, 2), 1.5))
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with opt.skip_synchronize():
            opt.step()
    assert_close(model.weight, torch.full((1, 2), 1.0 - 2**-0.5))
    opt.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    assert any("skip_synchronize" in str(w.message) for w in caught)


def check_adasum_refused():
    for call in (
        lambda: hvd.allreduce(torch.ones(1), op=hvd.Adasum),
        lambda: hvd.DistributedOptimizer(
            torch.optim.SGD([torch.ones(1, requires_grad=True)]), op=hvd.Adasum
        ),
    ):
        try:
            call()
        except ValueError as e:
            assert str(e) == hvd.ADASUM_UNSUPPORTED
        else:
            raise AssertionError("Adasum must be refused")


def check_join_barrier():
    hvd.barrier()
    assert hvd.join() in (0, 1)


CHECKS = {name[len("check_") :]: fn for name, fn in globals().items() if name.startswith("check_")}

if __name__ == "__main__":
    hvd.init()
    results = {}
    for name, check in CHECKS.items():
        try:
            check()
            results[name] = "ok"
        except Exception as e:  # recorded, reported by the test of that name
            results[name] = f"{type(e).__name__}: {e}"
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{hvd.rank()}.json").write_text(json.dumps(results, indent=1))
    hvd.shutdown()
