"""Deterministic initialisation shared by every family."""

import torch
from torch import nn


def materialize(model: nn.Module) -> None:
    """Move a model whose submodules were built on meta to the default device, then init it.

    Every family builds its submodules under ``torch.device("meta")`` and finishes with this
    call. Construction therefore draws no random numbers and allocates nothing, so the
    weights depend only on the RNG state when ``init_weights()`` runs: a direct build, and a
    meta build followed by ``to_empty(device=...)`` and ``init_weights()``, give the same
    weights under the same seed. The default device honours ``with torch.device(...)``.
    """
    model.to_empty(device=torch.get_default_device())
    model.init_weights()
