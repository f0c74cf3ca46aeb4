"""Tolerances for the numerical-equivalence tests, derived once, and a comparison that says
where it fails.

Two runs of the same math (one process and a parallel layout, eager and compiled, this CPU
and another) sum in different orders, so float32 results differ in their last bits. What
that noise can do depends on what is compared:

- Losses, logits, gradients: a forward or backward pass of a tiny model rounds a few hundred
  times; reordering moves a result by ~1e-7 relative (measured: at most 4.2e-7 over 20
  training steps between AVX512, AVX2 and default kernels). ``FLOAT32`` and ``LOSS_RTOL``
  allow 1e-5: 20x that, and still far below any real bug (a wrong shard, a bias added twice).
- Parameters after SGD: a step moves a parameter by ``lr * grad``; runs whose gradients agree
  to rounding differ after it by rounding, at most an ulp or two of the tensor's scale per
  step. ``sgd_tolerance(steps, scale)`` allows 2 ulps a step.
- Parameters after Adam: its step is ``lr * m / (sqrt(v) + eps)``, about ``lr`` per element
  whatever the gradient's size, so an element whose gradient is near zero (crossing zero, or
  zero in exact arithmetic) turns a last-bit difference into a difference of up to ``lr``
  per step. No elementwise bound below ``~2 * sum(lr)`` is guaranteed, and that one would
  let a tensor that never trained pass. ``adam_tolerance(lr_sum)`` therefore has two tiers:
  every element within ``1e-5 + 1e-5*|x| + ADAM_NOISE * lr_sum``, and at most
  ``OUTLIER_FRACTION`` of a tensor's elements (at least one) beyond the float32 tier. The
  noise reaches single, isolated elements; a bug moves a block (a shard, a row, a tensor).
  Measured on gpt-nano, 20 AdamW steps, lr_sum 0.0356, TP-2 vs one process across AVX512,
  AVX2 and default kernels: largest difference 3.6e-5 = 1.0e-3 * lr_sum, at most 1 element of
  a tensor beyond 1e-5 (of 2048), 99.9% of all elements within 2.7e-6. ADAM_NOISE = 1e-2
  leaves 10x over that worst element and stays ~30x below how far Adam moves a parameter.

``KERNELS`` are environments that make ATen, oneDNN and MKL take other vector code paths in
a child process, as another CPU would; the distributed tests run their workers under them
against a reference computed with this process's kernels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

FLOAT32_ATOL = 1e-5
FLOAT32_RTOL = 1e-5
LOSS_RTOL = 1e-5
ADAM_NOISE = 1e-2  # of lr_sum: Adam's noise allowance for isolated elements (see above)
OUTLIER_FRACTION = 1e-2  # of a tensor's elements, at least one, may use that allowance
EPS32 = torch.finfo(torch.float32).eps  # 2**-23, one ulp at 1.0

# name -> variables that change kernels (set before torch loads; unknown values are ignored
# with a warning, e.g. on ARM). "inherited" keeps this process's own kernels.
KERNELS: dict[str, dict[str, str]] = {
    "inherited": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "default": {
        "ATEN_CPU_CAPABILITY": "default",  # scalar ATen kernels
        "ONEDNN_MAX_CPU_ISA": "SSE41",  # LSTM, conv
        "MKL_CBWR": "COMPATIBLE",  # MKL's sgemm (matmul, linear) on its portable path
    },
}


@dataclass(frozen=True)
class Tolerance:
    """``|got - want| <= atol + rtol*|want|`` for every element, except that up to
    ``outlier_fraction`` of a tensor's elements (at least one, when the fraction is > 0) may
    reach ``outlier_atol + rtol*|want|`` instead."""

    atol: float
    rtol: float
    outlier_atol: float = 0.0
    outlier_fraction: float = 0.0

    def allowed_outliers(self, numel: int) -> int:
        if self.outlier_fraction <= 0 or self.outlier_atol <= self.atol:
            return 0
        return max(1, math.floor(self.outlier_fraction * numel))

    def __str__(self) -> str:
        text = f"{self.atol:.3g} + {self.rtol:.3g}*|want|"
        if self.outlier_fraction > 0 and self.outlier_atol > self.atol:
            text += (
                f" (up to {self.outlier_fraction:.3g} of the elements, at least one,"
                f" {self.outlier_atol:.3g} + {self.rtol:.3g}*|want|)"
            )
        return text


FLOAT32 = Tolerance(FLOAT32_ATOL, FLOAT32_RTOL)


def adam_tolerance(lr_sum: float) -> Tolerance:
    """Parameters after AdamW steps whose learning rates sum to ``lr_sum`` (see above)."""
    if lr_sum < 0:
        raise ValueError(f"lr_sum must be >= 0; got {lr_sum}.")
    return Tolerance(
        FLOAT32_ATOL, FLOAT32_RTOL, FLOAT32_ATOL + ADAM_NOISE * lr_sum, OUTLIER_FRACTION
    )


def sgd_tolerance(steps: int, scale: float) -> Tolerance:
    """Parameters of size ``<= scale`` after ``steps`` plain SGD steps: 2 ulps of the scale
    a step (each run rounds the update once; the gradients agree to rounding)."""
    if steps < 0 or scale <= 0:
        raise ValueError(f"steps must be >= 0 and scale > 0; got {steps} and {scale}.")
    return Tolerance(2 * steps * EPS32 * scale, 0.0)


def lr_sum(records: Sequence[Mapping]) -> float:
    """The sum of the learning rates of training records (``metrics.jsonl`` lines with a loss)."""
    return sum(r["lr"] for r in records if "loss" in r)


def _index(flat: int, shape: torch.Size) -> list[int]:
    return [int(i) for i in torch.unravel_index(torch.tensor(flat), shape)] if shape else []


def check_tensor(name: str, got: torch.Tensor, want: torch.Tensor, tol: Tolerance) -> dict:
    """What a reader needs to judge one comparison: the element furthest beyond its tolerance,
    its place, both values and tolerance, the largest difference, how many elements exceed
    each tier, and the verdict ``ok``. Plain numbers: workers send it back as JSON."""
    if got.shape != want.shape:
        return {"name": name, "ok": False, "error": f"shape {tuple(got.shape)} != {tuple(want.shape)}"}  # fmt: skip
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    diff = (got - want).abs()
    diff[torch.isnan(got) & torch.isnan(want)] = 0.0  # both NaN: equal
    diff[torch.isnan(diff)] = math.inf  # one NaN, or inf - inf
    tight = tol.atol + tol.rtol * want.abs()
    loose = torch.maximum(tight, tol.outlier_atol + tol.rtol * want.abs())
    beyond_tight, beyond_loose = int((diff > tight).sum()), int((diff > loose).sum())
    allowed = tol.allowed_outliers(want.numel())
    flat = int((diff - tight).flatten().argmax()) if want.numel() else 0
    report = {
        "name": name,
        "ok": beyond_loose == 0 and beyond_tight <= allowed,
        "numel": want.numel(),
        "max_diff": float(diff.max()) if want.numel() else 0.0,
        "index": _index(flat, want.shape),
        "got": float(got.flatten()[flat]) if want.numel() else None,
        "want": float(want.flatten()[flat]) if want.numel() else None,
        "tolerance": float(tight.flatten()[flat]) if want.numel() else tol.atol,
        "beyond": beyond_tight,
        "allowed": allowed,
        "beyond_outlier_bound": beyond_loose,
    }
    return report


def describe(report: dict, tol: Tolerance) -> str:
    """One line: name, largest difference, where, both values, the tolerance and the counts."""
    if "error" in report:
        return f"{report['name']}: {report['error']}"
    index = "[" + ", ".join(map(str, report["index"])) + "]"
    line = (
        f"{report['name']}{index}: got {report['got']:.8g}, want {report['want']:.8g},"
        f" |diff| {abs(report['got'] - report['want']):.3g} > tolerance"
        f" {report['tolerance']:.3g} (largest |diff| {report['max_diff']:.3g});"
        f" {report['beyond']} of {report['numel']} elements beyond it"
    )
    if report["allowed"]:
        line += (
            f" ({report['allowed']} allowed), {report['beyond_outlier_bound']} beyond"
            f" {tol.outlier_atol:.3g} + {tol.rtol:.3g}*|want|"
        )
    return line


def check_tensors(
    got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor], tol: Tolerance
) -> list[dict]:
    """``check_tensor`` for each name; a name on one side only is a failure."""
    reports = [check_tensor(n, got[n], want[n], tol) for n in want if n in got]
    for n in sorted(set(got) ^ set(want)):
        reports.append({"name": n, "ok": False, "error": "present in one state dict only"})
    return reports


def failures(reports: Sequence[dict], tol: Tolerance, what: str = "tensors") -> str:
    """An assertion message listing every failed comparison, worst first; '' when all pass."""
    bad = sorted((r for r in reports if not r["ok"]), key=lambda r: -r.get("max_diff", math.inf))
    if not bad:
        return ""
    lines = [f"{len(bad)} of {len(reports)} {what} differ beyond {tol}:"]
    return "\n".join(lines + [describe(r, tol) for r in bad])


def assert_tensors_close(
    got: Mapping[str, torch.Tensor] | torch.Tensor,
    want: Mapping[str, torch.Tensor] | torch.Tensor,
    tol: Tolerance = FLOAT32,
    what: str = "tensors",
) -> list[dict]:
    """Fails with the numbers and the place of every mismatch; returns the reports."""
    if isinstance(want, torch.Tensor):
        got, want = {what: got}, {what: want}
    reports = check_tensors(got, want, tol)
    message = failures(reports, tol, what)
    assert not message, message
    return reports


def assert_losses_close(
    got: Sequence[float], want: Sequence[float], rtol: float = LOSS_RTOL, what: str = "loss"
) -> None:
    """Step-by-step relative agreement; fails naming the worst step and both values."""
    assert len(got) == len(want), f"{len(got)} {what} values, want {len(want)}"
    rel = [abs(g - w) / max(abs(w), 1e-30) for g, w in zip(got, want)]
    worst = max(range(len(rel)), key=rel.__getitem__, default=None)
    assert worst is None or rel[worst] <= rtol, (
        f"{what} at step {worst + 1} of {len(rel)}: got {got[worst]!r}, want {want[worst]!r},"
        f" relative difference {rel[worst]:.3g} > {rtol:.3g}"
        f" ({sum(r > rtol for r in rel)} steps beyond it)"
    )
