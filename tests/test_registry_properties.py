"""Property tests for the observer registry: every matching event is accounted for.

Random sequences of operations (add a sink or a subscription, emit, emit a
batch with ``emit_many``, receive, close a receiver, remove a sink, close the
registry) run against a real
registry and against a plain model of bounded channels. After every step each
sink's counters must equal the model's, and ``delivered + missed`` must equal
the number of matching events emitted while the sink was registered. At the
end every consumer drains its channel: the events it received are exactly the
delivered ones, in emit order, and a ``report_missed`` subscription's markers
sit exactly where the losses were.

Everything is deterministic: nothing ever waits for real. A ``BLOCK`` emit
that finds a full channel is run in a task, shown to be blocked with
``wait_all_tasks_blocked`` (and shown *not* to block otherwise), then
cancelled, which the registry counts as missed.
"""

from __future__ import annotations

import enum
from collections import deque
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field

import hypothesis
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_observer import (
    MissedEvents,
    ObserverBackpressure,
    ObserverRegistry,
    ObserverSinkStatus,
    ObserverSubscriberId,
    Subscription,
)
from trio_observer._events import EventCategory, ObserverEvent, ObserverEventKind

BLOCK = ObserverBackpressure.BLOCK

# -- operations -----------------------------------------------------------------


@dataclass(frozen=True)
class Add:
    categories: frozenset[EventCategory]
    capacity: int
    backpressure: ObserverBackpressure
    report_missed: bool
    """Register through ``subscribe(report_missed=True)`` instead of
    ``add_channel``."""


@dataclass(frozen=True)
class Emit:
    category: EventCategory
    wait: bool
    """``emit`` (in a task, cancelled if it blocks) rather than ``emit_nowait``."""


@dataclass(frozen=True)
class EmitMany:
    categories: tuple[EventCategory, ...]
    """One event per entry, through ``emit_many`` (in a task, cancelled if
    it blocks)."""


@dataclass(frozen=True)
class Receive:
    sink: int
    count: int


@dataclass(frozen=True)
class CloseReceiver:
    sink: int


@dataclass(frozen=True)
class Remove:
    sink: int


@dataclass(frozen=True)
class CloseRegistry:
    pass


Operation = Add | Emit | EmitMany | Receive | CloseReceiver | Remove | CloseRegistry

_SINK_INDEX = st.integers(0, 7)
_ADD = st.builds(
    Add,
    st.frozensets(st.sampled_from(EventCategory)),
    st.integers(0, 5),
    st.sampled_from(ObserverBackpressure),
    st.booleans(),
)
_EMIT = st.builds(Emit, st.sampled_from(EventCategory), st.booleans())
_EMIT_MANY = st.builds(
    EmitMany, st.lists(st.sampled_from(EventCategory), min_size=0, max_size=6).map(tuple)
)
_RECEIVE = st.builds(Receive, _SINK_INDEX, st.integers(1, 4))
_CLOSE_RECEIVER = st.builds(CloseReceiver, _SINK_INDEX)
_REMOVE = st.builds(Remove, _SINK_INDEX)
_CLOSE_REGISTRY = st.just(CloseRegistry())
# Weighted by repetition: emits are what the invariants are about, and
# closing the registry ends most of the interesting behaviour, so it is rare.
_OPERATION = st.sampled_from(
    [_ADD] * 4
    + [_EMIT] * 8
    + [_EMIT_MANY] * 3
    + [_RECEIVE] * 4
    + [_CLOSE_RECEIVER, _REMOVE, _REMOVE]
    + [_CLOSE_REGISTRY]
).flatmap(lambda strategy: strategy)
OPERATIONS = st.lists(_OPERATION, min_size=20, max_size=60)

_KIND = {
    EventCategory.LIFECYCLE: ObserverEventKind.STARTED,
    EventCategory.PROCESS: ObserverEventKind.DESCENDANT_STARTED,
    EventCategory.FILE: ObserverEventKind.FILE_OPEN,
    EventCategory.NETWORK: ObserverEventKind.SOCKET_LISTEN,
}

# -- the model --------------------------------------------------------------------


class Outcome(enum.Enum):
    """What a receive gave when it gave no item."""

    END = "end"
    """The stream ended (EndOfChannel)."""
    BLOCKS = "blocks"
    """The receive would wait."""


END = Outcome.END
BLOCKS = Outcome.BLOCKS


@dataclass
class SinkModel:
    """One sink as a plain bounded queue, plus what its consumer saw."""

    sink_id: ObserverSubscriberId
    categories: frozenset[EventCategory]
    capacity: int
    backpressure: ObserverBackpressure
    receive_channel: trio.MemoryReceiveChannel[ObserverEvent] | None = None
    subscription: Subscription[ObserverEvent | MissedEvents] | None = None
    exit_subscription: AbstractAsyncContextManager[object] | None = None
    registered: bool = True
    send_closed: bool = False
    receiver_closed: bool = False
    buffer: deque[int] = field(default_factory=deque)
    matching: list[int] = field(default_factory=list)
    """Pids of the matching events emitted while registered, in order."""
    delivered_pids: set[int] = field(default_factory=set)
    missed: int = 0
    received: list[int | MissedEvents] = field(default_factory=list)
    # For report_missed: the position in `matching` the consumer has reached,
    # and an event taken from the channel while its marker went out first.
    position: int = 0
    held: int | None = None

    @property
    def delivered(self) -> int:
        return len(self.delivered_pids)

    def offer(self, pid: int, *, may_wait: bool) -> bool:
        """Apply one matching emit; return True if a real emit would block."""
        self.matching.append(pid)
        if self.receiver_closed or self.send_closed:
            self.missed += 1
            return False
        if len(self.buffer) < self.capacity:
            self.buffer.append(pid)
            self.delivered_pids.add(pid)
            return False
        # Full: DROP_OLDEST and emit_nowait count it now; a blocked BLOCK
        # emit is cancelled by the harness, which also counts it.
        self.missed += 1
        return may_wait and self.backpressure is BLOCK

    def lose(self, pid: int) -> None:
        """A matching event never offered (an ``emit_many`` cancelled before it)."""
        self.matching.append(pid)
        self.missed += 1

    def expected_status(self) -> ObserverSinkStatus:
        return ObserverSinkStatus(self.missed, self.delivered, self.receiver_closed)

    def receive_plain(self) -> int | Outcome:
        if self.buffer:
            return self.buffer.popleft()
        return END if self.send_closed else BLOCKS

    def receive_marked(self) -> int | MissedEvents | Outcome:
        """What a ``report_missed`` subscription must yield next, by position:
        a marker counts the matching events before the next one that never
        reached the channel."""
        if self.held is not None:
            pid, self.held = self.held, None
            return pid
        if self.buffer:
            pid = self.buffer.popleft()
            index = self.matching.index(pid)
            lost, self.position = index - self.position, index + 1
            if lost:
                self.held = pid
                return MissedEvents(lost)
            return pid
        if not self.send_closed:
            return BLOCKS
        lost, self.position = len(self.matching) - self.position, len(self.matching)
        return MissedEvents(lost) if lost else END


class Harness:
    def __init__(self) -> None:
        self.registry = ObserverRegistry()
        self.sinks: list[SinkModel] = []
        self.next_pid = 0

    def pick(self, index: int) -> SinkModel | None:
        return self.sinks[index % len(self.sinks)] if self.sinks else None

    async def apply(self, operation: Operation) -> None:
        match operation:
            case Add():
                await self.add(operation)
            case Emit():
                await self.emit(operation)
            case EmitMany():
                await self.emit_many(operation)
            case Receive():
                sink = self.pick(operation.sink)
                if sink is not None:
                    for _ in range(operation.count):
                        if not await self.receive_one(sink):
                            break
            case CloseReceiver():
                sink = self.pick(operation.sink)
                if sink is not None and sink.receive_channel is not None:
                    sink.receive_channel.close()
                    sink.receiver_closed = True
            case Remove():
                sink = self.pick(operation.sink)
                if sink is not None:
                    await self.remove(sink)
            case CloseRegistry():
                self.registry.close()
                for sink in self.sinks:
                    sink.send_closed = True

    async def add(self, operation: Add) -> None:
        before = len(self.registry)
        if self.registry.closed:
            try:
                if operation.report_missed:
                    await self.registry.subscribe(operation.categories).__aenter__()
                else:
                    self.registry.add_channel(operation.categories, 1, BLOCK)
            except trio.ClosedResourceError:
                assert len(self.registry) == before
                return
            raise AssertionError("a closed registry accepted a sink")
        capacity = max(operation.capacity, 1)
        if operation.report_missed:
            manager = self.registry.subscribe(
                operation.categories,
                capacity=operation.capacity,
                backpressure=operation.backpressure,
                report_missed=True,
            )
            subscription = await manager.__aenter__()
            model = SinkModel(
                subscription.id,
                operation.categories,
                capacity,
                operation.backpressure,
                subscription=subscription,
                exit_subscription=manager,
            )
        else:
            sink_id, receive_channel = self.registry.add_channel(
                operation.categories, operation.capacity, operation.backpressure
            )
            model = SinkModel(
                sink_id,
                operation.categories,
                capacity,
                operation.backpressure,
                receive_channel=receive_channel,
            )
        self.sinks.append(model)
        assert len(self.registry) == before + 1

    async def emit(self, operation: Emit) -> None:
        pid = self.next_pid
        self.next_pid += 1
        event = ObserverEvent(
            category=operation.category,
            kind=_KIND[operation.category],
            pid=pid,
            timestamp_ms=0.0,
        )
        would_block = False
        for sink in self.sinks:
            if sink.registered and operation.category in sink.categories:
                would_block |= sink.offer(pid, may_wait=operation.wait)
        assert self.registry.wants(operation.category) == any(
            sink.registered and operation.category in sink.categories for sink in self.sinks
        )
        if not operation.wait:
            self.registry.emit_nowait(event)
            return
        finished = False
        scope = trio.CancelScope()

        async def run() -> None:
            nonlocal finished
            with scope:
                await self.registry.emit(event)
                finished = True

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            await trio.testing.wait_all_tasks_blocked()
            assert finished != would_block, "emit waited iff a matching BLOCK sink was full"
            scope.cancel()
        assert scope.cancelled_caught == would_block
        if would_block:
            hypothesis.event("a BLOCK emit waited and was cancelled")

    async def emit_many(self, operation: EmitMany) -> None:
        pids = list(range(self.next_pid, self.next_pid + len(operation.categories)))
        self.next_pid += len(pids)
        events = [
            ObserverEvent(category=category, kind=_KIND[category], pid=pid, timestamp_ms=0.0)
            for category, pid in zip(operation.categories, pids, strict=True)
        ]
        would_block = self.model_emit_many(events)
        finished = False
        scope = trio.CancelScope()

        async def run() -> None:
            nonlocal finished
            with scope:
                await self.registry.emit_many(events)
                finished = True

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            await trio.testing.wait_all_tasks_blocked()
            assert finished != would_block, "emit_many waited iff a BLOCK sink was full"
            scope.cancel()
        assert scope.cancelled_caught == would_block
        if would_block:
            hypothesis.event("an emit_many waited and was cancelled")

    def model_emit_many(self, events: list[ObserverEvent]) -> bool:
        """Apply ``emit_many`` to the model; True if the real one would wait.

        Run by run of one category: untagged DROP_OLDEST sinks take the whole
        run first, then the others event by event. At the first event a full
        BLOCK sink would wait on (the harness cancels it), every event not
        yet offered to a sink counts as missed on it.
        """
        start = 0
        while start < len(events):
            category = events[start].category
            stop = start + 1
            while stop < len(events) and events[stop].category is category:
                stop += 1
            wanting = [s for s in self.sinks if s.registered and category in s.categories]
            plain = [
                s
                for s in wanting
                if s.backpressure is ObserverBackpressure.DROP_OLDEST and s.subscription is None
            ]
            general = [s for s in wanting if s not in plain]
            for sink in plain:
                for event in events[start:stop]:
                    sink.offer(event.pid, may_wait=True)
            for index in range(start, stop):
                blocked = False
                for sink in general:
                    blocked |= sink.offer(events[index].pid, may_wait=True)
                if blocked:
                    for event in events[index + 1 : stop]:
                        for sink in general:
                            sink.lose(event.pid)
                    for event in events[stop:]:
                        for sink in self.sinks:
                            if sink.registered and event.category in sink.categories:
                                sink.lose(event.pid)
                    return True
            start = stop
        return False

    async def receive_one(self, sink: SinkModel) -> bool:
        """Receive one item from ``sink`` and check it; False when none came."""
        if sink.subscription is not None:
            expected_marked = sink.receive_marked()
            got = await _receive_or_block(sink.subscription)
            if isinstance(got, ObserverEvent):
                assert got.pid == expected_marked
                sink.received.append(got.pid)
                return True
            assert got == expected_marked
            if isinstance(got, MissedEvents):
                hypothesis.event("a subscription reported missed events")
                sink.received.append(got)
                return True
            return False
        if sink.receive_channel is None or sink.receiver_closed:
            return False
        expected = sink.receive_plain()
        try:
            event = sink.receive_channel.receive_nowait()
        except trio.WouldBlock:
            assert expected == BLOCKS
            return False
        except trio.EndOfChannel:
            assert expected is END
            return False
        assert event.pid == expected
        sink.received.append(event.pid)
        return True

    async def remove(self, sink: SinkModel) -> None:
        before = len(self.registry)
        if sink.exit_subscription is not None and sink.registered:
            await sink.exit_subscription.__aexit__(None, None, None)
        else:
            assert self.registry.remove(sink.sink_id) == sink.registered
        assert self.registry.status(sink.sink_id) is None
        assert len(self.registry) == before - sink.registered
        sink.registered = False
        sink.send_closed = True

    def check(self) -> None:
        """Counters equal the model's; nothing is lost from the books."""
        for sink in self.sinks:
            assert sink.delivered + sink.missed == len(sink.matching)
            if sink.registered:
                assert self.registry.status(sink.sink_id) == sink.expected_status()
            if sink.subscription is not None:
                # A subscription keeps its counters after it is removed.
                assert sink.subscription.status() == sink.expected_status()
        assert len(self.registry) == sum(sink.registered for sink in self.sinks)

    async def finish(self) -> None:
        """Remove everything, drain every consumer, check what it received."""
        for sink in self.sinks:
            if sink.registered:
                await self.remove(sink)
        self.check()
        for sink in self.sinks:
            while await self.receive_one(sink):
                pass
            events = [item for item in sink.received if isinstance(item, int)]
            # Received in emit order, and only matching events.
            assert events == sorted(events)
            assert set(events) <= set(sink.matching)
            if sink.receiver_closed:
                assert set(events) <= sink.delivered_pids
                continue
            # Everything delivered reached the consumer, nothing else did.
            assert set(events) == sink.delivered_pids
            if sink.subscription is not None:
                check_markers(sink)
            else:
                assert not any(isinstance(item, MissedEvents) for item in sink.received)


def check_markers(sink: SinkModel) -> None:
    """Before each event, the markers so far add up to the matching events
    that came before it and were not received; at the end, to all missed."""
    reported = 0
    received: set[int] = set()
    for item in sink.received:
        if isinstance(item, MissedEvents):
            assert item.count > 0
            reported += item.count
            continue
        before = sink.matching[: sink.matching.index(item)]
        assert reported == sum(pid not in received for pid in before)
        received.add(item)
    assert reported == sink.missed


async def _receive_or_block(
    subscription: Subscription[ObserverEvent | MissedEvents],
) -> ObserverEvent | MissedEvents | Outcome:
    """One ``receive()`` in a task: its item, END, or BLOCKS if it waited."""
    result: list[ObserverEvent | MissedEvents | Outcome] = []
    scope = trio.CancelScope()

    async def run() -> None:
        with scope:
            try:
                result.append(await subscription.receive())
            except trio.EndOfChannel:
                result.append(END)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        await trio.testing.wait_all_tasks_blocked()
        scope.cancel()
    return result[0] if result else BLOCKS


async def run_operations(operations: list[Operation]) -> None:
    harness = Harness()
    for operation in operations:
        await harness.apply(operation)
        harness.check()
    await harness.finish()


@settings(max_examples=200, deadline=None)
@given(operations=OPERATIONS)
def test_every_matching_event_is_delivered_or_counted_missed(
    operations: list[Operation],
) -> None:
    trio.run(run_operations, operations)
