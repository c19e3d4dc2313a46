"""Byte tees: a bounded per-subscriber copy of a captured stream.

A tee is to an :class:`~trio_observer.OutputLog` what a sink is to the
observer registry: a bounded queue per subscriber with the same two
policies. The log pushes every chunk fed after the tee was opened; the tee
hands chunks out in order, with an in-band :class:`MissedBytes` where a
``DROP_OLDEST`` tee had to drop some.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import final

import trio

from ._sink import ObserverBackpressure


@final
@dataclass(frozen=True, slots=True)
class MissedBytes:
    """In-band notice that a tee dropped ``count`` bytes before the next item.

    Yielded by a :class:`ByteTee` right before the first chunk delivered
    after a loss, and once more at the end of the stream if bytes were lost
    after the last chunk, like the registry's ``MissedEvents``.
    """

    count: int
    """How many bytes this tee did not deliver since its previous item."""


@final
@dataclass(frozen=True, slots=True)
class ByteTeeStatus:
    """A snapshot of one tee's counters.

    While the tee is open, ``delivered_bytes + missed_bytes`` equals the
    number of bytes fed to the log since the tee was opened.
    """

    delivered_bytes: int
    """Bytes put into the tee's queue: they are queued or already received."""
    missed_bytes: int
    """Bytes that did not fit (``DROP_OLDEST`` with a full queue)."""
    queued_chunks: int
    """Chunks waiting in the queue right now (markers not counted)."""
    capacity: int
    """How many chunks the queue holds before the policy applies."""
    backpressure: ObserverBackpressure
    """The tee's policy."""
    disconnected: bool
    """True once the receiving side was closed; the tee no longer gets data."""


@final
class ByteTee(trio.abc.ReceiveChannel[bytes | MissedBytes]):
    """The receiving end of a byte tee opened with :meth:`OutputLog.open_tee`.

    Iterate it with ``async for`` (or call :meth:`receive`); items are the
    chunks fed to the log, in order, and :class:`MissedBytes` markers where
    the tee dropped chunks. The iteration ends after the log's end of stream
    and everything queued before it. Use it as an async context manager, or
    call :meth:`close`, to detach it from the log. Not constructed by users.
    """

    def __init__(
        self,
        *,
        capacity: int,
        backpressure: ObserverBackpressure,
        room_lot: trio.lowlevel.ParkingLot,
        detach: Callable[[ByteTee], None],
    ) -> None:
        self._capacity = capacity
        self._backpressure = backpressure
        self._blocking = backpressure is ObserverBackpressure.BLOCK
        # Markers live in the same queue as chunks but take no capacity, so
        # a full DROP_OLDEST queue can still report its loss in order.
        self._queue: deque[bytes | MissedBytes] = deque()
        self._queued_chunks = 0
        self._unreported = 0
        self._delivered = 0
        self._missed = 0
        self._eof = False
        self._closed = False
        self._lot = trio.lowlevel.ParkingLot()
        # Shared with the log: a writer waiting for room in BLOCK tees parks
        # there, and every chunk taken from a BLOCK tee wakes it.
        self._room_lot = room_lot
        self._detach = detach

    # -- the log's side --------------------------------------------------

    def _push(self, data: bytes) -> None:
        """Queue ``data`` or, for a full ``DROP_OLDEST`` tee, count it as missed.

        A full ``BLOCK`` tee still takes the chunk: the log never loses
        bytes for it, and it is the writer's job to wait for room first
        (:meth:`OutputLog.feed` does).
        """
        if self._queued_chunks >= self._capacity and not self._blocking:
            self._missed += len(data)
            self._unreported += len(data)
            return
        if self._unreported:
            self._queue.append(MissedBytes(self._unreported))
            self._unreported = 0
        self._queue.append(data)
        self._queued_chunks += 1
        self._delivered += len(data)
        if self._lot:
            self._lot.unpark_all()

    def _has_room(self) -> bool:
        """Return True when another chunk fits without overfilling the queue."""
        return self._queued_chunks < self._capacity

    def _end(self) -> None:
        """Mark the end of the stream: the receiver ends after the queue drains."""
        if self._eof:
            return
        self._eof = True
        if self._unreported:
            self._queue.append(MissedBytes(self._unreported))
            self._unreported = 0
        self._lot.unpark_all()

    # -- the receiver's side ---------------------------------------------

    def status(self) -> ByteTeeStatus:
        """Return the tee's counters (still readable after it was closed)."""
        return ByteTeeStatus(
            delivered_bytes=self._delivered,
            missed_bytes=self._missed,
            queued_chunks=self._queued_chunks,
            capacity=self._capacity,
            backpressure=self._backpressure,
            disconnected=self._closed,
        )

    def receive_nowait(self) -> bytes | MissedBytes:
        """Return the next item if one is queued.

        Raises:
          trio.WouldBlock: nothing is queued yet.
          trio.EndOfChannel: the log was closed and everything was received.
          trio.ClosedResourceError: this tee was closed.
        """
        if self._closed:
            raise trio.ClosedResourceError("this byte tee was closed")
        if self._queue:
            item = self._queue.popleft()
            if type(item) is bytes:
                self._queued_chunks -= 1
                if self._blocking and self._room_lot:
                    self._room_lot.unpark_all()
            return item
        if self._eof:
            raise trio.EndOfChannel
        raise trio.WouldBlock

    async def receive(self) -> bytes | MissedBytes:
        """Wait for the next chunk or :class:`MissedBytes` marker.

        Raises:
          trio.EndOfChannel: the log was closed and everything was received.
          trio.ClosedResourceError: this tee was closed, before or during
            the call.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            item = self.receive_nowait()
        except trio.WouldBlock:
            pass
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return item
        while True:
            await self._lot.park()
            try:
                return self.receive_nowait()
            except trio.WouldBlock:
                continue

    def close(self) -> None:
        """Detach the tee from its log and drop what is queued. Idempotent.

        The log and its other readers are unaffected; a writer waiting for
        room in this tee is released.
        """
        if self._closed:
            return
        self._closed = True
        self._queue.clear()
        self._queued_chunks = 0
        self._detach(self)
        self._lot.unpark_all()
        self._room_lot.unpark_all()

    async def aclose(self) -> None:
        """Close the tee (see :meth:`close`), then checkpoint."""
        self.close()
        await trio.lowlevel.checkpoint()
