"""The tree observer: descendants, files and sockets of the launched processes.

One :class:`TreeObserver` per session. The session feeds it the pids it
spawns (:meth:`TreeObserver.add_root`) and runs :meth:`TreeObserver.run` in
its nursery while a sink wants PROCESS, FILE or NETWORK events.

Descendants are tracked by one of two backends:

* ``"connector"``: the netlink process connector reports every fork and exit
  as it happens, with exit codes and kernel timestamps (grade ``EXACT``).
* ``"poll"``: the process table is scanned every ``poll_interval`` seconds of
  the trio clock and diffed (grade ``INFERRED``); a process that lives and
  dies between two scans without leaving a zombie behind is never seen.

Files and sockets are always snapshots (see :mod:`._descriptors`).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Final, Literal, NoReturn, final

import trio

from .._events import EventCategory, EventGrade, ObserverEvent, ObserverEventKind, trio_time_ms
from ._activity import ActivityWatch
from ._connector import (
    ConnectorBatch,
    ConnectorSocket,
    ConnectorUnavailableError,
    ExitRecord,
    ForkRecord,
    ProcConnector,
    open_connector_socket,
    wait_status_to_exit_code,
)
from ._descriptors import DescriptorTracker, TrackedProcess
from ._procfs import (
    ProcStat,
    environ_has,
    has_children_files,
    read_children,
    read_cmdline,
    read_stat,
    scan_all,
)

Backend = Literal["auto", "poll", "connector"]

OBSERVABLE_CATEGORIES: Final = frozenset(
    {EventCategory.PROCESS, EventCategory.FILE, EventCategory.NETWORK}
)
"""The categories a tree observer produces; others passed to it are ignored."""

LOSS_PID: Final = 0
"""The ``pid`` of ``OBSERVATION_LOST`` events: the loss is not about one
process."""

# An exit can be queued before the fork that created the task: the fork
# message is sent after the child is woken, and the child may run and exit
# on another CPU first. Exits of unknown pids are remembered this long (in
# records) so a late fork can be matched with its exit.
_RECENT_EXITS: Final = 1024


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


@dataclass(slots=True)
class _Node:
    pid: int
    starttime: int | None
    ppid: int | None
    root_pid: int | None
    cached: TrackedProcess | None = None

    def tracked(self) -> TrackedProcess:
        # Asked for every process on every pass: built again only when the
        # start time (the one field that is filled in later) changed.
        cached = self.cached
        if cached is None or cached.starttime != self.starttime:
            cached = self.cached = TrackedProcess(
                self.pid, self.starttime, self.ppid, self.root_pid
            )
        return cached


@final
class TreeObserver:
    """Watch the descendants, files and sockets of the processes a session launched.

    Events go to ``emit`` in the order they were noticed. Only the categories
    currently wanted are observed at all; with none wanted, :meth:`run` does
    no work and holds no socket until :meth:`set_categories` asks for one.

    Args:
        emit: Awaited with every event (the session passes its registry's
            ``emit``).
        categories: Which of PROCESS, FILE and NETWORK to observe now; other
            categories are ignored.
        poll_interval: Seconds of the trio clock between scans.
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
        categories: frozenset[EventCategory] = OBSERVABLE_CATEGORIES,
        poll_interval: float = 0.02,
        proc_root: str = "/proc",
        backend: Backend = "auto",
        connector_factory: Callable[[], ConnectorSocket] | None = None,
        adopt_marker: bytes | None = None,
        reap_adopted: bool = False,
    ) -> None:
        if not poll_interval > 0 or math.isinf(poll_interval):
            raise ValueError(f"poll_interval must be a positive number, not {poll_interval!r}")
        if backend not in ("auto", "poll", "connector"):
            raise ValueError(f"backend must be 'auto', 'poll' or 'connector', not {backend!r}")
        self._emit = emit
        self._categories = frozenset(categories) & OBSERVABLE_CATEGORIES
        self._poll_interval = poll_interval
        self._proc_root = proc_root
        self._backend_choice: Backend = backend
        if connector_factory is None and backend == "auto" and proc_root != "/proc":
            self._backend_choice = "poll"
        self._connector_factory = connector_factory
        self._roots: dict[int, _Node] = {}
        self._members: dict[int, _Node] = {}
        self._seen_dead: set[tuple[int, int]] = set()
        self._recent_exits: dict[int, ExitRecord] = {}
        self._roots_dirty = False
        self._children_files: bool | None = None
        self._descriptors = DescriptorTracker(proc_root)
        self._activity = ActivityWatch(proc_root)
        self._adopt_marker = adopt_marker
        self._reap_adopted = reap_adopted
        self._self_pid = os.getpid()
        # Children of this process whose environment lacked the marker, by
        # identity, so it is read once per process and not once per scan.
        self._not_ours: set[tuple[int, int]] = set()
        # Exited members that may still be zombie children of this process.
        self._to_reap: dict[int, int | None] = {}
        self._running = False
        self._active_scope: trio.CancelScope | None = None
        self._wake = trio.Event()
        # Set while the active loop runs and has done its first pass: from
        # then on every fork is seen (see wait_active).
        self._ready = trio.Event()
        self._backend_in_use: str | None = None
        self._fallback_reason: str | None = None
        self._polls = 0
        self._connector_records = 0
        self._lost_overruns = 0

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
        if pid in self._roots:
            return
        stat = read_stat(self._proc_root, pid)
        self._roots[pid] = _Node(
            pid,
            stat.starttime if stat is not None else None,
            stat.ppid if stat is not None else None,
            pid,
        )
        self._roots_dirty = True

    def set_categories(self, categories: frozenset[EventCategory]) -> None:
        """Change what is observed; an empty set stops all work.

        Args:
            categories: The categories some sink wants now. Those other than
                PROCESS, FILE and NETWORK are ignored.
        """
        wanted = frozenset(categories) & OBSERVABLE_CATEGORIES
        self._categories = wanted
        self._descriptors.reset(
            files=EventCategory.FILE in wanted, network=EventCategory.NETWORK in wanted
        )
        self._activity.forget_all()
        if not wanted:
            if self._active_scope is not None:
                self._active_scope.cancel()
        else:
            self._wake.set()

    async def wait_active(self) -> None:
        """Wait until the wanted categories are being observed.

        Returns at once (with a checkpoint) when nothing is wanted, or when
        the backend is already subscribed and has scanned the tree once. The
        session awaits this before it spawns, so that the first sink of a
        category does not miss the forks of a process started right after it
        subscribed.
        """
        if self._categories:
            await self._ready.wait()
        else:
            await trio.lowlevel.checkpoint()

    def known_descendants(self) -> set[int]:
        """Return the pids of the descendants currently believed alive.

        The roots themselves are not included. Only meaningful while
        :meth:`run` is running (or just after it): an idle observer does not
        follow the tree.

        Returns:
            A new set the caller may keep.
        """
        return set(self._members)

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
            known_descendants=len(self._members),
        )

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Observe until cancelled; use ``await nursery.start(observer.run)``.

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
            while True:
                if not self._categories and started is not None:
                    started.started()
                    started = None
                while not self._categories:
                    self._wake = trio.Event()
                    await self._wake.wait()
                with trio.CancelScope() as scope:
                    self._active_scope = scope
                    await self._run_active(started)
                started = None
                self._active_scope = None
                self._ready = trio.Event()
                # Going idle: nobody wants closes or exits reported while we
                # do not look; on resume the next scan reports the difference.
        finally:
            self._active_scope = None
            self._ready = trio.Event()
            self._running = False

    # ------------------------------------------------------------ the loops

    async def _open_connector(self) -> ProcConnector | None:
        if self._backend_choice == "poll" or (
            self._backend_choice == "auto" and self._fallback_reason is not None
        ):
            return None
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
        connector = await self._open_connector()
        self._backend_in_use = "poll" if connector is None else "connector"
        try:
            # Subscribe first, then scan: a fork between the two is seen by
            # both, never by neither.
            await self._pass(scan_tree=True)
            self._ready.set()
            if task_status is not None:
                task_status.started()
            next_poll = trio.current_time() + self._poll_interval
            while True:
                if connector is None:
                    await trio.sleep_until(next_poll)
                else:
                    with trio.move_on_at(next_poll):
                        await connector.wait_readable()
                    await self._handle_batch(connector.receive_nowait())
                if self._to_reap:
                    self._reap()
                if trio.current_time() < next_poll:
                    continue
                if connector is None:
                    await self._pass(scan_tree=True)
                elif self._roots_dirty or self._categories - {EventCategory.PROCESS}:
                    await self._pass(scan_tree=self._roots_dirty)
                next_poll = trio.current_time() + self._poll_interval
        finally:
            if connector is not None:
                connector.close()

    async def _emit_all(self, events: Iterable[ObserverEvent]) -> None:
        for event in events:
            # Re-read per event: a sink may go away while we emit.
            if event.category in self._categories:
                await self._emit(event)

    async def _pass(self, *, scan_tree: bool) -> None:
        self._polls += 1
        events: list[ObserverEvent] = []
        files = EventCategory.FILE in self._categories
        network = EventCategory.NETWORK in self._categories
        # Before anything is read: a process that runs after this is active
        # in the next pass (see ._activity).
        quiet = self._activity.update([*self._roots, *self._members])
        if scan_tree:
            # Only the poll backend looks at the tree every pass, which is
            # what makes "quiet since the last pass" mean "no fork since the
            # children were last read". A connector rescan walks everything.
            events.extend(self._scan_tree(set() if self._backend_in_use == "connector" else quiet))
        if files or network:
            procs = [n.tracked() for n in (*self._roots.values(), *self._members.values())]
            events.extend(self._descriptors.scan(procs, files=files, network=network, quiet=quiet))
        await self._emit_all(events)
        if self._to_reap:
            self._reap()

    # ---------------------------------------------------- the process table

    def _scan_tree(self, quiet: set[int]) -> list[ObserverEvent]:
        """Update the tree from /proc; return exits, then starts.

        ``quiet`` processes have not run since the previous scan, so they
        have neither exited nor forked: their stat and children are not read.
        """
        self._roots_dirty = False
        if not self._roots and not self._members:
            self._seen_dead = set()
            return []
        table: dict[int, ProcStat] | None = None
        for probe in (*self._roots, *self._members):
            # Decided once, by the first process still there to look at: the
            # kernel either has children files or not.
            if self._children_files is not None:
                break
            self._children_files = has_children_files(self._proc_root, probe)
        if not self._children_files:
            table = scan_all(self._proc_root)
        stats: dict[int, ProcStat | None] = dict(table) if table is not None else {}

        def stat_of(pid: int) -> ProcStat | None:
            if table is not None:
                return table.get(pid)
            if pid not in stats:
                stats[pid] = read_stat(self._proc_root, pid)
            return stats[pid]

        by_parent: dict[int, list[int]] = {}
        if table is not None:
            for entry in table.values():
                by_parent.setdefault(entry.ppid, []).append(entry.pid)

        def children_of(pid: int) -> list[int]:
            if table is not None:
                return by_parent.get(pid, [])
            return read_children(self._proc_root, pid) or []

        exits: list[ObserverEvent] = []
        parents: dict[int, int | None] = {}
        # Whose children to read: those that ran, and their parents, since
        # clone(CLONE_PARENT) makes a child of the caller's parent.
        walk: set[int] = set()
        seen_dead: set[tuple[int, int]] = set()
        lost = False
        for pid, root in list(self._roots.items()):
            if pid in quiet:
                parents[pid] = pid
                continue
            stat = stat_of(pid)
            if stat is None or stat.is_dead or not _same(root, stat):
                # An exited root has no children left (they were reparented
                # and, if known, stay members); its pid may be reused.
                del self._roots[pid]
                exits.extend(self._descriptors.forget(root.tracked()))
                lost = True
                continue
            root.starttime = stat.starttime
            parents[pid] = pid
            walk.add(pid)
        for pid, node in list(self._members.items()):
            if pid in quiet:
                parents[pid] = node.root_pid
                continue
            stat = stat_of(pid)
            if stat is not None and not stat.is_dead and _same(node, stat):
                node.starttime = stat.starttime
                parents[pid] = node.root_pid
                walk.update((pid, stat.ppid))
                continue
            del self._members[pid]
            lost = True
            code = None
            if stat is not None and stat.is_dead and _same(node, stat):
                seen_dead.add(stat.identity)
                if stat.exit_code is not None:
                    code = wait_status_to_exit_code(stat.exit_code)
                if self._reap_adopted and stat.ppid == self._self_pid:
                    self._to_reap[pid] = stat.starttime
            exits.extend(self._descriptors.forget(node.tracked()))
            exits.append(self._process_event(node, ObserverEventKind.DESCENDANT_EXITED, code))
        starts: list[ObserverEvent] = []
        if lost or table is not None or not quiet:
            # An exit re-parents the exited process's children, possibly to a
            # member that is a subreaper itself: look everywhere once.
            queue = list(parents)
        else:
            queue = [pid for pid in parents if pid in walk]
        if self._adopt_marker is not None and (queue or lost):
            starts.extend(self._adopt(children_of(self._self_pid), stat_of, parents, queue))
        while queue:
            parent = queue.pop()
            for child in children_of(parent):
                if child in self._members or child in self._roots:
                    continue
                stat = stat_of(child)
                if stat is None or stat.ppid != parent:
                    continue
                node = _Node(child, stat.starttime, parent, parents[parent])
                if stat.is_dead:
                    # A zombie we never saw alive: it lived and died between
                    # two scans, but its parent has not reaped it yet, so
                    # both its existence and its exit status are known.
                    if stat.identity not in self._seen_dead and stat.identity not in seen_dead:
                        status = stat.exit_code
                        code = None if status is None else wait_status_to_exit_code(status)
                        starts.append(self._started_event(node, None))
                        starts.append(
                            self._process_event(node, ObserverEventKind.DESCENDANT_EXITED, code)
                        )
                    seen_dead.add(stat.identity)
                    continue
                self._members[child] = node
                parents[child] = node.root_pid
                queue.append(child)
                starts.append(self._started_event(node, None))
        self._seen_dead = seen_dead
        return exits + starts

    def _adopt(
        self,
        candidates: list[int],
        stat_of: Callable[[int], ProcStat | None],
        parents: dict[int, int | None],
        queue: list[int],
    ) -> list[ObserverEvent]:
        """Take in the marked, unknown children of this process (orphans)."""
        assert self._adopt_marker is not None
        events: list[ObserverEvent] = []
        for pid in candidates:
            if pid in self._members or pid in self._roots:
                continue
            stat = stat_of(pid)
            if stat is None or stat.is_dead or stat.ppid != self._self_pid:
                # A zombie's environment is gone: it cannot be recognised.
                continue
            if stat.identity in self._not_ours:
                continue
            if not environ_has(self._proc_root, pid, self._adopt_marker):
                self._not_ours.add(stat.identity)
                continue
            root_pid: int | None = None
            for root in self._roots:
                root_stat = stat_of(root)
                if root_stat is not None and (
                    root_stat.pgid == stat.pgid or root_stat.sid == stat.sid
                ):
                    root_pid = root
                    break
            node = _Node(pid, stat.starttime, stat.ppid, root_pid)
            self._members[pid] = node
            parents[pid] = root_pid
            queue.append(pid)
            events.append(self._started_event(node, None))
        if len(self._not_ours) > _RECENT_EXITS:
            self._not_ours.clear()
        return events

    def _reap(self) -> None:
        """Reap exited members that are zombie children of this process."""
        for pid, starttime in list(self._to_reap.items()):
            stat = read_stat(self._proc_root, pid)
            if (
                stat is None
                or stat.ppid != self._self_pid
                or (starttime is not None and stat.starttime != starttime)
            ):
                del self._to_reap[pid]  # reaped by someone else, or not ours
                continue
            if not stat.is_dead:
                continue  # still exiting (the connector reports exits early)
            del self._to_reap[pid]
            if pid in self._roots:
                continue
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass

    def _process_event(
        self,
        node: _Node,
        kind: ObserverEventKind,
        exit_code: int | None,
        *,
        grade: EventGrade = EventGrade.INFERRED,
        timestamp_ms: float | None = None,
    ) -> ObserverEvent:
        return ObserverEvent(
            category=EventCategory.PROCESS,
            kind=kind,
            pid=node.pid,
            ppid=node.ppid,
            root_pid=node.root_pid,
            exit_code=exit_code,
            grade=grade,
            timestamp_ms=trio_time_ms() if timestamp_ms is None else timestamp_ms,
        )

    def _started_event(
        self,
        node: _Node,
        timestamp_ms: float | None,
        *,
        grade: EventGrade = EventGrade.INFERRED,
    ) -> ObserverEvent:
        return ObserverEvent(
            category=EventCategory.PROCESS,
            kind=ObserverEventKind.DESCENDANT_STARTED,
            pid=node.pid,
            ppid=node.ppid,
            root_pid=node.root_pid,
            argv=read_cmdline(self._proc_root, node.pid),
            grade=grade,
            timestamp_ms=trio_time_ms() if timestamp_ms is None else timestamp_ms,
        )

    # ------------------------------------------------------- the connector

    def _root_of(self, pid: int) -> int | None:
        if pid in self._roots:
            return pid
        node = self._members.get(pid)
        return None if node is None else node.root_pid

    async def _handle_batch(self, batch: ConnectorBatch) -> None:
        self._connector_records += len(batch.records)
        events: list[ObserverEvent] = []
        for record in batch.records:
            if isinstance(record, ForkRecord):
                events.extend(self._on_fork(record))
            elif isinstance(record, ExitRecord):
                events.extend(self._on_exit(record))
        if batch.overruns:
            self._lost_overruns += batch.overruns
            events.append(
                ObserverEvent(
                    category=EventCategory.PROCESS,
                    kind=ObserverEventKind.OBSERVATION_LOST,
                    pid=LOSS_PID,
                    timestamp_ms=trio_time_ms(),
                    grade=EventGrade.EXACT,
                    count=None,
                )
            )
            await self._emit_all(events)
            # The lost records may have been forks or exits of the tree.
            await self._pass(scan_tree=True)
            return
        await self._emit_all(events)

    def _on_fork(self, record: ForkRecord) -> list[ObserverEvent]:
        if record.child_pid != record.child_tgid:
            return []  # a new thread, not a new process
        child = record.child_tgid
        root = self._root_of(record.parent_tgid)
        if root is None or child in self._members or child in self._roots:
            return []
        stat = read_stat(self._proc_root, child)
        starttime = stat.starttime if stat is not None else None
        node = _Node(child, starttime, record.parent_tgid, root)
        self._members[child] = node
        when = _kernel_time_ms(record.timestamp_ns)
        events = [self._started_event(node, when, grade=EventGrade.EXACT)]
        early_exit = self._recent_exits.pop(child, None)
        if early_exit is not None:
            events.extend(self._on_exit(early_exit))
        return events

    def _on_exit(self, record: ExitRecord) -> list[ObserverEvent]:
        if record.pid != record.tgid:
            return []  # a thread ended, the process goes on
        pid = record.tgid
        node = self._members.pop(pid, None)
        if node is None:
            root = self._roots.pop(pid, None)
            if root is not None:
                return self._descriptors.forget(root.tracked())
            self._recent_exits[pid] = record
            if len(self._recent_exits) > _RECENT_EXITS:
                del self._recent_exits[next(iter(self._recent_exits))]
            return []
        if self._reap_adopted:
            # Reaped once it is a zombie: the record comes before that.
            self._to_reap[pid] = node.starttime
        events = self._descriptors.forget(node.tracked())
        events.append(
            self._process_event(
                node,
                ObserverEventKind.DESCENDANT_EXITED,
                record.exit_code,
                grade=EventGrade.EXACT,
                timestamp_ms=_kernel_time_ms(record.timestamp_ns),
            )
        )
        return events


def _same(node: _Node, stat: ProcStat) -> bool:
    return node.starttime is None or node.starttime == stat.starttime


def _kernel_time_ms(timestamp_ns: int) -> float:
    # Connector timestamps are CLOCK_MONOTONIC; trio's clock is a different
    # (possibly mock) clock, so carry over the event's age, not its value.
    age_ns = max(0, time.monotonic_ns() - timestamp_ns)
    return trio_time_ms() - age_ns / 1e6
