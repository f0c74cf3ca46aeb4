"""Gradient clipping that always reports the global gradient norm."""

from collections.abc import Iterable

import torch


def clip_gradients(
    parameters: Iterable[torch.Tensor] | torch.Tensor,
    max_norm: float | None,
    max_value: float | None,
) -> torch.Tensor:
    """Clip gradients by value, then by global L2 norm; return the total norm.

    The norm is measured after value clipping and before norm clipping, and is computed
    even when ``max_norm`` is None (for logging). A non-finite norm is returned as is;
    the caller decides whether to skip the step. torch picks its foreach kernels where
    the device supports them.
    """
    if max_norm is not None and not max_norm > 0:
        raise ValueError(f"max_norm must be > 0 or None, got {max_norm!r}.")
    if max_value is not None and not max_value > 0:
        raise ValueError(f"max_value must be > 0 or None, got {max_value!r}.")
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    if max_value is not None:
        torch.nn.utils.clip_grad_value_(params, max_value)
    if max_norm is not None:
        return torch.nn.utils.clip_grad_norm_(params, max_norm, error_if_nonfinite=False)
    grads = [p.grad for p in params if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads, error_if_nonfinite=False)
