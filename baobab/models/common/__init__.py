"""Blocks and helpers shared by the model families."""

from baobab.models.common.checks import check_choice, check_fraction, check_positive
from baobab.models.common.init import materialize
from baobab.models.common.rope import apply_rotary, rope_cos_sin, rotate_half

__all__ = [
    "apply_rotary",
    "check_choice",
    "check_fraction",
    "check_positive",
    "materialize",
    "rope_cos_sin",
    "rotate_half",
]
