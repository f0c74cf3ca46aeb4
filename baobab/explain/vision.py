"""Explanations of image and vector models (resnet, mlp), by Captum around the finished model.

Images (N, C, H, W) in [0, 1] give an ``ImageExplanation``: integrated gradients, gradient ×
input and occlusion maps shaped like one image, and for a resnet a Grad-CAM heat-map at the
deepest stage whose feature map is at least 2x2 (on 8x8 digits the last stage is 1x1, where
Grad-CAM can only say "everywhere"). An mlp reads each image flattened in (C, H, W) order.
Vectors (N, F) or (F,) give a ``FeatureExplanation`` with one score per feature.

The explained value is the label's logit for a classifier (label: the one asked for, else
the argmax) and the selected output (default 0) for a regression mlp. Every method starts
from a zero baseline (a black image, a zero vector). Integrated gradients integrate one input
at a time piece by piece (``paths.py``): a ReLU network's path gradient is piecewise
constant, where one Gauss-Legendre rule converges only as 1/steps.

Work units (``progress``): every row of every forward pass, as for text: integrated
gradients' integration points plus two rows per piece for its delta, one per input for
gradient × input and for Grad-CAM, one per occluded window per input plus the unoccluded
one for occlusion; ``input_work`` bounds the total in advance. Inputs are explained in
chunks of at most ``internal_batch_size`` rows so that no Captum batch holds more.

Shape legend: N inputs, C channels, H height, W width, F features, K outputs.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from captum.attr import (
    InputXGradient,
    LayerAttribution,
    LayerGradCam,
    Occlusion,
)
from torch import nn

from baobab.explain.paths import integrated_gradients, max_rows
from baobab.explain.types import (
    Attribution,
    ExplainError,
    FeatureExplanation,
    ImageExplanation,
    InputItem,
)

Progress = Callable[[int], None]
GRADCAM_CANDIDATES = ("layer4", "layer3", "layer2", "layer1", "maxpool")
"""ResNet modules Grad-CAM may read, deepest first; ``maxpool`` is the stem's output (an
``nn.Identity`` with ``small_input``)."""


class _Counted:
    """The forward function Captum calls, reporting the rows of each pass as work units
    (Captum calls it once per internal batch, so the server may pause between them)."""

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], progress: Progress):
        self.forward, self.progress = forward, progress

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.forward(x)
        self.progress(x.shape[0])
        return out


def _task(model: nn.Module, family: str) -> str:
    if family == "resnet":
        return "classification"
    if family == "mlp":
        return model.cfg.task
    raise ExplainError(f"a {family} model is not an image or vector model; use resnet or mlp.")


def _check_inputs(model: nn.Module, family: str, inputs: torch.Tensor) -> torch.Tensor:
    """``inputs`` as a batch: (N, C, H, W) images or (N, F) vectors (a 1-D vector is one row)."""
    if family == "resnet":
        c = model.cfg.in_channels
        expected = f"images shaped (N, {c}, H, W) with values in [0, 1]"
    else:
        f = model.cfg.in_features
        expected = f"vectors shaped (N, {f}) or images (N, C, H, W) with C*H*W = {f}"
    if not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point():
        raise ExplainError(f"a {family} model explains floating-point {expected}.")
    if inputs.dim() == 1:
        inputs = inputs[None]
    if inputs.dim() not in (2, 4) or inputs.shape[0] == 0:
        raise ExplainError(
            f"a {family} model explains {expected}; got shape {tuple(inputs.shape)}."
        )
    if family == "resnet" and (inputs.dim() != 4 or inputs.shape[1] != c):
        raise ExplainError(f"a resnet model explains {expected}; got shape {tuple(inputs.shape)}.")
    if family == "mlp" and math.prod(inputs.shape[1:]) != f:
        raise ExplainError(
            f"this mlp takes {f} input features, so it explains {expected}; "
            f"got shape {tuple(inputs.shape)}."
        )
    if not torch.isfinite(inputs).all():
        raise ExplainError("inputs must be finite (no NaN or infinity).")
    if inputs.dim() == 4 and not bool(((inputs >= 0) & (inputs <= 1)).all()):
        raise ExplainError("images must hold values in [0, 1].")
    return inputs


def _is_index(y: object) -> bool:
    """An integer label (int, numpy or 0-d torch integer), not a bool or a float."""
    if isinstance(y, bool) or (isinstance(y, torch.Tensor) and y.dtype == torch.bool):
        return False
    try:
        operator.index(y)
    except TypeError:
        return False
    return True


def _targets(
    outputs: torch.Tensor, task: str, labels: Sequence[int] | None
) -> tuple[list[int], list[int | None]]:
    """Captum's output index per input and the label each item reports (None for a
    single-output regression)."""
    n, k = outputs.shape
    if labels is not None:
        labels = list(labels)
        if len(labels) != n:
            raise ExplainError(f"got {len(labels)} labels for {n} inputs; give one per input.")
        bad = [y for y in labels if not _is_index(y) or not 0 <= operator.index(y) < k]
        if bad:
            what = "a class" if task == "classification" else "an output index"
            raise ExplainError(f"label {bad[0]!r} is not {what} of this model (0 to {k - 1}).")
        labels = [operator.index(y) for y in labels]
        return labels, list(labels)
    if task == "classification":
        predicted = outputs.argmax(dim=1).tolist()
        return predicted, predicted
    return [0] * n, [None if k == 1 else 0] * n


def gradcam_layer(model: nn.Module, image_hw: tuple[int, int]) -> str | None:
    """The deepest of ``GRADCAM_CANDIDATES`` whose output map is at least 2x2 for images of
    ``image_hw``, found by a hooked forward of one black image; None if there is none."""
    names = [name for name in GRADCAM_CANDIDATES if hasattr(model, name)]
    if not names:
        return None
    sizes: dict[str, tuple[int, ...]] = {}
    # Forward hooks that only read shapes: the inplace ReLUs cannot disturb them.
    hooks = [
        getattr(model, name).register_forward_hook(
            lambda _m, _i, out, name=name: sizes.__setitem__(name, tuple(out.shape[-2:]))
        )
        for name in names
    ]
    param = next(model.parameters())
    x = torch.zeros(1, model.cfg.in_channels, *image_hw, dtype=param.dtype, device=param.device)
    training = model.training  # eval: train-mode BatchNorm would update its statistics
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    finally:
        model.train(training)
        for hook in hooks:
            hook.remove()
    return next((name for name in names if min(sizes.get(name, (0,))) >= 2), None)


def _windows(shape: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Occlusion's sliding window and strides for one input: every channel at once and a
    quarter of each side (stride half a window) for an image, one feature for a vector."""
    if len(shape) == 1:
        return (1,), (1,)
    c, h, w = shape
    wh, ww = max(1, h // 4), max(1, w // 4)
    return (c, wh, ww), (c, max(1, wh // 2), max(1, ww // 2))


def occlusion_windows(shape: Sequence[int]) -> int:
    """How many windows occlusion slides over one input of ``shape`` (as Captum counts:
    the last window of each side may overhang, so every element is covered)."""
    window, strides = _windows(shape)
    return math.prod(math.ceil((d - k) / s) + 1 for d, k, s in zip(shape, window, strides))


def input_work(
    model: nn.Module, shape: Sequence[int], methods: Sequence[str], ig_steps: int
) -> int:
    """Work units ``explain_inputs`` reports for inputs of ``shape`` ((N, C, H, W), (N, F)
    or (F,)), at most: a bound on the total of its ``progress`` calls, for a progress bar's
    total or a work limit."""
    shape = tuple(shape) if len(shape) != 1 else (1, *shape)
    n, one = shape[0], shape[1:]
    # Integrated gradients: at most (a smooth path stops refining early).
    per_input = {
        "ig": max_rows(ig_steps),
        "grad_x_input": 1,
        "occlusion": 1 + occlusion_windows(one),
    }
    units = n * sum(per_input[m] for m in methods)
    if len(one) == 3 and gradcam_layer(model, one[1:]) is not None:
        units += n  # one Grad-CAM pass per image
    return units


def _attribute(
    method: str,
    forward: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    target: list[int],
    progress: Progress,
    ig_steps: int,
    max_delta: float,
    internal_batch_size: int,
) -> tuple[torch.Tensor, list[float] | None]:
    """One method's scores for a chunk x (n, ...) with n <= internal_batch_size and, for
    integrated gradients, each input's convergence delta bound (refused over max_delta)."""
    counted = _Counted(forward, progress)
    if method == "ig":
        scores, deltas = [], []
        for row, k in zip(x, target):
            # paths.py integrates one input of a scalar function: the target's output.
            attr, delta = integrated_gradients(
                lambda z, k=k: counted(z)[:, k],
                row[None],
                torch.zeros_like(row[None]),
                ig_steps,
                max_delta,
                internal_batch_size,
            )
            scores.append(attr)
            deltas.append(delta)
        return torch.cat(scores), deltas
    if method == "grad_x_input":
        ixg = InputXGradient(counted)
        return ixg.attribute(x.clone().requires_grad_(), target=target), None
    window, strides = _windows(x.shape[1:])
    scores = Occlusion(counted).attribute(
        x,
        sliding_window_shapes=window,
        strides=strides,
        baselines=0.0,
        target=target,
        perturbations_per_eval=max(1, internal_batch_size // x.shape[0]),
    )
    return scores, None


def _gradcam(
    model: nn.Module, layer: str, x: torch.Tensor, target: list[int], progress: Progress
) -> torch.Tensor:
    """Grad-CAM (n, H, W) of chunk x (n, C, H, W): channel-weighted ``layer`` activations,
    ReLU'd, upsampled bilinearly to the image. Captum's hook returns a clone of the layer's
    output, so the stages' inplace ReLUs never overwrite what it differentiates."""
    cam = LayerGradCam(_Counted(model, progress), getattr(model, layer))
    heat = cam.attribute(x, target=target, relu_attributions=True)  # (n, 1, h, w)
    heat = LayerAttribution.interpolate(heat, tuple(x.shape[-2:]), "bilinear")
    return F.relu(heat)[:, 0].detach()


def explain_inputs(
    model: nn.Module,
    family: str,
    inputs: torch.Tensor,
    labels: Sequence[int] | None,
    *,
    methods: list[str],
    ig_steps: int,
    max_delta: float,
    internal_batch_size: int,
    progress: Callable[[int], None],
) -> ImageExplanation | FeatureExplanation:
    """Explain a resnet or mlp on ``inputs`` (see the module docstring); called by
    ``baobab.explain.explain``, which has checked the methods and options.

    Integrated gradients whose convergence delta bound (``paths.py``) still exceeds
    ``max_delta`` for any input at ``ig_steps`` points are refused (ExplainError). The
    model is left in eval mode, with no hooks and no
    parameter gradients.
    """
    task = _task(model, family)
    inputs = _check_inputs(model, family, inputs)
    is_image = inputs.dim() == 4
    param = next(model.parameters())
    x_all = inputs.detach().to(device=param.device, dtype=param.dtype)  # the model's dtype
    # An mlp reads an image flattened in (C, H, W) order; Captum sees the unflattened input.
    forward = (lambda x: model(x.flatten(1))) if family == "mlp" and is_image else model
    model.eval()
    with torch.no_grad():
        outputs = forward(x_all)  # (N, K)
    targets, item_labels = _targets(outputs, task, labels)
    values = outputs.gather(1, torch.tensor(targets, device=outputs.device)[:, None])[:, 0]
    probs = outputs.softmax(dim=1) if task == "classification" else None

    layer = None
    if family == "resnet":
        layer = gradcam_layer(model, tuple(inputs.shape[-2:]))
    scores: dict[str, list[torch.Tensor]] = {m: [] for m in methods}
    deltas: list[float] = []
    heat: list[torch.Tensor] = []
    for start in range(0, len(x_all), internal_batch_size):
        x = x_all[start : start + internal_batch_size]
        target = targets[start : start + internal_batch_size]
        for method in methods:
            s, delta = _attribute(
                method, forward, x, target, progress, ig_steps, max_delta, internal_batch_size
            )
            deltas += delta or []
            scores[method].append(s.detach())
        if layer is not None:
            heat.append(_gradcam(model, layer, x, target, progress))

    by_method = {m: torch.cat(s).float().cpu() for m, s in scores.items()}
    items = [
        InputItem(
            index=i,
            label=item_labels[i],
            label_name=None,
            value=float(values[i]),
            probability=None if probs is None else float(probs[i, targets[i]]),
            attributions=[
                Attribution(
                    method=m,
                    scores=by_method[m][i],
                    delta=deltas[i] if m == "ig" else None,
                )
                for m in methods
            ],
        )
        for i in range(len(inputs))
    ]
    common = dict(family=family, items=items, methods=list(methods), ig_steps=ig_steps)
    if not is_image:
        names = [f"x{j}" for j in range(inputs.shape[1])]
        return FeatureExplanation(
            inputs=inputs.detach().float().cpu(), feature_names=names, **common
        )
    return ImageExplanation(
        images=inputs.detach().float().cpu(),
        gradcam=torch.cat(heat).float().cpu() if heat else None,
        gradcam_layer=layer,
        **common,
    )


__all__ = [
    "GRADCAM_CANDIDATES",
    "explain_inputs",
    "gradcam_layer",
    "input_work",
    "occlusion_windows",
]
