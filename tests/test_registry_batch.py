"""Tests for the observer registry (_registry): sinks that come and go while ``emit_many`` waits."""

from __future__ import annotations

import trio
import trio.testing

from tests.registry_helpers import BLOCK, DROP, FILE, LIFECYCLE, drain, ev, status
from trio_observer import ObserverRegistry, ObserverSinkStatus


async def _receive_pids(receiver: trio.MemoryReceiveChannel[object], count: int) -> list[int]:
    pids = []
    for _ in range(count):
        event = await receiver.receive()
        pids.append(event.pid)  # type: ignore[attr-defined]
    return pids


async def test_a_sink_added_while_emit_many_waits_gets_the_events_not_yet_begun() -> None:
    registry = ObserverRegistry()
    block_id, block_rx = registry.add_channel([LIFECYCLE], 1, BLOCK)
    await registry.emit(ev(0))  # the BLOCK sink is full
    batch = [ev(1), ev(2), ev(3), ev(4, FILE), ev(5)]
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(registry.emit_many, batch)
            await trio.testing.wait_all_tasks_blocked()
            # emit_many waits on the BLOCK sink for event 1: 1 had begun.
            late_drop_id, late_drop_rx = registry.add_channel([LIFECYCLE, FILE], 8, DROP)
            late_block_id, late_block_rx = registry.add_channel([LIFECYCLE], 8, BLOCK)
            received = await _receive_pids(block_rx, 5)
    assert received == [0, 1, 2, 3, 5]
    # The rest of the run it was added in, then every later run, in order.
    assert drain(late_drop_rx) == [2, 3, 4, 5]
    assert drain(late_block_rx) == [2, 3, 5]
    assert status(registry, late_drop_id) == ObserverSinkStatus(0, 4, False)
    assert status(registry, late_block_id) == ObserverSinkStatus(0, 3, False)
    assert status(registry, block_id) == ObserverSinkStatus(0, 5, False)


async def test_a_sink_removed_while_emit_many_waits_counts_nothing_more() -> None:
    registry = ObserverRegistry()
    _, block_rx = registry.add_channel([LIFECYCLE], 1, BLOCK)
    await registry.emit(ev(0))
    leaving = registry.subscribe([LIFECYCLE], capacity=8, backpressure=BLOCK)
    subscription = await leaving.__aenter__()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(registry.emit_many, [ev(1), ev(2), ev(3)])
            await trio.testing.wait_all_tasks_blocked()
            # Event 1 reached the subscription; the sink goes while 1 waits.
            await leaving.__aexit__(None, None, None)
            assert await _receive_pids(block_rx, 4) == [0, 1, 2, 3]
    assert [event.pid async for event in subscription] == [1]
    # Events 2 and 3 were emitted after it was removed: not its to count.
    assert subscription.status() == ObserverSinkStatus(0, 1, False)


async def test_a_plain_sink_found_gone_while_emit_many_waits_is_counted_once() -> None:
    # It took the whole run at once; found disconnected by another emitter
    # meanwhile, it moves to the general route, which must not offer it
    # the rest of the run again.
    registry = ObserverRegistry()
    _, block_rx = registry.add_channel([LIFECYCLE], 1, BLOCK)
    await registry.emit(ev(0))
    drop_id, drop_rx = registry.add_channel([LIFECYCLE, FILE], 8, DROP)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(registry.emit_many, [ev(1), ev(2), ev(3)])
            await trio.testing.wait_all_tasks_blocked()
            assert drain(drop_rx) == [1, 2, 3]
            drop_rx.close()
            registry.emit_nowait(ev(9, FILE))
            assert await _receive_pids(block_rx, 4) == [0, 1, 2, 3]
    assert status(registry, drop_id) == ObserverSinkStatus(1, 3, True)
