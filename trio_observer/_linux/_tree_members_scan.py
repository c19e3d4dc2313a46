"""Keeping a tree's membership up to date from scans of ``/proc``.

:meth:`_ProcScan.scan` diffs what ``/proc`` shows against what was known
(grade ``INFERRED``): the members gone, the execs of those that ran, the
children found by walking down from them (and the orphans adopted, see
:mod:`._tree_members_orphans`), and the zombies already reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import final

from .._events import ObserverEvent, ObserverEventKind
from ._connector import wait_status_to_exit_code
from ._procfs import (
    ProcStat,
    has_children_files,
    read_cgroup_path,
    read_children,
    read_cmdline,
    read_stat,
    scan_all,
)
from ._tree_members_orphans import _Orphans
from ._tree_members_state import _SEEN_DEAD, TreeNode, _same


class _ProcScan(_Orphans):
    """The ``/proc`` scan of :class:`~._tree_members.TreeMembers`."""

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

    def _exec_seen(self, node: TreeNode) -> ObserverEvent | None:
        """Return a ``DESCENDANT_EXEC`` if a running member's command line changed."""
        argv = read_cmdline(self._proc_root, node.pid)
        # None: unreadable, or empty in the middle of an exec; the next
        # pass reads it again.
        if argv is None or argv == node.argv:
            return None
        return self._exec_event(node, argv)


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
