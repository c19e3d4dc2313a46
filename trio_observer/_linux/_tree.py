"""The tree observer: descendants, files and sockets of the launched processes.

One :class:`TreeObserver` per session. The session feeds it the pids it
spawns (:meth:`TreeObserver.add_root`) and runs :meth:`TreeObserver.run` in
its nursery while a sink wants PROCESS, FILE or NETWORK events. At the end
the session stops it with :meth:`TreeObserver.settle` (before its final
sweep) and :meth:`TreeObserver.finish` (after it), which report what the
teardown did before any sink closes.

Descendants are tracked by one of two backends:

* ``"connector"``: the netlink process connector reports every fork and exit
  as it happens, with exit codes and kernel timestamps (grade ``EXACT``).
* ``"poll"``: the process table is scanned every ``poll_interval`` seconds of
  the trio clock and diffed (grade ``INFERRED``); a process that lives and
  dies between two scans without leaving a zombie behind is never seen.

Files and sockets are always snapshots (see :mod:`._descriptors`).

This module is the loop: which backend, when to look, what is wanted, and
where the events go. Which processes belong to the tree, and the events
about them joining and leaving it, are :mod:`._tree_members`'s.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Final, Literal, final

import trio

from .._events import EventCategory, EventGrade, ObserverEvent, ObserverEventKind, trio_time_ms

if TYPE_CHECKING:
    # Imported where the observer first has work (see TreeObserver._load):
    # together they cost more to import than the rest of a session, which
    # most sessions (no tree category wanted) would pay for nothing.
    from ._activity import ActivityWatch
    from ._cgroup import Cgroup
    from ._connector import ConnectorBatch, ConnectorRecord, ConnectorSocket, ProcConnector
    from ._descriptors import DescriptorTracker
    from ._quiet_watch import QuietWatch, Snapshot
    from ._tree_members import TreeMembers

Backend = Literal["auto", "poll", "connector"]

OBSERVABLE_CATEGORIES: Final = frozenset(
    {EventCategory.PROCESS, EventCategory.FILE, EventCategory.NETWORK}
)
"""The categories a tree observer produces; others passed to it are ignored."""

# How many of the latest exits are remembered (see TreeObserver._ended): a
# zombie that waits longer than that many exits for the final sweep is
# reported again, as unseen, when the sweep reaps it.
_REMEMBERED_ENDS: Final = 4096

LOSS_PID: Final = 0
"""The ``pid`` of ``OBSERVATION_LOST`` events: the loss is not about one
process."""


@final
@dataclass(frozen=True, slots=True)
class TreeObserverStatistics:
    """A snapshot of what a :class:`TreeObserver` has done."""

    backend: str | None
    """``"connector"`` or ``"poll"``: how descendants are tracked; ``None``
    until :meth:`TreeObserver.run` has chosen."""
    fallback_reason: str | None
    """Why ``backend="auto"`` fell back to polling, if it did."""
    polls: int
    """How many scans of ``/proc`` were made (process table or descriptors)."""
    connector_records: int
    """How many connector records were read (all processes of the system)."""
    lost_overruns: int
    """How many times the connector's receive buffer overran (``ENOBUFS``).
    Each lost an unknown number of records and was followed by a rescan."""
    known_descendants: int
    """How many descendants are currently believed alive."""


@final
class TreeObserver:
    """Watch the descendants, files and sockets of the processes a session launched.

    Events go to ``emit`` in the order they were noticed. Only the categories
    currently wanted are observed at all; with none wanted, :meth:`run` does
    no work and holds no socket until :meth:`set_categories` asks for one.

    Args:
        emit: Awaited with every event (the session passes its registry's
            ``emit``).
        emit_many: Awaited with each run of same-category events of a
            pass, in order, instead of ``emit`` per event (the session
            passes its registry's ``emit_many``): one await per run, not one
            per event. It must count, on cancellation, every event of the run
            it was not able to offer, as the registry's does. ``None`` awaits
            ``emit`` per event.
        emit_nowait: Called with the events that ``emit`` had no time for
            when :meth:`run` is cancelled while it reports the end of the
            tree (see :meth:`finish`), so that a full sink counts them as
            missed instead of never hearing of them. ``None`` drops them.
        categories: Which of PROCESS, FILE and NETWORK to observe now; other
            categories are ignored.
        poll_interval: Seconds of the trio clock between scans. While
            no process of the tree runs, a thread of the observer reads
            their run counters at this interval instead, and the loop
            sleeps until one moves (see ``docs/observation.md``).
        proc_root: Where ``/proc`` is mounted; tests pass a fake tree.
        backend: ``"connector"`` requires the process connector (and raises
            from :meth:`run` if it is refused); ``"poll"`` never uses it;
            ``"auto"`` (the default) tries it and falls back to polling. With
            a ``proc_root`` other than ``"/proc"`` and no
            ``connector_factory``, ``"auto"`` polls, because the connector
            reports the real system's pids.
        connector_factory: Opens the connector socket; tests pass a fake.
            Defaults to a real subscribed netlink socket.
        adopt_marker: An environment entry (``b"NAME=value"``) that marks
            the processes of this tree. A child of *this* process that is not
            a root and not known, and whose initial environment holds this
            exact entry, is adopted into the tree and reported with
            ``DESCENDANT_STARTED``: an orphan re-parented to this process (a
            child subreaper) before a scan saw it under its own parent.
            ``None`` (the default) adopts nothing.
        cgroup: Returns the session's cgroup, which holds every process of
            the tree (each root and its descendants in a cgroup of the
            root's own below it), or ``None`` while the session has none.
            With one, an orphan re-parented to this process is the tree's
            if it is in a root's cgroup, whatever it did to its group,
            session or environment (an ``env -i setsid`` double fork), and
            ``adopt_marker`` is not read. And a periodic pass first reads the
            cgroup's ``cpu.stat``: if the tree's CPU time did not move, no
            process of it ran, and the pass reads nothing else. ``None``
            (the default): membership is what the walk from the roots and
            the marker find, and every pass checks every thread.
        reap_adopted: Reap (``waitpid``) a descendant that exits as a zombie
            child of this process, after its ``DESCENDANT_EXITED`` (and its
            exit code) is taken. Roots are never reaped here: they are the
            caller's. Off by default because reaping someone else's child
            would steal its exit status.

    Raises:
        ValueError: If ``poll_interval`` is not positive or ``backend`` is
            unknown.
    """

    def __init__(
        self,
        *,
        emit: Callable[[ObserverEvent], Awaitable[None]],
        emit_many: Callable[[Sequence[ObserverEvent]], Awaitable[None]] | None = None,
        emit_nowait: Callable[[ObserverEvent], None] | None = None,
        categories: frozenset[EventCategory] = OBSERVABLE_CATEGORIES,
        poll_interval: float = 0.02,
        proc_root: str = "/proc",
        backend: Backend = "auto",
        connector_factory: Callable[[], ConnectorSocket] | None = None,
        adopt_marker: bytes | None = None,
        cgroup: Callable[[], Cgroup | None] | None = None,
        reap_adopted: bool = False,
    ) -> None:
        if not poll_interval > 0 or math.isinf(poll_interval):
            raise ValueError(f"poll_interval must be a positive number, not {poll_interval!r}")
        if backend not in ("auto", "poll", "connector"):
            raise ValueError(f"backend must be 'auto', 'poll' or 'connector', not {backend!r}")
        self._emit = emit
        self._emit_many = emit_many
        self._emit_nowait = emit_nowait
        self._categories = frozenset(categories) & OBSERVABLE_CATEGORIES
        self._poll_interval = poll_interval
        self._proc_root = proc_root
        self._backend_choice: Backend = backend
        if connector_factory is None and backend == "auto" and proc_root != "/proc":
            self._backend_choice = "poll"
        self._connector_factory = connector_factory
        self._adopt_marker = adopt_marker
        self._cgroup = cgroup
        self._cpu_stat: tuple[Cgroup, str] | None = None
        # A root added since the last full pass: the next one may not be
        # skipped on the cgroup's word (the root may not be in it yet).
        self._roots_added = False
        self._reap_adopted = reap_adopted
        # The thread that re-reads the counters while the tree is quiet (see
        # _quiet_watch), made at the first quiet pass of an active loop; and
        # whether a pass should come now, not at the nap's deadline (it saw
        # something run, or a root came).
        self._quiet: QuietWatch | None = None
        self._quiet_fired = False
        # Whether the last pass found nothing to do: nothing of the tree ran
        # since the pass before it, and it produced no event.
        self._last_pass_quiet = False
        # The members, descriptors and activity parts, made (and their
        # modules imported) by _load once something is wanted. Until then
        # the roots are only remembered, in spawn order.
        self._parts: tuple[TreeMembers, DescriptorTracker, ActivityWatch] | None = None
        self._idle_roots: dict[int, None] = {}
        self._running = False
        self._active_scope: trio.CancelScope | None = None
        self._wake = trio.Event()
        # Set while the active loop runs and has done its first pass: from
        # then on every fork is seen (see wait_active). Replaced by a fresh
        # one when the loop stops; the old one is set then, to wake waiters.
        self._ready = trio.Event()
        self._backend_in_use: str | None = None
        self._fallback_reason: str | None = None
        self._polls = 0
        self._connector_records = 0
        self._lost_overruns = 0
        # The end of the session (see settle and finish).
        self._nap: trio.CancelScope | None = None
        self._settle_requests: list[trio.Event] = []
        self._finishing = False
        self._stopped = trio.Event()
        self._exit_codes: Mapping[int, int] = {}
        # The pids of the latest exits reported, so that a zombie the final
        # sweep reaps is reported once, and only if the tree never had it.
        self._ended: dict[int, None] = {}
        if self._categories:
            self._load()

    def _load(self) -> tuple[TreeMembers, DescriptorTracker, ActivityWatch]:
        if self._parts is None:
            from ._activity import ActivityWatch
            from ._descriptors import DescriptorTracker
            from ._tree_members import TreeMembers

            descriptors = DescriptorTracker(self._proc_root)
            members = TreeMembers(
                proc_root=self._proc_root,
                descriptors=descriptors,
                adopt_marker=self._adopt_marker,
                reap_adopted=self._reap_adopted,
                in_cgroup=None if self._cgroup is None else self._has_cgroup,
            )
            for pid in self._idle_roots:
                members.add_root(pid, read_now=False)
            self._idle_roots.clear()
            self._parts = (members, descriptors, ActivityWatch(self._proc_root))
        return self._parts

    def _has_cgroup(self) -> bool:
        return self._cgroup is not None and self._cgroup() is not None

    def _group_cpu_stat(self) -> str | None:
        group = None if self._cgroup is None else self._cgroup()
        if group is None:
            return None
        if self._cpu_stat is None or self._cpu_stat[0] is not group:
            self._cpu_stat = (group, str(group.path / "cpu.stat"))
        return self._cpu_stat[1]

    @property
    def _tree(self) -> TreeMembers:
        return self._load()[0]

    @property
    def _descriptors(self) -> DescriptorTracker:
        return self._load()[1]

    @property
    def _activity(self) -> ActivityWatch:
        return self._load()[2]

    # ----------------------------------------------------------- public API

    def add_root(self, pid: int) -> None:
        """Watch the descendants of ``pid``, a process the session spawned.

        Call it right after the spawn, before the next checkpoint, so the
        connector backend cannot process the root's first forks before it
        knows the root. Events about the root itself are the session's; the
        tree reports its descendants and its files and sockets.

        Args:
            pid: The spawned process.
        """
        # While idle, nothing is read: the first scan fills in the details,
        # so a spawn costs no /proc read unless someone observes the tree.
        self._roots_added = True
        # Spawned by us, a root moves no counter of the tree: a quiet nap
        # would not end for it.
        self._end_quiet_nap()
        if self._parts is None:
            self._idle_roots[pid] = None
        else:
            self._parts[0].add_root(pid, read_now=bool(self._categories))

    def discard_root(self, pid: int) -> None:
        """Say that the session has reaped ``pid``, one of the roots.

        An idle observer forgets it at once, so that a long session that
        nobody observes does not accumulate its dead processes. An active
        observer keeps it until its next scan notices the exit and reports
        the closing of the root's files and sockets.

        Args:
            pid: A root given to :meth:`add_root`.
        """
        if not self._categories:
            if self._parts is None:
                self._idle_roots.pop(pid, None)
            else:
                self._parts[0].discard_root(pid)

    def set_categories(self, categories: frozenset[EventCategory]) -> None:
        """Change what is observed; an empty set stops all work.

        Args:
            categories: The categories some sink wants now. Those other than
                PROCESS, FILE and NETWORK are ignored.
        """
        wanted = frozenset(categories) & OBSERVABLE_CATEGORIES
        self._categories = wanted
        if wanted or self._parts is not None:
            _, descriptors, activity = self._load()
            self._end_quiet_nap()  # before its descriptors are closed
            descriptors.reset(
                files=EventCategory.FILE in wanted, network=EventCategory.NETWORK in wanted
            )
            activity.forget_all()
        if not wanted:
            if self._active_scope is not None:
                self._active_scope.cancel()
        else:
            # Also out of a nap without a deadline (connector, PROCESS
            # alone): FILE or NETWORK wanted now are scanned on the clock.
            self._interrupt()

    async def wait_active(self) -> None:
        """Wait until the wanted categories are being observed.

        Returns at once (with a checkpoint) when nothing is wanted, or when
        the backend is already subscribed and has scanned the tree once. The
        session awaits this before it spawns, so that the first sink of a
        category does not miss the forks of a process started right after it
        subscribed. If everything is unsubscribed while it waits, it returns
        once the observer has gone idle; if something is subscribed again
        meanwhile, it waits for that new run's first scan.
        """
        while self._categories:
            ready = self._ready
            await ready.wait()
            if ready is self._ready:
                return
            # The run it waited for stopped (nothing was wanted for a moment)
            # before its first pass was done: wait for the next run, if any.
        await trio.lowlevel.checkpoint()

    def known_descendants(self) -> set[int]:
        """Return the pids of the descendants not known to be gone.

        That is those believed alive, and those whose exit was seen but
        that still wait to be reaped (``reap_adopted``): the session's final
        sweep reaps what the observer had no time to. The roots themselves
        are not included. Only meaningful while :meth:`run` is running (or
        just after it): an idle observer does not follow the tree.

        Returns:
            A new set the caller may keep.
        """
        if self._parts is None:
            return set()
        return self._tree.descendants() | self._tree.awaiting_reap()

    async def settle(self, *, exit_codes: Mapping[int, int] | None = None) -> None:
        """Catch up now with everything the kernel has queued and ``/proc`` shows.

        The session awaits this once its own processes are reaped and
        before its final sweep, so that what is still alive is known (and
        its argv read) before the sweep stops it: a daemon that a poll had
        not seen yet is reported as started. Returns at once when nothing
        is observed.

        Args:
            exit_codes: A mapping of pid to exit code that the caller fills
                in as it reaps processes of the tree (the final sweep): once
                a process is reaped, a poll can learn its exit code from
                nowhere else. Read until :meth:`finish` returns.
        """
        if exit_codes is not None:
            self._exit_codes = exit_codes
        if self._active_scope is None or self._finishing:
            await trio.lowlevel.checkpoint()
            return
        done = trio.Event()
        self._settle_requests.append(done)
        self._interrupt()
        await done.wait()

    async def finish(self) -> None:
        """Report the end of the tree, then stop :meth:`run`; the sinks may close after.

        Call it when every process of the tree is gone (the session does,
        after its final sweep). It reads whatever the kernel still queued:
        the connector multicasts a record onto our socket as the kernel
        sends it, and an exiting task sends its exit record right after it
        became a zombie, so once the tree is dead one read until the socket
        is empty holds every record of it (but that of a task reaped in the
        instant between the two). With polling it scans once more. Then
        every member still believed alive is looked at: a gone one gets its
        ``DESCENDANT_EXITED`` (``INFERRED``: its record was lost, or no scan
        saw it go), with its closes; processes the sweep reaped that the tree
        never knew get a started/exited pair; the members still running
        (they could not be stopped) are counted in one ``OBSERVATION_LOST``.

        The processes the caller reaped are those in the ``exit_codes``
        given to :meth:`settle`.
        """
        self._finishing = True
        self._interrupt()
        if self._running:
            await self._stopped.wait()
        else:
            await trio.lowlevel.checkpoint()

    def statistics(self) -> TreeObserverStatistics:
        """Return counters describing the observer's work so far.

        Returns:
            A frozen snapshot.
        """
        return TreeObserverStatistics(
            backend=self._backend_in_use,
            fallback_reason=self._fallback_reason,
            polls=self._polls,
            connector_records=self._connector_records,
            lost_overruns=self._lost_overruns,
            known_descendants=0 if self._parts is None else self._tree.descendant_count(),
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Observe until :meth:`finish` or cancelled; use ``await nursery.start(observer.run)``.

        Idle (no work, no socket) while no category is wanted.

        Args:
            task_status: Under ``nursery.start``, reports started once the
                backend is chosen (the connector subscribed) and the first
                scan is done, so every fork after that is seen; at once if no
                category is wanted.

        Raises:
            trio.BusyResourceError: If it is already running.
            ConnectorUnavailableError: With ``backend="connector"``, if the
                process connector cannot be used.
        """
        if self._running:
            raise trio.BusyResourceError("this TreeObserver is already running")
        self._running = True
        started: trio.TaskStatus[None] | None = task_status
        try:
            while not self._finishing:
                if not self._categories and started is not None:
                    started.started()
                    started = None
                while not self._categories and not self._finishing:
                    self._wake = trio.Event()
                    await self._wake.wait()
                if self._finishing:
                    break
                with trio.CancelScope() as scope:
                    self._active_scope = scope
                    await self._run_active(started)
                started = None
                self._active_scope = None
                self._replace_ready()
                # Going idle: nobody wants closes or exits reported while we
                # do not look; on resume the next scan reports the difference.
            if started is not None:
                started.started()  # finished before it ever started
        finally:
            self._active_scope = None
            self._replace_ready()
            self._running = False
            self._stopped.set()

    def _replace_ready(self) -> None:
        # Set, not dropped: a wait_active() caller may be waiting on it.
        ready, self._ready = self._ready, trio.Event()
        ready.set()
        # Likewise for settle(): a loop that stopped has nothing to catch up.
        self._answer_settle_requests()

    def _end_quiet_nap(self) -> None:
        # Stop the thread reading the counters and make the loop pass now.
        if self._quiet is not None and self._quiet.armed:
            self._quiet.disarm()
            self._on_quiet_moved()

    def _on_quiet_moved(self) -> None:
        # From the quiet watch (through the trio token) or _end_quiet_nap.
        self._quiet_fired = True
        if self._nap is not None:
            self._nap.cancel()

    def _quiet_watch(self) -> QuietWatch | None:
        """The quiet watch, made on first use; ``None`` where it cannot keep the run's time.

        Its thread waits in real time: under another clock than trio's
        own (a ``trio.testing.MockClock``), every pass stays on the trio
        clock.
        """
        if self._quiet is not None and self._quiet.failed is not None:
            return None  # its thread died (and woke the loop): no more watching
        if self._quiet is None:
            if type(trio.lowlevel.current_clock()).__name__ != "SystemClock":
                return None
            from ._quiet_watch import QuietWatch

            self._quiet = QuietWatch(
                self._poll_interval, self._on_quiet_moved, trio.lowlevel.current_trio_token()
            )
        return self._quiet

    def _interrupt(self) -> None:
        # Wakes the active loop only where it waits for the kernel or the
        # clock, never inside an emit (a BLOCK sink would count a miss).
        if self._nap is not None:
            self._nap.cancel()
        self._wake.set()

    # ------------------------------------------------------------ the loops

    async def _open_connector(self) -> ProcConnector | None:
        if self._backend_choice == "poll" or (
            self._backend_choice == "auto" and self._fallback_reason is not None
        ):
            return None
        from ._connector import ConnectorUnavailableError, ProcConnector, open_connector_socket

        factory: Callable[[], ConnectorSocket] = self._connector_factory or open_connector_socket
        try:
            # The subscription waits (briefly) for the kernel's ack.
            sock = await trio.to_thread.run_sync(factory)
        except ConnectorUnavailableError as exc:
            if self._backend_choice == "connector":
                raise
            self._fallback_reason = str(exc)
            return None
        return ProcConnector(sock)

    async def _run_active(self, task_status: trio.TaskStatus[None] | None) -> None:
        self._load()
        connector = await self._open_connector()
        self._backend_in_use = "poll" if connector is None else "connector"
        drained = False
        try:
            # Subscribe first, then scan: a fork between the two is seen by
            # both, never by neither.
            await self._pass(scan_tree=True)
            self._ready.set()
            if task_status is not None:
                task_status.started()
            interval = self._poll_interval
            last_pass = trio.current_time()
            next_poll = last_pass + interval
            # Whether the quiet watch is armed for this nap (it reads the
            # connector's socket then), and how many passes it stands in for
            # until the next full look (0 with PROCESS alone: no passes).
            watched = False
            quiet_passes = 0
            while True:
                if self._finishing:
                    drained = True
                    await self._emit_all(self._final_events(connector))
                    return
                if self._settle_requests:
                    await self._catch_up(connector)
                    self._answer_settle_requests()
                    # The catch-up pass ended any quiet nap.
                    next_poll = min(next_poll, trio.current_time() + interval)
                    watched, quiet_passes = False, 0
                    continue
                with trio.CancelScope(deadline=self._nap_deadline(connector, next_poll)) as nap:
                    self._nap = nap
                    if connector is None or watched:
                        await trio.sleep_forever()
                    else:
                        await connector.wait_readable()
                self._nap = None
                # Only when readable, or after a watched nap (what the watch
                # held): a nap that ran out (or was cut short by _interrupt)
                # leaves whatever came meanwhile queued, and the next wait
                # returns at once for it.
                if (
                    connector is not None
                    and (watched or not nap.cancelled_caught)
                    and await self._handle_batch(self._receive(connector))
                    and quiet_passes
                ):
                    self._quiet_fired = True  # the tree changed: pass now
                watched = False
                if self._tree.reap_pending:
                    self._tree.reap()
                fired, self._quiet_fired = self._quiet_fired, False
                now = trio.current_time()
                if connector is not None and not self._categories - {EventCategory.PROCESS}:
                    # PROCESS alone on the connector: nothing to scan on the
                    # clock (the nap waits for records, or for the reaps).
                    next_poll = now + interval
                    watched = self._hold_socket(connector, [])
                    continue
                if now < next_poll and not fired:
                    continue
                if quiet_passes:
                    # The watch read the counters at each interval in between.
                    self._activity.skip_passes(
                        max(0, min(quiet_passes, round((now - last_pass) / interval)) - 1)
                    )
                    quiet_passes = 0
                if connector is None:
                    await self._pass(scan_tree=True, may_skip=True)
                else:
                    # No rescan of the tree for a new root: add_root comes
                    # before the next checkpoint and records are handled only
                    # here, so its forks are all seen. A rescan would race
                    # with the records still queued: it took a child reaped
                    # since for an exit without a code, and a zombie already
                    # reported for a new one (a second, inferred pair).
                    await self._pass(scan_tree=False, may_skip=True)
                last_pass = trio.current_time()
                next_poll = last_pass + interval
                quiet_passes = self._nap_quietly(connector)
                if quiet_passes:
                    watched = True
                    next_poll = last_pass + interval * quiet_passes
        finally:
            self._nap = None
            if self._quiet is not None:
                self._quiet.close()
                self._quiet = None
                self._quiet_fired = False
            if self._finishing and not drained:
                # Cancelled on the way (a BLOCK sink that never made room ran
                # out the session's patience): what is left still counts.
                self._push_nowait(self._final_events(connector))
            # Its schedstat descriptors are not kept while nobody looks.
            self._activity.forget_all()
            if connector is not None:
                connector.close()

    def _receive(self, connector: ProcConnector) -> ConnectorBatch:
        # The only read of the socket here: never while the watch reads it.
        if self._quiet is not None:
            self._quiet.disarm()
        return connector.receive_nowait()

    def _nap_quietly(self, connector: ProcConnector | None) -> int:
        """After a pass, hand the counters to the quiet watch if the pass found nothing to do.

        Returns:
            How many intervals after this pass the next one is due (the
            next full look), with the watch reading the counters at each
            interval in between; ``0`` if the next pass is one interval away
            as usual.
        """
        if not self._last_pass_quiet or self._roots_added:  # a root not baselined yet
            return 0
        snapshot = self._activity.quiet_snapshot()
        if snapshot is None:
            return 0
        # Even for one interval: with the connector, the watch also spares
        # the loop a wake-up per batch of the machine's records meanwhile.
        passes = self._activity.passes_until_due()
        if connector is None:
            watch = self._quiet_watch() if self._may_nap() else None
            if watch is None:
                return 0
            watch.arm(snapshot)
            return passes
        return passes if self._hold_socket(connector, snapshot) else 0

    def _hold_socket(self, connector: ProcConnector, snapshot: Snapshot) -> bool:
        """Arm the quiet watch with ``snapshot`` and the connector's socket.

        Returns:
            Whether it was armed: not with a reap or a settle pending, at
            the end, or under a clock the thread cannot keep.
        """
        watch = self._quiet_watch() if self._may_nap() else None
        if watch is None:
            return False
        members = frozenset(self._tree.known_pids())
        watch.arm(snapshot, (connector.fileno(), partial(connector.hold_queued, members)))
        return True

    def _may_nap(self) -> bool:
        return not (self._tree.reap_pending or self._settle_requests or self._finishing)

    def _nap_deadline(self, connector: ProcConnector | None, next_poll: float) -> float:
        # The connector reports the tree as it changes: with nothing to scan
        # on the clock (PROCESS alone) and nobody to reap, waking every
        # interval would cost a wake-up of the whole loop for nothing.
        if (
            connector is not None
            and not self._categories - {EventCategory.PROCESS}
            and not self._tree.reap_pending
        ):
            return math.inf
        return next_poll

    def _answer_settle_requests(self) -> None:
        requests, self._settle_requests = self._settle_requests, []
        for request in requests:
            request.set()

    async def _catch_up(self, connector: ProcConnector | None) -> None:
        if connector is None:
            await self._pass(scan_tree=True)
            return
        await self._handle_batch(self._receive(connector))
        await self._pass(scan_tree=False)

    def _final_events(self, connector: ProcConnector | None) -> list[ObserverEvent]:
        events: list[ObserverEvent] = []
        if connector is not None:
            events.extend(self._batch_events(self._receive(connector)))
            # Files and sockets only: a rescan of the tree would take a
            # zombie already reported for a new one.
            events.extend(self._pass_events(scan_tree=False))
        else:
            events.extend(self._pass_events(scan_tree=True))
        ends, still_running = self._tree.close_out(self._exit_codes)
        events.extend(ends)
        events = self._with_exit_codes(events)
        codes = self._exit_codes
        self._note_ends(events)
        # Reaped by the sweep and never seen by the tree (it lived between
        # two scans, or its fork record was lost).
        unseen = set(codes) - self._ended.keys() - self._tree.known_pids()
        events.extend(self._tree.unseen_exits({p: codes[p] for p in sorted(unseen)}))
        if still_running:
            events.append(self._loss_event(still_running))
        if self._tree.reap_pending:
            self._tree.reap()
        return events

    def _loss_event(self, count: int | None) -> ObserverEvent:
        return ObserverEvent(
            category=EventCategory.PROCESS,
            kind=ObserverEventKind.OBSERVATION_LOST,
            pid=LOSS_PID,
            timestamp_ms=trio_time_ms(),
            grade=EventGrade.EXACT,
            count=count,
        )

    def _push_nowait(self, events: Iterable[ObserverEvent]) -> None:
        if self._emit_nowait is None:
            return
        for event in events:
            if event.category in self._categories:
                self._emit_nowait(event)

    async def _emit_all(self, events: Iterable[ObserverEvent]) -> None:
        pending = list(events)
        self._note_ends(pending)
        if self._emit_many is not None:
            await self._emit_runs(pending, self._emit_many)
            return
        for index, event in enumerate(pending):
            # Re-read per event: a sink may go away while we emit.
            if event.category in self._categories:
                try:
                    await self._emit(event)
                except BaseException:
                    # Cancelled, or Ctrl-C delivered where it waits: the one
                    # being sent is counted by the registry; the rest must
                    # be too, not vanish with this task.
                    self._push_nowait(pending[index + 1 :])
                    raise

    async def _emit_runs(
        self,
        pending: list[ObserverEvent],
        emit_many: Callable[[Sequence[ObserverEvent]], Awaitable[None]],
    ) -> None:
        # One await per run of a category, not per event: a run shares the
        # wanted-check, and emit_many counts what it could not offer of the
        # run it was cancelled in. The later runs go out without waiting, as
        # the per-event path does, so a sink with room still gets them.
        end = len(pending)
        start = 0
        while start < end:
            category = pending[start].category
            stop = start + 1
            while stop < end and pending[stop].category is category:
                stop += 1
            # Re-read per run: the wanted categories may change while we emit.
            if category in self._categories:
                run = pending if stop - start == end else pending[start:stop]
                try:
                    await emit_many(run)
                except trio.Cancelled:
                    self._push_nowait(pending[stop:])
                    raise
            start = stop

    def _with_exit_codes(self, events: list[ObserverEvent]) -> list[ObserverEvent]:
        codes = self._exit_codes
        if not codes:
            return events
        return [
            # Seen gone after the caller had reaped it: the caller knows.
            dataclasses.replace(e, exit_code=codes[e.pid])
            if e.kind is ObserverEventKind.DESCENDANT_EXITED
            and e.exit_code is None
            and e.pid in codes
            else e
            for e in events
        ]

    def _note_ends(self, events: list[ObserverEvent]) -> None:
        ended = self._ended
        for event in events:
            if event.kind is ObserverEventKind.DESCENDANT_EXITED:
                ended[event.pid] = None
                if len(ended) > _REMEMBERED_ENDS:
                    del ended[next(iter(ended))]
            elif event.kind is ObserverEventKind.DESCENDANT_STARTED:
                ended.pop(event.pid, None)

    def _pass_events(self, *, scan_tree: bool, may_skip: bool = False) -> list[ObserverEvent]:
        activity = self._activity
        if self._quiet is not None:
            self._quiet.disarm()  # this pass may close what it reads
        self._last_pass_quiet = False
        # Before anything is read: a process that runs after this is active
        # in the next pass (see ._activity).
        cpu_stat = self._group_cpu_stat()
        if (
            cpu_stat is not None
            and activity.group_unchanged(cpu_stat)
            and may_skip
            and not self._roots_added
        ):
            # Nothing of the tree ran: nothing it does itself can have
            # changed, and the full looks that are due come at the next
            # pass that reads.
            activity.skip_pass()
            self._last_pass_quiet = True
            return []
        self._roots_added = False
        self._polls += 1
        events: list[ObserverEvent] = []
        tree = self._tree
        pids = tree.pids()
        active = activity.update(pids)
        if scan_tree:
            if self._backend_in_use == "connector":
                # A connector rescan (after lost records) walks everything.
                events.extend(tree.scan(set()))
            elif active or tree.roots_dirty:
                # Only the poll backend looks at the tree every pass, which
                # is what makes "quiet since the last pass" mean "no fork
                # since the children were last read". The periodic full look
                # is for what others change (descriptors): a process whose
                # counters did not move did not fork, exec or exit.
                events.extend(tree.scan(set(pids).difference(active)))
            # Else no process of the tree ran since the last scan and no root
            # came: none forked, exec'd or exited (and an orphan appears only
            # when one exits), so the walk would read just what it read then.
        if self._categories - {EventCategory.PROCESS}:
            events.extend(self._descriptor_events(active, events))
        self._last_pass_quiet = not active and not events and not tree.roots_dirty
        return self._with_exit_codes(events)

    def _descriptor_events(
        self, active: set[int], events: list[ObserverEvent]
    ) -> list[ObserverEvent]:
        """Read the descriptors of the processes that may have changed them."""
        tree = self._tree
        descriptors = self._descriptors
        # A process that did not run cannot have opened or closed anything
        # itself: read those that ran or are new, those due for the full look
        # (what others change), and those the scan just found.
        wanted = active | self._activity.due
        wanted.update(e.pid for e in events if e.kind is ObserverEventKind.DESCENDANT_STARTED)
        files = EventCategory.FILE in self._categories
        network = EventCategory.NETWORK in self._categories
        found = descriptors.scan(
            tree.tracked(wanted) if wanted else (), files=files, network=network
        )
        outside = self._activity.outside_due - wanted
        if outside:
            # Due for the full look, but nothing of the tree ran since the
            # last one: only what processes outside it change is looked at.
            found.extend(descriptors.recheck(tree.tracked(outside), files=files, network=network))
        if descriptors.tracked_count > tree.size():
            # Some process left without the tree saying so (forget).
            found.extend(descriptors.prune(tree.tracked()))
        return found

    async def _pass(self, *, scan_tree: bool, may_skip: bool = False) -> None:
        await self._emit_all(self._pass_events(scan_tree=scan_tree, may_skip=may_skip))
        if self._tree.reap_pending:
            self._tree.reap()

    # ------------------------------------------------------- the connector

    def _batch_events(self, batch: ConnectorBatch) -> list[ObserverEvent]:
        from ._connector import ExitRecord, ForkRecord

        self._connector_records += len(batch.records)
        events: list[ObserverEvent] = []
        members = self._tree
        superseded = _superseded_execs(batch.records)
        for index, record in enumerate(batch.records):
            if isinstance(record, ForkRecord):
                events.extend(members.on_fork(record))
            elif isinstance(record, ExitRecord):
                events.extend(members.on_exit(record))
            else:
                events.extend(members.on_exec(record, superseded=index in superseded))
        if batch.overruns:
            self._lost_overruns += batch.overruns
            # A lost record may have been a thread's creation or end.
            members.forget_threads()
            events.append(self._loss_event(None))
            # The lost records may have been forks or exits of the tree.
            events.extend(self._pass_events(scan_tree=True))
        return events

    async def _handle_batch(self, batch: ConnectorBatch) -> bool:
        # Whether the batch was about the tree (it made events).
        events = self._batch_events(batch)
        await self._emit_all(events)
        return bool(events)


def _superseded_execs(records: Sequence[ConnectorRecord]) -> set[int]:
    """The indexes of the exec records followed, later in ``records``, by
    another exec or the end of the main thread of the same process.

    What ``/proc`` shows of such a process when the batch is handled is no
    longer the program of that exec: a later one's, or nothing.
    """
    from ._connector import ExecRecord, ExitRecord

    superseded: set[int] = set()
    changed: set[int] = set()
    for index in range(len(records) - 1, -1, -1):
        record = records[index]
        if isinstance(record, ExecRecord):
            if record.tgid in changed:
                superseded.add(index)
            changed.add(record.tgid)
        elif isinstance(record, ExitRecord) and record.pid == record.tgid:
            changed.add(record.tgid)
    return superseded
