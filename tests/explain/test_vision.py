"""Explanations of image and vector models: integrated gradients' completeness on the mlps,
Grad-CAM's pointing game on a small ResNet trained here, its layer choice, work units and
refusals."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from baobab.explain import ExplainError, FeatureExplanation, ImageExplanation, explain
from baobab.explain.vision import gradcam_layer, input_work, occlusion_windows
from baobab.models import build_model
from baobab.models.resnet import ResNetConfig


def _completeness(model: torch.nn.Module, x: torch.Tensor, explanation) -> torch.Tensor:
    """|sum(scores) - (f(x) - f(0))| per input, for the explained output."""
    with torch.no_grad():
        fx = model(x.flatten(1))
        f0 = model(torch.zeros_like(x).flatten(1))
    gaps = []
    for i, item in enumerate(explanation.items):
        k = item.label or 0
        (ig,) = [a for a in item.attributions if a.method == "ig"]
        total = ig.scores.double().sum()
        gaps.append(abs(float(total) - float(fx[i, k] - f0[i, k])))
        assert gaps[-1] <= ig.delta + 1e-6  # a bound (paths.py); scores are float32
    return torch.tensor(gaps)


def test_ig_completeness_on_the_seed_regression_mlp() -> None:
    # ReLU: along the path the gradient is piecewise constant, where one Gauss-Legendre
    # rule converges only as 1/steps (2048 points for 1e-4); pieces split at the kinks.
    model = build_model("mlp", seed=0).double()
    x = torch.randn(8, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    e = explain(model, inputs=x, methods="ig", ig_steps=1024, max_delta=1e-4,
                internal_batch_size=256)  # fmt: skip
    assert isinstance(e, FeatureExplanation)
    assert e.feature_names == [f"x{j}" for j in range(10)]
    assert all(item.label is None and item.probability is None for item in e.items)
    with torch.no_grad():
        assert [it.value for it in e.items] == pytest.approx(model(x)[:, 0].tolist())
    assert _completeness(model, x, e).max() < 1e-4


def test_ig_completeness_on_a_digits_classifier_mlp_over_images() -> None:
    # A smooth activation: 64 Gauss-Legendre steps are exact to ~1e-9.
    model = build_model("mlp-digits", seed=0, activation="gelu").double()
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    e = explain(model, inputs=x, methods=["ig", "grad_x_input"], ig_steps=64, max_delta=1e-4)
    assert isinstance(e, ImageExplanation) and e.gradcam is None and e.gradcam_layer is None
    assert e.images.shape == (6, 1, 8, 8) and e.images.dtype == torch.float32
    with torch.no_grad():
        logits = model(x.flatten(1))
    assert [it.label for it in e.items] == logits.argmax(1).tolist()
    probs = logits.softmax(1).max(1).values.tolist()
    assert [it.probability for it in e.items] == pytest.approx(probs)
    assert all(a.scores.shape == (1, 8, 8) for it in e.items for a in it.attributions)
    assert _completeness(model, x, e).max() < 1e-4
    e = explain(model, inputs=x, labels=torch.full((6,), 3), methods="ig", ig_steps=64)
    assert [it.label for it in e.items] == [3] * 6
    assert _completeness(model, x, e).max() < 1e-4


def _patch_images(n: int, g: torch.Generator, positive: bool = False):
    """32x32 dark noise; class 1 images hold a bright 10x10 patch at a random place at
    least 3 pixels from the border. Returns images, classes and each patch's top-left."""
    y = torch.ones(n, dtype=torch.long) if positive else torch.randint(0, 2, (n,), generator=g)
    x = torch.rand(n, 1, 32, 32, generator=g) * 0.3
    corner = torch.randint(3, 32 - 10 - 3 + 1, (n, 2), generator=g)
    for i in range(n):
        r, c = corner[i].tolist()
        if y[i]:
            x[i, 0, r : r + 10, c : c + 10] = 1.0
    return x, y, corner


def test_gradcam_points_at_the_patch() -> None:
    """The pointing game: the Grad-CAM peak lies inside the bright patch.

    The class is whether the patch is there. A class that is the patch's *location* cannot
    be pointed at: a network with global pooling must carry absolute position in every cell
    (it learns it from the zero padding), and on such a classifier Grad-CAM's peak fell in
    the patch's quadrant for none of 64 images (16x16, 2x2 map) and in the patch for 0-5%
    (32x32, 4x4 map).
    """
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    cfg = ResNetConfig(depth=18, num_classes=2, in_channels=1, small_input=True, width=4,
                       image_size=32)  # fmt: skip
    model = build_model(cfg, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(60):
        x, y, _ = _patch_images(32, g)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    # BatchNorm's running statistics lag the fast-moving weights: measure them afresh.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    with torch.no_grad():
        for _ in range(4):
            model(_patch_images(64, g)[0])
    model.eval()
    x, y, _ = _patch_images(64, torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert (model(x).argmax(1) == y).float().mean() >= 0.95

    x, _, corner = _patch_images(48, torch.Generator().manual_seed(100), positive=True)
    e = explain(model, inputs=x, methods="grad_x_input", internal_batch_size=48)
    assert e.gradcam_layer == "layer4" and e.gradcam.shape == (48, 32, 32)
    assert all(it.label == 1 for it in e.items)
    peak = e.gradcam.flatten(1).argmax(1)  # (48,)
    r, c = peak // 32, peak % 32
    inside = (r >= corner[:, 0]) & (r < corner[:, 0] + 10)
    inside &= (c >= corner[:, 1]) & (c < corner[:, 1] + 10)
    assert inside.float().mean() >= 0.9


def _map_sizes(model: torch.nn.Module, x: torch.Tensor) -> dict[str, tuple[int, ...]]:
    sizes = {}
    hooks = [
        getattr(model, n).register_forward_hook(
            lambda _m, _i, out, n=n: sizes.__setitem__(n, tuple(out.shape[-2:]))
        )
        for n in ("layer1", "layer2", "layer3", "layer4")
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return sizes


def test_gradcam_skips_the_digits_resnets_1x1_last_stage() -> None:
    model = build_model("resnet18-digits", seed=0).eval()
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert _map_sizes(model, x) == {"layer1": (8, 8), "layer2": (4, 4), "layer3": (2, 2),
                                    "layer4": (1, 1)}  # fmt: skip
    e = explain(model, inputs=x, methods="grad_x_input")
    assert e.gradcam_layer == "layer3" and e.gradcam.shape == (3, 8, 8)
    assert (e.gradcam >= 0).all()
    # The ImageNet stem quarters the image: on 16x16 layer2 is the last 2x2 map; on 2x2
    # images no module keeps 2x2 and there is no Grad-CAM.
    imagenet = build_model(ResNetConfig(depth=18, num_classes=3, width=4), seed=0)
    assert gradcam_layer(imagenet, (16, 16)) == "layer2"
    assert gradcam_layer(imagenet, (64, 64)) == "layer4"
    e = explain(imagenet, inputs=torch.rand(2, 3, 2, 2), methods="grad_x_input")
    assert e.gradcam is None and e.gradcam_layer is None
    # No hook is left behind, the model stays in eval mode and its parameters gain no grad.
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert not model.training and all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("internal_batch_size", [4, 64])
def test_progress_counts_every_unit_in_batches(internal_batch_size: int) -> None:
    model = build_model(ResNetConfig(depth=18, num_classes=4, in_channels=1, small_input=True,
                                     width=4, image_size=16), seed=0)  # fmt: skip
    x = torch.rand(5, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    calls: list[int] = []
    methods = ["ig", "grad_x_input", "occlusion"]
    e = explain(model, inputs=x, methods=methods, ig_steps=8, max_delta=1.0,
                internal_batch_size=internal_batch_size, progress=calls.append)  # fmt: skip
    assert occlusion_windows((1, 16, 16)) == 49  # 4x4 windows, stride 2: 7 x 7 places
    # Rows: IG two pieces of 4 points, each with 2 rows for its delta (the loose max_delta
    # stops refining); grad x input 1; occlusion 49 windows and the unoccluded image; Grad-CAM 1.
    expected = 5 * (2 * (4 + 2) + 1 + (49 + 1) + 1)
    assert sum(calls) == expected == input_work(model, x.shape, methods, 8)
    assert max(calls) <= internal_batch_size and min(calls) >= 1
    assert [a.method for a in e.items[0].attributions] == methods
    assert [a.delta is None for a in e.items[0].attributions] == [False, True, True]

    mlp = build_model("mlp", seed=0)
    calls.clear()
    explain(mlp, inputs=torch.randn(10), methods=methods, ig_steps=8, max_delta=1.0,
            internal_batch_size=internal_batch_size, progress=calls.append)  # fmt: skip
    assert sum(calls) == 2 * (4 + 2) + 1 + (10 + 1) == input_work(mlp, (10,), methods, 8)


def test_occlusion_scores_the_occluded_feature() -> None:
    # One feature at a time from a zero baseline: a linear model's score is w_j * x_j.
    model = build_model("mlp", seed=0, hidden=())
    x = torch.randn(2, 10, generator=torch.Generator().manual_seed(0))
    e = explain(model, inputs=x, methods=["occlusion", "grad_x_input"])
    expected = model.fc1.weight.detach()[0] * x
    for item, row in zip(e.items, expected):
        for a in item.attributions:
            torch.testing.assert_close(a.scores, row)


@pytest.mark.parametrize(
    ("model_name", "inputs", "labels", "message"),
    [
        ("mlp", torch.randn(3, 7), None, "takes 10 input features"),
        ("mlp", torch.randn(2, 1, 3, 3), None, "takes 10 input features"),
        ("mlp", torch.randint(0, 5, (3, 10)), None, "floating-point"),
        ("mlp", torch.randn(2, 2, 5), None, "shaped (N, 10)"),
        ("mlp", torch.full((2, 10), float("nan")), None, "finite"),
        ("mlp", torch.randn(2, 10), [1, 0], "not an output index"),
        ("mlp-digits", torch.rand(2, 64), [3], "2 inputs"),
        ("mlp-digits", torch.rand(2, 64), [3, 10], "label 10 is not a class"),
        ("mlp-digits", torch.rand(2, 64), [3, 1.5], "label 1.5 is not a class"),
        ("resnet18-digits", torch.rand(2, 64), None, "images shaped (N, 1, H, W)"),
        ("resnet18-digits", torch.rand(2, 3, 8, 8), None, "images shaped (N, 1, H, W)"),
        ("resnet18-digits", torch.rand(2, 1, 8, 8) * 2, None, "values in [0, 1]"),
    ],
)
def test_bad_inputs_are_refused_in_one_sentence(model_name, inputs, labels, message) -> None:
    model = build_model(model_name, seed=0)
    with pytest.raises(ExplainError, match=re.escape(message)):
        explain(model, inputs=inputs, labels=labels)


def test_integrated_gradients_with_too_few_steps_are_refused() -> None:
    model = build_model("mlp-digits", seed=0)
    x = torch.rand(4, 64, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ExplainError, match="exceeds max_delta 0.0001 at 1 steps; raise ig_steps"):
        explain(model, inputs=x, methods="ig", ig_steps=1, max_delta=1e-4)


@pytest.mark.cuda
def test_a_model_on_the_gpu_explains_cpu_inputs_as_on_the_cpu() -> None:
    model = build_model("resnet18-digits", seed=0).eval()
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    methods = ["ig", "grad_x_input", "occlusion"]
    options = dict(labels=[0, 4, 9], methods=methods, ig_steps=16, max_delta=10.0)
    cpu = explain(model, inputs=x, **options)
    gpu = explain(model.cuda(), inputs=x, **options)  # cuDNN may use TF32: loose tolerances
    assert gpu.images.device.type == "cpu" and gpu.gradcam.device.type == "cpu"
    torch.testing.assert_close(gpu.gradcam, cpu.gradcam, atol=1e-3, rtol=1e-2)
    for a, b in zip(gpu.items, cpu.items):
        for sa, sb in zip(a.attributions, b.attributions):
            torch.testing.assert_close(sa.scores, sb.scores, atol=1e-3, rtol=1e-2)
