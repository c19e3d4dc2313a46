"""Argument checks shared by the public entry points, with one wording."""

from __future__ import annotations


def check_int(name: str, value: int, *, minimum: int) -> int:
    """Return ``value`` if it is an int (not a bool) of at least ``minimum``.

    Raises:
      TypeError: ``value`` is not an int.
      ValueError: ``value`` is less than ``minimum``.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_seconds(name: str, value: float) -> float:
    """Return ``value`` if it is a non-negative number of seconds.

    ``math.inf`` is allowed: a grace period that never runs out is a choice.

    Raises:
      TypeError: ``value`` is not a number.
      ValueError: ``value`` is negative or NaN.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
    if not value >= 0:  # NaN fails this too
        raise ValueError(f"{name} must be >= 0 seconds, got {value!r}")
    return value
