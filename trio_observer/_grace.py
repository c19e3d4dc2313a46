"""The one way a process tree is stopped: SIGTERM, a grace period, SIGKILL.

A process the session supervises and the leftovers of the final sweep are
stopped by the same routine, so the two cannot drift apart in how long they
wait or in what they send.
"""

from __future__ import annotations

import math
import signal
from collections.abc import Awaitable, Callable

import trio


class Grace:
    """A grace period that can be cut short while it is running.

    A session holds one for its whole teardown: a second Ctrl-C during the
    teardown calls :meth:`hurry`, and every stop that is still waiting out
    its grace sends SIGKILL at once, as does every stop that starts after.
    """

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds
        self._waiting: set[trio.CancelScope] = set()

    @property
    def seconds(self) -> float:
        """What a stop that starts now waits before SIGKILL (0 once hurried)."""
        return self._seconds

    def hurry(self) -> None:
        """End every running grace now, and give none from now on."""
        self._seconds = 0.0
        for scope in self._waiting:
            scope.deadline = -math.inf


async def terminate_then_kill(
    send: Callable[[int], None],
    wait: Callable[[], Awaitable[object]],
    grace_period: float | Grace,
) -> bool:
    """``send(SIGTERM)``, wait up to ``grace_period``, then SIGKILL and wait.

    ``wait`` returns once the tree is gone; the grace is measured on the
    trio clock. Returns True if SIGKILL had to be sent.
    """
    grace = grace_period if isinstance(grace_period, Grace) else Grace(grace_period)
    send(signal.SIGTERM)
    with trio.move_on_after(grace.seconds) as scope:
        grace._waiting.add(scope)
        try:
            await wait()
        finally:
            grace._waiting.discard(scope)
    if not scope.cancelled_caught:
        return False
    send(signal.SIGKILL)
    await wait()
    return True
