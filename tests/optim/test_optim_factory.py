import copy

import pytest
import torch
from optim_helpers import Tiny, make_tiny, train
from torch import nn

from baobab.optim import (
    OPTIMIZER_NAMES,
    MuonWithAdamW,
    OptimConfig,
    build_optimizer,
    is_full_batch,
    param_groups,
)

WD = 0.1


@pytest.fixture
def tiny() -> Tiny:
    return make_tiny()


def _groups(model: Tiny) -> list[dict]:
    """The reference grouping, written out by hand."""
    return [
        {"params": [model.fc1.weight, model.fc2.weight], "weight_decay": WD},
        {
            "params": [
                model.emb.weight,
                model.fc1.bias,
                model.norm.weight,
                model.norm.bias,
                model.fc2.bias,
            ],
            "weight_decay": 0.0,
        },
    ]


def _reference(name: str, model: Tiny, cfg: OptimConfig) -> torch.optim.Optimizer:
    o = torch.optim
    if name in ("gd", "sgd"):
        return o.SGD(_groups(model), lr=cfg.lr)
    if name == "momentum":
        return o.SGD(_groups(model), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if name == "adagrad":
        return o.Adagrad(_groups(model), lr=cfg.lr, lr_decay=cfg.lr_decay, eps=cfg.eps)
    if name == "rmsprop":
        return o.RMSprop(_groups(model), lr=cfg.lr, alpha=cfg.alpha, eps=cfg.eps)
    if name == "adam":
        return o.Adam(_groups(model), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    if name == "adamw":
        return o.AdamW(_groups(model), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    assert name == "muon"
    muon = o.Muon(
        [model.fc1.weight],
        lr=cfg.lr,
        weight_decay=WD,
        momentum=cfg.muon_momentum,
        nesterov=True,
        ns_steps=cfg.muon_ns_steps,
        adjust_lr_fn="match_rms_adamw",
    )
    rest = [
        {"params": [model.fc2.weight], "weight_decay": WD},
        {
            "params": [model.emb.weight, model.fc1.bias, model.norm.weight, model.norm.bias]
            + [model.fc2.bias],
            "weight_decay": 0.0,
        },
    ]
    adamw = o.AdamW(rest, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)

    class Both:
        def zero_grad(self, set_to_none: bool = True) -> None:
            muon.zero_grad(set_to_none)
            adamw.zero_grad(set_to_none)

        def step(self) -> None:
            muon.step()
            adamw.step()

    return Both()


def _assert_same_params(a: nn.Module, b: nn.Module) -> None:
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-7, msg=name)


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_matches_torch_reference(name: str) -> None:
    cfg = OptimConfig(name=name, lr=0.05, weight_decay=WD, nesterov=name == "momentum")
    model, ref_model = make_tiny(), make_tiny()
    train(model, build_optimizer(model, cfg), steps=3)
    train(ref_model, _reference(name, ref_model, cfg), steps=3)
    _assert_same_params(model, ref_model)
    assert any((p != q).any() for p, q in zip(model.parameters(), make_tiny().parameters()))


def test_optimizer_classes_and_hyperparameters(tiny: Tiny) -> None:
    momentum = build_optimizer(tiny, OptimConfig(name="momentum", momentum=0.8, nesterov=True))
    assert isinstance(momentum, torch.optim.SGD)
    assert momentum.defaults["momentum"] == 0.8 and momentum.defaults["nesterov"]
    assert build_optimizer(tiny, OptimConfig(name="sgd")).defaults["momentum"] == 0.0
    rms = build_optimizer(tiny, OptimConfig(name="rmsprop", rmsprop_momentum=0.5))
    assert isinstance(rms, torch.optim.RMSprop) and rms.defaults["momentum"] == 0.5
    assert isinstance(build_optimizer(tiny, OptimConfig()), torch.optim.AdamW)
    assert isinstance(build_optimizer(tiny, OptimConfig(name="muon")), MuonWithAdamW)


def test_is_full_batch() -> None:
    assert is_full_batch(OptimConfig(name="gd"))
    assert not any(is_full_batch(OptimConfig(name=n)) for n in OPTIMIZER_NAMES if n != "gd")


def test_weight_decay_groups(tiny: Tiny) -> None:
    groups = param_groups(tiny, 0.3)
    assert [g["weight_decay"] for g in groups] == [0.3, 0.0]
    decay, no_decay = ({id(p) for p in g["params"]} for g in groups)
    assert decay == {id(tiny.fc1.weight), id(tiny.fc2.weight)}
    expected = [tiny.emb.weight, tiny.fc1.bias, tiny.fc2.bias, tiny.norm.weight, tiny.norm.bias]
    assert no_decay == {id(p) for p in expected}

    (everything,) = param_groups(tiny, 0.3, decay_norms_biases_embeddings=True)
    assert everything["weight_decay"] == 0.3 and len(everything["params"]) == 7

    opt = build_optimizer(tiny, OptimConfig(weight_decay=0.3))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.3, 0.0]


def test_param_groups_skip_frozen_and_empty_groups_and_tied_weights(tiny: Tiny) -> None:
    for p in (tiny.fc1.weight, tiny.fc2.weight):
        p.requires_grad_(False)
    (only,) = param_groups(tiny, 0.1)
    assert only["weight_decay"] == 0.0 and len(only["params"]) == 5

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.head = nn.Linear(8, 10, bias=False)
            self.head.weight = self.emb.weight

    tied = Tied()
    groups = param_groups(tied, 0.1)
    assert len(groups) == 1 and groups[0]["params"] == [tied.emb.weight]
    assert groups[0]["weight_decay"] == 0.0
    opt = build_optimizer(tied, OptimConfig(name="muon"))
    assert opt.muon is None and len(opt.adamw.param_groups[0]["params"]) == 1


def test_muon_parameter_selection(tiny: Tiny) -> None:
    opt = build_optimizer(tiny, OptimConfig(name="muon", weight_decay=0.1))
    assert [p for g in opt.muon.param_groups for p in g["params"]] == [tiny.fc1.weight]
    adamw_ids = {id(p) for g in opt.adamw.param_groups for p in g["params"]}
    assert id(tiny.fc2.weight) in adamw_ids and id(tiny.emb.weight) in adamw_ids
    assert len(adamw_ids) == 6

    named = build_optimizer(tiny, OptimConfig(name="muon"), output_layer="fc1")
    assert [p for g in named.muon.param_groups for p in g["params"]] == [tiny.fc2.weight]
    with pytest.raises(ValueError, match="output_layer 'nope'.*fc1, fc2"):
        build_optimizer(tiny, OptimConfig(name="muon"), output_layer="nope")


def test_muon_lr_defaults_to_lr_and_can_be_set(tiny: Tiny) -> None:
    opt = build_optimizer(tiny, OptimConfig(name="muon", lr=0.01))
    assert opt.muon.param_groups[0]["lr"] == 0.01
    assert opt.muon.param_groups[0]["adjust_lr_fn"] == "match_rms_adamw"
    cfg = OptimConfig(name="muon", lr=0.01, muon_lr=0.02, muon_adjust_lr="original")
    opt = build_optimizer(tiny, cfg)
    assert opt.muon.param_groups[0]["lr"] == 0.02 and opt.adamw.param_groups[0]["lr"] == 0.01
    assert opt.muon.param_groups[0]["adjust_lr_fn"] == "original"


@pytest.mark.parametrize("name", ["sgd", "adagrad", "adam", "adamw", "muon"])
@pytest.mark.parametrize("implementation", ["foreach", "fused", "for-loop"])
def test_implementations_agree(name: str, implementation: str) -> None:
    base = make_tiny()
    train(base, build_optimizer(base, OptimConfig(name=name, lr=0.01, weight_decay=WD)), 2)
    model = make_tiny()
    cfg = OptimConfig(name=name, lr=0.01, weight_decay=WD, implementation=implementation)
    opt = build_optimizer(model, cfg)
    groups = opt.adamw.param_groups if name == "muon" else opt.param_groups
    key = "fused" if implementation == "fused" else "foreach"
    assert groups[0][key] is (implementation != "for-loop")
    train(model, opt, 2)
    for p, q in zip(model.parameters(), base.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_fused_refused_where_unsupported(tiny: Tiny) -> None:
    with pytest.raises(ValueError, match="implementation 'fused'.*rmsprop"):
        build_optimizer(tiny, OptimConfig(name="rmsprop", implementation="fused"))
    meta = copy.deepcopy(tiny).to("meta")
    with pytest.raises(ValueError, match="implementation 'fused'.*meta"):
        build_optimizer(meta, OptimConfig(name="adamw", implementation="fused"))


def test_no_trainable_parameters(tiny: Tiny) -> None:
    tiny.requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        build_optimizer(tiny, OptimConfig())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["sgd", "adagrad", "adam", "adamw", "muon"])
def test_fused_on_cuda_matches_cpu(name: str) -> None:
    cpu = make_tiny()
    train(cpu, build_optimizer(cpu, OptimConfig(name=name, lr=0.01, weight_decay=WD)), 2)
    gpu = make_tiny().cuda()
    cfg = OptimConfig(name=name, lr=0.01, weight_decay=WD, implementation="fused")
    train(gpu, build_optimizer(gpu, cfg), 2)
    for p, q in zip(gpu.parameters(), cpu.parameters()):
        # Muon orthogonalizes in bfloat16, so CUDA and CPU matmuls differ slightly.
        torch.testing.assert_close(p.cpu(), q, rtol=1e-3, atol=1e-3)
