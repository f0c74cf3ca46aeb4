"""baobab.horovod's collectives and DistributedOptimizer: two ranks (one torchrun launch whose
checks become one test each) and the single-process fallback without torchrun's variables."""

from __future__ import annotations

import json

import pytest
import torch
from hvd_launch import TORCHRUN_VARS, torchrun  # tests/horovod is on sys.path (rootdir import)
from hvd_unit_worker import CHECKS

import baobab.horovod as hvd


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory) -> list[dict[str, str]]:
    out = tmp_path_factory.mktemp("hvd_unit")
    torchrun("hvd_unit_worker.py", str(out))
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("name", list(CHECKS))
def test_two_ranks(two_rank_results, name):
    for rank, results in enumerate(two_rank_results):
        assert results.get(name) == "ok", f"rank {rank}: {results.get(name)}"


@pytest.fixture
def alone(monkeypatch):
    """baobab.horovod initialized as a lone process (no torchrun variables)."""
    for var in TORCHRUN_VARS:
        monkeypatch.delenv(var, raising=False)
    hvd.init()
    yield
    hvd.shutdown()


def test_calls_before_init_raise():
    assert not hvd.is_initialized()
    with pytest.raises(ValueError, match="call hvd.init"):
        hvd.rank()


@pytest.mark.usefixtures("alone")
def test_single_process_fallback():
    assert not torch.distributed.is_initialized()
    assert (hvd.size(), hvd.rank(), hvd.local_rank(), hvd.local_size()) == (1, 0, 0, 1)
    assert (hvd.cross_rank(), hvd.cross_size()) == (0, 1)
    t = torch.tensor([1.0, 2.0])
    assert torch.equal(hvd.allreduce(t), t)
    assert torch.equal(
        hvd.allreduce(t, op=hvd.Sum, prescale_factor=2.0, postscale_factor=3.0), 6 * t
    )
    assert torch.equal(hvd.synchronize(hvd.allreduce_async(t)), t)
    assert torch.equal(hvd.allgather(t), t) and torch.equal(hvd.broadcast(t, 0), t)
    assert hvd.broadcast_object({"a": 1}) == {"a": 1} and hvd.allgather_object(3) == [3]
    with pytest.raises(ValueError, match="root_rank"):
        hvd.broadcast(t, root_rank=1)
    hvd.barrier()
    assert hvd.join() == 0

    model = torch.nn.Linear(3, 1)
    plain = torch.nn.Linear(3, 1)
    plain.load_state_dict(model.state_dict())
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    opt = hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters()
    )
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    for m, o in ((model, opt), (plain, plain_opt)):
        m(torch.ones(2, 3)).pow(2).mean().backward()
        o.step()
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    for p, q in zip(model.parameters(), plain.parameters()):
        assert torch.equal(p, q)


@pytest.mark.usefixtures("alone")
def test_adasum_and_bad_arguments_are_refused():
    with pytest.raises(
        ValueError,
        match=r"^Adasum is not supported by baobab\.horovod; use hvd\.Average or hvd\.Sum",
    ):
        hvd.allreduce(torch.ones(1), op=hvd.Adasum)
    model = torch.nn.Linear(2, 1)
    with pytest.raises(ValueError, match="Adasum is not supported"):
        hvd.DistributedOptimizer(torch.optim.SGD(model.parameters()), op=hvd.Adasum)
    with pytest.raises(ValueError, match="not both"):
        hvd.allreduce(torch.ones(1), average=True, op=hvd.Sum)
    with pytest.raises(ValueError, match="gradient_predivide_factor"):
        hvd.DistributedOptimizer(
            torch.optim.SGD(model.parameters()), op=hvd.Sum, gradient_predivide_factor=2.0
        )
    with pytest.raises(ValueError, match="not in it"):
        hvd.DistributedOptimizer(torch.optim.SGD(model.parameters()), [("weight", model.weight)])
    with pytest.raises(ValueError, match="unique"):
        hvd.DistributedOptimizer(
            torch.optim.SGD(model.parameters()), [("w", model.weight), ("w", model.bias)]
        )
    with pytest.raises(ValueError, match="params must be"):
        hvd.broadcast_parameters(torch.ones(2), root_rank=0)
