"""Tests for the observer registry (_registry): wants(), the interest callback and close()."""

from __future__ import annotations

from collections.abc import Iterable

import pytest
import trio
import trio.testing

from tests.registry_helpers import (
    BLOCK,
    DROP,
    FILE,
    LIFECYCLE,
    NETWORK,
    PROCESS,
    drain,
    ev,
    snapshot,
    start_emit,
    status,
)
from trio_observer import (
    ObserverRegistry,
    ObserverSinkStatus,
)
from trio_observer._events import EventCategory, ObserverEvent

# -- interest and close -------------------------------------------------------


async def test_wants_follows_add_and_remove() -> None:
    changes: list[list[bool]] = []
    registry = ObserverRegistry(
        on_interest_changed=lambda: changes.append(
            [registry.wants(category) for category in EventCategory]
        )
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

    before = snapshot(registry)
    with pytest.raises(trio.ClosedResourceError):
        registry.add_channel([LIFECYCLE], 1, DROP)
    with pytest.raises(trio.ClosedResourceError):
        async with registry.subscribe([LIFECYCLE]):
            pytest.fail("the block must not be entered")
    assert snapshot(registry) == before

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


async def test_category_check_refuses_before_anything_is_registered() -> None:
    seen: list[frozenset[EventCategory]] = []
    changes: list[None] = []

    def refuse_file(categories: frozenset[EventCategory]) -> None:
        seen.append(categories)
        if FILE in categories:
            raise ValueError("categories: FILE is not observable here")

    registry = ObserverRegistry(
        category_check=refuse_file, on_interest_changed=lambda: changes.append(None)
    )
    with pytest.raises(ValueError, match="FILE"):
        registry.add_channel([LIFECYCLE, FILE], 1, DROP)
    assert len(registry) == 0
    assert changes == []
    registry.add_channel([LIFECYCLE], 1, DROP)
    assert seen == [frozenset([LIFECYCLE, FILE]), frozenset([LIFECYCLE])]
    assert changes == [None]
