"""The training loop, its objectives, evaluation and reporting."""

from baobab.train.config import DataConfig, FaultConfig, ModelSpec, RunConfig, TrainerConfig
from baobab.train.objectives import Objective, build_objective
from baobab.train.run import build_trainer, run
from baobab.train.trainer import Trainer, TrainingError, TrainResult

__all__ = [
    "DataConfig",
    "FaultConfig",
    "ModelSpec",
    "Objective",
    "RunConfig",
    "TrainResult",
    "Trainer",
    "TrainerConfig",
    "TrainingError",
    "build_objective",
    "build_trainer",
    "run",
]
