"""Argument checks shared by the public entry points, with one wording."""

from __future__ import annotations

import math
import signal


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


def check_seconds(
    name: str, value: float, *, positive: bool = False, allow_infinite: bool = True
) -> float:
    """Return ``value`` as a float if it is a valid number of seconds.

    ``math.inf`` is allowed unless ``allow_infinite`` is false: a grace
    period that never runs out is a choice. Every finite value must also be
    one the trio clock can add to its current time, so an int too large for
    a float (``10**400``) is refused here rather than raising
    ``OverflowError`` in the middle of a teardown.

    Raises:
      TypeError: ``value`` is not a number (a bool is not one).
      ValueError: ``value`` is negative (or zero, when ``positive``), NaN,
        too large for a float, or infinite when that is not allowed.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
    try:
        seconds = float(value)
    except OverflowError:
        raise ValueError(
            f"{name} must be a number of seconds a float can hold, got an int of "
            f"{int(value).bit_length()} bits"
        ) from None
    bound = "> 0" if positive else ">= 0"
    if not (seconds > 0 if positive else seconds >= 0):  # NaN fails this too
        raise ValueError(f"{name} must be {bound} seconds, got {value!r}")
    if not allow_infinite and math.isinf(seconds):
        raise ValueError(f"{name} must be a finite number of seconds {bound}, got {value!r}")
    return seconds


def check_bool(name: str, value: bool) -> bool:
    """Return ``value`` if it is a bool: a flag given ``"yes"`` or ``1`` is a mistake.

    Raises:
      TypeError: ``value`` is not a bool.
    """
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, not {value!r}")
    return value


def check_signal(name: str, value: int) -> int:
    """Return ``value`` if it is a signal this platform has (or 0, which only checks).

    Raises:
      TypeError: ``value`` is not an int (a bool is not one).
      ValueError: no signal has that number here.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a signal number, not {value!r}")
    if value != 0 and value not in _VALID_SIGNALS:
        raise ValueError(f"{name}: no signal {value} on this platform")
    return value


def check_bytes(name: str, value: bytes | bytearray | memoryview) -> None:
    """Refuse what is not bytes-like: ``bytes(3)`` would be three NUL bytes.

    Raises:
      TypeError: ``value`` is not ``bytes``, ``bytearray`` or ``memoryview``.
    """
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError(
            f"{name} must be bytes, bytearray or memoryview, not {type(value).__name__}"
        )


_VALID_SIGNALS: frozenset[int] = frozenset(int(s) for s in signal.valid_signals())
