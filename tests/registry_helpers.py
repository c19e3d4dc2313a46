"""What the registry tests share: short names, an event maker, a pending emit."""

from __future__ import annotations

import trio
import trio.testing

from trio_observer import (
    ObserverBackpressure,
    ObserverRegistry,
    ObserverSinkStatus,
    ObserverSubscriberId,
)
from trio_observer._events import EventCategory, ObserverEvent, ObserverEventKind

LIFECYCLE = EventCategory.LIFECYCLE
FILE = EventCategory.FILE
PROCESS = EventCategory.PROCESS
NETWORK = EventCategory.NETWORK
BLOCK = ObserverBackpressure.BLOCK
DROP = ObserverBackpressure.DROP_OLDEST

_KIND = {
    LIFECYCLE: ObserverEventKind.STARTED,
    PROCESS: ObserverEventKind.DESCENDANT_STARTED,
    FILE: ObserverEventKind.FILE_OPEN,
    NETWORK: ObserverEventKind.SOCKET_LISTEN,
}


def ev(pid: int, category: EventCategory = LIFECYCLE) -> ObserverEvent:
    """An event told apart from the others by its pid."""
    return ObserverEvent(category=category, kind=_KIND[category], pid=pid, timestamp_ms=0.0)


def status(registry: ObserverRegistry, sink_id: ObserverSubscriberId) -> ObserverSinkStatus:
    found = registry.status(sink_id)
    assert found is not None, "sink should still be registered"
    return found


def drain(receive_channel: trio.MemoryReceiveChannel[ObserverEvent]) -> list[int]:
    """The pids of everything buffered, without waiting."""
    pids = []
    while True:
        try:
            pids.append(receive_channel.receive_nowait().pid)
        except (trio.WouldBlock, trio.EndOfChannel):
            return pids


def snapshot(registry: ObserverRegistry) -> tuple[int, list[bool]]:
    """What registering a sink changes: the count and what is wanted."""
    return len(registry), [registry.wants(category) for category in EventCategory]


class PendingEmit:
    """An ``emit`` running in its own task, so a test can see it block.

    ``done`` is set only when ``emit`` returned normally; ``cancelled`` only
    when ``trio.Cancelled`` came out of it and reached the scope.
    """

    def __init__(self, registry: ObserverRegistry, event: ObserverEvent) -> None:
        self.registry = registry
        self.event = event
        self.scope = trio.CancelScope()
        self.done = False
        self.cancelled = False

    async def run(self) -> None:
        with self.scope:
            await self.registry.emit(self.event)
            self.done = True
        self.cancelled = self.scope.cancelled_caught


async def start_emit(
    nursery: trio.Nursery, registry: ObserverRegistry, event: ObserverEvent
) -> PendingEmit:
    pending = PendingEmit(registry, event)
    nursery.start_soon(pending.run)
    await trio.testing.wait_all_tasks_blocked()
    return pending
