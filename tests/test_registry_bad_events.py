"""What the emit paths do with something that is not an event: refuse it by name, lose nothing."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import trio

from tests.registry_helpers import BLOCK, DROP, LIFECYCLE, drain, ev, status
from trio_observer import ObserverEvent, ObserverRegistry, ObserverSubscriberId

# An event whose category is a string ("lifecycle" is what the JSON form
# says), and things that are not events at all.
_BAD_CATEGORY = dataclasses.replace(ev(1), category="lifecycle")  # type: ignore[arg-type]
_NOT_EVENTS: list[Any] = [_BAD_CATEGORY, "started", None, {"category": LIFECYCLE}]


Sinks = list[tuple[ObserverSubscriberId, trio.MemoryReceiveChannel[ObserverEvent]]]


def _two_sinks() -> tuple[ObserverRegistry, Sinks]:
    """A registry with a DROP_OLDEST and a BLOCK sink for LIFECYCLE."""
    registry = ObserverRegistry()
    return registry, [registry.add_channel([LIFECYCLE], 8, policy) for policy in (DROP, BLOCK)]


def _assert_only(registry: ObserverRegistry, sinks: Sinks, pids: list[int]) -> None:
    """Each sink got ``pids`` and counted them, and nothing else."""
    for sink_id, receiver in sinks:
        assert drain(receiver) == pids
        assert status(registry, sink_id).delivered_events == len(pids)
        assert status(registry, sink_id).missed_events == 0


@pytest.mark.parametrize("bad", _NOT_EVENTS)
async def test_emit_and_emit_nowait_refuse_what_is_not_an_event_and_go_on(bad: Any) -> None:
    registry, sinks = _two_sinks()
    with pytest.raises(TypeError, match=r"^event"):
        registry.emit_nowait(bad)
    with pytest.raises(TypeError, match=r"^event"):
        await registry.emit(bad)
    # Nothing was delivered or counted, and the registry goes on.
    await registry.emit(ev(2))
    registry.emit_nowait(ev(3))
    _assert_only(registry, sinks, [2, 3])


@pytest.mark.parametrize("bad", _NOT_EVENTS)
async def test_emit_many_refuses_a_batch_with_a_bad_item_before_delivering_any(bad: Any) -> None:
    registry, sinks = _two_sinks()
    with pytest.raises(TypeError, match=r"^events\[2\]"):
        await registry.emit_many([ev(1), ev(2), bad, ev(4)])
    await registry.emit_many([ev(5), ev(6)])
    _assert_only(registry, sinks, [5, 6])


async def test_a_bad_item_is_refused_before_a_full_block_sink_is_waited_on() -> None:
    # It used to be found only when its run came: after waiting on the
    # full sink, and, once that wait was cancelled, while counting the rest
    # of the batch as missed (a KeyError that hid the Cancelled).
    registry = ObserverRegistry()
    block_id, _ = registry.add_channel([LIFECYCLE], 1, BLOCK)
    await registry.emit(ev(0))  # the channel is full now
    with trio.move_on_after(0.01) as scope:
        with pytest.raises(TypeError, match=r"^events\[1\]"):
            await registry.emit_many([ev(1), _BAD_CATEGORY])
    assert not scope.cancelled_caught
    assert status(registry, block_id).delivered_events == 1
    assert status(registry, block_id).missed_events == 0


async def test_emit_many_refuses_what_is_not_iterable_by_name() -> None:
    registry = ObserverRegistry()
    registry.add_channel([LIFECYCLE], 8, DROP)
    with pytest.raises(TypeError, match=r"^events must be an iterable"):
        await registry.emit_many(ev(1))  # type: ignore[arg-type]
