"""Tests for the observer registry (_registry): removing sinks and receivers that go away."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from tests.registry_helpers import (
    BLOCK,
    DROP,
    LIFECYCLE,
    drain,
    ev,
    status,
)
from trio_observer import (
    ObserverBackpressure,
    ObserverRegistry,
    ObserverSinkStatus,
)

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


def _fast_route(registry: ObserverRegistry) -> int:
    # The registry's plain route (connected, untagged DROP_OLDEST sinks that
    # emit() serves without looking at them): white-box, because counting
    # cannot tell a disconnected sink left on it from one moved off it.
    plain, _ = registry._routes[LIFECYCLE]
    return len(plain)


@pytest.mark.parametrize("way", ["emit", "emit_nowait", "emit_many"])
async def test_a_receiver_found_gone_leaves_the_fast_route_whichever_emit_found_it(
    way: str,
) -> None:
    # emit_nowait used to mark the sink disconnected without rebuilding the
    # routes (seen failing on the old code for "emit_nowait").
    registry = ObserverRegistry()
    gone_id, gone_rx = registry.add_channel([LIFECYCLE], 4, DROP)
    other_id, other_rx = registry.add_channel([LIFECYCLE], 8, DROP)
    assert _fast_route(registry) == 2
    gone_rx.close()
    if way == "emit":
        await registry.emit(ev(1))
    elif way == "emit_nowait":
        registry.emit_nowait(ev(1))
    else:
        await registry.emit_many([ev(1)])
    assert _fast_route(registry) == 1
    assert status(registry, gone_id) == ObserverSinkStatus(1, 0, True)
    # Later events are counted on the general route, exactly once each.
    await registry.emit(ev(2))
    registry.emit_nowait(ev(3))
    await registry.emit_many([ev(4), ev(5)])
    assert status(registry, gone_id) == ObserverSinkStatus(5, 0, True)
    assert status(registry, other_id) == ObserverSinkStatus(0, 5, False)
    assert drain(other_rx) == [1, 2, 3, 4, 5]


async def test_a_receiver_closed_while_a_block_emit_waits_disconnects_the_sink() -> None:
    registry = ObserverRegistry()
    sink_id, rx = registry.add_channel([LIFECYCLE], 1, BLOCK)
    await registry.emit(ev(0))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(registry.emit, ev(1))
        await trio.testing.wait_all_tasks_blocked()
        rx.close()
    assert status(registry, sink_id) == ObserverSinkStatus(1, 1, True)
    registry.emit_nowait(ev(2))
    assert status(registry, sink_id) == ObserverSinkStatus(2, 1, True)
