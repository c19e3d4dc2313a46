"""Subscriptions: a sink with a lifetime, and in-band notice of loss."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar, cast, final

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
class Subscription(Generic[ItemT]):
    """A registered sink together with its receiving end.

    Iterate it with ``async for``; the loop ends when the sink is removed
    (the ``async with`` block that opened it exits) or when the session ends.
    Obtained from :meth:`ObserverRegistry.subscribe`; not constructed by users.
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
        """
        if not self._sink.tagged:
            return cast(ItemT, await self._receive_channel.receive())
        if self._held is not None:
            # Checkpoint before taking the event: a receive cancelled here
            # must leave it for the next call.
            await trio.lowlevel.checkpoint()
            if self._held is not None:
                event, self._held = self._held, None
                return event
        try:
            item = await self._receive_channel.receive()
        except trio.EndOfChannel:
            # Numbers handed out after the last event received belong to
            # events that were never delivered.
            if self._sink.sequence > self._next:
                return cast(ItemT, self._marker(self._sink.sequence))
            raise
        sequence, event = cast("tuple[int, ObserverEvent]", item)
        if sequence > self._next:
            marker = self._marker(sequence)
            self._held = event
            self._next = sequence + 1
            return cast(ItemT, marker)
        self._next = sequence + 1
        return event

    def _marker(self, sequence: int) -> MissedEvents:
        lost, self._next = sequence - self._next, sequence
        return MissedEvents(lost)

    # __anext__ on the class rather than an async generator, as trio's own
    # channels do: a consumer that breaks out of its loop leaves no
    # unfinished generator behind for the garbage collector to warn about.
    def __aiter__(self) -> Subscription[ItemT]:
        return self

    async def __anext__(self) -> ItemT:
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None
