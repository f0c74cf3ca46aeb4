"""Learning-rate schedules as a pure factor function and a ``LambdaLR`` around it.

Step ``s`` (0-based; the lr used by the s-th optimizer step) gets ``lr * lr_factor(s)``:
- warmup, s < W:   (s + 1) / W           (> 0 at s = 0, exactly 1.0 at s = W - 1)
- then, with progress p = (s - start) / (total - start) clamped to [0, 1]:
  constant: 1
  cosine:   m + (1 - m) * (1 + cos(pi * p)) / 2,  start = W
  linear:   m + (1 - m) * (1 - p),                start = W
  wsd:      1 before start, then linear,          start = max(W, (1 - decay_fraction) * total)
where m = min_lr_ratio; every shape reaches m at s = total and stays there.
"""

import functools
import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from baobab.optim.config import ScheduleConfig


def _check_steps(cfg: ScheduleConfig, total_steps: int) -> None:
    if not (isinstance(total_steps, int) and total_steps >= 1):
        raise ValueError(f"total_steps must be an integer >= 1, got {total_steps!r}.")
    if cfg.warmup_steps > 0 and cfg.warmup_steps >= total_steps:
        raise ValueError(
            f"warmup_steps must be < total_steps ({total_steps}), got {cfg.warmup_steps}."
        )


def lr_factor(step: int, cfg: ScheduleConfig, total_steps: int) -> float:
    """The multiplier of the peak lr at 0-based ``step`` of a ``total_steps`` run."""
    _check_steps(cfg, total_steps)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}.")
    warmup = cfg.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    if cfg.name == "constant":
        return 1.0
    start = float(warmup)
    if cfg.name == "wsd":
        start = max(start, (1.0 - cfg.decay_fraction) * total_steps)
        if step < start:
            return 1.0
    span = total_steps - start
    progress = 1.0 if span <= 0 else min(1.0, (step - start) / span)
    m = cfg.min_lr_ratio
    if cfg.name == "cosine":
        return m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return m + (1.0 - m) * (1.0 - progress)  # linear, wsd


def build_scheduler(optimizer: Optimizer, cfg: ScheduleConfig, total_steps: int) -> LambdaLR:
    """A ``LambdaLR`` scaling every group's initial lr by ``lr_factor(step, cfg, total_steps)``.

    Call ``scheduler.step()`` once after each ``optimizer.step()``.
    """
    _check_steps(cfg, total_steps)
    # partial (not a lambda) so the scheduler pickles and its state_dict round-trips.
    return LambdaLR(optimizer, functools.partial(lr_factor, cfg=cfg, total_steps=total_steps))
