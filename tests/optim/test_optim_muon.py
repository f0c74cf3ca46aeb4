import copy
import pickle

import pytest
import torch
from optim_helpers import make_tiny, train
from torch import nn

from baobab.optim import (
    MuonWithAdamW,
    OptimConfig,
    ScheduleConfig,
    build_optimizer,
    build_scheduler,
    lr_factor,
)

CFG = OptimConfig(name="muon", lr=0.02, weight_decay=0.1, muon_lr=0.05)


def test_param_groups_are_the_inner_dicts() -> None:
    model = make_tiny()
    opt = build_optimizer(model, CFG)
    inner = opt.muon.param_groups + opt.adamw.param_groups
    assert len(opt.param_groups) == len(inner) == 3
    assert all(a is b for a, b in zip(opt.param_groups, inner))
    assert opt.muon.state is opt.state and opt.adamw.state is opt.state


def test_state_dict_round_trip_gives_identical_steps() -> None:
    model = make_tiny()
    opt = build_optimizer(model, CFG)
    train(model, opt, steps=2)
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    assert sorted(saved_opt["state"]) == list(range(7))  # one id per parameter, Muon first
    assert set(saved_opt["state"][0]) == {"momentum_buffer"}

    resumed = make_tiny()
    resumed.load_state_dict(saved_model)
    resumed_opt = build_optimizer(resumed, CFG)
    resumed_opt.load_state_dict(saved_opt)
    assert opt.muon.state is opt.state and resumed_opt.adamw.state is resumed_opt.state
    assert resumed_opt.adamw.param_groups[0] is resumed_opt.param_groups[1]

    train(model, opt, steps=2, start=2)
    train(resumed, resumed_opt, steps=2, start=2)
    for p, q in zip(model.parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_works_under_lambda_lr() -> None:
    model = make_tiny()
    opt = build_optimizer(model, CFG)
    cfg = ScheduleConfig(name="cosine", warmup_steps=2, min_lr_ratio=0.0)
    sched = build_scheduler(opt, cfg, total_steps=6)
    for step in range(4):
        f = lr_factor(step, cfg, 6)
        assert opt.muon.param_groups[0]["lr"] == pytest.approx(0.05 * f)
        assert opt.adamw.param_groups[0]["lr"] == pytest.approx(0.02 * f)
        train(model, opt, steps=1, start=step)
        sched.step()

    # After a resume the scheduler still reaches the inner optimizers.
    opt.load_state_dict(opt.state_dict())
    sched.step()
    assert opt.muon.param_groups[0]["lr"] == pytest.approx(0.05 * lr_factor(5, cfg, 6))


def test_closure_zero_grad_and_hooks() -> None:
    model = make_tiny()
    opt = build_optimizer(model, CFG)
    calls = []
    opt.register_step_post_hook(lambda *_: calls.append("post"))

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = model(torch.arange(4)).square().mean()
        loss.backward()
        return loss

    before = model.fc1.weight.detach().clone()
    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and calls == ["post"]
    assert not torch.equal(before, model.fc1.weight)
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in model.parameters())


def test_one_sided_and_pickle() -> None:
    only_adamw = nn.Sequential(nn.Linear(3, 1))
    opt = build_optimizer(only_adamw, OptimConfig(name="muon"))
    assert opt.muon is None and len(opt.param_groups) == 2
    only_adamw(torch.ones(2, 3)).sum().backward()
    opt.step()

    only_muon = MuonWithAdamW([torch.nn.Parameter(torch.ones(3, 3))], [])
    assert only_muon.adamw is None
    with pytest.raises(ValueError, match="muon_params or adamw_params"):
        MuonWithAdamW([], [])
    with pytest.raises(NotImplementedError):
        only_muon.add_param_group({"params": [torch.nn.Parameter(torch.ones(2, 2))]})

    model = make_tiny()
    clone = pickle.loads(pickle.dumps(build_optimizer(model, CFG)))
    assert clone.param_groups[0] is clone.muon.param_groups[0]
    assert clone.adamw.state is clone.state


def test_distributed_checkpoint_state_dict_round_trip() -> None:
    dcp_sd = pytest.importorskip("torch.distributed.checkpoint.state_dict")
    model = make_tiny()
    opt = build_optimizer(model, CFG)
    train(model, opt, steps=1)
    osd = dcp_sd.get_optimizer_state_dict(model, opt)
    assert "fc1.weight" in osd["state"] and "fc2.weight" in osd["state"]
    assert set(osd["state"]["fc1.weight"]) == {"momentum_buffer"}

    resumed = copy.deepcopy(model)
    resumed_opt = build_optimizer(resumed, CFG)
    dcp_sd.set_optimizer_state_dict(resumed, resumed_opt, copy.deepcopy(osd))
    train(model, opt, steps=1, start=1)
    train(resumed, resumed_opt, steps=1, start=1)
    for p, q in zip(model.parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
