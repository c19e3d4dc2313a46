"""The observer registry: bounded sinks, backpressure and loss accounting."""

from __future__ import annotations

import enum
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final, Generic, Literal, TypeVar, cast, final, overload

import trio

from ._events import EventCategory, ObserverEvent


class ObserverBackpressure(enum.Enum):
    """What an emitter does when a sink's channel is full."""

    DROP_OLDEST = "drop-oldest"
    """Never wait. The event that does not fit is dropped and counted in
    ``missed_events``. (The name is the reference's: the channel keeps the
    *oldest* events it already holds and drops the newcomer, so a consumer
    that falls behind sees the start of a burst, then a gap.)"""
    BLOCK = "block"
    """The emitter waits until the sink's channel has room."""


@final
class ObserverSubscriberId:
    """The id of a registered sink: a UUID version 4 string, 36 characters.

    Ids are equal by value and hashable, so a consumer can keep the string
    (``str(id)``) and look the sink up again with :meth:`from_string`.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError(f"subscriber id must be a str, not {type(value).__name__}")
        self._value = value

    @classmethod
    def new(cls) -> ObserverSubscriberId:
        """Return a fresh id from the operating system's random source."""
        # uuid4() draws from os.urandom, a CSPRNG; ids derived from clock
        # bits (as the reference did) can collide across processes.
        return cls(str(uuid.uuid4()))

    @classmethod
    def from_string(cls, value: str) -> ObserverSubscriberId:
        """Wrap an id previously obtained with ``str(id)`` or :meth:`as_str`."""
        return cls(value)

    def as_str(self) -> str:
        """Return the id as a string."""
        return self._value

    def __str__(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"ObserverSubscriberId({self._value!r})"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ObserverSubscriberId):
            return self._value == other._value
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._value)


@final
@dataclass(frozen=True, slots=True)
class ObserverSinkStatus:
    """A snapshot of one sink's counters."""

    missed_events: int
    """Matching events that were not delivered: the channel was full
    (``DROP_OLDEST``), the receiver had gone away, the sink was removed while
    an emitter waited on it, or the emitter was cancelled while it waited."""
    delivered_events: int
    """Matching events whose ``send`` completed: they are in the channel or
    already received."""
    disconnected: bool
    """True once the receiving side was closed; every later matching event
    counts as missed."""


@final
@dataclass(frozen=True, slots=True)
class MissedEvents:
    """In-band notice that ``count`` events were lost before the next one.

    Yielded by a subscription opened with ``report_missed=True``, like the
    ``Lagged(n)`` error of tokio's broadcast channel.
    """

    count: int
    """How many matching events this subscriber did not receive."""


class _Sink:
    """One registered sink. Counters only go up; the session's tasks are the
    only writers, and trio runs them one at a time, so no lock is needed."""

    __slots__ = (
        "backpressure",
        "categories",
        "delivered",
        "disconnected",
        "missed",
        "send_channel",
        "send_nowait",
        "sequence",
        "tagged",
    )

    def __init__(
        self,
        categories: frozenset[EventCategory],
        send_channel: trio.MemorySendChannel[object],
        backpressure: ObserverBackpressure,
        tagged: bool,
    ) -> None:
        self.categories = categories
        self.send_channel = send_channel
        # Bound once: emit()'s plain route calls it for every event.
        self.send_nowait = send_channel.send_nowait
        self.backpressure = backpressure
        # A tagged sink sends (sequence, event) pairs, which is how a
        # subscription knows exactly where a loss happened in its stream.
        self.tagged = tagged
        self.delivered = 0
        self.missed = 0
        self.disconnected = False
        # Every matching event takes the next number when its fate is decided
        # or its blocking send begins, which is channel order. A snapshot of
        # `missed` would not do: an emitter queued behind one that is then
        # cancelled carries the count from before that loss, and the marker
        # would land after its event instead of before.
        self.sequence = 0

    def item(self, event: ObserverEvent) -> object:
        """What to put in the channel for ``event``, numbered but unclaimed."""
        return (self.sequence, event) if self.tagged else event

    def claim(self, event: ObserverEvent) -> object:
        """Number ``event`` for a blocking send; its outcome is counted later."""
        item = self.item(event)
        self.sequence += 1
        return item

    def count_delivered(self) -> None:
        self.sequence += 1
        self.delivered += 1

    def count_missed(self) -> None:
        self.sequence += 1
        self.missed += 1

    @property
    def plain(self) -> bool:
        return (
            self.backpressure is ObserverBackpressure.DROP_OLDEST
            and not self.tagged
            and not self.disconnected
        )

    def mark_disconnected(self) -> None:
        self.disconnected = True
        self.send_channel.close()

    def status(self) -> ObserverSinkStatus:
        # The receiver may have been closed since an emit last looked; the
        # status says so at once, not only after the next matching event.
        receiver_gone = self.send_channel.statistics().open_receive_channels == 0
        return ObserverSinkStatus(self.missed, self.delivered, self.disconnected or receiver_gone)


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


_ALL_CATEGORIES: Final = tuple(EventCategory)


@final
class ObserverRegistry:
    """The set of sinks of one session; emitting fans an event out to them.

    Registrations belong to the registry (the session), not to a consumer:
    a sink stays registered until it is removed or the registry is closed,
    and its counters can be read with :meth:`status` even after its receiver
    went away. Events are not replayed to late subscribers.

    Users get a registry from :attr:`Session.observers`; constructing one is
    useful in tests.
    """

    def __init__(self) -> None:
        self._sinks: dict[ObserverSubscriberId, _Sink] = {}
        # The sinks of each category, in registration order, rebuilt whenever
        # a sink comes or goes. Emitting walks one tuple with no filtering,
        # and wants() is a truth test: nobody pays for unwanted events.
        self._by_category: dict[EventCategory, tuple[_Sink, ...]] = dict.fromkeys(
            _ALL_CATEGORIES, ()
        )
        # The same split in two: plain connected DROP_OLDEST sinks, which
        # emit() serves in a tight loop, and the rest (BLOCK, tagged, or
        # disconnected), which need the general path.
        self._routes: dict[EventCategory, tuple[tuple[_Sink, ...], tuple[_Sink, ...]]] = (
            dict.fromkeys(_ALL_CATEGORIES, ((), ()))
        )
        self._interest_callbacks: list[Callable[[], None]] = []
        # The session refuses categories this machine cannot observe here,
        # before anything is registered.
        self._category_checks: list[Callable[[frozenset[EventCategory]], None]] = []
        self._closed = False

    # -- registration ---------------------------------------------------

    def add_channel(
        self,
        categories: Iterable[EventCategory],
        capacity: int,
        backpressure: ObserverBackpressure,
    ) -> tuple[ObserverSubscriberId, trio.MemoryReceiveChannel[ObserverEvent]]:
        """Register a bounded sink and return its id and receiving end.

        Args:
          categories: The event categories this sink receives.
          capacity: How many events the channel buffers. 0 is treated as 1
            (a rendezvous channel would make every ``DROP_OLDEST`` event
            missed unless a receiver happened to be waiting).
          backpressure: What an emitter does when the channel is full.

        Returns:
          ``(id, receive_channel)``. Closing ``receive_channel`` marks the
          sink disconnected; it never affects the session or other sinks.

        Raises:
          TypeError: ``categories`` holds something that is not an
            :class:`EventCategory`, ``capacity`` is not an int, or
            ``backpressure`` is not an :class:`ObserverBackpressure`.
          ValueError: ``capacity`` is negative.
          trio.ClosedResourceError: the registry was closed (its session
            ended).
        """
        sink_id, receive_channel = self._add(categories, capacity, backpressure, tagged=False)
        return sink_id, receive_channel  # type: ignore[return-value]

    def _add(
        self,
        categories: Iterable[EventCategory],
        capacity: int,
        backpressure: ObserverBackpressure,
        *,
        tagged: bool,
    ) -> tuple[ObserverSubscriberId, trio.MemoryReceiveChannel[object]]:
        wanted = _check_categories(categories)
        if not isinstance(capacity, int) or isinstance(capacity, bool):
            raise TypeError(f"capacity must be an int, not {type(capacity).__name__}")
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        if not isinstance(backpressure, ObserverBackpressure):
            raise TypeError(
                "backpressure must be ObserverBackpressure.BLOCK or "
                f"ObserverBackpressure.DROP_OLDEST, not {backpressure!r}"
            )
        if self._closed:
            raise trio.ClosedResourceError("this observer registry's session has ended")
        for check in self._category_checks:
            check(wanted)
        send_channel, receive_channel = trio.open_memory_channel[object](max(capacity, 1))
        sink_id = ObserverSubscriberId.new()
        self._sinks[sink_id] = _Sink(wanted, send_channel, backpressure, tagged)
        self._interest_changed()
        return sink_id, receive_channel

    def remove(self, sink_id: ObserverSubscriberId) -> bool:
        """Unregister a sink and close its sending side.

        The consumer's ``async for`` ends after the events already buffered.
        An emitter waiting on this sink (``BLOCK``) is released without an
        error; the event it was delivering counts as missed.

        Returns:
          True if the sink was registered, False if it was not (a second
          call, or an unknown id).
        """
        sink = self._sinks.pop(sink_id, None)
        if sink is None:
            return False
        sink.send_channel.close()
        self._interest_changed()
        return True

    @overload
    def subscribe(
        self,
        categories: Iterable[EventCategory],
        *,
        capacity: int = ...,
        backpressure: ObserverBackpressure = ...,
        report_missed: Literal[False] = ...,
    ) -> AbstractAsyncContextManager[Subscription[ObserverEvent]]: ...
    @overload
    def subscribe(
        self,
        categories: Iterable[EventCategory],
        *,
        capacity: int = ...,
        backpressure: ObserverBackpressure = ...,
        report_missed: Literal[True],
    ) -> AbstractAsyncContextManager[Subscription[ObserverEvent | MissedEvents]]: ...
    def subscribe(
        self,
        categories: Iterable[EventCategory],
        *,
        capacity: int = 256,
        backpressure: ObserverBackpressure = ObserverBackpressure.DROP_OLDEST,
        report_missed: bool = False,
    ) -> AbstractAsyncContextManager[Subscription[Any]]:
        """Register a sink for the duration of an ``async with`` block.

        ::

            async with session.observers.subscribe([EventCategory.LIFECYCLE]) as sub:
                async for event in sub:
                    ...

        Args:
          categories: The event categories to receive.
          capacity: Channel size; see :meth:`add_channel`. The default, 256,
            absorbs the bursts of a build tool starting many processes.
          backpressure: ``DROP_OLDEST`` by default, so that a slow consumer
            never stalls the session; choose ``BLOCK`` when every event
            matters more than the pace of the processes.
          report_missed: When true, the subscription yields a
            :class:`MissedEvents` marker before the first event after a loss,
            so the consumer learns of it in-band, in the right place.

        Raises:
          TypeError, ValueError, trio.ClosedResourceError: as
            :meth:`add_channel`, when the block is entered.
        """
        return self._subscribe(categories, capacity, backpressure, report_missed)

    @asynccontextmanager
    async def _subscribe(
        self,
        categories: Iterable[EventCategory],
        capacity: int,
        backpressure: ObserverBackpressure,
        report_missed: bool,
    ) -> AsyncIterator[Subscription[Any]]:
        sink_id, receive_channel = self._add(
            categories, capacity, backpressure, tagged=report_missed
        )
        subscription: Subscription[Any] = Subscription(
            sink_id, self._sinks[sink_id], receive_channel
        )
        try:
            yield subscription
        finally:
            # Only the sending side: a consumer in another task drains what
            # is buffered and then its loop ends normally.
            self.remove(sink_id)

    def status(self, sink_id: ObserverSubscriberId) -> ObserverSinkStatus | None:
        """Return the sink's counters, or None if it is not registered."""
        sink = self._sinks.get(sink_id)
        return None if sink is None else sink.status()

    def __len__(self) -> int:
        return len(self._sinks)

    def is_empty(self) -> bool:
        """Return True when no sink is registered."""
        return not self._sinks

    def wants(self, category: EventCategory) -> bool:
        """Return True if some registered sink receives ``category``.

        Emitters call this before building an event, so an event nobody
        would receive is never built.
        """
        return bool(self._by_category[category])

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    def close(self) -> None:
        """Close every sink's sending side and refuse new sinks.

        Consumers' ``async for`` loops end after the events already buffered.
        Statuses stay readable. Idempotent. The session calls this when it
        ends.
        """
        if self._closed:
            return
        self._closed = True
        for sink in self._sinks.values():
            sink.send_channel.close()

    def _on_interest_changed(self, callback: Callable[[], None]) -> None:
        # The session uses this to start the tree poller when the first
        # PROCESS/FILE/NETWORK sink arrives and stop it when the last goes.
        self._interest_callbacks.append(callback)

    def _rebuild_routes(self) -> None:
        sinks = tuple(self._sinks.values())
        for category in _ALL_CATEGORIES:
            wanting = tuple(s for s in sinks if category in s.categories)
            self._by_category[category] = wanting
            self._routes[category] = (
                tuple(s for s in wanting if s.plain),
                tuple(s for s in wanting if not s.plain),
            )

    def _interest_changed(self) -> None:
        self._rebuild_routes()
        for callback in self._interest_callbacks:
            callback()

    # -- emitting -------------------------------------------------------

    def emit_nowait(self, event: ObserverEvent) -> None:
        """Deliver ``event`` to every matching sink without waiting.

        A full channel counts the event as missed, whatever the sink's
        policy. The session uses this where it must not wait (while it tears
        a process tree down after a cancellation).
        """
        for sink in self._by_category[event.category]:
            _push_nowait(sink, event)

    async def emit(self, event: ObserverEvent) -> None:
        """Deliver ``event`` to every sink whose categories include it.

        ``DROP_OLDEST`` sinks get it at once or count it as missed. ``BLOCK``
        sinks that are full are waited on, one after another, only after
        every other sink has had its chance; so however slow a ``BLOCK``
        consumer is, every other sink has the event delivered or counted
        before this call starts to wait.

        With no matching sink this returns at once, without a checkpoint:
        it is on the spawn and reap paths, and an idle registry must cost
        one check. With only ``DROP_OLDEST`` sinks it never yields either.
        After delivering to a ``BLOCK`` sink it yields to the scheduler (a
        cancel-shielded checkpoint), as trio's own ``send`` does, so that the
        consumer runs before the channel fills up.

        Cancellation while waiting counts the event as missed on every
        ``BLOCK`` sink that had not received it yet, then raises
        ``trio.Cancelled``.
        """
        if not self._sinks:
            return
        # Both routes are read before delivering: a sink that disconnects
        # now moves to the general route, and must not be counted twice.
        plain, general = self._routes[event.category]
        for sink in plain:
            try:
                sink.send_nowait(event)
            except trio.WouldBlock:
                sink.missed += 1
                continue
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                sink.missed += 1
                if isinstance(exc, trio.BrokenResourceError):
                    sink.mark_disconnected()
                    # It leaves the fast path; this loop holds the old tuple.
                    self._rebuild_routes()
                continue
            sink.delivered += 1
        if general:
            await _emit_general(general, event)


async def _emit_general(sinks: tuple[_Sink, ...], event: ObserverEvent) -> None:
    """Deliver to BLOCK, tagged and disconnected sinks (see emit)."""
    waiting: list[_Sink] | None = None
    delivered_to_block = False
    for sink in sinks:
        if sink.disconnected:
            sink.count_missed()
            continue
        try:
            sink.send_channel.send_nowait(sink.item(event))
        except trio.WouldBlock:
            if sink.backpressure is ObserverBackpressure.BLOCK:
                if waiting is None:
                    waiting = []
                waiting.append(sink)
            else:
                sink.count_missed()
            continue
        except trio.BrokenResourceError:
            sink.mark_disconnected()
            sink.count_missed()
            continue
        except trio.ClosedResourceError:
            # Removed, or the registry closed: nothing can be delivered.
            sink.count_missed()
            continue
        sink.count_delivered()
        if sink.backpressure is ObserverBackpressure.BLOCK:
            delivered_to_block = True
    if waiting is not None:
        await _send_waiting(waiting, event)
    elif delivered_to_block:
        await trio.lowlevel.cancel_shielded_checkpoint()


def _push_nowait(sink: _Sink, event: ObserverEvent) -> None:
    if sink.disconnected:
        sink.count_missed()
        return
    try:
        sink.send_channel.send_nowait(sink.item(event))
    except (trio.WouldBlock, trio.ClosedResourceError):
        sink.count_missed()
        return
    except trio.BrokenResourceError:
        sink.mark_disconnected()
        sink.count_missed()
        return
    sink.count_delivered()


async def _send_waiting(waiting: list[_Sink], event: ObserverEvent) -> None:
    for index, sink in enumerate(waiting):
        # Numbered now, not when the sink was found full: other emitters may
        # have queued on it since, and numbers must follow channel order.
        item = sink.claim(event)
        try:
            await sink.send_channel.send(item)
        except trio.BrokenResourceError:
            sink.mark_disconnected()
            sink.missed += 1
        except trio.ClosedResourceError:
            sink.missed += 1
        except BaseException:
            # Cancelled (or worse) while waiting: this sink and the ones
            # after it never got the event. Account for it, then go.
            sink.missed += 1
            for unsent in waiting[index + 1 :]:
                unsent.count_missed()
            raise
        else:
            sink.delivered += 1


def _check_categories(categories: Iterable[EventCategory]) -> frozenset[EventCategory]:
    if isinstance(categories, (str, bytes, EventCategory)):
        raise TypeError(
            "categories must be an iterable of EventCategory, e.g. "
            f"[EventCategory.LIFECYCLE], not {categories!r}"
        )
    wanted = frozenset(categories)
    for category in wanted:
        if not isinstance(category, EventCategory):
            allowed = ", ".join(f"EventCategory.{c.name}" for c in EventCategory)
            raise TypeError(f"categories: {category!r} is not an EventCategory ({allowed})")
    return wanted
