import pytest

from baobab.optim import OPTIMIZER_NAMES, OptimConfig, ScheduleConfig, clip_gradients


def test_defaults_are_valid() -> None:
    cfg = OptimConfig()
    assert cfg.name == "adamw" and cfg.betas == (0.9, 0.95) and cfg.muon_lr is None
    assert OptimConfig(betas=[0.8, 0.9]).betas == (0.8, 0.9)
    assert ScheduleConfig().name == "cosine"


def test_unknown_optimizer_lists_names() -> None:
    with pytest.raises(ValueError, match="unknown optimizer 'lion'; choose one of: ") as err:
        OptimConfig(name="lion")
    assert all(n in str(err.value) for n in OPTIMIZER_NAMES)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"lr": -1e-3}, "lr"),
        ({"lr": 0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"betas": (0.9, 1.0)}, "betas"),
        ({"betas": (-0.1, 0.9)}, "betas"),
        ({"betas": (0.9,)}, "betas"),
        ({"eps": 0.0}, "eps"),
        ({"momentum": 1.0}, "momentum"),
        ({"name": "momentum", "momentum": 0.0, "nesterov": True}, "momentum"),
        ({"alpha": 1.5}, "alpha"),
        ({"rmsprop_momentum": -0.5}, "rmsprop_momentum"),
        ({"lr_decay": -1}, "lr_decay"),
        ({"muon_momentum": 1.0}, "muon_momentum"),
        ({"muon_ns_steps": 0}, "muon_ns_steps"),
        ({"muon_ns_steps": 2.5}, "muon_ns_steps"),
        ({"muon_lr": 0.0}, "muon_lr"),
        ({"muon_adjust_lr": "none"}, "muon_adjust_lr"),
        ({"grad_clip_norm": 0.0}, "grad_clip_norm"),
        ({"grad_clip_value": -1.0}, "grad_clip_value"),
        ({"implementation": "cuda"}, "implementation"),
        ({"lr": "big"}, "lr"),
    ],
)
def test_optim_errors_name_the_key(kwargs: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        OptimConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "step"}, "unknown schedule 'step'; choose one of: constant, cosine, linear, wsd"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"warmup_steps": 1.5}, "warmup_steps"),
        ({"decay_fraction": 1.5}, "decay_fraction"),
        ({"min_lr_ratio": -0.1}, "min_lr_ratio"),
    ],
)
def test_schedule_errors_name_the_key(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ScheduleConfig(**kwargs)


def test_clip_arguments_validated() -> None:
    with pytest.raises(ValueError, match="max_norm"):
        clip_gradients([], max_norm=0.0, max_value=None)
    with pytest.raises(ValueError, match="max_value"):
        clip_gradients([], max_norm=None, max_value=-1.0)
