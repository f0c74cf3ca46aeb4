import math

import torch
from torch import nn

from baobab.optim import clip_gradients


def _model_with_grads() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    (model(torch.randn(5, 4)).square().sum() * 10).backward()
    return model


def _grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


def test_norm_clip_matches_torch() -> None:
    model, ref = _model_with_grads(), _model_with_grads()
    norm = clip_gradients(model.parameters(), max_norm=0.5, max_value=None)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
    torch.testing.assert_close(norm, ref_norm)
    assert norm > 0.5
    torch.testing.assert_close(_grads(model), _grads(ref))


def test_value_then_norm_matches_torch() -> None:
    model, ref = _model_with_grads(), _model_with_grads()
    norm = clip_gradients(list(model.parameters()), max_norm=0.3, max_value=0.2)
    torch.nn.utils.clip_grad_value_(ref.parameters(), 0.2)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.3)
    torch.testing.assert_close(norm, ref_norm)
    torch.testing.assert_close(_grads(model), _grads(ref))


def test_norm_reported_without_clipping() -> None:
    model = _model_with_grads()
    before = _grads(model)
    norm = clip_gradients(model.parameters(), max_norm=None, max_value=None)
    expected = torch.linalg.vector_norm(torch.cat([g.flatten() for g in before]))
    torch.testing.assert_close(norm, expected)
    torch.testing.assert_close(_grads(model), before)
    torch.testing.assert_close(
        clip_gradients(nn.Linear(2, 2).parameters(), None, None), torch.tensor(0.0)
    )


def test_non_finite_norm_returned() -> None:
    model = _model_with_grads()
    next(model.parameters()).grad[0, 0] = math.inf
    assert clip_gradients(model.parameters(), max_norm=None, max_value=None).isinf()
    assert clip_gradients(model.parameters(), max_norm=1.0, max_value=None).isinf()
