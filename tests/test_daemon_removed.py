"""Removed subscriptions: listed while they can hand something out, and bounded."""

from __future__ import annotations

import math

import trio
import trio.testing

from trio_observer import EventCategory, ObserverBackpressure, ObserverEvent, ObserverEventKind
from trio_observer._daemon._sessions import REMOVED_KEPT, DaemonSession, RemoteSubscription


async def subscribe(daemon_session: DaemonSession) -> RemoteSubscription:
    return await daemon_session.subscribe(
        frozenset({EventCategory.LIFECYCLE}),
        capacity=4,
        backpressure=ObserverBackpressure.DROP_OLDEST,
        detach_timeout=math.inf,
        resend=4,
    )


def started(pid: int) -> ObserverEvent:
    return ObserverEvent(
        category=EventCategory.LIFECYCLE, kind=ObserverEventKind.STARTED, pid=pid, timestamp_ms=0
    )


async def test_removed_subscriptions_beyond_the_bound_are_forgotten_and_counted() -> None:
    daemon_session = DaemonSession(
        "s", grace_period=1, track_descendants=False, containment="process-group"
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon_session.run)
        remotes = [await subscribe(daemon_session) for _ in range(REMOVED_KEPT + 3)]
        # One event in every sink; then one more in the last three only.
        daemon_session.session.observers.emit_nowait(started(1))
        for remote in remotes[:-3]:
            # One at a time, so that "oldest removed" is this order.
            remote.remove("test")
            await trio.testing.wait_all_tasks_blocked()
        assert len(daemon_session.subscriptions) == REMOVED_KEPT + 3
        assert daemon_session.forgotten_subscriptions == 0
        daemon_session.session.observers.emit_nowait(started(2))
        # The last three go too: the three oldest removed are forgotten,
        # with the one unread event each held.
        for remote in remotes[-3:]:
            remote.remove("test")
            await trio.testing.wait_all_tasks_blocked()
        assert set(daemon_session.subscriptions) == {r.id for r in remotes[3:]}
        assert daemon_session.forgotten_subscriptions == 3
        assert daemon_session.forgotten_events == 3
        described = daemon_session.describe()
        assert described["forgotten_subscriptions"] == 3
        assert described["forgotten_events"] == 3
        # A kept one still hands out what it buffered, then ends.
        kept = remotes[-1]
        frames = []
        while (frame := await kept.next_frame()) is not None:
            frames.append(frame)
        assert [f["event"]["pid"] for f in frames] == [1, 2]
        assert kept.unread() == 0
        daemon_session.close()
