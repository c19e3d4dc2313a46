"""Captured byte streams: a bounded backlog and the pump that feeds it.

One :class:`OutputLog` holds the newest bytes of one stream (a pipe or a
PTY). Every position is an absolute byte offset since the start of the
stream, so readers never share state: a cursor, an ``expect`` call and a
tee each keep their own offset, and the writer never waits for any of them
(except ``BLOCK`` tees, and only through :meth:`OutputLog.feed`).
The cursors live in ``_cursor.py``, the search behind ``expect`` in
``_expect.py``, the line iterators in ``_lines.py``, the tees in
``_tee.py``.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal, final

import trio

from ._checks import check_bytes, check_int, check_seconds
from ._sink import ObserverBackpressure, check_backpressure

if TYPE_CHECKING:
    # At run time each is imported by the methods that make one (cursor,
    # open_tee, expect, wait_for_idle): a program that captures nothing,
    # such as every CLI run, does not load them.
    from ._cursor import OutputCursor
    from ._expect import ExpectMatch, Pattern
    from ._tee import ByteTee

_READ_SIZE = 65536
# What pump_stream() asks for while a stream flows faster than it is read
# (the last read filled _READ_SIZE), on a pipe grown to 1 MiB: a quarter of
# the pipe per wakeup. Fewer, larger reads cut the reader's CPU per byte
# (512 KiB measured no better). Only while flowing: glibc serves a buffer
# over 128 KiB with mmap until it has freed one that large, a cost a read
# that returns a few bytes should not pay.
BURST_SIZE = 262144
# Reads shorter than this are gathered into one tail buffer instead of being
# kept one by one: a slot, an offset and a bytes header cost about 80 bytes,
# so a backlog of 2-byte reads would otherwise take 40 times its size.
_SMALL = 4096


@final
class OutputLog:
    """A bounded backlog of one byte stream, with independent readers.

    The writer (the session's reader task, through :func:`pump_stream`)
    calls :meth:`feed_nowait` and finally :meth:`close`. Readers take a
    :meth:`cursor`, :meth:`expect` a pattern, :meth:`wait_for_idle`, or
    :meth:`open_tee` a bounded copy of the live stream. Only the newest
    ``max_bytes`` are retained; a reader that falls behind learns it from an
    :class:`OutputGap`, it never slows the writer.

    Args:
      max_bytes: How many of the newest bytes to keep. The default, 1 MiB,
        holds a long build log tail while bounding memory per stream.

    Raises:
      ValueError: ``max_bytes`` is less than 1.
    """

    __slots__ = (
        "_blocking_tees",
        "_chunks",
        "_close_lot",
        "_closed",
        "_data_lot",
        "_expect_at",
        "_head",
        "_last_feed",
        "_max",
        "_room_lot",
        "_seal_at",
        "_start",
        "_starts",
        "_tail",
        "_tees",
        "_total",
    )

    def __init__(self, *, max_bytes: int = 1 << 20) -> None:
        self._max = check_int("max_bytes", max_bytes, minimum=1)
        # Reads of _SMALL bytes or more are kept as fed, never copied; smaller
        # ones are gathered in _tail (below) first. _starts[i] is the absolute
        # offset of _chunks[i][0]; entries before _head are evicted and are
        # only deleted in bulk, so that eviction is O(1) amortised and
        # _starts stays sorted for bisect.
        self._chunks: list[bytes] = []
        self._starts: list[int] = []
        self._head = 0
        # The newest small reads, after every chunk, gathered until they
        # reach _seal_at bytes and then sealed into one chunk. Sealing at
        # max_bytes at most keeps the tail shorter than the backlog, so
        # eviction never has to cut into it.
        self._tail = bytearray()
        self._seal_at = min(_SMALL, self._max)
        self._start = 0
        self._total = 0
        # pexpect's position: where the last successful expect() ended.
        self._expect_at = 0
        self._closed = False
        self._data_lot = trio.lowlevel.ParkingLot()
        self._close_lot = trio.lowlevel.ParkingLot()
        self._room_lot = trio.lowlevel.ParkingLot()
        self._tees: list[ByteTee] = []
        self._blocking_tees = 0
        try:
            self._last_feed: float | None = trio.current_time()
        except RuntimeError:
            # Built outside trio.run: the quiet period starts at the first
            # wait_for_idle() instead of at construction.
            self._last_feed = None

    def __repr__(self) -> str:
        return (
            f"<OutputLog total_bytes={self._total} retained={self._total - self._start} "
            f"max_bytes={self._max} closed={self._closed}>"
        )

    # -- counters ------------------------------------------------------

    @property
    def max_bytes(self) -> int:
        """How many of the newest bytes the backlog keeps."""
        return self._max

    @property
    def total_bytes(self) -> int:
        """Every byte ever fed; also the absolute offset of the next byte."""
        return self._total

    @property
    def dropped_bytes(self) -> int:
        """Bytes evicted from the backlog to stay within ``max_bytes``."""
        # Offsets start at 0, so the first retained offset is also the
        # number of bytes evicted before it.
        return self._start

    @property
    def start_offset(self) -> int:
        """Absolute offset of the oldest retained byte."""
        return self._start

    @property
    def retained_bytes(self) -> int:
        """How many bytes :meth:`snapshot` would return."""
        return self._total - self._start

    @property
    def closed(self) -> bool:
        """True once the end of the stream was recorded with :meth:`close`."""
        return self._closed

    # -- the writer's side ---------------------------------------------

    def feed_nowait(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data`` to the stream without waiting for any reader.

        Cursors and ``expect`` calls waiting for data are woken; tees get a
        copy (a full ``DROP_OLDEST`` tee counts it as missed, a full
        ``BLOCK`` tee still takes it: use :meth:`feed` to wait for
        ``BLOCK`` tees instead). Must be called inside ``trio.run``.

        Raises:
          trio.ClosedResourceError: :meth:`close` was called.
          TypeError: ``data`` is not bytes, bytearray or memoryview.
        """
        if type(data) is not bytes:
            check_bytes("data", data)
            # A bytearray may be reused by the caller; the backlog must not change.
            data = bytes(data)
        if data:
            self._append(data, trio.current_time())
        elif self._closed:
            raise trio.ClosedResourceError("this OutputLog was closed (end of stream)")

    def _append(self, data: bytes, now: float) -> None:
        # The capture hot path, called by pump_stream() directly for each
        # read (non-empty bytes, up to BURST_SIZE), with the time of the read
        # (`now`, for wait_for_idle): a few attribute loads, and no copy of
        # a read of _SMALL bytes or more. The rest of a capture's cost is
        # the pipe and the memory traffic of retaining max_bytes.
        if self._closed:
            raise trio.ClosedResourceError("this OutputLog was closed (end of stream)")
        total = self._total
        size = len(data)
        if size >= _SMALL:
            if self._tail:
                self._seal()
            self._chunks.append(data)
            self._starts.append(total)
        else:
            tail = self._tail
            tail += data
            if len(tail) >= self._seal_at:
                self._total = total + size
                self._seal()
        total += size
        self._total = total
        if total - self._start > self._max:
            self._evict()
        self._last_feed = now
        if self._data_lot:
            self._data_lot.unpark_all()
        if self._tees:
            for tee in self._tees:
                tee._push(data)

    def _seal(self) -> None:
        # Turn the gathered small reads into one chunk; the caller has
        # already counted them in _total.
        tail = self._tail
        self._chunks.append(bytes(tail))
        self._starts.append(self._total - len(tail))
        tail.clear()

    def _evict(self) -> None:
        start = self._total - self._max
        self._start = start
        chunks, starts = self._chunks, self._starts
        head = self._head
        while starts[head] + len(chunks[head]) <= start:
            # Release the bytes now; the list slot goes at the next compaction.
            chunks[head] = b""
            head += 1
        if start - starts[head] > self._max:
            # Only a single feed larger than max_bytes gets here: copy its
            # tail so memory stays bounded by max_bytes, not by the feed.
            chunks[head] = chunks[head][start - starts[head] :]
            starts[head] = start
        if head >= 64 and 2 * head >= len(chunks):
            del chunks[:head]
            del starts[:head]
            head = 0
        self._head = head

    async def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Wait until every ``BLOCK`` tee has room, then :meth:`feed_nowait` ``data``.

        This is how a ``BLOCK`` tee slows the stream down: while a consumer
        lags, the writer stops reading the pipe, the pipe fills up and the
        process blocks in ``write()``. Cursors and ``expect`` never block it.
        If cancelled while waiting, ``data`` is still fed (a ``BLOCK`` tee
        may then hold one chunk over its capacity), so no byte is lost.

        Raises:
          trio.ClosedResourceError: :meth:`close` was called, before or
            during the wait (``data`` is then not fed).
          TypeError: ``data`` is not bytes, bytearray or memoryview.
        """
        if type(data) is not bytes:
            check_bytes("data", data)
        if self._closed:
            raise trio.ClosedResourceError("this OutputLog was closed (end of stream)")
        try:
            await trio.lowlevel.checkpoint()
            # close() wakes us; a full tee must not keep us parked after it.
            while not self._closed and self._must_wait():
                await self._room_lot.park()
        except BaseException:
            if not self._closed:
                self.feed_nowait(data)
            raise
        self.feed_nowait(data)

    def _must_wait(self) -> bool:
        if self._blocking_tees:
            for tee in self._tees:
                if tee._blocking and not tee._has_room():
                    return True
        return False

    def close(self) -> None:
        """Record the end of the stream. Idempotent.

        Readers finish with the data already fed, then see the end: cursors
        stop, ``expect`` raises :class:`ExpectEOF`, ``wait_for_idle``
        returns, tees end after their queue. Closing a session's captured
        log is allowed: its :func:`pump_stream` reads on and discards the
        rest of the stream, so the process is not blocked.
        """
        if self._closed:
            return
        self._closed = True
        for tee in self._tees:
            tee._end()
        self._data_lot.unpark_all()
        self._close_lot.unpark_all()
        self._room_lot.unpark_all()

    async def wait_closed(self) -> None:
        """Wait until the end of the stream was recorded (:attr:`closed`).

        A session's captured log is closed when its reader reached end of
        file: everything the process (and whatever shared the stream) wrote
        is in the log by then. That can come after :meth:`Process.wait`
        returns, since the reader drains the pipe on its own.
        """
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        while not self._closed:
            await self._close_lot.park()

    # -- reading -------------------------------------------------------

    def snapshot(self) -> bytes:
        """Return a copy of the retained bytes (the newest ``max_bytes`` at most)."""
        head = self._head
        parts: list[bytes | bytearray] = [*self._chunks[head:]]
        if self._tail:
            parts.append(self._tail)
        if not parts:
            return b""
        if head < len(self._chunks):
            skip = self._start - self._starts[head]
        else:
            skip = self._start - (self._total - len(self._tail))
        if skip:
            parts[0] = parts[0][skip:]
        return b"".join(parts)

    def _read_at(self, position: int) -> bytes:
        # The caller guarantees start <= position < total.
        tail_start = self._total - len(self._tail)
        if position >= tail_start:
            # A copy: the tail keeps growing and is cleared when sealed.
            return bytes(self._tail[position - tail_start :])
        index = bisect.bisect_right(self._starts, position, self._head) - 1
        chunk = self._chunks[index]
        skip = position - self._starts[index]
        return chunk[skip:] if skip else chunk

    def cursor(self, start: Literal["oldest", "now"] | int = "oldest") -> OutputCursor:
        """Return a new independent reader.

        Args:
          start: ``"oldest"`` (the default) starts at the oldest retained
            byte, ``"now"`` at the next byte to be fed, and an int at that
            absolute offset (for example an :attr:`ExpectMatch.end`); an
            offset already evicted makes the first item an
            :class:`OutputGap`.

        Raises:
          ValueError: ``start`` is another string, or an offset outside
            ``0..total_bytes``.
        """
        from ._cursor import OutputCursor

        if start == "oldest":
            return OutputCursor(self, self._start)
        if start == "now":
            return OutputCursor(self, self._total)
        if isinstance(start, str):
            raise ValueError(f"start must be 'oldest', 'now' or an offset, not {start!r}")
        return OutputCursor(self, self._check_offset("start", start))

    def _check_offset(self, name: str, offset: int) -> int:
        if isinstance(offset, bool) or not isinstance(offset, int):
            raise TypeError(f"{name} must be an int offset, not {type(offset).__name__}")
        if not 0 <= offset <= self._total:
            raise ValueError(
                f"{name} must be an offset between 0 and total_bytes ({self._total}), not {offset}"
            )
        return offset

    async def expect(
        self,
        pattern: Pattern | Sequence[Pattern],
        *,
        # A timeout argument, not a cancel scope: expiry must raise a
        # TimeoutError carrying what was seen, which a scope cannot do.
        timeout: float | None = None,  # noqa: ASYNC109
        since: OutputCursor | int | None = None,
        encoding: str = "utf-8",
    ) -> ExpectMatch:
        """Wait until ``pattern`` appears in the stream and return where.

        Like pexpect, each log keeps an *expect position*: by default a
        search starts where the previous successful ``expect`` on this log
        ended (at the oldest retained byte for the first call), so output
        printed before the call is not missed and nothing is matched twice.
        Every successful search, with or without ``since``, moves the
        position to the end of its match. The search never takes data from
        a cursor or another search. Matches that straddle chunk boundaries
        are found. A literal is searched incrementally; a regex is re-run
        over everything since the search start each time data arrives
        (O(bytes searched) per wakeup, bounded by ``max_bytes``); like
        pexpect, it matches the data as it is when it runs, so ``rb"\\d+"``
        may match ``b"12"`` of a ``b"123"`` still on its way, and ``^``
        matches at the search start.

        Args:
          pattern: A ``bytes`` literal, a ``str`` literal (encoded with
            ``encoding``), a regex compiled from bytes, a regex compiled
            from ``str`` (matched against the text decoded with
            ``encoding``; undecodable bytes never match a printable
            character), or a list of these: the earliest match in the
            stream wins (ties: the first listed) and ``match.index`` says
            which pattern it was.
          timeout: Seconds of the trio clock to wait; None waits for ever.
          since: Where to start instead of the expect position: a cursor
            starts at its position (without moving it); an int at that
            absolute offset, such as a previous match's ``end``, or 0 for
            the oldest retained byte.
          encoding: How ``str`` patterns relate to the bytes; UTF-8 by
            default.

        Returns:
          The first match at or after the search start.

        Raises:
          ExpectTimeout: ``timeout`` passed first (a :class:`TimeoutError`;
            ``exc.seen`` holds the bytes searched).
          ExpectEOF: the stream ended without a match (an :class:`EOFError`;
            ``exc.seen`` as above).
          TypeError: ``pattern`` is not a pattern or a list of them, or
            ``timeout`` is not a number (a bool is not one).
          ValueError: ``since`` is a cursor of another log or an offset
            outside ``0..total_bytes``; ``timeout`` is negative, NaN or too
            large for a float; the list of patterns is empty.
        """
        from ._expect import compile_patterns, search

        patterns, _ = compile_patterns(pattern, encoding)
        position = self._resolve_since(since)
        found = await search(self, pattern, patterns, position, timeout, encoding)
        self._expect_at = found.end
        return found

    @property
    def expect_position(self) -> int:
        """Where the next :meth:`expect` without ``since`` starts searching.

        The end of the last successful match, or the oldest retained byte
        if that is later (nothing matched yet, or the match was evicted).
        """
        return max(self._expect_at, self._start)

    def _resolve_since(self, since: OutputCursor | int | None) -> int:
        if since is None:
            return self.expect_position
        from ._cursor import OutputCursor

        if isinstance(since, OutputCursor):
            if since._log is not self:
                raise ValueError("since: the cursor belongs to another OutputLog")
            return since.position
        return self._check_offset("since", since)

    async def wait_for_idle(
        self,
        quiet: float,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - mirrors expect()
    ) -> None:
        """Wait until no output arrived for ``quiet`` seconds of the trio clock.

        The quiet period counts from the last :meth:`feed_nowait` (or from the
        log's creation if nothing was fed yet), so it may already be over
        when this is called. A closed stream is idle at once: nothing more
        can arrive.

        Args:
          quiet: Seconds without output that count as idle.
          timeout: Seconds to wait at most; None waits for ever.

        Raises:
          TimeoutError: ``timeout`` passed while output kept arriving.
          TypeError: ``quiet`` or ``timeout`` is not a number (a bool is not one).
          ValueError: ``quiet`` or ``timeout`` is negative, NaN or too large
            for a float.
        """
        check_seconds("quiet", quiet)
        from ._expect import deadline

        timeout_at = deadline("timeout", timeout)
        if self._last_feed is None:
            self._last_feed = trio.current_time()
        parked = False
        while not self._closed:
            # Feeds only ever move idle_at later, so sleeping until it and
            # then looking again needs no wakeup per feed.
            idle_at = self._last_feed + quiet
            now = trio.current_time()
            if now >= idle_at:
                break
            if now >= timeout_at:
                if not parked:
                    await trio.lowlevel.checkpoint()
                raise TimeoutError(
                    f"output did not stay quiet for {quiet} seconds within {timeout} seconds"
                )
            with trio.move_on_at(min(idle_at, timeout_at)):
                await self._close_lot.park()
            parked = True
        if not parked:
            await trio.lowlevel.checkpoint()

    # -- tees ----------------------------------------------------------

    def open_tee(
        self,
        *,
        capacity: int = 16,
        backpressure: ObserverBackpressure = ObserverBackpressure.DROP_OLDEST,
    ) -> ByteTee:
        """Attach a bounded queue that receives every chunk fed from now on.

        ::

            async with log.open_tee(capacity=64) as tee:
                async for item in tee:
                    ...

        Args:
          capacity: How many chunks the queue holds (at most 64 KiB each
            when fed by :func:`pump_stream`, 256 KiB from a captured pipe
            that is being written faster than it is read).
          backpressure: ``DROP_OLDEST`` (the default, as for observer sinks)
            never slows the stream: a chunk that does not fit is dropped,
            counted, and reported in-band as one :class:`MissedBytes`
            before the next chunk delivered. ``BLOCK`` makes
            :meth:`feed` (and so :func:`pump_stream`) wait for room.

        Returns:
          The tee's receiving end; closing it detaches the tee without
          affecting the log. On a closed log the tee ends at once.

        Raises:
          TypeError: ``capacity`` is not an int or ``backpressure`` is not
            an :class:`ObserverBackpressure`.
          ValueError: ``capacity`` is less than 1.
        """
        from ._tee import ByteTee

        check_int("capacity", capacity, minimum=1)
        check_backpressure(backpressure)
        tee = ByteTee(
            capacity=capacity,
            backpressure=backpressure,
            room_lot=self._room_lot,
            detach=self._detach_tee,
        )
        if self._closed:
            tee._end()
        else:
            self._tees.append(tee)
            self._blocking_tees += tee._blocking
        return tee

    def _detach_tee(self, tee: ByteTee) -> None:
        if tee in self._tees:
            self._tees.remove(tee)
            self._blocking_tees -= tee._blocking


async def pump_stream(
    stream: trio.abc.ReceiveStream,
    log: OutputLog,
    *,
    chunk_size: int = _READ_SIZE,
    burst_size: int | None = None,
) -> None:
    """Copy ``stream`` into ``log`` until end of file, then close ``log``.

    This is the session's reader task for a pipe or a PTY. It waits for
    ``BLOCK`` tees (see :meth:`OutputLog.feed`) and for nothing else.
    The log is closed however the loop ends (EOF, error or cancellation),
    so readers always see an end. If someone closes ``log`` first, the pump
    keeps reading to end of file and discards the rest, so the process
    never blocks on a full pipe. The stream itself is left open: it
    belongs to the caller.

    Args:
      stream: Where the bytes come from.
      log: Where they go.
      chunk_size: The ``max_bytes`` of each ``receive_some`` call.
      burst_size: The ``max_bytes`` after a read that returned
        ``chunk_size`` bytes or more, until one returns less: for a stream
        that can hand over more at once (a pipe grown with
        ``F_SETPIPE_SZ``). None keeps every read at ``chunk_size``.
    """
    receive_some = stream.receive_some
    burst = chunk_size if burst_size is None else burst_size
    size = chunk_size
    append = log._append
    # The clock's own method: trio.current_time() finds the run's clock
    # anew on each call, which was a third of the cost of appending a
    # chunk; this task lives in one run, so its clock cannot change.
    now = trio.lowlevel.current_clock().current_time
    try:
        while True:
            data = await receive_some(size)
            if not data:
                break
            size = burst if len(data) >= chunk_size else chunk_size
            if log._closed:
                # A reader closed the log to stop waiting on it. Stopping
                # here would leave the pipe unread and the process stuck in
                # write(); reading on and discarding lets it run to its end.
                continue
            # receive_some() already checkpoints each round; only pay for
            # feed() when a BLOCK tee actually has to be waited for.
            if log._blocking_tees and log._must_wait():
                try:
                    await log.feed(data)
                except trio.ClosedResourceError:
                    # Only the log raises this (it was closed while we
                    # waited for room); the next round discards.
                    pass
            elif type(data) is bytes:
                append(data, now())
            else:
                # A ReceiveStream may return a bytearray it reuses.
                log.feed_nowait(data)
    finally:
        log.close()
