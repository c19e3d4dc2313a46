"""Re-reading a quiet tree's run counters from a thread, so the trio loop can sleep.

When a pass of the tree observer finds that no process of the tree ran
since the one before, every pass after it reads the same counters again,
one per interval, to learn the same thing, until something runs. Those
reads are cheap; waking the trio loop for them is not: its timer, its
``epoll_wait``, the scheduler and the task cost several times what a
thread pays to wake from ``threading.Condition.wait`` (see the ``tree-cpu``
section of ``docs/performance.md``). So once a pass was quiet, the observer
hands the descriptors and the bytes they last held to a :class:`QuietWatch`
and naps until the next full look is due; the thread re-reads them every
interval and wakes the observer, through trio's token, as soon as one
differs. The pass that follows is the one that would have found the change.

The thread only reads descriptors the observer owns. It reads them under a
lock that :meth:`QuietWatch.disarm` takes, so once ``disarm`` has returned
the thread reads none of them and the observer may close them.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from typing import final

import trio

Snapshot = Sequence[tuple[int, bytes]]
"""Descriptors to re-read with ``pread(fd, 128, 0)`` and the bytes each held."""


def _moved(snapshot: Snapshot) -> bool:
    pread = os.pread
    try:
        for fd, before in snapshot:
            if pread(fd, 128, 0) != before:
                return True
    except OSError:
        # A reaped task (ESRCH): it ran, to exit.
        return True
    return False


@final
class QuietWatch:
    """A thread that re-reads a snapshot every ``interval`` seconds and calls back when it moved.

    The callback runs in the trio thread (``token.run_sync_soon``), once per
    :meth:`arm`: after it is called the watch is disarmed until armed again.

    Args:
        interval: Seconds of real time between two reads of the snapshot.
        on_moved: Called in the trio thread when some descriptor read
            differently from its bytes in the snapshot (or failed).
        token: The trio run's token.
    """

    def __init__(
        self, interval: float, on_moved: Callable[[], None], token: trio.lowlevel.TrioToken
    ) -> None:
        self._interval = interval
        self._on_moved = on_moved
        self._token = token
        self._condition = threading.Condition(threading.Lock())
        self._snapshot: Snapshot | None = None
        # Bumped by every arm and disarm: a wait that began before one does
        # not read the new snapshot early.
        self._generation = 0
        self._closing = False
        self.checks = 0
        """How many times the thread has read a snapshot (for tests and statistics)."""
        self._thread = threading.Thread(
            target=self._run, name="trio_observer quiet watch", daemon=True
        )
        self._thread.start()

    @property
    def armed(self) -> bool:
        """Whether a snapshot is being watched."""
        return self._snapshot is not None

    def arm(self, snapshot: Snapshot) -> None:
        """Watch ``snapshot``: read it one interval from now, and every interval after.

        Args:
            snapshot: The descriptors and their bytes; they must stay open
                until :meth:`disarm` has returned.
        """
        with self._condition:
            self._snapshot = snapshot
            self._generation += 1
            self._condition.notify()

    def disarm(self) -> None:
        """Stop watching; on return, no descriptor of the snapshot is being read.

        Blocks while the thread is in the middle of a read of the snapshot
        (one ``pread`` per descriptor), never longer.
        """
        if self._snapshot is None:
            return
        with self._condition:
            self._snapshot = None
            self._generation += 1
            self._condition.notify()

    def close(self) -> None:
        """Stop the thread and wait for it to end."""
        with self._condition:
            self._snapshot = None
            self._closing = True
            self._condition.notify()
        self._thread.join()

    def _run(self) -> None:
        condition = self._condition
        with condition:
            while not self._closing:
                if self._snapshot is None:
                    condition.wait()
                    continue
                generation = self._generation
                condition.wait(self._interval)
                snapshot = self._snapshot
                if self._closing or snapshot is None or generation != self._generation:
                    continue  # disarmed or armed anew meanwhile: start over
                self.checks += 1
                if not _moved(snapshot):
                    continue
                self._snapshot = None
                try:
                    self._token.run_sync_soon(self._on_moved)
                except trio.RunFinishedError:
                    return
