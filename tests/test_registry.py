"""Tests for the observer registry (_registry): sinks, backpressure, loss accounting."""

from __future__ import annotations

import gc
import uuid
from collections.abc import Iterable
from typing import Any

import pytest
import trio
import trio.testing

from trio_observer import (
    MissedEvents,
    ObserverBackpressure,
    ObserverRegistry,
    ObserverSinkStatus,
    ObserverSubscriberId,
    Subscription,
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


# -- carried over from the reference ------------------------------------------


async def test_only_matching_sinks_receive() -> None:
    registry = ObserverRegistry()
    _, lifecycle_rx = registry.add_channel([LIFECYCLE], 4, BLOCK)
    _, file_rx = registry.add_channel([FILE], 4, BLOCK)

    await registry.emit(ev(101, LIFECYCLE))
    received = lifecycle_rx.receive_nowait()
    assert (received.category, received.pid) == (LIFECYCLE, 101)
    with pytest.raises(trio.WouldBlock):
        file_rx.receive_nowait()

    await registry.emit(ev(202, FILE))
    received = file_rx.receive_nowait()
    assert (received.category, received.pid) == (FILE, 202)
    with pytest.raises(trio.WouldBlock):
        lifecycle_rx.receive_nowait()


async def test_drop_oldest_keeps_what_fits_and_counts_the_rest() -> None:
    registry = ObserverRegistry()
    sink_id, rx = registry.add_channel([LIFECYCLE], 2, DROP)
    for pid in range(5):
        await registry.emit(ev(pid))
    assert status(registry, sink_id) == ObserverSinkStatus(
        missed_events=3, delivered_events=2, disconnected=False
    )
    # The channel holds the start of the burst; the newcomers were dropped.
    assert drain(rx) == [0, 1]


async def test_removed_sink_gets_nothing_and_second_remove_is_false() -> None:
    registry = ObserverRegistry()
    sink_id, rx = registry.add_channel([LIFECYCLE], 4, BLOCK)
    assert registry.remove(sink_id) is True
    await registry.emit(ev(7))
    # The send side is closed and nothing was buffered: the stream is over.
    with pytest.raises(trio.EndOfChannel):
        rx.receive_nowait()
    assert registry.is_empty()
    assert len(registry) == 0
    assert registry.status(sink_id) is None
    assert registry.remove(sink_id) is False


async def test_emit_on_empty_registry_is_a_noop_without_checkpoint() -> None:
    registry = ObserverRegistry()
    with trio.CancelScope() as scope:
        scope.cancel()
        # Documented: with no sink, emit returns without a checkpoint, so a
        # pending cancellation is not delivered here.
        await registry.emit(ev(1))
        registry.emit_nowait(ev(2))
        reached = True
    assert reached
    assert not scope.cancelled_caught
    assert len(registry) == 0


async def test_unknown_id_is_not_registered() -> None:
    registry = ObserverRegistry()
    registry.add_channel([LIFECYCLE], 1, DROP)
    stranger = ObserverSubscriberId.new()
    assert registry.status(stranger) is None
    assert registry.remove(stranger) is False
    assert len(registry) == 1


def test_ids_are_unique_uuid4_strings() -> None:
    ids = {ObserverSubscriberId.new() for _ in range(1000)}
    assert len(ids) == 1000
    for sink_id in ids:
        text = sink_id.as_str()
        assert len(text) == 36
        assert uuid.UUID(text).version == 4
        assert str(uuid.UUID(text)) == text


async def test_registered_ids_are_distinct() -> None:
    registry = ObserverRegistry()
    first, _ = registry.add_channel([LIFECYCLE], 1, DROP)
    second, _ = registry.add_channel([LIFECYCLE], 1, DROP)
    assert first != second
    assert uuid.UUID(str(first)).version == 4


def test_id_compares_and_hashes_by_value() -> None:
    original = ObserverSubscriberId.new()
    text = str(original)
    assert text == original.as_str()
    again = ObserverSubscriberId.from_string(text)
    assert again is not original
    assert again == original
    assert hash(again) == hash(original)
    assert {original: "sink"}[again] == "sink"
    assert again != ObserverSubscriberId.new()
    # An id is not its string: comparing across types is simply unequal.
    assert original != text
    assert repr(original) == f"ObserverSubscriberId({text!r})"
    with pytest.raises(TypeError, match="subscriber id must be a str"):
        ObserverSubscriberId.from_string(42)  # type: ignore[arg-type]


async def test_status_lookup_by_id_from_string() -> None:
    registry = ObserverRegistry()
    sink_id, _ = registry.add_channel([LIFECYCLE], 1, DROP)
    await registry.emit(ev(1))
    assert status(registry, ObserverSubscriberId.from_string(str(sink_id))).delivered_events == 1
    assert registry.remove(ObserverSubscriberId.from_string(sink_id.as_str())) is True


# -- arguments ------------------------------------------------------------------


async def test_capacity_zero_is_treated_as_one() -> None:
    registry = ObserverRegistry()
    sink_id, rx = registry.add_channel([LIFECYCLE], 0, DROP)
    assert rx.statistics().max_buffer_size == 1
    # No receiver is waiting, yet the first event still fits.
    await registry.emit(ev(1))
    await registry.emit(ev(2))
    assert status(registry, sink_id) == ObserverSinkStatus(1, 1, False)
    assert drain(rx) == [1]


async def test_capacity_zero_block_sink_buffers_one_without_waiting() -> None:
    registry = ObserverRegistry()
    sink_id, rx = registry.add_channel([LIFECYCLE], 0, BLOCK)
    with trio.fail_after(1):
        await registry.emit(ev(1))
    assert status(registry, sink_id).delivered_events == 1
    assert drain(rx) == [1]


_BAD_ARGUMENTS = [
    pytest.param(([LIFECYCLE], -1, DROP), ValueError, "capacity must be >= 0", id="negative"),
    pytest.param(([LIFECYCLE], 1.0, DROP), TypeError, "capacity must be an int", id="float"),
    pytest.param(([LIFECYCLE], "2", DROP), TypeError, "capacity must be an int", id="str-cap"),
    pytest.param(([LIFECYCLE], True, DROP), TypeError, "capacity must be an int", id="bool-cap"),
    pytest.param(("lifecycle", 1, DROP), TypeError, "categories", id="str-categories"),
    pytest.param((["lifecycle"], 1, DROP), TypeError, "categories", id="str-in-list"),
    pytest.param(([LIFECYCLE, "file"], 1, DROP), TypeError, "categories", id="mixed-list"),
    pytest.param((LIFECYCLE, 1, DROP), TypeError, "categories", id="bare-category"),
    pytest.param(([LIFECYCLE], 1, "block"), TypeError, "backpressure", id="str-policy"),
    pytest.param(([LIFECYCLE], 1, None), TypeError, "backpressure", id="none-policy"),
]


def _snapshot(registry: ObserverRegistry) -> tuple[int, list[bool]]:
    return len(registry), [registry.wants(category) for category in EventCategory]


@pytest.mark.parametrize(("arguments", "error", "message"), _BAD_ARGUMENTS)
async def test_bad_add_channel_arguments_register_nothing(
    arguments: tuple[Any, Any, Any], error: type[Exception], message: str
) -> None:
    registry = ObserverRegistry()
    registry.add_channel([FILE], 1, DROP)
    calls: list[None] = []
    registry._on_interest_changed(lambda: calls.append(None))
    before = _snapshot(registry)
    with pytest.raises(error, match=message):
        registry.add_channel(*arguments)
    assert _snapshot(registry) == before
    assert calls == []
    # The failure left nothing behind that an emit could reach.
    await registry.emit(ev(1, LIFECYCLE))


@pytest.mark.parametrize(("arguments", "error", "message"), _BAD_ARGUMENTS)
async def test_bad_subscribe_arguments_raise_on_entry(
    arguments: tuple[Any, Any, Any], error: type[Exception], message: str
) -> None:
    registry = ObserverRegistry()
    categories, capacity, backpressure = arguments
    before = _snapshot(registry)
    with pytest.raises(error, match=message):
        async with registry.subscribe(categories, capacity=capacity, backpressure=backpressure):
            pytest.fail("the block must not be entered")
    assert _snapshot(registry) == before


# -- remove and disconnect ------------------------------------------------------


async def test_remove_ends_iteration_after_buffered_events() -> None:
    registry = ObserverRegistry()
    sink_id, rx = registry.add_channel([LIFECYCLE], 5, BLOCK)
    for pid in range(3):
        await registry.emit(ev(pid))
    assert registry.remove(sink_id)
    received = []
    with trio.fail_after(1):
        async for event in rx:
            received.append(event.pid)
    assert received == [0, 1, 2]


@pytest.mark.parametrize("policy", [DROP, BLOCK])
async def test_closed_receiver_marks_disconnected_and_counts_missed(
    policy: ObserverBackpressure,
) -> None:
    registry = ObserverRegistry()
    gone_id, gone_rx = registry.add_channel([LIFECYCLE], 1, policy)
    other_id, other_rx = registry.add_channel([LIFECYCLE], 4, policy)
    await registry.emit(ev(0))
    # The closed sink is full too: a BLOCK emitter must still not wait on it.
    gone_rx.close()
    with trio.fail_after(1):
        for pid in range(1, 4):
            await registry.emit(ev(pid))
    assert status(registry, gone_id) == ObserverSinkStatus(
        missed_events=3, delivered_events=1, disconnected=True
    )
    assert status(registry, other_id) == ObserverSinkStatus(0, 4, False)
    assert drain(other_rx) == [0, 1, 2, 3]
    # Still registered: a disconnected sink stays until it is removed.
    assert len(registry) == 2


async def test_status_shows_closed_receiver_before_any_emit() -> None:
    registry = ObserverRegistry()
    sink_id, rx = registry.add_channel([LIFECYCLE], 1, DROP)
    rx.close()
    assert status(registry, sink_id) == ObserverSinkStatus(0, 0, True)


async def test_emit_nowait_counts_missed_on_closed_receiver() -> None:
    registry = ObserverRegistry()
    sink_id, rx = registry.add_channel([LIFECYCLE], 2, BLOCK)
    rx.close()
    registry.emit_nowait(ev(1))
    registry.emit_nowait(ev(2))
    assert status(registry, sink_id) == ObserverSinkStatus(2, 0, True)


# -- BLOCK ----------------------------------------------------------------------


async def test_block_emit_waits_for_room() -> None:
    registry = ObserverRegistry()
    sink_id, rx = registry.add_channel([LIFECYCLE], 1, BLOCK)
    await registry.emit(ev(1))
    async with trio.open_nursery() as nursery:
        pending = await start_emit(nursery, registry, ev(2))
        assert not pending.done
        assert status(registry, sink_id) == ObserverSinkStatus(0, 1, False)

        assert (await rx.receive()).pid == 1
        await trio.testing.wait_all_tasks_blocked()
        assert pending.done
        assert status(registry, sink_id) == ObserverSinkStatus(0, 2, False)
    assert drain(rx) == [2]


async def test_block_emit_counts_delivered_only_when_send_completes() -> None:
    registry = ObserverRegistry()
    sink_id, rx = registry.add_channel([LIFECYCLE], 1, BLOCK)
    await registry.emit(ev(1))
    async with trio.open_nursery() as nursery:
        pending = await start_emit(nursery, registry, ev(2))
        # receive_nowait hands the waiting sender's item over and reschedules
        # it; until that task runs, its send has not returned.
        assert rx.receive_nowait().pid == 1
        assert not pending.done
        assert status(registry, sink_id).delivered_events == 1
        await trio.testing.wait_all_tasks_blocked()
        assert pending.done
        assert status(registry, sink_id).delivered_events == 2


async def test_block_emit_is_cancellable_and_counts_missed() -> None:
    registry = ObserverRegistry()
    sink_id, rx = registry.add_channel([LIFECYCLE], 1, BLOCK)
    await registry.emit(ev(1))
    async with trio.open_nursery() as nursery:
        pending = await start_emit(nursery, registry, ev(2))
        pending.scope.cancel()
    assert pending.cancelled
    assert not pending.done
    assert status(registry, sink_id) == ObserverSinkStatus(1, 1, False)
    # The cancelled event never reached the channel.
    assert drain(rx) == [1]


async def test_block_emit_raises_cancelled_out_of_emit() -> None:
    registry = ObserverRegistry()
    sink_id, _rx = registry.add_channel([LIFECYCLE], 1, BLOCK)
    await registry.emit(ev(1))
    with trio.CancelScope() as scope:
        scope.cancel()
        with pytest.raises(trio.Cancelled):
            await registry.emit(ev(2))
    assert status(registry, sink_id) == ObserverSinkStatus(1, 1, False)


async def test_registry_answers_while_emit_is_blocked() -> None:
    registry = ObserverRegistry()
    blocked_id, blocked_rx = registry.add_channel([LIFECYCLE], 1, BLOCK)
    other_id, _ = registry.add_channel([FILE], 1, DROP)
    await registry.emit(ev(1))
    async with trio.open_nursery() as nursery:
        pending = await start_emit(nursery, registry, ev(2))
        # All of these are synchronous; none may need the blocked emitter to
        # finish (the reference held its lock while a Block send waited).
        assert status(registry, blocked_id) == ObserverSinkStatus(0, 1, False)
        new_id, new_rx = registry.add_channel([NETWORK], 1, DROP)
        assert len(registry) == 3
        assert registry.remove(other_id) is True
        assert not registry.wants(FILE)
        # Another emit that does not touch the full sink goes straight through.
        with trio.fail_after(1):
            await registry.emit(ev(3, NETWORK))
        assert not pending.done
        assert drain(new_rx) == [3]
        assert registry.remove(new_id)
        assert blocked_rx.receive_nowait().pid == 1
    assert pending.done
    assert drain(blocked_rx) == [2]


async def test_removing_the_awaited_sink_releases_emit_without_error() -> None:
    registry = ObserverRegistry()
    async with registry.subscribe([LIFECYCLE], capacity=1, backpressure=BLOCK) as sub:
        await registry.emit(ev(1))
        async with trio.open_nursery() as nursery:
            pending = await start_emit(nursery, registry, ev(2))
            assert registry.remove(sub.id) is True
        assert pending.done
        assert not pending.cancelled
        assert sub.status() == ObserverSinkStatus(1, 1, False)
        # The consumer still gets what was buffered, then the stream ends.
        assert [event.pid async for event in sub] == [1]


async def test_receiver_closed_while_emit_is_blocked() -> None:
    registry = ObserverRegistry()
    sink_id, rx = registry.add_channel([LIFECYCLE], 1, BLOCK)
    await registry.emit(ev(1))
    async with trio.open_nursery() as nursery:
        pending = await start_emit(nursery, registry, ev(2))
        rx.close()
    assert pending.done
    assert status(registry, sink_id) == ObserverSinkStatus(1, 1, True)
    # Once disconnected, later events are missed without waiting.
    with trio.fail_after(1):
        await registry.emit(ev(3))
    assert status(registry, sink_id) == ObserverSinkStatus(2, 1, True)


async def test_slow_block_sink_does_not_starve_the_others() -> None:
    registry = ObserverRegistry()
    slow_id, slow_rx = registry.add_channel([LIFECYCLE], 1, BLOCK)
    drop_id, drop_rx = registry.add_channel([LIFECYCLE], 2, DROP)
    full_drop_id, _ = registry.add_channel([LIFECYCLE], 1, DROP)
    roomy_id, roomy_rx = registry.add_channel([LIFECYCLE], 2, BLOCK)
    await registry.emit(ev(1))
    async with trio.open_nursery() as nursery:
        pending = await start_emit(nursery, registry, ev(2))
        assert not pending.done
        # Registered after the slow sink, yet already served.
        assert status(registry, drop_id) == ObserverSinkStatus(0, 2, False)
        assert status(registry, full_drop_id) == ObserverSinkStatus(1, 1, False)
        assert status(registry, roomy_id) == ObserverSinkStatus(0, 2, False)
        assert status(registry, slow_id) == ObserverSinkStatus(0, 1, False)
        assert drain(drop_rx) == [1, 2]
        assert drain(roomy_rx) == [1, 2]
        assert (await slow_rx.receive()).pid == 1
    assert pending.done
    assert status(registry, slow_id) == ObserverSinkStatus(0, 2, False)


async def test_full_block_sinks_are_waited_on_one_after_another() -> None:
    registry = ObserverRegistry()
    first_id, first_rx = registry.add_channel([LIFECYCLE], 1, BLOCK)
    second_id, second_rx = registry.add_channel([LIFECYCLE], 1, BLOCK)
    await registry.emit(ev(1))
    async with trio.open_nursery() as nursery:
        pending = await start_emit(nursery, registry, ev(2))
        # Room in the second sink does not help while the emitter waits on
        # the first; it is used once the emitter gets there.
        assert drain(second_rx) == [1]
        await trio.testing.wait_all_tasks_blocked()
        assert status(registry, second_id).delivered_events == 1
        assert not pending.done

        assert (await first_rx.receive()).pid == 1
        await trio.testing.wait_all_tasks_blocked()
        assert pending.done
    assert status(registry, first_id) == ObserverSinkStatus(0, 2, False)
    assert status(registry, second_id) == ObserverSinkStatus(0, 2, False)


async def test_cancel_counts_missed_on_every_block_sink_not_yet_served() -> None:
    registry = ObserverRegistry()
    first_id, first_rx = registry.add_channel([LIFECYCLE], 1, BLOCK)
    second_id, _ = registry.add_channel([LIFECYCLE], 1, BLOCK)
    third_id, _ = registry.add_channel([LIFECYCLE], 1, BLOCK)
    await registry.emit(ev(1))
    async with trio.open_nursery() as nursery:
        pending = await start_emit(nursery, registry, ev(2))
        assert (await first_rx.receive()).pid == 1
        await trio.testing.wait_all_tasks_blocked()
        # Delivered to the first; now waiting on the second.
        assert status(registry, first_id).delivered_events == 2
        pending.scope.cancel()
    assert pending.cancelled
    assert status(registry, first_id) == ObserverSinkStatus(0, 2, False)
    assert status(registry, second_id) == ObserverSinkStatus(1, 1, False)
    assert status(registry, third_id) == ObserverSinkStatus(1, 1, False)


async def test_concurrent_block_emitters_deliver_in_order() -> None:
    registry = ObserverRegistry()
    sink_id, rx = registry.add_channel([LIFECYCLE], 1, BLOCK)
    await registry.emit(ev(0))
    async with trio.open_nursery() as nursery:
        pendings = [await start_emit(nursery, registry, ev(pid)) for pid in range(1, 4)]
        assert not any(pending.done for pending in pendings)
        received = [(await rx.receive()).pid for _ in range(4)]
    assert received == [0, 1, 2, 3]
    assert status(registry, sink_id) == ObserverSinkStatus(0, 4, False)


async def test_emit_nowait_never_waits_on_a_full_block_sink() -> None:
    registry = ObserverRegistry()
    sink_id, rx = registry.add_channel([LIFECYCLE], 1, BLOCK)
    registry.emit_nowait(ev(1))
    registry.emit_nowait(ev(2))
    registry.emit_nowait(ev(3, FILE))
    assert status(registry, sink_id) == ObserverSinkStatus(1, 1, False)
    assert drain(rx) == [1]


async def test_emit_with_room_is_not_affected_by_an_unmatched_full_sink() -> None:
    registry = ObserverRegistry()
    full_id, _ = registry.add_channel([FILE], 1, BLOCK)
    lifecycle_id, _ = registry.add_channel([LIFECYCLE], 1, BLOCK)
    await registry.emit(ev(1, FILE))
    with trio.fail_after(1):
        await registry.emit(ev(2, LIFECYCLE))
    assert status(registry, full_id) == ObserverSinkStatus(0, 1, False)
    assert status(registry, lifecycle_id) == ObserverSinkStatus(0, 1, False)


# -- interest and close -------------------------------------------------------


async def test_wants_follows_add_and_remove() -> None:
    registry = ObserverRegistry()
    changes: list[list[bool]] = []
    registry._on_interest_changed(
        lambda: changes.append([registry.wants(category) for category in EventCategory])
    )
    assert not any(registry.wants(category) for category in EventCategory)
    both_id, _ = registry.add_channel([LIFECYCLE, FILE, FILE], 1, DROP)
    file_id, _ = registry.add_channel([FILE], 1, DROP)
    assert registry.wants(LIFECYCLE)
    assert registry.wants(FILE)
    assert not registry.wants(PROCESS)
    assert not registry.wants(NETWORK)

    assert registry.remove(both_id)
    assert not registry.wants(LIFECYCLE)
    assert registry.wants(FILE)
    assert registry.remove(file_id)
    assert not registry.wants(FILE)
    # A failed second remove is not a change.
    assert not registry.remove(file_id)
    order = list(EventCategory)
    lifecycle, file_ = order.index(LIFECYCLE), order.index(FILE)
    assert [(row[lifecycle], row[file_]) for row in changes] == [
        (True, True),
        (True, True),
        (False, True),
        (False, False),
    ]


async def test_sink_with_no_categories_receives_nothing() -> None:
    registry = ObserverRegistry()
    sink_id, rx = registry.add_channel([], 1, DROP)
    for category in EventCategory:
        await registry.emit(ev(1, category))
    assert status(registry, sink_id) == ObserverSinkStatus(0, 0, False)
    assert not any(registry.wants(category) for category in EventCategory)
    assert len(registry) == 1
    assert drain(rx) == []


async def test_categories_may_be_any_iterable() -> None:
    registry = ObserverRegistry()

    def categories() -> Iterable[EventCategory]:
        yield NETWORK
        yield PROCESS

    sink_id, rx = registry.add_channel(categories(), 2, DROP)
    await registry.emit(ev(1, NETWORK))
    await registry.emit(ev(2, PROCESS))
    await registry.emit(ev(3, FILE))
    assert drain(rx) == [1, 2]
    assert status(registry, sink_id).delivered_events == 2


async def test_close_ends_consumers_and_refuses_new_sinks() -> None:
    registry = ObserverRegistry()
    first_id, first_rx = registry.add_channel([LIFECYCLE], 4, DROP)
    second_id, second_rx = registry.add_channel([LIFECYCLE], 4, BLOCK)
    await registry.emit(ev(1))
    received: dict[str, list[int]] = {"first": [], "second": []}

    async def consume(name: str, rx: trio.MemoryReceiveChannel[ObserverEvent]) -> None:
        async for event in rx:
            received[name].append(event.pid)

    with trio.fail_after(1):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(consume, "first", first_rx)
            nursery.start_soon(consume, "second", second_rx)
            await trio.testing.wait_all_tasks_blocked()
            await registry.emit(ev(2))
            registry.close()
            assert registry.closed
    assert received == {"first": [1, 2], "second": [1, 2]}

    before = _snapshot(registry)
    with pytest.raises(trio.ClosedResourceError):
        registry.add_channel([LIFECYCLE], 1, DROP)
    with pytest.raises(trio.ClosedResourceError):
        async with registry.subscribe([LIFECYCLE]):
            pytest.fail("the block must not be entered")
    assert _snapshot(registry) == before

    # Statuses stay readable; events after close are counted, not delivered.
    await registry.emit(ev(3))
    assert status(registry, first_id) == ObserverSinkStatus(1, 2, False)
    assert status(registry, second_id) == ObserverSinkStatus(1, 2, False)
    registry.close()
    assert registry.closed


async def test_close_releases_a_blocked_emitter() -> None:
    registry = ObserverRegistry()
    sink_id, rx = registry.add_channel([LIFECYCLE], 1, BLOCK)
    await registry.emit(ev(1))
    async with trio.open_nursery() as nursery:
        pending = await start_emit(nursery, registry, ev(2))
        registry.close()
    assert pending.done
    assert status(registry, sink_id) == ObserverSinkStatus(1, 1, False)
    assert [event.pid async for event in rx] == [1]


# -- subscribe ----------------------------------------------------------------


async def test_subscribe_registers_and_removes_on_exit() -> None:
    registry = ObserverRegistry()
    async with registry.subscribe([LIFECYCLE]) as sub:
        assert isinstance(sub, Subscription)
        assert len(registry) == 1
        assert registry.wants(LIFECYCLE)
        await registry.emit(ev(1))
        assert status(registry, sub.id) == ObserverSinkStatus(0, 1, False)
        assert (await sub.receive()).pid == 1
    assert len(registry) == 0
    assert not registry.wants(LIFECYCLE)
    assert registry.status(sub.id) is None
    assert sub.status() == ObserverSinkStatus(0, 1, False)


async def test_subscribe_removes_on_error() -> None:
    registry = ObserverRegistry()

    async def fail_inside() -> None:
        async with registry.subscribe([LIFECYCLE]):
            assert len(registry) == 1
            raise KeyError("consumer failed")

    with pytest.raises(KeyError, match="consumer failed"):
        await fail_inside()
    assert len(registry) == 0


async def test_subscribe_defaults_are_256_and_drop_oldest() -> None:
    registry = ObserverRegistry()
    async with registry.subscribe([LIFECYCLE]) as sub:
        with trio.fail_after(1):
            for pid in range(300):
                await registry.emit(ev(pid))
        assert sub.status() == ObserverSinkStatus(44, 256, False)


async def test_subscription_iteration_in_a_task_ends_when_the_block_exits() -> None:
    registry = ObserverRegistry()
    received: list[int] = []

    async def consume(sub: Subscription[ObserverEvent]) -> None:
        async for event in sub:
            received.append(event.pid)

    with trio.fail_after(1):
        async with trio.open_nursery() as nursery, registry.subscribe([LIFECYCLE]) as sub:
            nursery.start_soon(consume, sub)
            await trio.testing.wait_all_tasks_blocked()
            await registry.emit(ev(1))
            await trio.testing.wait_all_tasks_blocked()
            # Exit while the consumer is busy, not waiting: events still
            # buffered must reach it, then its loop ends cleanly.
            await registry.emit(ev(2))
            await registry.emit(ev(3))
    assert received == [1, 2, 3]
    assert len(registry) == 0


async def test_subscription_consumer_that_starts_late_still_ends_cleanly() -> None:
    registry = ObserverRegistry()
    received: list[int] = []

    async def consume(sub: Subscription[ObserverEvent]) -> None:
        async for event in sub:
            received.append(event.pid)

    async with trio.open_nursery() as nursery, registry.subscribe([LIFECYCLE]) as sub:
        await registry.emit(ev(1))
        nursery.start_soon(consume, sub)
    assert received == [1]


async def test_report_missed_puts_markers_where_the_loss_happened() -> None:
    registry = ObserverRegistry()
    async with registry.subscribe([LIFECYCLE], capacity=1, report_missed=True) as sub:
        await registry.emit(ev(1))
        await registry.emit(ev(2))  # missed
        await registry.emit(ev(3))  # missed
        assert await sub.receive() == ev(1)
        await registry.emit(ev(4))
        assert await sub.receive() == MissedEvents(2)
        assert await sub.receive() == ev(4)
        await registry.emit(ev(5))
        assert await sub.receive() == ev(5)
        await registry.emit(ev(6))
        await registry.emit(ev(7))  # missed
        assert registry.remove(sub.id)
        assert [item async for item in sub] == [ev(6), MissedEvents(1)]
        assert sub.status() == ObserverSinkStatus(3, 4, False)
        # The end marker is reported once.
        with pytest.raises(trio.EndOfChannel):
            await sub.receive()


async def test_report_missed_no_marker_without_loss() -> None:
    registry = ObserverRegistry()
    async with registry.subscribe([LIFECYCLE], capacity=3, report_missed=True) as sub:
        for pid in range(3):
            await registry.emit(ev(pid))
        registry.remove(sub.id)
        assert [item async for item in sub] == [ev(0), ev(1), ev(2)]


async def test_report_missed_counts_loss_to_a_closed_registry_at_the_end() -> None:
    registry = ObserverRegistry()
    async with registry.subscribe([LIFECYCLE], capacity=2, report_missed=True) as sub:
        await registry.emit(ev(1))
        registry.close()
        await registry.emit(ev(2))
        assert [item async for item in sub] == [ev(1), MissedEvents(1)]


async def test_without_report_missed_no_markers_are_yielded() -> None:
    registry = ObserverRegistry()
    async with registry.subscribe([LIFECYCLE], capacity=1) as sub:
        await registry.emit(ev(1))
        await registry.emit(ev(2))  # missed
        assert await sub.receive() == ev(1)
        await registry.emit(ev(3))
        await registry.emit(ev(4))  # missed
        registry.remove(sub.id)
        assert [item async for item in sub] == [ev(3)]
        assert sub.status() == ObserverSinkStatus(2, 2, False)


async def test_report_missed_marker_precedes_event_queued_after_a_cancelled_one() -> None:
    # Two emitters wait on one full BLOCK sink; the first is cancelled. The
    # event of the second comes after the lost one, so the marker goes
    # before it, not after.
    registry = ObserverRegistry()
    async with registry.subscribe(
        [LIFECYCLE], capacity=1, backpressure=BLOCK, report_missed=True
    ) as sub:
        await registry.emit(ev(1))
        async with trio.open_nursery() as nursery:
            first = await start_emit(nursery, registry, ev(2))
            second = await start_emit(nursery, registry, ev(3))
            first.scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert first.cancelled
            assert await sub.receive() == ev(1)
            assert await sub.receive() == MissedEvents(1)
            assert await sub.receive() == ev(3)
        assert second.done
        registry.remove(sub.id)
        assert [item async for item in sub] == []


async def test_report_missed_marker_for_emitter_released_by_remove() -> None:
    registry = ObserverRegistry()
    async with registry.subscribe(
        [LIFECYCLE], capacity=1, backpressure=BLOCK, report_missed=True
    ) as sub:
        await registry.emit(ev(1))
        async with trio.open_nursery() as nursery:
            await start_emit(nursery, registry, ev(2))
            registry.remove(sub.id)
        assert [item async for item in sub] == [ev(1), MissedEvents(1)]


async def test_cancelled_receive_does_not_lose_the_held_event() -> None:
    registry = ObserverRegistry()
    async with registry.subscribe([LIFECYCLE], capacity=1, report_missed=True) as sub:
        await registry.emit(ev(1))
        await registry.emit(ev(2))  # missed
        assert await sub.receive() == ev(1)
        await registry.emit(ev(3))
        assert await sub.receive() == MissedEvents(1)
        with trio.CancelScope() as scope:
            scope.cancel()
            await sub.receive()
        assert scope.cancelled_caught
        with trio.fail_after(1):
            assert await sub.receive() == ev(3)


async def test_consumer_errors_surface_as_an_exception_group() -> None:
    registry = ObserverRegistry()

    async def consume(sub: Subscription[ObserverEvent]) -> None:
        async for event in sub:
            raise ValueError(f"bad event {event.pid}")

    with pytest.RaisesGroup(pytest.RaisesExc(ValueError, match="bad event 7")):
        async with trio.open_nursery() as nursery, registry.subscribe([LIFECYCLE]) as sub:
            nursery.start_soon(consume, sub)
            await trio.testing.wait_all_tasks_blocked()
            await registry.emit(ev(7))
            await trio.testing.wait_all_tasks_blocked()
    # The sink is gone even though the nursery failed.
    assert len(registry) == 0


async def test_breaking_out_of_a_subscription_loop_leaves_nothing_behind() -> None:
    registry = ObserverRegistry()
    async with registry.subscribe([LIFECYCLE]) as sub:
        for pid in range(3):
            await registry.emit(ev(pid))
        async for event in sub:
            assert event.pid == 0
            break
        # No half-run async generator is left for the garbage collector to
        # warn about (an error under filterwarnings=error), and the rest of
        # the stream is still there for the next loop.
        gc.collect()
        registry.remove(sub.id)
        assert [event.pid async for event in sub] == [1, 2]


async def test_emit_that_does_not_wait_is_not_interrupted_by_cancellation() -> None:
    registry = ObserverRegistry()
    drop_id, _ = registry.add_channel([LIFECYCLE], 1, DROP)
    block_id, _ = registry.add_channel([LIFECYCLE], 1, BLOCK)
    with trio.CancelScope() as scope:
        scope.cancel()
        # The event is in both channels; raising Cancelled now would tell
        # the caller it was not.
        await registry.emit(ev(1))
        reached = True
    assert reached
    assert status(registry, drop_id) == ObserverSinkStatus(0, 1, False)
    assert status(registry, block_id) == ObserverSinkStatus(0, 1, False)


async def test_emit_to_drop_oldest_sinks_only_never_yields() -> None:
    registry = ObserverRegistry()
    sink_id, _ = registry.add_channel([LIFECYCLE], 1, DROP)
    ran: list[str] = []

    async def other() -> None:
        ran.append("other")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)
        for pid in range(3):
            await registry.emit(ev(pid))
        # No other task ran in between: emit never reached a schedule point.
        assert ran == []
    assert ran == ["other"]
    assert status(registry, sink_id) == ObserverSinkStatus(2, 1, False)


async def test_report_missed_subscription_in_a_task_ends_with_its_marker() -> None:
    registry = ObserverRegistry()
    received: list[ObserverEvent | MissedEvents] = []

    async def consume(sub: Subscription[ObserverEvent | MissedEvents]) -> None:
        async for item in sub:
            received.append(item)

    with trio.fail_after(1):
        async with (
            trio.open_nursery() as nursery,
            registry.subscribe([LIFECYCLE], capacity=1, report_missed=True) as sub,
        ):
            await registry.emit(ev(1))
            await registry.emit(ev(2))  # missed
            nursery.start_soon(consume, sub)
    assert received == [ev(1), MissedEvents(1)]
