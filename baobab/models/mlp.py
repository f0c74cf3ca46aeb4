"""Multi-layer perceptron; the default is the seed network Linear(10, 5) -> ReLU -> Linear(5, 1).

Layers are attributes ``fc1``, ``fc2``, ... so the seed's state_dict keys are unchanged.

Shape legend: B batch, I in_features, O out_features.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from baobab.models.common import check_choice, check_positive
from baobab.models.common.init import InitFn, linear_default

ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}
TASKS = ("regression", "classification")


@dataclass(frozen=True)
class MLPConfig:
    """Shape of a fully connected network."""

    in_features: int = 10
    """Width of the input vector."""
    hidden: tuple[int, ...] = (5,)
    """Widths of the hidden layers, in order; empty for a single linear layer."""
    out_features: int = 1
    """Width of the output (1 for scalar regression, the class count for classification)."""
    activation: str = "relu"
    """Nonlinearity between layers: relu, gelu, silu, tanh or sigmoid."""
    task: str = "regression"
    """Objective the trainer uses: regression (MSE) or classification (cross-entropy)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden", tuple(self.hidden))  # lists from YAML/CLI
        check_positive("MLPConfig", in_features=self.in_features, out_features=self.out_features)
        for width in self.hidden:
            if isinstance(width, bool) or not isinstance(width, int) or width <= 0:
                raise ValueError(f"MLPConfig.hidden must hold positive ints; got {self.hidden!r}.")
        check_choice("MLPConfig", "activation", self.activation, ACTIVATIONS)
        check_choice("MLPConfig", "task", self.task, TASKS)


class MLP(nn.Module):
    """forward(x (B, I)) -> (B, O); the activation follows every layer but the last."""

    def __init__(self, cfg: MLPConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.act = ACTIVATIONS[cfg.activation]
        widths = (cfg.in_features, *cfg.hidden, cfg.out_features)
        self.n_linear = len(widths) - 1
        with torch.device("meta"):
            for i in range(self.n_linear):
                setattr(self, f"fc{i + 1}", nn.Linear(widths[i], widths[i + 1]))
        # Built on meta; build_model allocates it and fills it by init_rules().

    def _linears(self) -> list[nn.Linear]:
        return [getattr(self, f"fc{i + 1}") for i in range(self.n_linear)]

    def init_rules(self) -> dict[str, InitFn]:
        """How every tensor starts, by name (see baobab.models.common.init): each layer at
        nn.Linear's default distributions for its fan-in."""
        rules: dict[str, InitFn] = {}
        for i, lin in enumerate(self._linears()):
            rules[f"fc{i + 1}.weight"], rules[f"fc{i + 1}.bias"] = linear_default(lin.in_features)
        return rules

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        *hidden, last = self._linears()
        for lin in hidden:
            x = self.act(lin(x))  # (B, hidden_i)
        return last(x)  # (B, O)
