"""Tests for the observer registry (_registry): subscribe() and the Subscription channel."""

from __future__ import annotations

import gc

import pytest
import trio
import trio.testing

from tests.registry_helpers import (
    BLOCK,
    DROP,
    LIFECYCLE,
    ev,
    start_emit,
    status,
)
from trio_observer import (
    MissedEvents,
    ObserverRegistry,
    ObserverSinkStatus,
    Subscription,
)
from trio_observer._events import ObserverEvent

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


# -- Subscription as a trio.abc.ReceiveChannel ----------------------------------


@pytest.mark.parametrize("report_missed", [False, True])
async def test_subscription_is_a_receive_channel_with_receive_nowait(
    report_missed: bool,
) -> None:
    registry = ObserverRegistry()
    async with registry.subscribe([LIFECYCLE], capacity=2, report_missed=report_missed) as sub:
        assert isinstance(sub, trio.abc.ReceiveChannel)
        with pytest.raises(trio.WouldBlock):
            sub.receive_nowait()
        for pid in range(1, 4):
            await registry.emit(ev(pid))
        first = sub.receive_nowait()
        assert isinstance(first, ObserverEvent)
        assert first.pid == 1
        second = sub.receive_nowait()
        assert isinstance(second, ObserverEvent)
        assert second.pid == 2
        with pytest.raises(trio.WouldBlock):
            sub.receive_nowait()
    # Event 3 did not fit: with report_missed it is told at the end.
    if report_missed:
        assert sub.receive_nowait() == MissedEvents(1)
    with pytest.raises(trio.EndOfChannel):
        sub.receive_nowait()


async def test_report_missed_receive_nowait_puts_the_marker_before_the_event() -> None:
    registry = ObserverRegistry()
    async with registry.subscribe([LIFECYCLE], capacity=1, report_missed=True) as sub:
        await registry.emit(ev(1))
        await registry.emit(ev(2))  # missed: the channel holds 1
        assert [getattr(sub.receive_nowait(), "pid", None)] == [1]
        await registry.emit(ev(3))
        assert sub.receive_nowait() == MissedEvents(1)
        third = sub.receive_nowait()
        assert isinstance(third, ObserverEvent)
        assert third.pid == 3


@pytest.mark.parametrize("report_missed", [False, True])
async def test_closing_a_subscription_disconnects_its_sink(report_missed: bool) -> None:
    registry = ObserverRegistry()
    async with registry.subscribe(
        [LIFECYCLE], capacity=4, backpressure=BLOCK, report_missed=report_missed
    ) as sub:
        await registry.emit(ev(1))
        async with trio.open_nursery() as nursery:

            async def blocked_receiver() -> None:
                # Takes event 1, then waits for more and is woken by close.
                await sub.receive()
                with pytest.raises(trio.ClosedResourceError):
                    await sub.receive()

            nursery.start_soon(blocked_receiver)
            await trio.testing.wait_all_tasks_blocked()
            await sub.aclose()
        sub.close()  # idempotent
        with trio.fail_after(1):
            await registry.emit(ev(2))
        assert sub.status() == ObserverSinkStatus(1, 1, True)
        with pytest.raises(trio.ClosedResourceError):
            sub.receive_nowait()
        # Still registered until the block exits.
        assert len(registry) == 1
    assert len(registry) == 0


async def test_closing_a_subscription_that_holds_an_event_refuses_it() -> None:
    registry = ObserverRegistry()
    async with registry.subscribe([LIFECYCLE], capacity=1, report_missed=True) as sub:
        await registry.emit(ev(1))
        await registry.emit(ev(2))
        sub.receive_nowait()
        await registry.emit(ev(3))
        assert sub.receive_nowait() == MissedEvents(1)
        sub.close()
        with pytest.raises(trio.ClosedResourceError):
            sub.receive_nowait()
        with pytest.raises(trio.ClosedResourceError):
            await sub.receive()


async def test_subscription_clone_is_refused_with_the_alternative_named() -> None:
    registry = ObserverRegistry()
    async with registry.subscribe([LIFECYCLE]) as sub:
        with pytest.raises(NotImplementedError, match=r"open another subscription"):
            sub.clone()


async def test_async_with_a_subscription_closes_it() -> None:
    registry = ObserverRegistry()
    async with registry.subscribe([LIFECYCLE]) as sub:
        async with sub:
            await registry.emit(ev(1))
            first = await sub.receive()
            assert isinstance(first, ObserverEvent)
            assert first.pid == 1
        await registry.emit(ev(2))
        assert sub.status() == ObserverSinkStatus(1, 1, True)
