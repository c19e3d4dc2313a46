"""The observer registry: routing events to sinks, backpressure, subscribe."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Final, Literal, final, overload

import trio

from ._checks import check_bool, check_int
from ._events import EventCategory, ObserverEvent
from ._ki import ki_protected_context
from ._sink import (
    DELIVERED,
    FULL,
    ObserverBackpressure,
    ObserverSinkStatus,
    ObserverSubscriberId,
    _Sink,
    check_backpressure,
)
from ._subscription import MissedEvents, Subscription

_ALL_CATEGORIES: Final = tuple(EventCategory)
# An except clause is evaluated only when something is raised, so this saves
# one attribute lookup per event on a full channel only: the path a
# DROP_OLDEST sink takes when its consumer lags, which is when it matters.
_WouldBlock: Final = trio.WouldBlock

# One frozenset per distinct set of categories (there are 16), shared by
# every sink that wants that set: a set of one costs 216 bytes, more than
# the pair each route holds per sink, and a sink's size is a documented
# figure.
_CATEGORY_SETS: Final[dict[frozenset[EventCategory], frozenset[EventCategory]]] = {}


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

    def __init__(
        self,
        *,
        category_check: Callable[[frozenset[EventCategory]], None] | None = None,
        on_interest_changed: Callable[[], None] | None = None,
    ) -> None:
        """Make an empty registry.

        Args:
          category_check: Called with the categories of every new sink
            before it is registered; it raises to refuse them (a session
            refuses categories this machine cannot observe).
          on_interest_changed: Called after a sink was added or removed, so
            that its owner can follow what is wanted (a session starts the
            tree observer when the first PROCESS/FILE/NETWORK sink arrives
            and stops it when the last goes).
        """
        self._sinks: dict[ObserverSubscriberId, _Sink] = {}
        # The sinks of each category, in registration order, rebuilt whenever
        # a sink comes, goes or disconnects. Emitting walks one tuple with no
        # filtering, and wants() is a truth test: nobody pays for unwanted
        # events.
        self._by_category: dict[EventCategory, tuple[_Sink, ...]] = dict.fromkeys(
            _ALL_CATEGORIES, ()
        )
        # The same split in two: plain connected DROP_OLDEST sinks, which
        # emit() serves in a tight loop, and the rest (BLOCK, tagged, or
        # disconnected), which need the general path.
        self._routes: dict[EventCategory, tuple[_Plain, tuple[_Sink, ...]]] = dict.fromkeys(
            _ALL_CATEGORIES, ((), ())
        )
        # One bound method for every sink to call when it finds its receiver
        # gone, rather than one per sink: a sink's size is a documented figure.
        self._on_sink_disconnect = self._rebuild_routes
        self._category_check = category_check
        self._on_interest_changed = on_interest_changed
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

    @trio.lowlevel.enable_ki_protection
    def _add(
        self,
        categories: Iterable[EventCategory],
        capacity: int,
        backpressure: ObserverBackpressure,
        *,
        tagged: bool,
    ) -> tuple[ObserverSubscriberId, trio.MemoryReceiveChannel[object]]:
        # Protected from KeyboardInterrupt, as remove() and close() are: a
        # sink registered but not yet in the routes would be skipped by
        # every emit without a count.
        wanted = _check_categories(categories)
        check_int("capacity", capacity, minimum=0)
        check_backpressure(backpressure)
        if self._closed:
            raise trio.ClosedResourceError("this observer registry's session has ended")
        if self._category_check is not None:
            self._category_check(wanted)
        send_channel, receive_channel = trio.open_memory_channel[object](max(capacity, 1))
        sink_id = ObserverSubscriberId.new()
        self._sinks[sink_id] = _Sink(
            wanted, send_channel, backpressure, tagged, self._on_sink_disconnect
        )
        self._interest_changed()
        return sink_id, receive_channel

    @trio.lowlevel.enable_ki_protection
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
            _check_sink_id(sink_id)
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
    @overload
    def subscribe(
        self,
        categories: Iterable[EventCategory],
        *,
        capacity: int = ...,
        backpressure: ObserverBackpressure = ...,
        report_missed: bool,
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

    # Entered and exited under protection: a Ctrl-C after _add but before
    # the try below (or in contextlib's __aenter__, after the yield) left
    # the sink registered with nobody holding its receiver.
    @ki_protected_context
    async def _subscribe(
        self,
        categories: Iterable[EventCategory],
        capacity: int,
        backpressure: ObserverBackpressure,
        report_missed: bool,
    ) -> AsyncIterator[Subscription[Any]]:
        sink_id, receive_channel = self._add(
            categories, capacity, backpressure, tagged=check_bool("report_missed", report_missed)
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
        if sink is None:
            _check_sink_id(sink_id)
            return None
        return sink.status()

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
        try:
            return bool(self._by_category[category])
        except (KeyError, TypeError):
            raise TypeError(f"category must be an EventCategory, not {category!r}") from None

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    @trio.lowlevel.enable_ki_protection
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

    def _rebuild_routes(self) -> None:
        sinks = tuple(self._sinks.values())
        for category in _ALL_CATEGORIES:
            wanting = tuple(s for s in sinks if category in s.categories)
            self._by_category[category] = wanting
            self._routes[category] = (
                tuple((s, s.send_nowait) for s in wanting if s.plain),
                tuple(s for s in wanting if not s.plain),
            )

    def _interest_changed(self) -> None:
        self._rebuild_routes()
        if self._on_interest_changed is not None:
            self._on_interest_changed()

    # -- emitting -------------------------------------------------------
    #
    # Every emit path is protected from KeyboardInterrupt: a Ctrl-C landing
    # between a send_nowait() that put the event in a channel and the
    # counter that records it would leave that sink's counts short. With
    # protection trio delivers it at the caller's next checkpoint instead
    # (or where emit waits, which counts what it had not delivered). In
    # trio 0.35 the decorator only marks the code object, so it costs
    # nothing per call (docs/performance.md).
    #
    # The plain route's loop is written out in emit() and emit_nowait():
    # one call per event was a fifth of the budget the target leaves.

    @trio.lowlevel.enable_ki_protection
    def emit_nowait(self, event: ObserverEvent) -> None:
        """Deliver ``event`` to every matching sink without waiting.

        A full channel counts the event as missed, whatever the sink's
        policy. The session uses this where it must not wait (while it tears
        a process tree down after a cancellation). It is also the cheapest
        way to emit to ``DROP_OLDEST`` sinks: no coroutine is made.

        Raises:
          TypeError: ``event`` is not an :class:`ObserverEvent` (its
            ``category`` not an :class:`EventCategory`), before it is
            delivered anywhere.
        """
        # No early return for an empty registry: the routes are empty then,
        # and the check cost every delivering call more than it saved.
        try:
            plain, general = self._routes[event.category]
        except (AttributeError, KeyError, TypeError):
            raise _not_an_event("event", event) from None
        for sink, send_nowait in plain:
            try:
                send_nowait(event)
                sink.delivered += 1
            except _WouldBlock:
                sink.missed += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                # A disconnect rebuilds the routes; this loop holds the old tuple.
                sink.count_failure(exc)
        if general:
            for sink in general:
                sink.offer(event, may_wait=False)

    @trio.lowlevel.enable_ki_protection
    async def emit(self, event: ObserverEvent) -> None:
        """Deliver ``event`` to every sink whose categories include it.

        ``DROP_OLDEST`` sinks get it at once or count it as missed. ``BLOCK``
        sinks that are full are waited on, one after another, only after
        every other sink has had its chance; so however slow a ``BLOCK``
        consumer is, every other sink has the event delivered or counted
        before this call starts to wait. A sink registered while this call
        waits does not get the event: its delivery had begun.

        With no matching sink this returns at once, without a checkpoint:
        it is on the spawn and reap paths, and an idle registry must cost
        one check. With only ``DROP_OLDEST`` sinks it never yields either.
        After delivering to a ``BLOCK`` sink it yields to the scheduler (a
        cancel-shielded checkpoint), as trio's own ``send`` does, so that the
        consumer runs before the channel fills up.

        Cancellation while waiting counts the event as missed on every
        ``BLOCK`` sink that had not received it yet, then raises
        ``trio.Cancelled``. A ``KeyboardInterrupt`` never lands between
        delivering to a sink and counting it: it is raised where this call
        waits, or at the caller's next checkpoint.

        Raises:
          TypeError: ``event`` is not an :class:`ObserverEvent` (its
            ``category`` not an :class:`EventCategory`), before it is
            delivered anywhere. With no sink at all it is not looked at:
            that path is one check.
        """
        if not self._sinks:
            return
        # Both routes are read before delivering: a sink that disconnects
        # now moves to the general route, and must not be counted twice.
        try:
            plain, general = self._routes[event.category]
        except (AttributeError, KeyError, TypeError):
            raise _not_an_event("event", event) from None
        for sink, send_nowait in plain:
            try:
                send_nowait(event)
                sink.delivered += 1
            except _WouldBlock:
                sink.missed += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                sink.count_failure(exc)
        if general:
            await _emit_general(general, event)

    @trio.lowlevel.enable_ki_protection
    async def emit_many(self, events: Iterable[ObserverEvent]) -> None:
        """Deliver several events, in order, as :meth:`emit` delivers each.

        For a caller that has a batch at hand (a pass of the tree
        observer): with only ``DROP_OLDEST`` sinks it costs one coroutine
        for the whole batch instead of one per event, and each sink takes a
        run of same-category events in one loop. Every sink sees the events
        in the batch's order and counts each once, as with ``for event in
        events: await registry.emit(event)``; the one difference is that a
        ``DROP_OLDEST`` sink may get the rest of a run before a full
        ``BLOCK`` sink is waited on for its first event.

        Sinks may come and go while this waits on a ``BLOCK`` sink. One
        registered meanwhile gets the events whose delivery had not begun
        (those after the one being waited on), in order, and counts only
        those; one removed meanwhile is offered nothing more and counts
        nothing more.

        Cancellation while waiting on a ``BLOCK`` sink counts that event as
        :meth:`emit` does, and every event of the batch not yet offered to a
        sink as missed on that sink, then raises ``trio.Cancelled``: no
        event of the batch goes uncounted.

        Raises:
          TypeError: ``events`` is not iterable, or an item of it is not an
            :class:`ObserverEvent` (its ``category`` not an
            :class:`EventCategory`): raised, naming the item's index,
            before any event of the batch is delivered. With no sink at
            all the batch is not looked at.
        """
        if not self._sinks:
            return
        if isinstance(events, (list, tuple)):
            batch: Sequence[ObserverEvent] = events
        else:
            try:
                batch = tuple(events)
            except TypeError:
                raise TypeError(
                    f"events must be an iterable of ObserverEvent, not {events!r}"
                ) from None
        end = len(batch)
        # A run of events of one category shares its routes, and each plain
        # sink takes the whole run in one loop of its own (a DROP_OLDEST
        # sink never waits, so it may run ahead of the BLOCK sinks; each
        # sink still sees the events in order). The runs are found before
        # anything is delivered, so a bad item is refused with nothing of
        # the batch delivered or counted.
        runs: list[tuple[int, int, EventCategory]] = []
        start = 0
        try:
            while start < end:
                category = batch[start].category
                if category not in self._routes:
                    raise KeyError(category)
                stop = start + 1
                while stop < end and batch[stop].category is category:
                    stop += 1
                runs.append((start, stop, category))
                start = stop
        except (AttributeError, KeyError, TypeError):
            index = next((i for i, item in enumerate(batch) if not _is_event(item)), None)
            if index is None:
                raise  # from an item that passes for an event; not ours to name
            raise _not_an_event(f"events[{index}]", batch[index]) from None
        for start, stop, category in runs:
            run = batch[start:stop] if start or stop < end else batch
            routes = self._routes[category]
            plain, general = routes
            for sink, send_nowait in plain:
                _offer_run(sink, send_nowait, run)
            if general:
                served: set[_Sink] | None = None
                index = 0
                try:
                    while index < len(run):
                        await _emit_general(general, run[index])
                        index += 1
                        if self._routes[category] is not routes:
                            # Sinks came or went while that event waited.
                            if served is None:
                                served = {sink for sink, _ in plain}
                            routes = self._routes[category]
                            general = _rejoin(routes, served, run[index:])
                except BaseException:
                    # The plain sinks have this run already.
                    for _ in run[index + 1 :]:
                        for sink in general:
                            sink.count_missed()
                    for unsent in batch[stop:]:
                        for sink in self._by_category[unsent.category]:
                            sink.count_missed()
                    raise


def _check_sink_id(sink_id: object) -> None:
    # Only where an id was not found: the string form (as_str()) of a
    # registered id would otherwise read as "not registered".
    if not isinstance(sink_id, ObserverSubscriberId):
        raise TypeError(f"sink_id must be an ObserverSubscriberId, not {sink_id!r}")


def _is_event(item: object) -> bool:
    return isinstance(getattr(item, "category", None), EventCategory)


def _not_an_event(name: str, item: object) -> TypeError:
    if hasattr(item, "category"):
        category = item.category
        return TypeError(f"{name}.category must be an EventCategory, not {category!r}")
    return TypeError(f"{name} must be an ObserverEvent, not {item!r}")


_Plain = tuple[tuple[_Sink, Callable[[object], None]], ...]
"""The plain route: each connected, untagged DROP_OLDEST sink with its bound
``send_nowait`` (unpacked from a pair, it is one attribute lookup fewer per
sink and event than ``sink.send_nowait``)."""


def _rejoin(
    routes: tuple[_Plain, tuple[_Sink, ...]], served: set[_Sink], rest: Sequence[ObserverEvent]
) -> tuple[_Sink, ...]:
    """Bring a run's delivery up to date with the current ``routes``.

    ``served`` are the sinks that took the whole run on the plain route. A
    plain sink registered since gets ``rest`` now (and joins ``served``).
    Returns the general sinks for ``rest``: those still registered that are
    not served, new ones included; one that was plain and disconnected
    since was served already, and one removed since is left out.
    """
    plain, general = routes
    for sink, send_nowait in plain:
        if sink not in served:
            served.add(sink)
            _offer_run(sink, send_nowait, rest)
    return tuple(sink for sink in general if sink not in served)


def _offer_run(
    sink: _Sink, send_nowait: Callable[[object], None], run: Sequence[ObserverEvent]
) -> None:
    # emit()'s plain loop turned inside out for emit_many: one sink, many
    # events, and `delivered` counted once per run.
    delivered = 0
    for event in run:
        try:
            send_nowait(event)
            delivered += 1
        except _WouldBlock:
            sink.missed += 1
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            sink.count_failure(exc)
    sink.delivered += delivered


async def _emit_general(sinks: tuple[_Sink, ...], event: ObserverEvent) -> None:
    """Deliver to BLOCK, tagged and disconnected sinks (see emit)."""
    waiting: list[_Sink] | None = None
    delivered_to_block = False
    for sink in sinks:
        outcome = sink.offer(event, may_wait=True)
        if outcome == FULL:
            if waiting is None:
                waiting = []
            waiting.append(sink)
        elif outcome == DELIVERED and sink.backpressure is ObserverBackpressure.BLOCK:
            delivered_to_block = True
    if waiting is not None:
        for index, sink in enumerate(waiting):
            try:
                await sink.send(event)
            except BaseException:
                # Cancelled (or worse) while waiting: the sinks after this
                # one never got the event. Account for it, then go.
                for unsent in waiting[index + 1 :]:
                    unsent.count_missed()
                raise
    elif delivered_to_block:
        await trio.lowlevel.cancel_shielded_checkpoint()


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
    return _CATEGORY_SETS.setdefault(wanted, wanted)
