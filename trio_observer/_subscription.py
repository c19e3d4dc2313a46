"""Subscriptions: a sink with a lifetime, and in-band notice of loss."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar, cast, final

import trio

from ._events import ObserverEvent
from ._sink import ObserverSinkStatus, ObserverSubscriberId, _Sink


@final
@dataclass(frozen=True, slots=True)
class MissedEvents:
    """In-band notice that ``count`` events were lost before the next one.

    Yielded by a subscription opened with ``report_missed=True``, like the
    ``Lagged(n)`` error of tokio's broadcast channel.
    """

    count: int
    """How many matching events this subscriber did not receive."""


ItemT = TypeVar("ItemT", ObserverEvent, "ObserverEvent | MissedEvents")


@final
class Subscription(trio.abc.ReceiveChannel[ItemT]):
    """A registered sink's receiving end: a ``trio.abc.ReceiveChannel``.

    Iterate it with ``async for``, or call :meth:`receive` /
    :meth:`receive_nowait`; the stream ends (``trio.EndOfChannel``) when
    the sink is removed (the ``async with`` block that opened it exits) or
    when the session ends. Obtained from :meth:`ObserverRegistry.subscribe`;
    not constructed by users.

    Closing it (:meth:`close`, :meth:`aclose`, or ``async with sub:``) is
    the consumer saying it wants no more: the sink is marked disconnected
    and every later matching event counts as missed, exactly as when the
    receiving end of :meth:`ObserverRegistry.add_channel` is closed. The
    sink stays registered, its :meth:`status` readable, until the block
    that opened it exits.
    """

    def __init__(
        self,
        sink_id: ObserverSubscriberId,
        sink: _Sink,
        receive_channel: trio.MemoryReceiveChannel[object],
    ) -> None:
        self._id = sink_id
        self._sink = sink
        self._receive_channel = receive_channel
        # The sequence number expected next (a larger one means events were
        # lost), and an event held back while its MissedEvents marker goes
        # out first.
        self._next = 0
        self._held: ObserverEvent | None = None
        self._closed = False

    @property
    def id(self) -> ObserverSubscriberId:
        """The sink's id in the registry."""
        return self._id

    def status(self) -> ObserverSinkStatus:
        """The sink's counters (still readable after the sink was removed)."""
        return self._sink.status()

    async def receive(self) -> ItemT:
        """Wait for the next item.

        With ``report_missed=True``, a :class:`MissedEvents` marker comes
        right before the first event delivered after a loss, and once more
        at the end of the stream if events were lost after the last one.

        Raises:
          trio.EndOfChannel: the sink was removed or the session ended, and
            everything buffered has been received.
          trio.ClosedResourceError: this subscription was closed.
        """
        if not self._sink.tagged:
            return cast(ItemT, await self._receive_channel.receive())
        if self._held is not None:
            # Checkpoint before taking the event: a receive cancelled here
            # must leave it for the next call.
            await trio.lowlevel.checkpoint()
            held = self._take_held()
            if held is not None:
                return held
        try:
            item = await self._receive_channel.receive()
        except trio.EndOfChannel:
            return self._end()
        return self._number(item)

    def receive_nowait(self) -> ItemT:
        """Return the next item if one is ready, without waiting.

        Raises:
          trio.WouldBlock: nothing is buffered yet.
          trio.EndOfChannel: as :meth:`receive`.
          trio.ClosedResourceError: this subscription was closed.
        """
        if not self._sink.tagged:
            return cast(ItemT, self._receive_channel.receive_nowait())
        held = self._take_held()
        if held is not None:
            return held
        try:
            item = self._receive_channel.receive_nowait()
        except trio.EndOfChannel:
            return self._end()
        return self._number(item)

    def _take_held(self) -> ItemT | None:
        if self._held is None:
            return None
        if self._closed:
            raise trio.ClosedResourceError("this subscription was closed")
        event, self._held = self._held, None
        return event

    def _number(self, item: object) -> ItemT:
        sequence, event = cast("tuple[int, ObserverEvent]", item)
        if sequence > self._next:
            marker = self._marker(sequence)
            self._held = event
            self._next = sequence + 1
            return cast(ItemT, marker)
        self._next = sequence + 1
        return event

    def _end(self) -> ItemT:
        # Numbers handed out after the last event received belong to
        # events that were never delivered.
        if self._sink.sequence > self._next:
            return cast(ItemT, self._marker(self._sink.sequence))
        raise trio.EndOfChannel

    def _marker(self, sequence: int) -> MissedEvents:
        lost, self._next = sequence - self._next, sequence
        return MissedEvents(lost)

    def clone(self) -> Subscription[ItemT]:
        """Not supported: open another subscription instead.

        A trio memory channel's clone shares one queue among readers (each
        item goes to one of them). A subscription's counters and
        :class:`MissedEvents` markers describe one reader's stream, which a
        shared queue would split; a second :meth:`ObserverRegistry.subscribe`
        gives a second reader every event, with its own counters.

        Raises:
          NotImplementedError: always.
        """
        raise NotImplementedError(
            "Subscription.clone() is not supported: its counters and MissedEvents "
            "markers describe one reader's stream; open another subscription with "
            "ObserverRegistry.subscribe() to give another task every event"
        )

    def close(self) -> None:
        """Stop receiving: the sink is disconnected, later events count as missed.

        Later :meth:`receive` calls raise ``trio.ClosedResourceError``, and a
        task blocked in one is woken with it. Idempotent.
        """
        self._closed = True
        self._receive_channel.close()

    async def aclose(self) -> None:
        """:meth:`close`, then a checkpoint."""
        self.close()
        await trio.lowlevel.checkpoint()
