"""What a tree's membership is kept in: its nodes, and the events about them.

:class:`_TreeState` holds the roots a session spawned, the descendants
believed alive and what is remembered about processes that left; it builds
the ``DESCENDANT_STARTED`` / ``DESCENDANT_EXITED`` / ``DESCENDANT_EXEC``
events of a :class:`TreeNode`. The parts of
:class:`~._tree_members.TreeMembers` that change it
(:mod:`._tree_members_scan`, :mod:`._tree_members_records`,
:mod:`._tree_members_orphans`) derive from it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from .._events import EventGrade, ObserverEvent, ObserverEventKind, lifecycle_event
from ._connector import ExitRecord
from ._descriptors import DescriptorTracker, TrackedProcess
from ._procfs import ProcStat, read_cmdline

if TYPE_CHECKING:
    from ._tree_members_records import _EarlyThreads

# An exit can be queued before the fork that created the task: the fork
# message is sent after the child is woken, and the child may run and exit
# on another CPU first. Exits of unknown pids are remembered this long (in
# records) so a late fork can be matched with its exit.
_RECENT_EXITS: Final = 1024
# Exits reported by the connector whose zombies a rescan may still meet.
_SEEN_DEAD: Final = 4096


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


class _TreeState:
    """The state :class:`~._tree_members.TreeMembers` is made of (see its arguments)."""

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


def _same(node: TreeNode, stat: ProcStat) -> bool:
    return node.starttime is None or node.starttime == stat.starttime
