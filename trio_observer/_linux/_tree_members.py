"""Which processes belong to a tree, kept up to date from ``/proc`` or from the connector.

A :class:`TreeMembers` holds the roots a session spawned and the
descendants believed alive, and turns what it learns about them into
``DESCENDANT_STARTED`` / ``DESCENDANT_EXITED`` events. It learns in one of
two ways: a scan of ``/proc`` diffed against what it knew
(:meth:`TreeMembers.scan`, grade ``INFERRED``), or the fork and exit records
of the process connector (:meth:`TreeMembers.on_fork`,
:meth:`TreeMembers.on_exit`, grade ``EXACT``).
It also adopts marked orphans and reaps the zombies it may reap. When and
how often to look, and where the events go, is :mod:`._tree`'s business.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass, field
from typing import Final, final

from .._events import (
    EventGrade,
    ObserverEvent,
    ObserverEventKind,
    lifecycle_event,
    trio_time_ms,
)
from ._connector import ExecRecord, ExitRecord, ForkRecord, wait_status_to_exit_code
from ._descriptors import DescriptorTracker, TrackedProcess
from ._procfs import (
    ProcStat,
    environ_has,
    has_children_files,
    read_cgroup_path,
    read_children,
    read_cmdline,
    read_stat,
    scan_all,
)

# An exit can be queued before the fork that created the task: the fork
# message is sent after the child is woken, and the child may run and exit
# on another CPU first. Exits of unknown pids are remembered this long (in
# records) so a late fork can be matched with its exit.
_RECENT_EXITS: Final = 1024
# Exits reported by the connector whose zombies a rescan may still meet.
_SEEN_DEAD: Final = 4096
# How much earlier than its fork record a child's exit may have been stamped
# (the parent can be preempted between waking the child and sending the fork
# message). A remembered exit older than that is of an earlier process that
# had the same pid.
_EARLY_EXIT_SLACK_NS: Final = 1_000_000_000


@dataclass(slots=True)
class TreeNode:
    """One process of a tree: a root, or a descendant believed alive."""

    pid: int
    starttime: int | None
    ppid: int | None
    root_pid: int | None
    cached: TrackedProcess | None = None
    # The command line last reported: a poll that reads another one has
    # seen an exec.
    argv: tuple[str, ...] | None = None
    # With the connector, the threads other than the main one, from the
    # records (see TreeMembers.on_exit); None where they are not all known
    # (a process not seen forked, or after lost records): /proc is read.
    threads: set[int] | None = None
    # Threads whose exit record came before the record of their creation.
    early_thread_exits: set[int] | None = None
    # The status of the latest thread other than the main one that ended
    # with one (see TreeMembers._end_status).
    thread_status: int = 0

    def tracked(self) -> TrackedProcess:
        """Return this process as the descriptor and activity scans want it."""
        # Asked for every process on every pass: built again only when the
        # start time (the one field that is filled in later) changed.
        cached = self.cached
        if cached is None or cached.starttime != self.starttime:
            cached = self.cached = TrackedProcess(
                self.pid, self.starttime, self.ppid, self.root_pid
            )
        return cached


@final
class TreeMembers:
    """The roots of one tree and the descendants believed alive.

    Args:
        proc_root: Where ``/proc`` is mounted.
        descriptors: Told to forget the files and sockets of every process
            that leaves the tree; the closes it reports come before the
            process's exit.
        adopt_marker: See :class:`~._tree.TreeObserver`.
        reap_adopted: See :class:`~._tree.TreeObserver`.
        in_cgroup: Tells whether the tree is in a cgroup now (see
            ``cgroup`` in :class:`~._tree.TreeObserver`): an unknown child of
            this process is then the tree's if it is in a root's cgroup.
    """

    def __init__(
        self,
        *,
        proc_root: str,
        descriptors: DescriptorTracker,
        adopt_marker: bytes | None,
        reap_adopted: bool,
        in_cgroup: Callable[[], bool] | None = None,
    ) -> None:
        self._proc_root = proc_root
        self._in_cgroup = in_cgroup
        # The cgroup of each root, read at the first scan that sees it (it
        # is placed in its leaf after add_root): an orphan in one of them is
        # the tree's, and that root's.
        self._root_cgroups: dict[int, str | None] = {}
        self._descriptors = descriptors
        self._roots: dict[int, TreeNode] = {}
        self._members: dict[int, TreeNode] = {}
        # Zombies already reported, by identity, with the parent whose
        # children file lists them: kept while that parent is not read again.
        self._seen_dead: dict[tuple[int, int], int] = {}
        self._recent_exits: dict[int, ExitRecord] = {}
        # Thread records of unknown processes, by pid: a child can start
        # threads before its parent sends the record of its fork.
        self._early_threads: dict[int, _EarlyThreads] = {}
        # Set by add_root, cleared by scan: a root added since the last scan
        # (the poll backend reads its children at the next pass; the
        # connector sees its forks and does not rescan).
        self.roots_dirty = False
        self._children_files: bool | None = None
        self._adopt_marker = adopt_marker
        self._reap_adopted = reap_adopted
        self._self_pid = os.getpid()
        # Children of this process whose environment lacked the marker, by
        # identity, so it is read once per process and not once per scan.
        self._not_ours: set[tuple[int, int]] = set()
        # Exited members that may still be zombie children of this process,
        # with their start time, or when it is unknown the latest tick they
        # can have started at (see reap).
        self._to_reap: dict[int, tuple[int | None, int | None]] = {}
        # Processes of the tree whose main thread exited (pthread_exit in
        # main, or another thread's execve) while other threads run on: the
        # exit of the last one ends the process.
        self._main_thread_gone: set[int] = set()

    def add_root(self, pid: int, *, read_now: bool = True) -> None:
        """Take in a process the session spawned (see ``TreeObserver.add_root``).

        With ``read_now=False`` its start time and parent are left for the
        first scan to fill in (``_same`` accepts an unknown start time).
        """
        if pid in self._roots:
            return
        stat = read_stat(self._proc_root, pid) if read_now else None
        self._roots[pid] = TreeNode(
            pid,
            stat.starttime if stat is not None else None,
            stat.ppid if stat is not None else None,
            pid,
        )
        self.roots_dirty = True

    def discard_root(self, pid: int) -> None:
        """Forget a root without reporting anything (see ``TreeObserver``)."""
        self._roots.pop(pid, None)
        self._root_cgroups.pop(pid, None)
        self._main_thread_gone.discard(pid)

    def descendants(self) -> set[int]:
        """Return the pids of the descendants believed alive, roots excluded."""
        return set(self._members)

    def awaiting_reap(self) -> set[int]:
        """Return the pids of exited members not reaped yet."""
        return set(self._to_reap)

    def descendant_count(self) -> int:
        """Return how many descendants are believed alive."""
        return len(self._members)

    def pids(self) -> list[int]:
        """Return the pids of the roots, then of the descendants."""
        return [*self._roots, *self._members]

    def size(self) -> int:
        """Return how many processes the tree has: roots and descendants believed alive."""
        return len(self._roots) + len(self._members)

    def tracked(self, pids: Container[int] | None = None) -> list[TrackedProcess]:
        """Return the processes of the tree, roots first, as the descriptor scan wants them.

        Args:
            pids: Only these; ``None`` for all.
        """
        nodes = (*self._roots.values(), *self._members.values())
        if pids is None:
            return [n.tracked() for n in nodes]
        return [n.tracked() for n in nodes if n.pid in pids]

    @property
    def reap_pending(self) -> bool:
        """True while some exited member may still have to be reaped."""
        return bool(self._to_reap)

    def scan(self, quiet: set[int]) -> list[ObserverEvent]:
        """Update the tree from ``/proc``; return the exits, then the starts.

        Args:
            quiet: Processes that have not run since the previous scan, so
                they have neither exited, forked nor exec'd: their stat,
                children and command line are not read.

        Returns:
            The closes and ``DESCENDANT_EXITED`` of the processes gone and the
            ``DESCENDANT_EXEC`` of those whose command line changed, then the
            ``DESCENDANT_STARTED`` of the new ones (with the exit of a zombie
            never seen alive right after its start).
        """
        self.roots_dirty = False
        if not self._roots and not self._members:
            self._seen_dead = {}
            return []
        view = self._view()
        scan = _Scan()
        self._refresh_roots(view, quiet, scan)
        self._refresh_members(view, quiet, scan)
        starts = self._discover_children(view, quiet, scan)
        self._carry_zombies_over(scan)
        return scan.exits + starts

    def _view(self) -> _ProcView:
        for probe in (*self._roots, *self._members):
            # Decided once, by the first process still there to look at: the
            # kernel either has children files or not.
            if self._children_files is not None:
                break
            self._children_files = has_children_files(self._proc_root, probe)
        table = None if self._children_files else scan_all(self._proc_root)
        return _ProcView(self._proc_root, table)

    def _refresh_roots(self, view: _ProcView, quiet: set[int], scan: _Scan) -> None:
        """Drop the roots that exited (their pid may be reused)."""
        for pid, root in list(self._roots.items()):
            if pid in quiet:
                scan.parents[pid] = pid
                continue
            stat = view.stat_of(pid)
            if stat is None or stat.is_dead or not _same(root, stat):
                # An exited root has no children left (they were reparented
                # and, if known, stay members).
                del self._roots[pid]
                self._main_thread_gone.discard(pid)
                scan.exits.extend(self._descriptors.forget(root.tracked()))
                scan.lost = True
                continue
            root.starttime = stat.starttime
            scan.parents[pid] = pid
            scan.walk.add(pid)
            if pid not in self._root_cgroups and self._in_cgroup is not None and self._in_cgroup():
                # Kept past the root's exit: its orphans stay in its leaf.
                self._root_cgroups[pid] = read_cgroup_path(self._proc_root, pid)
                if len(self._root_cgroups) > _SEEN_DEAD:
                    del self._root_cgroups[next(iter(self._root_cgroups))]

    def _refresh_members(self, view: _ProcView, quiet: set[int], scan: _Scan) -> None:
        """Report the members that exited and the execs of those that ran."""
        for pid, node in list(self._members.items()):
            if pid in quiet:
                scan.parents[pid] = node.root_pid
                continue
            stat = view.stat_of(pid)
            if stat is not None and not stat.is_dead and _same(node, stat):
                node.starttime = stat.starttime
                self._note_main_thread(stat)
                scan.parents[pid] = node.root_pid
                # Its parent too: clone(CLONE_PARENT) makes a child of the
                # caller's parent.
                scan.walk.update((pid, stat.ppid))
                exec_event = self._exec_seen(node)
                if exec_event is not None:
                    scan.exits.append(exec_event)
                continue
            del self._members[pid]
            scan.lost = True
            # Asked before it is forgotten: a zombie whose main thread went
            # first shows that thread's status, not the process's.
            code = self._zombie_exit(node, stat, scan)
            self._main_thread_gone.discard(pid)
            scan.exits.extend(self._descriptors.forget(node.tracked()))
            scan.exits.append(self._process_event(node, ObserverEventKind.DESCENDANT_EXITED, code))

    def _zombie_exit(self, node: TreeNode, stat: ProcStat | None, scan: _Scan) -> int | None:
        """Return the exit code of a member gone, if it is still a zombie."""
        if stat is None or not stat.is_dead or not _same(node, stat):
            return None
        scan.seen_dead[stat.identity] = stat.ppid
        if self._reap_adopted and stat.ppid == self._self_pid:
            self._to_reap[node.pid] = (stat.starttime, None)
        # After the main thread, older kernels show the main thread's own
        # status here, not the one the last thread's exit_group() set (6.18
        # shows the group's): not taken, rather than perhaps wrong.
        if stat.exit_code is None or node.pid in self._main_thread_gone:
            return None
        return wait_status_to_exit_code(stat.exit_code)

    def _discover_children(
        self, view: _ProcView, quiet: set[int], scan: _Scan
    ) -> list[ObserverEvent]:
        """Walk down from the processes that ran; return the starts found."""
        if scan.lost or view.table is not None or not quiet:
            # An exit re-parents the exited process's children, possibly to a
            # member that is a subreaper itself: look everywhere once.
            queue = list(scan.parents)
        else:
            queue = [pid for pid in scan.parents if pid in scan.walk]
        starts: list[ObserverEvent] = []
        by_cgroup = self._in_cgroup is not None and self._in_cgroup()
        if (queue or scan.lost) and (by_cgroup or self._adopt_marker is not None):
            starts.extend(
                self._adopt(
                    view.children_of(self._self_pid),
                    view.stat_of,
                    scan.parents,
                    queue,
                    by_cgroup=by_cgroup,
                )
            )
        while queue:
            parent = queue.pop()
            scan.read.add(parent)
            for child in view.children_of(parent):
                if child in self._members or child in self._roots:
                    continue
                stat = view.stat_of(child)
                if stat is None or stat.ppid != parent:
                    continue
                node = TreeNode(child, stat.starttime, parent, scan.parents[parent])
                if stat.is_dead:
                    starts.extend(self._unseen_zombie(node, stat, scan))
                    continue
                self._members[child] = node
                self._note_main_thread(stat)
                scan.parents[child] = node.root_pid
                queue.append(child)
                starts.append(self._started_event(node, None))
        return starts

    def _root_by_cgroup(self, pid: int) -> int | None:
        """The root whose cgroup (its leaf) holds ``pid``, if one does."""
        where = read_cgroup_path(self._proc_root, pid)
        if where is None:
            return None
        for root, leaf in self._root_cgroups.items():
            if leaf is not None and (where == leaf or where.startswith(leaf + "/")):
                return root
        return None

    def _unseen_zombie(self, node: TreeNode, stat: ProcStat, scan: _Scan) -> list[ObserverEvent]:
        """Report a zombie child found by the walk, unless already reported."""
        identity = stat.identity
        known = identity in self._seen_dead or identity in scan.seen_dead
        scan.seen_dead[identity] = node.ppid or 0
        if known:
            return []
        # It lived and died between two scans, but its parent has not reaped
        # it yet, so both its existence and its exit status are known.
        code = None if stat.exit_code is None else wait_status_to_exit_code(stat.exit_code)
        return [
            self._started_event(node, None),
            self._process_event(node, ObserverEventKind.DESCENDANT_EXITED, code),
        ]

    def _carry_zombies_over(self, scan: _Scan) -> None:
        for identity, parent in self._seen_dead.items():
            # A zombie of a quiet parent is still there, unreaped: forgetting
            # it would report it again, as new, when the parent is next read.
            # Once the parent leaves the tree its zombies are init's.
            if parent not in scan.read and parent in scan.parents:
                scan.seen_dead.setdefault(identity, parent)
        self._seen_dead = scan.seen_dead

    def _note_main_thread(self, stat: ProcStat) -> None:
        if stat.main_thread_exited:
            self._main_thread_gone.add(stat.pid)
        else:
            self._main_thread_gone.discard(stat.pid)

    def _lives_on(self, node: TreeNode) -> bool:
        """Tell whether a process whose main thread exited still has threads."""
        if node.starttime is None:
            # A reused pid could not be told apart: believe the exit.
            return False
        stat = read_stat(self._proc_root, node.pid)
        return stat is not None and stat.starttime == node.starttime and not stat.is_dead

    def _adopt(
        self,
        candidates: list[int],
        stat_of: Callable[[int], ProcStat | None],
        parents: dict[int, int | None],
        queue: list[int],
        *,
        by_cgroup: bool,
    ) -> list[ObserverEvent]:
        """Take in the unknown children of this process (orphans) that are the tree's.

        With ``by_cgroup``, those in the cgroup of one of the roots (exact:
        no process leaves its cgroup by changing its group, session or
        environment), else those whose environment holds the marker.
        """
        events: list[ObserverEvent] = []
        for pid in candidates:
            if pid in self._members or pid in self._roots:
                continue
            stat = stat_of(pid)
            if stat is None or stat.is_dead or stat.ppid != self._self_pid:
                # A zombie's environment is gone, and it has left its
                # cgroup: it cannot be recognised.
                continue
            if stat.identity in self._not_ours:
                continue
            root_pid: int | None = None
            if by_cgroup:
                root_pid = self._root_by_cgroup(pid)
                if root_pid is None:
                    self._not_ours.add(stat.identity)
                    continue
            else:
                assert self._adopt_marker is not None
                if not environ_has(self._proc_root, pid, self._adopt_marker):
                    self._not_ours.add(stat.identity)
                    continue
                for root in self._roots:
                    root_stat = stat_of(root)
                    if root_stat is not None and (
                        root_stat.pgid == stat.pgid or root_stat.sid == stat.sid
                    ):
                        root_pid = root
                        break
            node = TreeNode(pid, stat.starttime, stat.ppid, root_pid)
            self._members[pid] = node
            parents[pid] = root_pid
            queue.append(pid)
            events.append(self._started_event(node, None))
        if len(self._not_ours) > _RECENT_EXITS:
            self._not_ours.clear()
        return events

    def reap(self) -> None:
        """Reap exited members that are zombie children of this process."""
        for pid, (starttime, started_by) in list(self._to_reap.items()):
            stat = read_stat(self._proc_root, pid)
            if (
                stat is None
                or stat.ppid != self._self_pid
                or (starttime is not None and stat.starttime != starttime)
                # (A tick of slack: the two clocks are read one after the
                # other.)
                or (started_by is not None and stat.starttime > started_by + 1)
            ):
                # Reaped by someone else, or not ours: another child of this
                # process (another session's, say) must keep its status.
                del self._to_reap[pid]
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

    def known_pids(self) -> set[int]:
        """Return the pids of the roots and of the members believed alive."""
        return {*self._roots, *self._members}

    def close_out(self, exit_codes: Mapping[int, int]) -> tuple[list[ObserverEvent], int]:
        """Settle the tree at the end of a session, when it should be dead.

        Every root or member that is gone or a zombie leaves the tree with
        its closes (and, for a member, an ``INFERRED`` exit: the code a
        zombie shows, else the one in ``exit_codes``, else unknown).

        Returns:
            Those events, and how many members are still running.
        """
        events: list[ObserverEvent] = []
        for pid, root in list(self._roots.items()):
            stat = read_stat(self._proc_root, pid)
            if stat is None or stat.is_dead or not _same(root, stat):
                del self._roots[pid]
                events.extend(self._descriptors.forget(root.tracked()))
        running = 0
        for pid, node in list(self._members.items()):
            stat = read_stat(self._proc_root, pid)
            if stat is not None and not stat.is_dead and _same(node, stat):
                running += 1
                continue
            del self._members[pid]
            self._main_thread_gone.discard(pid)
            code = exit_codes.get(pid)
            if stat is not None and stat.is_dead and _same(node, stat):
                if stat.exit_code is not None:
                    code = wait_status_to_exit_code(stat.exit_code)
                if self._reap_adopted and stat.ppid == self._self_pid:
                    self._to_reap[pid] = (stat.starttime, None)
            events.extend(self._descriptors.forget(node.tracked()))
            events.append(self._process_event(node, ObserverEventKind.DESCENDANT_EXITED, code))
        return events, running

    def unseen_exits(self, exit_codes: Mapping[int, int]) -> list[ObserverEvent]:
        """Return a started/exited pair for each process reaped unseen, by pid."""
        events: list[ObserverEvent] = []
        for pid, code in exit_codes.items():
            node = TreeNode(pid, None, None, None)
            events.append(self._process_event(node, ObserverEventKind.DESCENDANT_STARTED, None))
            events.append(self._process_event(node, ObserverEventKind.DESCENDANT_EXITED, code))
        return events

    def _process_event(
        self,
        node: TreeNode,
        kind: ObserverEventKind,
        exit_code: int | None,
        *,
        grade: EventGrade = EventGrade.INFERRED,
        timestamp_ms: float | None = None,
    ) -> ObserverEvent:
        return lifecycle_event(
            kind,
            node.pid,
            ppid=node.ppid,
            root_pid=node.root_pid,
            exit_code=exit_code,
            grade=grade,
            timestamp_ms=timestamp_ms,
        )

    def _started_event(
        self,
        node: TreeNode,
        timestamp_ms: float | None,
        *,
        grade: EventGrade = EventGrade.INFERRED,
    ) -> ObserverEvent:
        node.argv = read_cmdline(self._proc_root, node.pid)
        return lifecycle_event(
            ObserverEventKind.DESCENDANT_STARTED,
            node.pid,
            ppid=node.ppid,
            root_pid=node.root_pid,
            argv=node.argv,
            grade=grade,
            timestamp_ms=timestamp_ms,
        )

    def _root_of(self, pid: int) -> int | None:
        if pid in self._roots:
            return pid
        node = self._members.get(pid)
        return None if node is None else node.root_pid

    def on_fork(self, record: ForkRecord) -> list[ObserverEvent]:
        """Take in the child of a fork inside the tree.

        Returns:
            Its ``DESCENDANT_STARTED`` (exact, with the kernel's time), and
            its exit if that came first; nothing for a thread or a fork
            outside the tree. A remembered exit of the child's pid is the
            child's only if the child is not running and the exit is not
            older than the fork by more than a second: else it was an
            earlier process's with the same pid.
        """
        if record.child_pid != record.child_tgid:
            self._thread_started(record)
            return []  # a new thread, not a new process
        child = record.child_tgid
        root = self._root_of(record.parent_tgid)
        if root is None or child in self._members or child in self._roots:
            return []
        stat = read_stat(self._proc_root, child)
        starttime = stat.starttime if stat is not None else None
        node = TreeNode(child, starttime, record.parent_tgid, root)
        # A fork makes a process of one thread, and every thread it makes
        # has a record: they are counted from the records, with those that
        # came before this one (the child ran before its parent sent it).
        early_threads = self._early_threads.pop(child, None)
        if (
            early_threads is not None
            and early_threads.since_ns >= record.timestamp_ns - _EARLY_EXIT_SLACK_NS
        ):
            node.threads = early_threads.started
            node.early_thread_exits = early_threads.ended or None
        else:
            node.threads = set()
        self._members[child] = node
        when = _kernel_time_ms(record.timestamp_ns)
        events = [self._started_event(node, when, grade=EventGrade.EXACT)]
        early_exit = self._recent_exits.pop(child, None)
        if (
            early_exit is not None
            and early_exit.timestamp_ns >= record.timestamp_ns - _EARLY_EXIT_SLACK_NS
            and (stat is None or stat.is_dead)
        ):
            events.extend(self.on_exit(early_exit))
        return events

    def on_exec(self, record: ExecRecord, *, superseded: bool = False) -> list[ObserverEvent]:
        """Report that a descendant called ``execve()``.

        With ``superseded`` (a later exec of the process, or the end of its
        main thread, is among the records already read), ``/proc`` no
        longer shows this program: ``argv`` is ``None`` rather than a later
        program's.

        An ``execve()`` by a thread other than the main one ends the main
        thread (with an exit record for the process's pid) and gives its pid
        to the calling thread: the process has a main thread again.

        Returns:
            The ``DESCENDANT_EXEC`` (exact, with the command line read now:
            the kernel sends the record once the new program is in place),
            or nothing for a root or a process outside the tree.
        """
        self._main_thread_gone.discard(record.tgid)
        node = self._members.get(record.tgid)
        if node is None:
            early_threads = self._early_threads.get(record.tgid)
            if early_threads is not None:
                early_threads.started.clear()  # execve() leaves one thread
            return []
        if node.threads is not None:
            # execve() leaves one thread, the main one (the caller, if it
            # was another, took the main thread's pid without an exit).
            node.threads = set()
            node.thread_status = 0
        return [
            self._exec_event(
                node,
                None if superseded else read_cmdline(self._proc_root, node.pid),
                grade=EventGrade.EXACT,
                timestamp_ms=_kernel_time_ms(record.timestamp_ns),
            )
        ]

    def _exec_event(
        self,
        node: TreeNode,
        argv: tuple[str, ...] | None,
        *,
        grade: EventGrade = EventGrade.INFERRED,
        timestamp_ms: float | None = None,
    ) -> ObserverEvent:
        node.argv = argv
        return lifecycle_event(
            ObserverEventKind.DESCENDANT_EXEC,
            node.pid,
            ppid=node.ppid,
            root_pid=node.root_pid,
            argv=argv,
            grade=grade,
            timestamp_ms=timestamp_ms,
        )

    def _exec_seen(self, node: TreeNode) -> ObserverEvent | None:
        """Return a ``DESCENDANT_EXEC`` if a running member's command line changed."""
        argv = read_cmdline(self._proc_root, node.pid)
        # None: unreadable, or empty in the middle of an exec; the next
        # pass reads it again.
        if argv is None or argv == node.argv:
            return None
        return self._exec_event(node, argv)

    def on_exit(self, record: ExitRecord) -> list[ObserverEvent]:
        """Drop a process of the tree that exited.

        An exit of an unknown pid is remembered for a while, in case its
        fork record is still to come. The exit of a main thread whose
        process still has other threads (``/proc`` is read to know) is not
        the process's: that ends with its last thread's exit record.

        Returns:
            The closes of its files and sockets, then its
            ``DESCENDANT_EXITED`` (exact); for a root, only the closes.
        """
        pid = record.tgid
        node = self._members.get(pid)
        if node is not None and node.threads is not None:
            if not self._last_thread(node, record):
                return []
            return self._member_exited(node, record, _end_status(node, record))
        if record.pid != pid and pid not in self._main_thread_gone:
            if node is None and pid not in self._roots:
                early_threads = self._early_threads.get(pid)
                if early_threads is not None:
                    early_threads.count_out(record.pid)
            return []  # a thread ended, the process goes on
        known = node if node is not None else self._roots.get(pid)
        if known is None:
            if record.pid == pid:
                self._recent_exits[pid] = record
                if len(self._recent_exits) > _RECENT_EXITS:
                    del self._recent_exits[next(iter(self._recent_exits))]
            return []
        if self._lives_on(known):
            self._main_thread_gone.add(pid)
            return []
        self._main_thread_gone.discard(pid)
        if node is None:
            del self._roots[pid]
            return self._descriptors.forget(known.tracked())
        return self._member_exited(node, record)

    def _thread_started(self, record: ForkRecord) -> None:
        tgid, tid = record.child_tgid, record.child_pid
        node = self._members.get(tgid)
        if node is None:
            if tgid in self._roots:
                return
            # Perhaps a child whose fork record is still to come: kept (for
            # a while) so that its threads are counted when it comes.
            early_threads = self._early_threads.get(tgid)
            if early_threads is None:
                early_threads = self._early_threads[tgid] = _EarlyThreads(record.timestamp_ns)
                if len(self._early_threads) > _RECENT_EXITS:
                    del self._early_threads[next(iter(self._early_threads))]
            if tid in early_threads.ended:
                early_threads.ended.discard(tid)
            else:
                early_threads.started.add(tid)
            return
        if node.threads is None:
            return
        early = node.early_thread_exits
        if early is not None and tid in early:
            early.discard(tid)  # it has already exited
        else:
            node.threads.add(tid)

    def _last_thread(self, node: TreeNode, record: ExitRecord) -> bool:
        """Count a thread of ``node`` out; return whether it was the process's last.

        Decided by the records alone, never by ``/proc``: when the record
        is handled the process may have gone on (an ``execve`` by another
        thread, and even its exit), or its pid may have been reused.
        """
        threads = node.threads
        assert threads is not None
        pid = node.pid
        if record.pid != pid:
            if record.exit_code:
                node.thread_status = record.exit_code
            if record.pid in threads:
                threads.discard(record.pid)
            else:
                # Its creation's record is still to come (the creator may
                # be preempted before sending it), or it was the thread that
                # called execve(), which is counted out already.
                if node.early_thread_exits is None:
                    node.early_thread_exits = set()
                node.early_thread_exits.add(record.pid)
            if threads or pid not in self._main_thread_gone:
                return False
        elif threads:
            # The main thread ended (pthread_exit, or an execve() by another
            # thread, which takes its pid): the process goes on.
            self._main_thread_gone.add(pid)
            return False
        self._main_thread_gone.discard(pid)
        return True

    def forget_threads(self) -> None:
        """Stop counting threads from the records (some were lost): ``/proc`` decides."""
        for node in self._members.values():
            node.threads = None
            node.early_thread_exits = None
        self._early_threads.clear()

    def _member_exited(
        self, node: TreeNode, record: ExitRecord, exit_code: int | None = None
    ) -> list[ObserverEvent]:
        pid = node.pid
        del self._members[pid]
        if node.starttime is not None and node.ppid is not None:
            # Reported now, but it may stay a zombie of its parent for a
            # while: a rescan of /proc must not take it for one never seen.
            self._seen_dead[(pid, node.starttime)] = node.ppid
            if len(self._seen_dead) > _SEEN_DEAD:
                # Only a rescan prunes it, and the connector rescans only
                # after lost records: the oldest is the likeliest reaped.
                del self._seen_dead[next(iter(self._seen_dead))]
        if self._reap_adopted:
            # Reaped once it is a zombie. Its start time is unknown when it
            # was gone by the time its fork record was handled: it started
            # before it exited, so a process of the pid that started after
            # that is another one (the pids came round meanwhile).
            self._to_reap[pid] = (
                node.starttime,
                _boot_ticks(record.timestamp_ns) if node.starttime is None else None,
            )
        events = self._descriptors.forget(node.tracked())
        events.append(
            self._process_event(
                node,
                ObserverEventKind.DESCENDANT_EXITED,
                record.exit_code if exit_code is None else exit_code,
                grade=EventGrade.EXACT,
                timestamp_ms=_kernel_time_ms(record.timestamp_ns),
            )
        )
        return events


@dataclass(slots=True)
class _EarlyThreads:
    """The thread records of a process not known (yet) to be in the tree."""

    since_ns: int
    """The kernel's time of the first one."""
    started: set[int] = field(default_factory=set)
    ended: set[int] = field(default_factory=set)

    def count_out(self, tid: int) -> None:
        if tid in self.started:
            self.started.discard(tid)
        else:
            self.ended.add(tid)


@dataclass(slots=True)
class _Scan:
    """What one :meth:`TreeMembers.scan` gathers as it goes."""

    exits: list[ObserverEvent] = field(default_factory=list)
    # Every process of the tree still there, with its root.
    parents: dict[int, int | None] = field(default_factory=dict)
    # Whose children to read: those that ran, and their parents.
    walk: set[int] = field(default_factory=set)
    # Zombies met (or reported) this scan, with their parents.
    seen_dead: dict[tuple[int, int], int] = field(default_factory=dict)
    # Whose children were read: the zombies of the others were not looked
    # at, so what is known about them is carried over.
    read: set[int] = field(default_factory=set)
    lost: bool = False


@final
class _ProcView:
    """The stat and children of processes, read at most once per scan.

    With a ``table`` (a kernel without children files) everything comes from
    one read of every ``/proc/<pid>/stat``.
    """

    def __init__(self, proc_root: str, table: dict[int, ProcStat] | None) -> None:
        self._proc_root = proc_root
        self.table = table
        self._stats: dict[int, ProcStat | None] = {}
        self._by_parent: dict[int, list[int]] = {}
        if table is not None:
            for entry in table.values():
                self._by_parent.setdefault(entry.ppid, []).append(entry.pid)

    def stat_of(self, pid: int) -> ProcStat | None:
        if self.table is not None:
            return self.table.get(pid)
        if pid not in self._stats:
            self._stats[pid] = read_stat(self._proc_root, pid)
        return self._stats[pid]

    def children_of(self, pid: int) -> list[int]:
        if self.table is not None:
            return self._by_parent.get(pid, [])
        return read_children(self._proc_root, pid) or []


def _same(node: TreeNode, stat: ProcStat) -> bool:
    return node.starttime is None or node.starttime == stat.starttime


def _end_status(node: TreeNode, last: ExitRecord) -> int:
    """The status of a process whose last thread's exit record is ``last``.

    ``wait()`` gives the group's status after an ``exit_group()`` or a
    fatal signal, which every thread still running then ends with, and
    else the main thread's own. A main thread that was already in its own
    exit (``pthread_exit``, status 0) when another thread called
    ``exit_group(n)`` keeps 0, and its record may come last: the group's
    status is then that of the other threads. Threads end with a status
    of their own only that way (``pthread_exit`` gives 0).
    """
    if last.pid == node.pid and last.exit_code == 0:
        return node.thread_status
    return last.exit_code


_TICKS_PER_SECOND: Final = os.sysconf("SC_CLK_TCK")


def _boot_ticks(timestamp_ns: int) -> int:
    """The clock tick after boot (the unit of stat's start time) of a connector time."""
    # Connector timestamps are CLOCK_MONOTONIC, start times CLOCK_BOOTTIME
    # (which also counts suspended time).
    boot_ns = timestamp_ns + time.clock_gettime_ns(time.CLOCK_BOOTTIME) - time.monotonic_ns()
    return boot_ns * _TICKS_PER_SECOND // 1_000_000_000


def _kernel_time_ms(timestamp_ns: int) -> float:
    # Connector timestamps are CLOCK_MONOTONIC; trio's clock is a different
    # (possibly mock) clock, so carry over the event's age, not its value.
    age_ns = max(0, time.monotonic_ns() - timestamp_ns)
    return trio_time_ms() - age_ns / 1e6
