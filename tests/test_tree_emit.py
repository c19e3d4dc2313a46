"""TreeObserver hands each pass to the registry's emit_many, a run per await."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path

import pytest
import trio
import trio.testing

from tests._fakeproc import FakeProc
from tests._tree_helpers import observing, settle
from trio_observer import EventCategory, ObserverBackpressure, ObserverRegistry
from trio_observer._events import ObserverEvent, ObserverEventKind
from trio_observer._linux._tree import TreeObserver

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc")

K = ObserverEventKind
PROCESS = frozenset({EventCategory.PROCESS})


async def test_a_pass_is_one_emit_many_in_order(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    fake = FakeProc(tmp_path)
    fake.add(100, 1)
    for pid in range(101, 106):
        fake.add(pid, 100)
    registry = ObserverRegistry()
    sink, receiver = registry.add_channel(
        [EventCategory.PROCESS], capacity=16, backpressure=ObserverBackpressure.DROP_OLDEST
    )
    single: list[ObserverEvent] = []
    batches: list[list[ObserverEvent]] = []

    async def emit(event: ObserverEvent) -> None:
        single.append(event)
        await registry.emit(event)

    async def emit_many(events: Iterable[ObserverEvent]) -> None:
        batches.append(list(events))
        await registry.emit_many(events)

    observer = TreeObserver(
        emit=emit,
        emit_many=emit_many,
        emit_nowait=registry.emit_nowait,
        categories=PROCESS,
        proc_root=fake.path,
        poll_interval=1.0,
    )
    observer.add_root(100)
    async with observing(observer):
        await settle()
        fake.remove(103)
        fake.remove(104)
        mock_clock.jump(1.0)
        await settle()
    assert single == []
    assert [[(e.kind, e.pid) for e in batch] for batch in batches] == [
        [(K.DESCENDANT_STARTED, pid) for pid in range(101, 106)],
        [(K.DESCENDANT_EXITED, 103), (K.DESCENDANT_EXITED, 104)],
    ]
    got = []
    while True:
        try:
            got.append(receiver.receive_nowait())
        except trio.WouldBlock:
            break
    assert got == [e for batch in batches for e in batch]
    status = registry.status(sink)
    assert status is not None
    assert (status.delivered_events, status.missed_events) == (7, 0)


def _event(category: EventCategory, kind: ObserverEventKind, pid: int) -> ObserverEvent:
    return ObserverEvent(category=category, kind=kind, pid=pid, timestamp_ms=0.0)


async def test_cancelled_on_a_full_block_sink_every_event_is_still_counted() -> None:
    # Cancelled while a full BLOCK sink holds up the first run, the rest of
    # that run is counted missed there, and the later runs still reach a sink
    # with room, as when each event was awaited on its own.
    registry = ObserverRegistry()
    blocked, blocked_rx = registry.add_channel(
        [EventCategory.PROCESS], capacity=1, backpressure=ObserverBackpressure.BLOCK
    )
    files, files_rx = registry.add_channel(
        [EventCategory.FILE], capacity=8, backpressure=ObserverBackpressure.DROP_OLDEST
    )
    registry.emit_nowait(_event(EventCategory.PROCESS, K.DESCENDANT_STARTED, 1))
    observer = TreeObserver(
        emit=registry.emit,
        emit_many=registry.emit_many,
        emit_nowait=registry.emit_nowait,
        categories=frozenset({EventCategory.PROCESS, EventCategory.FILE}),
    )
    batch = [
        _event(EventCategory.PROCESS, K.DESCENDANT_STARTED, 2),
        _event(EventCategory.PROCESS, K.DESCENDANT_STARTED, 3),
        _event(EventCategory.FILE, K.FILE_OPEN, 2),
        _event(EventCategory.FILE, K.FILE_OPEN, 3),
    ]
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(observer._emit_all, batch)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    status = registry.status(blocked)
    assert status is not None
    assert (status.delivered_events, status.missed_events) == (1, 2)
    status = registry.status(files)
    assert status is not None
    assert (status.delivered_events, status.missed_events) == (2, 0)
    assert [files_rx.receive_nowait().pid for _ in range(2)] == [2, 3]
    blocked_rx.close()
    files_rx.close()
