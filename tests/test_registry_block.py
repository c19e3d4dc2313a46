"""Tests for the observer registry (_registry): BLOCK sinks: waiting, cancellation, order."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from tests.registry_helpers import (
    BLOCK,
    DROP,
    FILE,
    LIFECYCLE,
    NETWORK,
    drain,
    ev,
    start_emit,
    status,
)
from trio_observer import (
    ObserverRegistry,
    ObserverSinkStatus,
)

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


async def test_emit_many_delivers_in_order_and_waits_on_full_block_sinks() -> None:
    registry = ObserverRegistry()
    block_id, block_rx = registry.add_channel([LIFECYCLE], 1, BLOCK)
    drop_id, drop_rx = registry.add_channel([LIFECYCLE, FILE], 8, DROP)
    received: list[int] = []

    async def consume() -> None:
        async for event in block_rx:
            received.append(event.pid)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(consume)
        with trio.fail_after(5):
            await registry.emit_many([ev(1), ev(2, FILE), ev(3), ev(4)])
        registry.close()
    assert received == [1, 3, 4]
    assert drain(drop_rx) == [1, 2, 3, 4]
    assert status(registry, block_id) == ObserverSinkStatus(0, 3, False)
    assert status(registry, drop_id) == ObserverSinkStatus(0, 4, False)


async def test_emit_many_cancelled_counts_the_rest_of_the_batch_as_missed() -> None:
    registry = ObserverRegistry()
    block_id, block_rx = registry.add_channel([LIFECYCLE], 1, BLOCK)
    drop_id, drop_rx = registry.add_channel([LIFECYCLE], 8, DROP)
    file_id, _ = registry.add_channel([FILE], 8, DROP)
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:

            async def emit_batch() -> None:
                await registry.emit_many([ev(1), ev(2), ev(3), ev(4, FILE)])

            nursery.start_soon(emit_batch)
            await trio.testing.wait_all_tasks_blocked()
            # Waiting on the BLOCK sink for event 2.
            scope.cancel()
    assert scope.cancelled_caught
    assert drain(block_rx) == [1]
    # The DROP_OLDEST sink took the run of LIFECYCLE events at once; 2 was
    # cut short on the BLOCK sink, 3 never offered to it, 4 to nobody.
    assert drain(drop_rx) == [1, 2, 3]
    assert status(registry, block_id) == ObserverSinkStatus(2, 1, False)
    assert status(registry, drop_id) == ObserverSinkStatus(0, 3, False)
    assert status(registry, file_id) == ObserverSinkStatus(1, 0, False)


async def test_emit_many_to_drop_oldest_sinks_only_never_yields() -> None:
    registry = ObserverRegistry()
    sink_id, rx = registry.add_channel([LIFECYCLE], 2, DROP)
    with trio.CancelScope() as scope:
        scope.cancel()
        await registry.emit_many([ev(1), ev(2), ev(3)])
    assert not scope.cancelled_caught
    assert drain(rx) == [1, 2]
    assert status(registry, sink_id) == ObserverSinkStatus(1, 2, False)
