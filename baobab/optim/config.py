"""Typed, validated configs for optimizers and learning-rate schedules.

Each field is checked in ``__post_init__``; a bad value raises ``ValueError`` with one
sentence naming the field and the allowed values or range.
"""

import math
from dataclasses import dataclass

OPTIMIZER_NAMES: tuple[str, ...] = (
    "gd",
    "sgd",
    "momentum",
    "adagrad",
    "rmsprop",
    "adam",
    "adamw",
    "muon",
)
SCHEDULE_NAMES: tuple[str, ...] = ("constant", "cosine", "linear", "wsd")
IMPLEMENTATIONS: tuple[str, ...] = ("auto", "foreach", "fused", "for-loop")
MUON_ADJUST_LR: tuple[str, ...] = ("match_rms_adamw", "original")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_positive(key: str, value: object) -> None:
    if not (_is_number(value) and math.isfinite(value) and value > 0):
        raise ValueError(f"{key} must be a finite number > 0, got {value!r}.")


def _check_non_negative(key: str, value: object) -> None:
    if not (_is_number(value) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{key} must be a finite number >= 0, got {value!r}.")


def _check_unit(key: str, value: object, *, closed: bool = False) -> None:
    """Check 0 <= value < 1 (or <= 1 when ``closed``)."""
    ok = _is_number(value) and value >= 0 and (value <= 1 if closed else value < 1)
    if not ok:
        interval = "[0, 1]" if closed else "[0, 1)"
        raise ValueError(f"{key} must be in {interval}, got {value!r}.")


def _check_choice(key: str, value: object, choices: tuple[str, ...], what: str) -> None:
    if value not in choices:
        raise ValueError(
            f"unknown {what} {value!r} for {key}; choose one of: {', '.join(choices)}."
        )


@dataclass
class OptimConfig:
    """Which optimizer to build and its hyper-parameters."""

    name: str = "adamw"
    """Optimizer: gd (full-batch gradient descent), sgd, momentum (SGD with momentum),
    adagrad, rmsprop, adam, adamw, or muon (Muon on hidden matrices, AdamW on the rest)."""

    lr: float = 3e-4
    """Peak learning rate (the schedule multiplies it by a factor in [0, 1])."""

    weight_decay: float = 0.0
    """Weight decay for matrices (decoupled for adamw and muon, L2 for the others)."""

    betas: tuple[float, float] = (0.9, 0.95)
    """Adam/AdamW (and the AdamW half of muon) moving-average coefficients, each in [0, 1)."""

    eps: float = 1e-8
    """Denominator epsilon of adagrad, rmsprop, adam, adamw and the AdamW half of muon."""

    momentum: float = 0.9
    """Momentum coefficient of the `momentum` optimizer, in [0, 1)."""

    nesterov: bool = False
    """Use Nesterov momentum in the `momentum` optimizer (muon always uses Nesterov)."""

    alpha: float = 0.99
    """RMSprop smoothing constant of the squared-gradient average, in [0, 1)."""

    rmsprop_momentum: float = 0.0
    """RMSprop momentum, in [0, 1); 0 gives classic RMSprop (kept apart from `momentum` so
    switching `name` between momentum and rmsprop never changes the other's behaviour)."""

    lr_decay: float = 0.0
    """Adagrad learning-rate decay, >= 0."""

    muon_momentum: float = 0.95
    """Muon momentum coefficient, in [0, 1)."""

    muon_ns_steps: int = 5
    """Newton-Schulz iterations Muon uses to orthogonalize each update, in [1, 99]."""

    muon_lr: float | None = None
    """Muon learning rate; None uses `lr`, which suits the default `muon_adjust_lr`."""

    muon_adjust_lr: str = "match_rms_adamw"
    """How Muon scales its lr per matrix: match_rms_adamw (Moonshot: update RMS matches
    AdamW's, so one lr serves both halves) or original (Keller Jordan's sqrt(max(1, rows/cols)),
    usually paired with muon_lr around 0.02)."""

    grad_clip_norm: float | None = None
    """Clip the global gradient norm to this value (> 0); None disables it."""

    grad_clip_value: float | None = None
    """Clip each gradient element to [-value, value] (> 0) before the norm clip; None disables."""

    decay_norms_biases_embeddings: bool = False
    """Also apply weight decay to norm weights, biases and embeddings (default: only matrices)."""

    implementation: str = "auto"
    """Kernel choice: auto (torch's default; fused on CUDA where torch has a fused kernel, so
    the trainer skips a bad step with no host synchronisation), foreach, fused or for-loop; for
    muon it applies to the AdamW half. fused on an optimizer or device without fused kernels is
    refused."""

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZER_NAMES:
            raise ValueError(
                f"unknown optimizer {self.name!r}; choose one of: {', '.join(OPTIMIZER_NAMES)}."
            )
        _check_positive("lr", self.lr)
        _check_non_negative("weight_decay", self.weight_decay)
        betas = tuple(self.betas) if isinstance(self.betas, (list, tuple)) else ()
        if len(betas) != 2 or not all(_is_number(b) and 0 <= b < 1 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}.")
        self.betas = (float(betas[0]), float(betas[1]))
        _check_positive("eps", self.eps)
        _check_unit("momentum", self.momentum)
        if self.name == "momentum" and self.nesterov and self.momentum == 0:
            raise ValueError("momentum must be in (0, 1) when nesterov is true, got 0.")
        _check_unit("alpha", self.alpha)
        _check_unit("rmsprop_momentum", self.rmsprop_momentum)
        _check_non_negative("lr_decay", self.lr_decay)
        _check_unit("muon_momentum", self.muon_momentum)
        steps = self.muon_ns_steps
        if not (isinstance(steps, int) and not isinstance(steps, bool) and 1 <= steps <= 99):
            raise ValueError(f"muon_ns_steps must be an integer in [1, 99], got {steps!r}.")
        if self.muon_lr is not None:
            _check_positive("muon_lr", self.muon_lr)
        _check_choice("muon_adjust_lr", self.muon_adjust_lr, MUON_ADJUST_LR, "lr adjustment")
        if self.grad_clip_norm is not None:
            _check_positive("grad_clip_norm", self.grad_clip_norm)
        if self.grad_clip_value is not None:
            _check_positive("grad_clip_value", self.grad_clip_value)
        _check_choice("implementation", self.implementation, IMPLEMENTATIONS, "implementation")


@dataclass
class ScheduleConfig:
    """Learning-rate schedule: a linear warmup, then a decay shape.

    The factor multiplies each parameter group's initial lr; see ``lr_factor``.
    """

    name: str = "cosine"
    """Shape after warmup: constant, cosine, linear, or wsd (warmup-stable-decay)."""

    warmup_steps: int = 0
    """Steps of linear warmup from lr/warmup_steps up to lr; must be < the run's total steps."""

    decay_fraction: float = 0.2
    """wsd only: the last fraction of total steps, in [0, 1], over which lr decays linearly."""

    min_lr_ratio: float = 0.1
    """Final lr as a fraction of the peak lr, in [0, 1] (ignored by constant)."""

    def __post_init__(self) -> None:
        if self.name not in SCHEDULE_NAMES:
            raise ValueError(
                f"unknown schedule {self.name!r}; choose one of: {', '.join(SCHEDULE_NAMES)}."
            )
        warmup = self.warmup_steps
        if not (isinstance(warmup, int) and not isinstance(warmup, bool) and warmup >= 0):
            raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup!r}.")
        _check_unit("decay_fraction", self.decay_fraction, closed=True)
        _check_unit("min_lr_ratio", self.min_lr_ratio, closed=True)
