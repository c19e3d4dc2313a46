"""Keeping a tree's membership up to date from the process connector's records.

The fork, exec and exit records (grade ``EXACT``, with the kernel's time)
come in the kernel's order, which is not always the order things happened
in: a child's exit or threads can come before its fork, and a process ends
with its last thread, not its main one. :class:`_ConnectorRecords` sorts
that out.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Final

from .._events import EventGrade, ObserverEvent, ObserverEventKind, trio_time_ms
from ._connector import ExecRecord, ExitRecord, ForkRecord
from ._procfs import read_cmdline, read_stat
from ._tree_members_state import _RECENT_EXITS, _SEEN_DEAD, TreeNode, _TreeState

# How much earlier than its fork record a child's exit may have been stamped
# (the parent can be preempted between waking the child and sending the fork
# message). A remembered exit older than that is of an earlier process that
# had the same pid.
_EARLY_EXIT_SLACK_NS: Final = 1_000_000_000


class _ConnectorRecords(_TreeState):
    """The connector record handling of :class:`~._tree_members.TreeMembers`."""

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

    def _lives_on(self, node: TreeNode) -> bool:
        """Tell whether a process whose main thread exited still has threads."""
        if node.starttime is None:
            # A reused pid could not be told apart: believe the exit.
            return False
        stat = read_stat(self._proc_root, node.pid)
        return stat is not None and stat.starttime == node.starttime and not stat.is_dead


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
