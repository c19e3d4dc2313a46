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
import sys
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from typing import TYPE_CHECKING, final

import trio

if TYPE_CHECKING:
    from ._cursor import OutputCursor, OutputGap


@final
class LineSplitter:
    """Incremental decoder and ``"\\n"`` splitter shared by both line iterators.

    A line longer than ``max_chars`` characters (not counting its ending)
    is cut into pieces of ``max_chars``, the last piece carrying the
    ending, however the stream was chunked; so the text held for a line
    still waiting for its ``"\\n"`` stays bounded.

    Raises:
      LookupError: ``encoding`` or ``errors`` is unknown (at construction,
        not at the first chunk).
    """

    __slots__ = ("_decode", "_decoder", "_keepends", "_max", "_parts", "_size")

    def __init__(self, encoding: str, errors: str, keepends: bool, max_chars: int) -> None:
        factory = codecs.getincrementaldecoder(encoding)
        codecs.lookup_error(errors)
        self._decoder = factory(errors)
        self._decode = self._decoder.decode
        self._keepends = keepends
        self._max = max_chars
        # Decoded text after the last "\n" seen (the start of a line), as
        # the pieces decoded: appending to one str would copy it each time.
        self._parts: list[str] = []
        self._size = 0  # total length of _parts

    def feed_nowait(self, data: bytes) -> list[str]:
        """Decode ``data`` and return the lines it completes, in order (maybe none)."""
        text = self._decode(data)
        parts = self._parts
        if "\n" not in text:
            if text:
                parts.append(text)
                self._size += len(text)
                if self._size > self._max:
                    return self._cut_pending()
            return []
        if parts:
            parts.append(text)
            text = "".join(parts)
            parts.clear()
        keepends = self._keepends
        # After the join, so that a "\r" ending one chunk and the "\n"
        # starting the next are seen together.
        if not keepends and "\r" in text:
            text = text.replace("\r\n", "\n")
        lines = text.split("\n")
        pending = lines.pop()
        if len(text) > self._max:
            # Only then can a line be too long: the common case pays one
            # comparison per chunk.
            lines = self._cut_lines(lines)
        elif keepends:
            lines = [line + "\n" for line in lines]
        self._size = len(pending)
        if pending:
            parts.append(pending)
            if self._size > self._max:
                lines += self._cut_pending()
        return lines

    def _cut_lines(self, lines: list[str]) -> list[str]:
        limit = self._max
        ending = "\n" if self._keepends else ""
        out: list[str] = []
        for line in lines:
            if len(line) > limit:
                cut = (len(line) - 1) // limit * limit
                out += [line[i : i + limit] for i in range(0, cut, limit)]
                line = line[cut:]
            out.append(line + ending)
        return out

    def _cut_pending(self) -> list[str]:
        # Hand out the pending text in pieces of _max, keeping the last
        # 1.._max characters: they may still be followed by a "\n" and must
        # then end the same line as if the text had come in one chunk.
        text = "".join(self._parts)
        size = len(text)
        if not self._keepends and text.endswith("\r"):
            # Maybe the first half of a "\r\n" ending, which is not counted.
            size -= 1
        limit = self._max
        cut = (size - 1) // limit * limit
        self._parts = [text[cut:]]
        self._size = len(text) - cut
        return [text[i : i + limit] for i in range(0, cut, limit)]

    def flush(self) -> list[str]:
        """End the text here (a gap or the end of the stream): return the partial line.

        The decoder is reset, so decoding starts afresh after a gap; a
        character cut short by the gap or the end is replaced according to
        ``errors``. A partial line longer than ``max_chars`` comes in pieces.
        """
        self._parts.append(self._decode(b"", True))
        tail = "".join(self._parts)
        self._decoder.reset()
        self._parts = []
        self._size = 0
        limit = self._max
        return [tail[i : i + limit] for i in range(0, len(tail), limit)]


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
                    batch = splitter.feed_nowait(item)
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

    ``async for`` runs on an async generator that :meth:`__aiter__` makes
    afresh for each loop (see :func:`_unhooked`): a step of an async
    generator that yields a line already in hand is 10 to 40 % cheaper
    than calling an ``async def __anext__``, which creates a coroutine per
    step. The state lives here, not in the generator, so a loop left by
    ``break`` or cancelled while it waited loses nothing, and the next loop
    over this object goes on where it stopped. :meth:`__anext__`, for
    callers that step by hand, serves the same lines.
    """

    __slots__ = ("_batches", "_ready")

    def __init__(self, batches: LineBatches) -> None:
        self._batches = batches
        # The rest of the current batch: an iterator, so that a generator
        # left in the middle of a batch leaves its position here.
        self._ready: Iterator[str] = iter(())

    def __aiter__(self) -> AsyncIterator[str | OutputGap]:
        return _unhooked(self._serve())

    async def __anext__(self) -> str | OutputGap:
        for line in self._ready:
            return line
        # StopAsyncIteration from the batches ends this iterator too.
        item = await self._batches.__anext__()
        if isinstance(item, list):
            self._ready = ready = iter(item)
            return next(ready)  # a batch is never empty
        return item

    async def _serve(self) -> AsyncGenerator[str | OutputGap, None]:
        yield ""  # the priming step taken by _unhooked(), never seen by a loop
        batches = self._batches
        while True:
            # No await while lines are in hand: the only checkpoint is
            # reading the next chunk, in LineBatches (as in __anext__).
            for line in self._ready:
                yield line
            try:
                item = await batches.__anext__()
            except StopAsyncIteration:
                return
            if isinstance(item, list):
                self._ready = iter(item)
            else:
                yield item


def _unhooked(
    generator: AsyncGenerator[str | OutputGap, None],
) -> AsyncGenerator[str | OutputGap, None]:
    """Take the first (priming) step of ``generator`` with no async-generator hooks installed.

    An async generator registers with the event loop's hooks at its first
    step, and trio's finalizer warns (a ``ResourceWarning``, an error under
    ``filterwarnings = error``) about each one collected before it was
    exhausted, which leaving a loop with ``break`` makes normal. Stepped
    first here, the generator is unknown to trio: when collected it is
    closed the default way, by ``GeneratorExit`` at its ``yield``, which
    is all the cleanup it needs (it holds no resource; the state it reads
    is its :class:`LineReader`'s). The hooks are restored before any other
    code runs.
    """
    hooks = sys.get_asyncgen_hooks()
    sys.set_asyncgen_hooks(firstiter=None, finalizer=None)
    try:
        generator.asend(None).__await__().send(None)
    except StopIteration:
        pass
    finally:
        sys.set_asyncgen_hooks(*hooks)
    return generator
