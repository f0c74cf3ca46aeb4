import math
import pickle

import pytest
import torch

from baobab.optim import SCHEDULE_NAMES, ScheduleConfig, build_scheduler, lr_factor


def test_warmup_starts_above_zero_and_reaches_one() -> None:
    for name in SCHEDULE_NAMES:
        cfg = ScheduleConfig(name=name, warmup_steps=10)
        assert lr_factor(0, cfg, 100) == pytest.approx(0.1)
        assert lr_factor(4, cfg, 100) == pytest.approx(0.5)
        assert lr_factor(9, cfg, 100) == 1.0
        assert lr_factor(10, cfg, 100) == 1.0


def test_constant() -> None:
    cfg = ScheduleConfig(name="constant", min_lr_ratio=0.5)
    assert [lr_factor(s, cfg, 10) for s in (0, 5, 10, 20)] == [1.0] * 4


def test_cosine() -> None:
    cfg = ScheduleConfig(name="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(60, cfg, 110) == pytest.approx(0.55)  # midpoint of the decay
    assert lr_factor(35, cfg, 110) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(110, cfg, 110) == pytest.approx(0.1)
    assert lr_factor(500, cfg, 110) == pytest.approx(0.1)


def test_linear() -> None:
    cfg = ScheduleConfig(name="linear", min_lr_ratio=0.0)
    assert [lr_factor(s, cfg, 4) for s in range(5)] == pytest.approx([1, 0.75, 0.5, 0.25, 0])


def test_wsd() -> None:
    cfg = ScheduleConfig(name="wsd", warmup_steps=5, decay_fraction=0.2, min_lr_ratio=0.1)
    assert lr_factor(5, cfg, 100) == 1.0
    assert lr_factor(79, cfg, 100) == 1.0  # plateau
    assert lr_factor(80, cfg, 100) == 1.0  # decay starts here
    assert lr_factor(90, cfg, 100) == pytest.approx(0.55)
    assert lr_factor(100, cfg, 100) == pytest.approx(0.1)
    no_decay = ScheduleConfig(name="wsd", decay_fraction=0.0)
    assert lr_factor(99, no_decay, 100) == 1.0


def test_warmup_not_shorter_than_total_is_refused() -> None:
    cfg = ScheduleConfig(warmup_steps=10)
    with pytest.raises(ValueError, match="warmup_steps must be < total_steps"):
        lr_factor(0, cfg, 10)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1.0)
    with pytest.raises(ValueError, match="warmup_steps"):
        build_scheduler(opt, cfg, total_steps=5)
    with pytest.raises(ValueError, match="total_steps"):
        build_scheduler(opt, ScheduleConfig(), total_steps=0)


def test_lambda_lr_integration() -> None:
    params = [torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(2))]
    opt = torch.optim.SGD([{"params": params[:1], "lr": 0.5}, {"params": params[1:]}], lr=0.1)
    cfg = ScheduleConfig(name="cosine", warmup_steps=3, min_lr_ratio=0.2)
    sched = build_scheduler(opt, cfg, total_steps=20)
    for step in range(25):
        f = lr_factor(step, cfg, 20)
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.5 * f, 0.1 * f])
        opt.step()
        sched.step()
    state = sched.state_dict()
    assert state["last_epoch"] == 25
    restored = build_scheduler(opt, cfg, total_steps=20)
    restored.load_state_dict(pickle.loads(pickle.dumps(state)))
    assert restored.last_epoch == 25
