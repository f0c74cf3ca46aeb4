"""Per-block training optimizations: activation checkpointing and ``torch.compile``.

Both are applied to a finished model from outside (DESIGN principle 1), to each entry of
its ``layers`` ModuleDict, in place and without renaming parameters, so checkpoints,
tensor-parallel plans and FSDP see the same names with or without them. ``parallelize``
applies them after tensor parallelism and before FSDP (see its ordering comment); a
single-device run applies them directly.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torch.distributed._composable import checkpoint

AC_MODES = ("none", "full", "selective")


@dataclass(frozen=True)
class BlockOptions:
    """How each transformer block is wrapped.

    Args:
        activation_checkpointing: none; full (every block recomputes its activations in
            backward); selective (every ``ac_every``-th block does).
        ac_every: for selective checkpointing, checkpoint blocks 0, n, 2n, ...
        compile: ``torch.compile`` each block (in place; parameter names unchanged).
        compile_model: ``torch.compile`` the whole model as one graph (one device only; any
            family, blocks or not). Per-block compile is the one that composes with FSDP.
    """

    activation_checkpointing: str = "none"
    ac_every: int = 2
    compile: bool = False
    compile_model: bool = False

    def __post_init__(self) -> None:
        if self.activation_checkpointing not in AC_MODES:
            raise ValueError(
                f"unknown activation_checkpointing '{self.activation_checkpointing}'; "
                f"choose one of: {', '.join(AC_MODES)}"
            )
        if self.ac_every < 1:
            raise ValueError(f"ac_every must be at least 1, got {self.ac_every}")

        if self.compile and self.compile_model:
            raise ValueError("set blocks.compile or blocks.compile_model, not both")

    @property
    def per_block(self) -> bool:
        return self.activation_checkpointing != "none" or self.compile


def apply_block_options(model: nn.Module, options: BlockOptions) -> nn.Module:
    """Checkpoint and/or compile the blocks of ``model.layers`` (or compile the whole model)
    in place; returns ``model``."""
    if options.compile_model:
        model.compile()
    if not options.per_block:
        return model
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleDict):
        raise ValueError(
            "activation checkpointing and per-block compile need a model with a `layers` "
            f"ModuleDict of blocks; {type(model).__name__} has none"
        )
    for position, block in enumerate(layers.values()):
        mode = options.activation_checkpointing
        if mode == "full" or (mode == "selective" and position % options.ac_every == 0):
            checkpoint(block)
        if options.compile:
            block.compile()
    return model
