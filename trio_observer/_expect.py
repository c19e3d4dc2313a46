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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, final

import trio

from ._checks import check_seconds

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
    """The match of a bytes regex (over ``before + data + ...``), else None."""
    missed_bytes: int = 0
    """Bytes evicted from the backlog before the search could look at them;
    0 unless the search fell more than ``max_bytes`` behind."""
    text_match: re.Match[str] | None = None
    """The match of a ``str`` regex, over the decoded text, else None."""
    index: int = 0
    """Which pattern matched: its index in the list given to ``expect``
    (pexpect's return value), 0 for a single pattern."""


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


Pattern = str | bytes | re.Pattern[bytes] | re.Pattern[str]
"""One thing ``expect`` can wait for."""


@dataclass(slots=True)
class _Compiled:
    literal: bytes
    regex: re.Pattern[bytes] | None
    text: re.Pattern[str] | None
    scan: int = 0  # with a literal: no match starts before buffer[scan]


def compile_patterns(
    pattern: Pattern | Sequence[Pattern], encoding: str
) -> tuple[list[_Compiled], bool]:
    """Return the compiled patterns and whether a list was given."""
    if isinstance(pattern, (list, tuple)):
        if not pattern:
            raise ValueError("pattern: the list of patterns is empty")
        return [_compile_one(p, encoding) for p in pattern], True
    return [_compile_one(pattern, encoding)], False  # type: ignore[arg-type]


def _compile_one(pattern: Pattern, encoding: str) -> _Compiled:
    if isinstance(pattern, str):
        return _Compiled(pattern.encode(encoding), None, None)
    if isinstance(pattern, (bytes, bytearray, memoryview)):
        return _Compiled(bytes(pattern), None, None)
    if isinstance(pattern, re.Pattern):
        if isinstance(pattern.pattern, str):
            return _Compiled(b"", None, pattern)
        return _Compiled(b"", pattern, None)
    raise TypeError(
        "pattern must be bytes, str, a compiled regex or a list of them, "
        f"not {type(pattern).__name__}"
    )


def _find(
    pattern: _Compiled, buffer: bytearray, encoding: str
) -> tuple[int, int, re.Match[bytes] | re.Match[str] | None] | None:
    if pattern.text is not None:
        # surrogateescape keeps one code point per undecodable byte, so the
        # byte offsets of a match can be recovered by re-encoding.
        text = buffer.decode(encoding, "surrogateescape")
        found = pattern.text.search(text)
        if found is None:
            return None
        start = len(text[: found.start()].encode(encoding, "surrogateescape"))
        end = start + len(found.group().encode(encoding, "surrogateescape"))
        return start, end, found
    if pattern.regex is not None:
        if pattern.regex.search(buffer) is None:
            return None
        # Re-run over an immutable copy so the Match handed out does not
        # point into our reusable buffer.
        match = pattern.regex.search(bytes(buffer))
        assert match is not None
        return match.start(), match.end(), match
    literal = pattern.literal
    index = buffer.find(literal, pattern.scan)
    if index < 0:
        pattern.scan = max(pattern.scan, len(buffer) - len(literal) + 1)
        return None
    return index, index + len(literal), None


def deadline(name: str, timeout: float | None) -> float:
    """Turn a ``timeout`` argument into an absolute trio deadline (inf for None)."""
    if timeout is None:
        return math.inf
    return trio.current_time() + check_seconds(name, timeout)


async def search(
    log: OutputLog,
    pattern: object,
    patterns: list[_Compiled],
    position: int,
    # A timeout argument, not a cancel scope: expiry must raise a
    # TimeoutError carrying what was seen, which a scope cannot do.
    timeout: float | None,  # noqa: ASYNC109
    encoding: str,
) -> ExpectMatch:
    """Search ``log`` from absolute offset ``position``; see :meth:`OutputLog.expect`."""
    timeout_at = deadline("timeout", timeout)
    reader = log.cursor(position)
    max_bytes = log.max_bytes
    lot = log._data_lot
    buffer = bytearray()
    base = position  # absolute offset of buffer[0]
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
                    for compiled in patterns:
                        compiled.scan = 0
            # The earliest match wins, ties going to the first pattern
            # listed, as in pexpect.
            best: tuple[int, int, re.Match[bytes] | re.Match[str] | None] | None = None
            best_index = 0
            for index, compiled in enumerate(patterns):
                found = _find(compiled, buffer, encoding)
                if found is not None and (best is None or found[0] < best[0]):
                    best, best_index = found, index
            if best is not None:
                start, end, match = best
                return ExpectMatch(
                    start=base + start,
                    end=base + end,
                    data=bytes(buffer[start:end]),
                    before=bytes(buffer[:start]),
                    match=match
                    if not isinstance(match, re.Match) or isinstance(match.string, bytes)
                    else None,
                    text_match=match
                    if isinstance(match, re.Match) and isinstance(match.string, str)
                    else None,
                    missed_bytes=missed,
                    index=best_index,
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
                for compiled in patterns:
                    compiled.scan = max(0, compiled.scan - excess)
            await lot.park()
    raise ExpectTimeout(
        f"{pattern!r} did not appear within {timeout} seconds",
        seen=bytes(buffer),
        missed_bytes=missed,
    )
