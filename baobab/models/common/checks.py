"""Validation helpers for config dataclasses: each failure is one ValueError sentence."""

from collections.abc import Iterable


def check_positive(owner: str, **values: float) -> None:
    """Raise ValueError unless every value is > 0 (ints stay ints: bools are refused)."""
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"{owner}.{key} must be a positive number; got {value!r}.")


def check_fraction(owner: str, **values: float) -> None:
    """Raise ValueError unless every value lies in [0, 1)."""
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise ValueError(f"{owner}.{key} must be in [0, 1); got {value!r}.")


def check_choice(owner: str, key: str, value: object, allowed: Iterable[object]) -> None:
    """Raise ValueError unless value is one of allowed."""
    allowed = list(allowed)
    if value not in allowed:
        names = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"{owner}.{key} must be one of {names}; got {value!r}.")
