"""Snapshots of the open descriptors of a process tree, diffed into events.

Each scan reads ``/proc/<pid>/fd/*`` of the processes of the tree that may
have changed it (the observer decides which: see :mod:`._activity`) and
compares it with what was reported before: new regular files become
``FILE_OPEN``, vanished ones ``FILE_CLOSE``; sockets are joined with the net
tables to become ``SOCKET_LISTEN``/``SOCKET_CONNECT``/``SOCKET_CLOSE``. What
opened and closed between two scans is never seen: these events are
``EventGrade.INFERRED``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final, final

from .._events import EventCategory, EventGrade, ObserverEvent, ObserverEventKind, trio_time_ms
from ._nettables import SocketEntry, read_socket_tables, socket_inode
from ._procfs import read_fds, read_net_namespace

# Terminals and the null device are the plumbing every process inherits from
# the session, not files it chose to open; reporting them would bury the
# interesting events under one open per descendant.
_SKIPPED_PATHS: Final = frozenset({"/dev/null", "/dev/ptmx", "/dev/tty", "/dev/console"})
_SKIPPED_PREFIXES: Final = ("/dev/pts/", "/memfd:")


def is_reportable_file(target: str) -> bool:
    """Whether a descriptor target is a file the FILE category reports.

    Only filesystem paths count: pipes (``pipe:[..]``), sockets (reported by
    the NETWORK category), anonymous inodes (eventfd, epoll, ...) and memfds
    are not files, and terminals and ``/dev/null`` are inherited plumbing.
    Deleted files keep the kernel's ``" (deleted)"`` suffix.

    Args:
        target: What ``readlink(/proc/<pid>/fd/N)`` returned.

    Returns:
        ``True`` if a ``FILE_OPEN`` should be reported for it.
    """
    if not target.startswith("/") or target in _SKIPPED_PATHS:
        return False
    return not target.startswith(_SKIPPED_PREFIXES)


@final
@dataclass(frozen=True, slots=True)
class TrackedProcess:
    """A process of the tree whose descriptors are scanned."""

    pid: int
    """The process."""
    starttime: int | None
    """Its start time, to tell a reused pid from the same process."""
    ppid: int | None
    """Its parent, copied into the events."""
    root_pid: int | None
    """The session process whose tree it belongs to (itself for a root)."""
    identity: tuple[int, int] = field(init=False, repr=False, compare=False)
    """``(pid, starttime)``; ``-1`` stands for an unknown start time. Made
    once: every scan looks it up for every process."""

    def __post_init__(self) -> None:
        starttime = -1 if self.starttime is None else self.starttime
        object.__setattr__(self, "identity", (self.pid, starttime))


def _file_event(proc: TrackedProcess, kind: ObserverEventKind, fd: int, path: str) -> ObserverEvent:
    return ObserverEvent(
        category=EventCategory.FILE,
        kind=kind,
        pid=proc.pid,
        ppid=proc.ppid,
        root_pid=proc.root_pid,
        timestamp_ms=trio_time_ms(),
        grade=EventGrade.INFERRED,
        fd=fd,
        path=path,
    )


def _socket_event(
    proc: TrackedProcess, kind: ObserverEventKind, fd: int, entry: SocketEntry
) -> ObserverEvent:
    return ObserverEvent(
        category=EventCategory.NETWORK,
        kind=kind,
        pid=proc.pid,
        ppid=proc.ppid,
        root_pid=proc.root_pid,
        timestamp_ms=trio_time_ms(),
        grade=EventGrade.INFERRED,
        fd=fd,
        protocol=entry.protocol,
        local_address=entry.local_address,
        remote_address=entry.remote_address,
    )


@final
class DescriptorTracker:
    """Remembers what was reported per process and turns scans into events.

    Args:
        proc_root: Where ``/proc`` is mounted (or a fake tree).
    """

    def __init__(self, proc_root: str) -> None:
        self._proc_root = proc_root
        self._files: dict[tuple[int, int], dict[int, str]] = {}
        self._sockets: dict[tuple[int, int], dict[int, SocketEntry]] = {}
        # Every process passed to scan since it was last forgotten.
        self._procs: dict[tuple[int, int], TrackedProcess] = {}
        # Those of them whose descriptors were not read and diffed since the
        # last reset (unreadable then, or a category wanted anew): each scan
        # reads them again, whether or not they are passed.
        self._unread: dict[tuple[int, int], TrackedProcess] = {}
        # What each process's descriptors pointed at when last read, all of
        # them (see recheck).
        self._links: dict[tuple[int, int], dict[int, str]] = {}

    def reset(self, *, files: bool, network: bool) -> None:
        """Forget what was reported for the categories no longer wanted.

        Nobody listens to their closes any more; if the category is wanted
        again, everything open then is reported as newly opened.

        Args:
            files: Whether FILE is still wanted.
            network: Whether NETWORK is still wanted.
        """
        if not files:
            self._files.clear()
        if not network:
            self._sockets.clear()
        if not files and not network:
            self._procs.clear()
            self._links.clear()
        # What was read may not have been diffed for a category wanted now.
        self._unread = dict(self._procs)

    def forget(self, proc: TrackedProcess) -> list[ObserverEvent]:
        """Report everything ``proc`` had open as closed: it exited.

        Args:
            proc: The process that is gone.

        Returns:
            ``FILE_CLOSE``/``SOCKET_CLOSE`` events, in descriptor order.
        """
        key = proc.identity
        self._procs.pop(key, None)
        self._unread.pop(key, None)
        self._links.pop(key, None)
        events = [
            _file_event(proc, ObserverEventKind.FILE_CLOSE, fd, path)
            for fd, path in sorted(self._files.pop(key, {}).items())
        ]
        events.extend(
            _socket_event(proc, ObserverEventKind.SOCKET_CLOSE, fd, entry)
            for fd, entry in sorted(self._sockets.pop(key, {}).items())
        )
        return events

    @property
    def tracked_count(self) -> int:
        """How many processes are tracked (passed to :meth:`scan`, not forgotten)."""
        return len(self._procs)

    def scan(
        self, processes: Iterable[TrackedProcess], *, files: bool, network: bool
    ) -> list[ObserverEvent]:
        """Read the descriptors of ``processes`` and return what changed.

        Pass the processes that may have changed since their last scan: new
        ones, and those that ran (see :class:`._activity.ActivityWatch`) or
        are due for their periodic full look. The others are not read. Those
        whose descriptors could not be read at their last scan (gone, or not
        ours to read: they keep their previous state), and all of them after
        a :meth:`reset`, are read again whether passed or not.

        Args:
            processes: Live processes of the tree, roots included.
            files: Whether FILE is wanted.
            network: Whether NETWORK is wanted.

        Returns:
            The events, grouped per process, closes before opens.
        """
        if self._unread:
            todo = {proc.identity: proc for proc in processes}
            for key, proc in self._unread.items():
                todo.setdefault(key, proc)
            processes = todo.values()
        events: list[ObserverEvent] = []
        # The socket tables are per network namespace; read each at most once
        # per scan, and only if some process holds a socket.
        tables: dict[str, dict[int, SocketEntry]] = {}
        procs = self._procs
        unread = self._unread
        for proc in processes:
            key = proc.identity
            procs[key] = proc
            fds = read_fds(self._proc_root, proc.pid)
            if fds is None:
                unread[key] = proc
                continue
            unread.pop(key, None)
            self._links[key] = fds
            if files:
                events.extend(self._diff_files(proc, fds))
            if network:
                events.extend(self._diff_sockets(proc, fds, tables))
        return events

    def recheck(
        self, processes: Iterable[TrackedProcess], *, files: bool, network: bool
    ) -> list[ObserverEvent]:
        """Look at what only a process outside the tree can have changed, and scan if it did.

        For processes that did not run since their last full look while no
        other process of the tree ran either (see
        ``ActivityWatch.outside_due``): their descriptor table is as it was
        then (only they, their threads and a process sharing the table can
        change it, and such a process is a clone of theirs, in the tree). What
        others can change is read instead: the link text of each descriptor
        that points at a path (a file renamed or deleted by someone else).
        Where one changed, where a socket is held (its state is in the
        tables, which its other holders change), or where there is no
        last read to compare with, the process is scanned in full.

        Args:
            processes: The processes to look at.
            files: Whether FILE is wanted.
            network: Whether NETWORK is wanted.

        Returns:
            The events of the processes scanned in full.
        """
        # Those whose last read failed are read by every scan anyway.
        full = [
            proc
            for proc in processes
            if proc.identity not in self._unread
            and not self._links_unchanged(proc, files=files, network=network)
        ]
        return self.scan(full, files=files, network=network)

    def _links_unchanged(self, proc: TrackedProcess, *, files: bool, network: bool) -> bool:
        links = self._links.get(proc.identity)
        if links is None:
            return False
        directory = f"{self._proc_root}/{proc.pid}/fd/"
        for fd, target in links.items():
            if target.startswith("socket:"):
                if network:
                    return False
            elif files and target.startswith("/"):
                try:
                    if os.readlink(f"{directory}{fd}") != target:
                        return False
                except OSError:
                    return False
        return True

    def prune(self, live: Iterable[TrackedProcess]) -> list[ObserverEvent]:
        """Forget every tracked process not in ``live``, reporting its descriptors closed.

        For a process the tree lost without saying so (:meth:`forget`):
        worth calling only when :attr:`tracked_count` exceeds the size of
        the tree.

        Args:
            live: Every process of the tree.

        Returns:
            The ``FILE_CLOSE``/``SOCKET_CLOSE`` events of those forgotten.
        """
        seen = {proc.identity for proc in live}
        events: list[ObserverEvent] = []
        for key in [k for k in self._procs if k not in seen]:
            events.extend(self.forget(self._procs[key]))
        return events

    def _diff_files(self, proc: TrackedProcess, fds: dict[int, str]) -> list[ObserverEvent]:
        old = self._files.get(proc.identity, {})
        new = {fd: target for fd, target in fds.items() if is_reportable_file(target)}
        self._files[proc.identity] = new
        events: list[ObserverEvent] = []
        for fd in sorted(old.keys() | new.keys()):
            before, after = old.get(fd), new.get(fd)
            if before == after:
                continue
            # A descriptor pointing somewhere else was closed and reopened
            # (dup2, or close+open reusing the lowest free number).
            if before is not None:
                events.append(_file_event(proc, ObserverEventKind.FILE_CLOSE, fd, before))
            if after is not None:
                events.append(_file_event(proc, ObserverEventKind.FILE_OPEN, fd, after))
        return events

    def _diff_sockets(
        self,
        proc: TrackedProcess,
        fds: dict[int, str],
        tables: dict[str, dict[int, SocketEntry]],
    ) -> list[ObserverEvent]:
        inodes = {fd: inode for fd, t in fds.items() if (inode := socket_inode(t)) is not None}
        old = self._sockets.get(proc.identity, {})
        if not inodes and not old:
            return []
        table: dict[int, SocketEntry] = {}
        if inodes:
            namespace = read_net_namespace(self._proc_root, proc.pid)
            if namespace is None:
                table = read_socket_tables(self._proc_root, proc.pid)
            else:
                if namespace not in tables:
                    tables[namespace] = read_socket_tables(self._proc_root, proc.pid)
                table = tables[namespace]
        new: dict[int, SocketEntry] = {}
        events: list[ObserverEvent] = []
        for fd in sorted(old.keys() | inodes.keys()):
            before = old.get(fd)
            inode = inodes.get(fd)
            if before is not None and before.inode == inode:
                new[fd] = before
                continue
            if before is not None:
                events.append(_socket_event(proc, ObserverEventKind.SOCKET_CLOSE, fd, before))
            entry = table.get(inode) if inode is not None else None
            if entry is None or entry.role is None:
                # Not bound or connected yet: reported once it is.
                continue
            new[fd] = entry
            kind = (
                ObserverEventKind.SOCKET_LISTEN
                if entry.role == "listen"
                else ObserverEventKind.SOCKET_CONNECT
            )
            events.append(_socket_event(proc, kind, fd, entry))
        self._sockets[proc.identity] = new
        return events
