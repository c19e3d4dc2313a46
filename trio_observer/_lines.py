"""Reading a captured stream as text lines, one at a time or a chunk's worth at a time.

Both iterators share one :class:`LineSplitter`, which decodes and splits
whole chunks with string methods (per-character work in Python would be
slower than reading a file object). :class:`LineBatches` awaits once per
chunk and hands out the chunk's lines as one list; :class:`LineReader`
hands them out one by one on top of it, paying one ``async for`` step per
line. This module reads the stream only through a cursor's ``receive()``;
it imports ``_cursor`` for type checking only, so ``_cursor`` can import it.
"""

from __future__ import annotations

import codecs
from typing import TYPE_CHECKING, final

import trio

if TYPE_CHECKING:
    from ._cursor import OutputCursor, OutputGap


@final
class LineSplitter:
    """Incremental decoder and ``"\\n"`` splitter shared by both line iterators.

    Raises:
      LookupError: ``encoding`` or ``errors`` is unknown (at construction,
        not at the first chunk).
    """

    __slots__ = ("_decode", "_decoder", "_keepends", "_pending")

    def __init__(self, encoding: str, errors: str, keepends: bool) -> None:
        factory = codecs.getincrementaldecoder(encoding)
        codecs.lookup_error(errors)
        self._decoder = factory(errors)
        self._decode = self._decoder.decode
        self._keepends = keepends
        # Decoded text after the last "\n" seen: the start of a line.
        self._pending = ""

    def feed(self, data: bytes) -> list[str]:
        """Decode ``data`` and return the lines it completes, in order (maybe none)."""
        text = self._decode(data)
        if "\n" not in text:
            self._pending += text
            return []
        if self._pending:
            text = self._pending + text
        keepends = self._keepends
        # After the join, so that a "\r" ending one chunk and the "\n"
        # starting the next are seen together.
        if not keepends and "\r" in text:
            text = text.replace("\r\n", "\n")
        lines = text.split("\n")
        self._pending = lines.pop()
        if keepends:
            lines = [line + "\n" for line in lines]
        return lines

    def flush(self) -> list[str]:
        """End the text here (a gap or the end of the stream): return the partial line.

        The decoder is reset, so decoding starts afresh after a gap; a
        character cut short by the gap or the end is replaced according to
        ``errors``.
        """
        tail = self._pending + self._decode(b"", True)
        self._decoder.reset()
        self._pending = ""
        return [tail] if tail else []


@final
class LineBatches:
    """The iterator behind :meth:`OutputCursor.line_batches`.

    A class rather than an async generator: trio warns about every async
    generator that is garbage collected unexhausted, and leaving a loop
    early with ``break`` is normal use.
    """

    __slots__ = ("_cursor", "_done", "_gap", "_splitter")

    def __init__(self, cursor: OutputCursor, splitter: LineSplitter) -> None:
        self._cursor = cursor
        self._splitter = splitter
        # A gap read together with the partial line before it: the line is
        # handed out first, the gap at the next step.
        self._gap: OutputGap | None = None
        self._done = False

    def __aiter__(self) -> LineBatches:
        return self

    async def __anext__(self) -> list[str] | OutputGap:
        gap = self._gap
        if gap is not None:
            self._gap = None
            return gap
        splitter = self._splitter
        while not self._done:
            try:
                item = await self._cursor.receive()
            except trio.EndOfChannel:
                self._done = True
                batch = splitter.flush()
            else:
                if isinstance(item, bytes):
                    batch = splitter.feed(item)
                else:
                    batch = splitter.flush()
                    if not batch:
                        return item
                    self._gap = item
            if batch:
                return batch
        raise StopAsyncIteration


@final
class LineReader:
    """The iterator behind :meth:`OutputCursor.lines`: :class:`LineBatches`, one line at a time.

    Each batch is reversed once so that every step while lines are
    buffered is one ``pop()`` and no await: the ``async for`` protocol
    itself (a coroutine per step) is then most of the cost per line.
    """

    __slots__ = ("_batches", "_ready")

    def __init__(self, batches: LineBatches) -> None:
        self._batches = batches
        self._ready: list[str] = []

    def __aiter__(self) -> LineReader:
        return self

    async def __anext__(self) -> str | OutputGap:
        ready = self._ready
        if ready:
            return ready.pop()
        # StopAsyncIteration from the batches ends this iterator too.
        item = await self._batches.__anext__()
        if isinstance(item, list):
            item.reverse()
            self._ready = item
            return item.pop()
        return item
