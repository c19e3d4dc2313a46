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

The parts live in modules of their own: the state and the events
(:mod:`._tree_members_state`), the ``/proc`` scan
(:mod:`._tree_members_scan`), the connector records
(:mod:`._tree_members_records`), and the adoption of orphans and reaping of
zombies (:mod:`._tree_members_orphans`). This module puts them together,
with the queries and the end-of-session close-out.
"""

from __future__ import annotations

from collections.abc import Container, Mapping
from typing import final

from .._events import ObserverEvent, ObserverEventKind
from ._connector import wait_status_to_exit_code
from ._descriptors import TrackedProcess
from ._procfs import read_stat
from ._tree_members_records import _ConnectorRecords
from ._tree_members_scan import _ProcScan
from ._tree_members_state import TreeNode, _same


@final
class TreeMembers(_ProcScan, _ConnectorRecords):
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
