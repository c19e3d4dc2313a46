"""Reading a captured stream: the cursor and the gap it reports when it fell behind.

An :class:`OutputCursor` is one reader's position in an
:class:`~trio_observer._output.OutputLog`: an absolute byte offset and
nothing else, so cursors never share state and never slow the writer. When
the backlog evicted bytes before a cursor read them, the cursor reports an
:class:`OutputGap` in-band and goes on. The backlog itself is in
``_output.py``; this module imports it for type checking only, so
``_output`` can import this one. The line iterators behind
:meth:`OutputCursor.lines` are in ``_lines.py``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, final

import trio

from ._checks import check_bool, check_int
from ._lines import LineBatches, LineReader, LineSplitter

if TYPE_CHECKING:
    from ._output import OutputLog


@final
@dataclass(frozen=True, slots=True)
class OutputGap:
    """In-band notice that a cursor fell behind and bytes were evicted unread.

    The cursor continues with the oldest byte still retained, so the bytes
    it yields plus every gap's ``missed_bytes`` add up to the stream.
    """

    missed_bytes: int
    """How many bytes were evicted from the backlog before this cursor read them."""


@final
class OutputCursor(trio.abc.ReceiveChannel[bytes | OutputGap]):
    """An independent reader of an :class:`OutputLog`, from :meth:`OutputLog.cursor`.

    ``async for item in cursor`` yields the stream's chunks in order, as
    ``bytes`` (reads under 4 KiB that the cursor had not taken yet may come
    gathered into one); if the cursor fell behind and bytes were evicted before it
    read them, one :class:`OutputGap` comes first and the cursor goes on
    with the oldest retained byte. The loop ends at the end of the stream.
    Reading never affects other readers, and a slow cursor never slows the
    writer. Not constructed by users.
    """

    def __init__(self, log: OutputLog, position: int) -> None:
        self._log = log
        self._position = position
        self._closed = False

    @property
    def position(self) -> int:
        """Absolute offset of the next byte this cursor will read."""
        return self._position

    def receive_nowait(self) -> bytes | OutputGap:
        """Return the next chunk or gap if there is one already.

        Raises:
          trio.WouldBlock: the cursor is at the end of the data fed so far.
          trio.EndOfChannel: the stream ended and everything was read.
          trio.ClosedResourceError: this cursor was closed.
        """
        if self._closed:
            raise trio.ClosedResourceError("this cursor was closed")
        log = self._log
        position = self._position
        if position < log._start:
            self._position = log._start
            return OutputGap(log._start - position)
        if position < log._total:
            data = log._read_at(position)
            self._position = position + len(data)
            return data
        if log._closed:
            raise trio.EndOfChannel
        raise trio.WouldBlock

    async def receive(self) -> bytes | OutputGap:
        """Wait for the next chunk (or gap) and return it.

        Raises:
          trio.EndOfChannel: the stream ended and everything was read.
          trio.ClosedResourceError: this cursor was closed, before or
            during the call.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            item = self.receive_nowait()
        except trio.WouldBlock:
            pass
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return item
        lot = self._log._data_lot
        while True:
            await lot.park()
            try:
                return self.receive_nowait()
            except trio.WouldBlock:
                continue

    def lines(
        self,
        *,
        encoding: str = "utf-8",
        errors: str = "replace",
        keepends: bool = False,
        max_line_chars: int | None = None,
    ) -> AsyncIterator[str | OutputGap]:
        """Read the rest of the stream as decoded text lines.

        Lines end at ``"\\n"``. With ``keepends=False`` the ``"\\n"`` and a
        ``"\\r"`` right before it are removed (a lone ``"\\r"``, as in a
        progress bar, stays in the line). A multi-byte character split
        across chunks comes out whole. A final line without ``"\\n"`` is
        yielded at the end of the stream. If the cursor falls behind, the
        partial line before the gap is yielded, then the
        :class:`OutputGap`, and decoding restarts after it (so the first
        line after a gap may start mid-line). The iterator reads the cursor
        a chunk at a time, so to stop and resume reading lines, keep using
        the same iterator: the text it decoded but has not yielded yet is
        held there, not in the cursor. A line longer than
        ``max_line_chars`` is cut into pieces of that many characters
        (a forced break: only the last piece has the line ending), so
        output that never sends a ``"\\n"``, such as a progress bar
        redrawn with ``"\\r"``, cannot pile up unbounded.

        A line already decoded is served without a checkpoint; reading the
        next chunk from the cursor is one (a cancellation point and a
        schedule point), so a loop lets other tasks run, and can be
        cancelled, once per chunk (up to 256 KiB), and whenever it waits.
        Each line still costs one ``async for`` step, more than iterating a
        file object costs per line; when throughput matters, use
        :meth:`line_batches`, which steps once per chunk.

        Args:
          encoding: A codec name known to :mod:`codecs`.
          errors: How to handle undecodable bytes (``"replace"`` by default,
            so a binary burst never ends the loop).
          keepends: Keep the line endings as they were.
          max_line_chars: The longest line handed out whole, in characters
            not counting its ``"\\n"`` (nor, without ``keepends``, a
            ``"\\r"`` before it). None (the default) uses the log's
            ``max_bytes``: a line the backlog can hold is never cut.

        Raises:
          LookupError: ``encoding`` or ``errors`` is unknown (raised at
            once, not at the first iteration).
          TypeError: ``max_line_chars`` is neither an int nor None.
          ValueError: ``max_line_chars`` is less than 1.
        """
        splitter = self._splitter(encoding, errors, keepends, max_line_chars)
        return LineReader(LineBatches(self, splitter))

    def line_batches(
        self,
        *,
        encoding: str = "utf-8",
        errors: str = "replace",
        keepends: bool = False,
        max_line_chars: int | None = None,
    ) -> AsyncIterator[list[str] | OutputGap]:
        """Read the rest of the stream as lists of decoded text lines, one list per chunk.

        The fast way to read many lines: ``async for batch in
        cursor.line_batches(): for line in batch: ...`` awaits once per
        chunk read from the stream (up to 256 KiB), not once per line. The
        lines are exactly those of :meth:`lines`, in the same order and
        with the same options; each list holds the lines a chunk completed
        and is never empty (a chunk that completes no line yields nothing).
        An :class:`OutputGap` comes as an item of its own, right after the
        list holding the partial line before it. The lists are the
        caller's to keep or change.

        Args:
          encoding: A codec name known to :mod:`codecs`.
          errors: How to handle undecodable bytes (``"replace"`` by default).
          keepends: Keep the line endings as they were.
          max_line_chars: As for :meth:`lines`: longer lines come in
            pieces; None (the default) uses the log's ``max_bytes``.

        Raises:
          LookupError: ``encoding`` or ``errors`` is unknown (raised at
            once, not at the first iteration).
          TypeError: ``max_line_chars`` is neither an int nor None.
          ValueError: ``max_line_chars`` is less than 1.
        """
        return LineBatches(self, self._splitter(encoding, errors, keepends, max_line_chars))

    def _splitter(
        self, encoding: str, errors: str, keepends: bool, max_line_chars: int | None
    ) -> LineSplitter:
        check_bool("keepends", keepends)
        if max_line_chars is None:
            max_line_chars = self._log.max_bytes
        check_int("max_line_chars", max_line_chars, minimum=1)
        return LineSplitter(encoding, errors, keepends, max_line_chars)

    def close(self) -> None:
        """Detach the cursor: later reads raise ``ClosedResourceError``. Idempotent."""
        if self._closed:
            return
        self._closed = True
        # Wake a task blocked in receive() so it sees the close; other
        # sleepers wake spuriously and go back to sleep.
        self._log._data_lot.unpark_all()

    async def aclose(self) -> None:
        """Close the cursor (see :meth:`close`), then checkpoint."""
        self.close()
        await trio.lowlevel.checkpoint()
