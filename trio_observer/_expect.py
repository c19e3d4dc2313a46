"""Waiting for a pattern in a captured stream: the search behind ``OutputLog.expect``.

A search reads the log through a cursor of its own, so it never takes data
from another reader, and keeps at most ``max_bytes`` of history, like the
backlog it reads. This module only looks at the log through its cursor and
its wakeup lot; it imports ``_output`` for type checking only, so that
``_output`` can import it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, final

import trio

if TYPE_CHECKING:
    from ._output import OutputLog


@final
@dataclass(frozen=True, slots=True)
class ExpectMatch:
    """Where :meth:`OutputLog.expect` found its pattern.

    Chain searches with ``since=match.end`` to look for the next thing
    strictly after this one.
    """

    start: int
    """Absolute offset of the first matched byte."""
    end: int
    """Absolute offset just past the last matched byte."""
    data: bytes
    """The matched bytes."""
    before: bytes
    """The bytes between the search start and the match: only the newest
    ``max_bytes`` searched are kept, and none from before a gap (if the
    search lost bytes; see ``missed_bytes``)."""
    match: re.Match[bytes] | None
    """The regex match (over ``before + data + ...``), or None for a literal."""
    missed_bytes: int = 0
    """Bytes evicted from the backlog before the search could look at them;
    0 unless the search fell more than ``max_bytes`` behind."""


class ExpectTimeout(TimeoutError):
    """:meth:`OutputLog.expect` timed out; ``seen`` holds what it searched."""

    def __init__(self, message: str, *, seen: bytes, missed_bytes: int) -> None:
        super().__init__(message)
        self.seen = seen
        """The bytes searched without a match (at most ``max_bytes``, the newest)."""
        self.missed_bytes = missed_bytes
        """Bytes that arrived after the search start but were never searched."""


class ExpectEOF(EOFError):
    """The stream ended before :meth:`OutputLog.expect` found its pattern."""

    def __init__(self, message: str, *, seen: bytes, missed_bytes: int) -> None:
        super().__init__(message)
        self.seen = seen
        """The bytes searched without a match (at most ``max_bytes``, the newest)."""
        self.missed_bytes = missed_bytes
        """Bytes that arrived after the search start but were never searched."""


def compile_pattern(
    pattern: str | bytes | re.Pattern[bytes],
) -> tuple[bytes, re.Pattern[bytes] | None]:
    """Return ``(literal, None)`` or ``(b"", regex)``; reject str regexes and non-patterns."""
    if isinstance(pattern, str):
        return pattern.encode("utf-8"), None
    if isinstance(pattern, (bytes, bytearray, memoryview)):
        return bytes(pattern), None
    if isinstance(pattern, re.Pattern):
        if isinstance(pattern.pattern, str):
            raise TypeError(
                "pattern: a regex compiled from str cannot search bytes; "
                "compile it from bytes, e.g. re.compile(rb'...')"
            )
        return b"", pattern
    raise TypeError(
        f"pattern must be bytes, str or a compiled bytes regex, not {type(pattern).__name__}"
    )


def deadline(name: str, timeout: float | None) -> float:
    """Turn a ``timeout`` argument into an absolute trio deadline (inf for None)."""
    if timeout is None:
        return math.inf
    if not timeout >= 0:
        raise ValueError(f"{name} must be a number of seconds >= 0 or None, not {timeout!r}")
    return trio.current_time() + timeout


async def search(
    log: OutputLog,
    pattern: str | bytes | re.Pattern[bytes],
    literal: bytes,
    regex: re.Pattern[bytes] | None,
    position: int,
    # A timeout argument, not a cancel scope: expiry must raise a
    # TimeoutError carrying what was seen, which a scope cannot do.
    timeout: float | None,  # noqa: ASYNC109
) -> ExpectMatch:
    """Search ``log`` from absolute offset ``position``; see :meth:`OutputLog.expect`."""
    timeout_at = deadline("timeout", timeout)
    reader = log.cursor(position)
    max_bytes = log.max_bytes
    lot = log._data_lot
    buffer = bytearray()
    base = position  # absolute offset of buffer[0]
    scan = 0  # with a literal: no match starts before buffer[scan]
    missed = 0
    await trio.lowlevel.checkpoint()
    with trio.move_on_at(timeout_at):
        while True:
            ended = False
            while True:
                try:
                    item = reader.receive_nowait()
                except trio.WouldBlock:
                    break
                except trio.EndOfChannel:
                    ended = True
                    break
                if isinstance(item, bytes):
                    buffer += item
                else:
                    # A match must not straddle bytes nobody saw.
                    missed += item.missed_bytes
                    buffer.clear()
                    base = reader.position
                    scan = 0
            match: re.Match[bytes] | None = None
            if regex is None:
                index = buffer.find(literal, scan)
                found = index >= 0
                if found:
                    span = (index, index + len(literal))
                else:
                    scan = max(scan, len(buffer) - len(literal) + 1)
            else:
                found = regex.search(buffer) is not None
                if found:
                    # Re-run over an immutable copy so the Match handed
                    # out does not point into our reusable buffer.
                    match = regex.search(bytes(buffer))
                    assert match is not None
                    span = match.span()
            if found:
                return ExpectMatch(
                    start=base + span[0],
                    end=base + span[1],
                    data=bytes(buffer[span[0] : span[1]]),
                    before=bytes(buffer[: span[0]]),
                    match=match,
                    missed_bytes=missed,
                )
            if ended:
                raise ExpectEOF(
                    f"the stream ended before {pattern!r} appeared",
                    seen=bytes(buffer),
                    missed_bytes=missed,
                )
            excess = len(buffer) - max_bytes
            if excess > 0:
                # The search keeps no more history than the backlog does.
                # These bytes were searched, so they are not missed_bytes.
                del buffer[:excess]
                base += excess
                scan = max(0, scan - excess)
            await lot.park()
    raise ExpectTimeout(
        f"{pattern!r} did not appear within {timeout} seconds",
        seen=bytes(buffer),
        missed_bytes=missed,
    )
