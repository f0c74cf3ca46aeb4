"""Optimizers by name, parameter groups, learning-rate schedules and gradient clipping.

Works on any ``nn.Module``; nothing here knows about baobab's model families.
"""

from baobab.optim.clip import clip_gradients
from baobab.optim.config import OPTIMIZER_NAMES, SCHEDULE_NAMES, OptimConfig, ScheduleConfig
from baobab.optim.factory import build_optimizer, is_full_batch, param_groups
from baobab.optim.muon import MuonWithAdamW
from baobab.optim.schedule import build_scheduler, lr_factor

__all__ = [
    "OPTIMIZER_NAMES",
    "SCHEDULE_NAMES",
    "MuonWithAdamW",
    "OptimConfig",
    "ScheduleConfig",
    "build_optimizer",
    "build_scheduler",
    "clip_gradients",
    "is_full_batch",
    "lr_factor",
    "param_groups",
]
