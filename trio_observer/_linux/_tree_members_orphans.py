"""The tree's processes that are children of this process: adopting orphans, reaping zombies.

As a child subreaper, this process inherits the orphans of the tree:
:meth:`_Orphans._adopt` takes in those that are the tree's (by cgroup, or by
the marker in their environment), and :meth:`_Orphans.reap` reaps the
zombies of exited members that it may reap.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from .._events import ObserverEvent
from ._procfs import ProcStat, environ_has, read_cgroup_path, read_stat
from ._tree_members_state import _RECENT_EXITS, TreeNode, _TreeState


class _Orphans(_TreeState):
    """The adoption and reaping of :class:`~._tree_members.TreeMembers`."""

    def _root_by_cgroup(self, pid: int) -> int | None:
        """The root whose cgroup (its leaf) holds ``pid``, if one does."""
        where = read_cgroup_path(self._proc_root, pid)
        if where is None:
            return None
        for root, leaf in self._root_cgroups.items():
            if leaf is not None and (where == leaf or where.startswith(leaf + "/")):
                return root
        return None

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
