"""Watching a quiet tree from a thread, so the trio loop can sleep.

When a pass of the tree observer finds that no process of the tree ran
since the one before, every pass after it reads the same counters again,
one per interval, to learn the same thing, until something runs. Those
reads are cheap; waking the trio loop for them is not: its timer, its
``epoll_wait``, the scheduler and the task cost several times what a
thread pays to wake from ``select`` (see the ``tree-cpu`` section of
``docs/performance.md``). So once a pass was quiet, the observer hands the
descriptors and the bytes they last held to a :class:`QuietWatch` and naps
until the next full look is due; the thread re-reads them every interval
and wakes the observer, through trio's token, as soon as one differs. The
pass that follows is the one that would have found the change.

With the connector backend the thread also waits on the connector's
socket (``drain``): every fork, exec and exit of the machine is multicast
to it, and while the tree is quiet none of them is the tree's. The thread
reads the batches as they come (at most once per :data:`DRAIN_PAUSE`) and
holds the records for the loop, calling back at once for one about the
tree (the drain is given its pids),
so the machine's other records no longer wake the loop one batch at a
time, and the tree's are handled as soon as before. With PROCESS alone
there are no counters to read, only the socket.

The thread only reads descriptors the observer owns. It reads them under a
lock that :meth:`QuietWatch.disarm` takes, so once ``disarm`` has returned
the thread reads none of them and the observer may close them (or read the
socket itself).
"""

from __future__ import annotations

import math
import os
import select
import threading
import time
from collections.abc import Callable, Sequence
from typing import Final, final

import trio

DRAIN_PAUSE: Final = 0.002
"""Seconds the thread lets the drained descriptor fill before it waits on it
again (at most the interval): on a machine that starts processes fast, one
read takes in several batches of records, and a record about the tree is
handled at most this much later than without the pause."""

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
            differently from its bytes in the snapshot (or failed), or the
            drain asked for it.
        token: The trio run's token.
    """

    def __init__(
        self, interval: float, on_moved: Callable[[], None], token: trio.lowlevel.TrioToken
    ) -> None:
        self._interval = interval
        self._on_moved = on_moved
        self._token = token
        self._lock = threading.Lock()
        self._snapshot: Snapshot | None = None
        self._drain: tuple[int, Callable[[], bool]] | None = None
        # Bumped by every arm and disarm: a wait that began before one does
        # not read the new snapshot early.
        self._generation = 0
        self._closing = False
        # Written to by arm, disarm and close to end the thread's select.
        self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.checks = 0
        """How many times the thread has read a snapshot (for tests)."""
        self._failed: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, name="trio_observer quiet watch", daemon=True
        )
        self._thread.start()

    @property
    def armed(self) -> bool:
        """Whether a snapshot is being watched."""
        return self._snapshot is not None

    @property
    def failed(self) -> BaseException | None:
        """What ended the thread, if something went wrong in it: it watches nothing then."""
        return self._failed

    def arm(self, snapshot: Snapshot, drain: tuple[int, Callable[[], bool]] | None = None) -> None:
        """Watch ``snapshot``: read it one interval from now, and every interval after.

        Args:
            snapshot: The descriptors and their bytes; they must stay open
                until :meth:`disarm` has returned. Empty: only the drain.
            drain: A descriptor to wait on and what to call, in the thread,
                when it is readable (the connector's socket and
                ``hold_queued``); ``True`` calls back as a moved snapshot does.
        """
        self._set(snapshot, drain)

    def disarm(self) -> None:
        """Stop watching; on return, nothing of the snapshot or the drain is being read.

        Blocks while the thread is in the middle of a read (one ``pread``
        per descriptor, or one drain), never longer.
        """
        if self._snapshot is not None:
            self._set(None, None)

    def close(self) -> None:
        """Stop the thread and wait for it to end."""
        self._set(None, None, closing=True)
        self._thread.join()
        os.close(self._wake_read)
        os.close(self._wake_write)

    def _set(
        self,
        snapshot: Snapshot | None,
        drain: tuple[int, Callable[[], bool]] | None,
        *,
        closing: bool = False,
    ) -> None:
        # What the thread reads next; a new generation makes it start over.
        with self._lock:
            self._snapshot = snapshot
            self._drain = drain
            self._generation += 1
            self._closing = self._closing or closing
        self._poke()

    def _poke(self) -> None:
        try:
            os.write(self._wake_write, b"\0")
        except BlockingIOError:
            pass  # the pipe is full of pokes already: the thread will look

    def _run(self) -> None:
        try:
            self._watch()
        except BaseException as exc:
            # Whatever it was, the loop must not sleep on a watch that is
            # gone: it is woken, and makes no watch of this one again. The
            # error goes on to threading.excepthook, to be seen.
            self._failed = exc
            with self._lock:
                armed, self._snapshot, self._drain = self._snapshot is not None, None, None
            if armed:
                try:
                    self._token.run_sync_soon(self._on_moved)
                except trio.RunFinishedError:
                    pass
            raise

    def _watch(self) -> None:
        # poll, not select: the descriptors may be past FD_SETSIZE.
        poller = select.poll()
        poller.register(self._wake_read, select.POLLIN)
        polled = -1  # the drained descriptor, while registered
        generation = -1
        next_check = math.inf
        # Until when the drained descriptor is not waited on (see DRAIN_PAUSE).
        paused_until = 0.0
        pause = min(DRAIN_PAUSE, self._interval)
        while True:
            with self._lock:
                if self._closing:
                    return
                if generation != self._generation:
                    generation = self._generation
                    next_check = (
                        math.inf if not self._snapshot else time.monotonic() + self._interval
                    )
                    paused_until = 0.0
                drain = self._drain
            now = time.monotonic()
            wake_at = next_check
            wanted = -1
            if drain is not None:
                if now >= paused_until:
                    wanted = drain[0]
                else:
                    wake_at = min(wake_at, paused_until)
            if wanted != polled:
                if polled >= 0:
                    poller.unregister(polled)
                if wanted >= 0:
                    poller.register(wanted, select.POLLIN)
                polled = wanted
            timeout = None if wake_at == math.inf else max(0.0, wake_at - now) * 1000
            readable = {fd for fd, _ in poller.poll(timeout)}
            if self._wake_read in readable:
                try:
                    os.read(self._wake_read, 4096)
                except BlockingIOError:
                    pass
            with self._lock:
                snapshot = self._snapshot
                if self._closing or snapshot is None or generation != self._generation:
                    continue  # disarmed or armed anew meanwhile: start over
                moved = False
                if drain is not None and drain[0] in readable:
                    moved = self._drained(drain[1])
                    paused_until = time.monotonic() + pause
                if not moved and time.monotonic() >= next_check:
                    self.checks += 1
                    next_check = time.monotonic() + self._interval
                    moved = _moved(snapshot)
                if not moved:
                    continue
                self._snapshot = None
                self._drain = None
                self._generation += 1
                generation = self._generation
                next_check = math.inf
            try:
                self._token.run_sync_soon(self._on_moved)
            except trio.RunFinishedError:
                return

    @staticmethod
    def _drained(drain: Callable[[], bool]) -> bool:
        # A failed read asks for the loop too: its own read will raise it
        # where it can be handled.
        try:
            return drain()
        except OSError:
            return True
