"""Which processes of the tree may have done anything since the last look.

A process changes its descriptor table, forks, or exits only while one of its
threads runs. The scheduler counts, per thread, how often the thread was put
on a CPU and how long it ran (``/proc/<pid>/task/<tid>/schedstat``). When
neither count of any thread moved between two reads, no thread of the
process was switched in between them, so nothing the process does itself can
have changed: the observer skips re-reading its descriptors and children.
Reading one small file per thread is several times cheaper than listing the
descriptors and reading every link, and an idle tree is the common case.

What the counters cannot see, and why a periodic full look remains (every
:data:`VERIFY_EVERY` passes per process):

* changes made to a process by *another* process: a descriptor table shared
  through ``clone(CLONE_FILES)`` without ``CLONE_THREAD``, a socket shared
  with another process that binds, listens or connects it, an open file
  renamed or deleted by someone else (its link text changes);
* a thread that stays on a CPU the whole interval: the runtime is brought up
  to date at each scheduler tick, but a ``nohz_full`` CPU may run one task
  for a long time without a tick;
* a pid reused by a new process whose counters equal the old one's to the
  nanosecond (pids are handed out cyclically, so reuse within one interval
  needs a wrap of the pid space first).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, final

from ._procfs import parse_run_counters, read_thread_ids, run_counters_path

VERIFY_EVERY: Final = 25
"""After this many quiet passes in a row a process is looked at in full
anyway (0.5 s at the default 20 ms interval), for the changes the counters
cannot see."""

MAX_KEPT_FDS: Final = 1024
"""At most this many ``schedstat`` files are kept open (one per thread
watched). Threads past the bound are read by opening the file each pass, as
before: correct, only dearer."""


@dataclass(slots=True)
class _Record:
    paths: tuple[str, ...]
    # One open schedstat per thread, or -1 where the bound was reached. The
    # descriptor stays bound to the task it was opened for: once that task is
    # reaped a read fails (ESRCH) or is empty, so it can never show the
    # counters of a later process that reused the pid.
    fds: list[int]
    # The bytes each thread's file held at the baseline, compared as they
    # are: equal bytes mean equal counters, and any other change (the run
    # delay moves only around a switch-in or a migration) errs towards
    # "ran". Parsing is only needed once, to refuse zeros.
    counters: list[bytes]
    # The pass of the last full look (the baseline, or a due look): the next
    # is due VERIFY_EVERY passes later, skipped passes included.
    looked: int
    seen: int


def _read_counters(path: str) -> bytes:
    # Threads past MAX_KEPT_FDS: one open, read and close per pass.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return b""
    try:
        return os.read(fd, 128)
    except OSError:
        return b""
    finally:
        os.close(fd)


def _pread_counters(fd: int) -> bytes:
    # Empty for a task reaped since the descriptor was opened.
    try:
        return os.pread(fd, 128, 0)
    except OSError:
        return b""


@final
class ActivityWatch:
    """Tell apart the processes that ran since the previous look from those that did not.

    Keeps one ``schedstat`` descriptor open per watched thread (at most
    :data:`MAX_KEPT_FDS`) and re-reads it with ``pread``; :meth:`forget_all`
    closes them.

    Args:
        proc_root: Where ``/proc`` is mounted (or a fake tree).
        verify_every: Quiet passes after which a process is reported active
            anyway; ``0`` reports every process active every time (no
            skipping).
    """

    def __init__(self, proc_root: str, *, verify_every: int = VERIFY_EVERY) -> None:
        self._proc_root = proc_root
        self._verify_every = verify_every
        self._records: dict[int, _Record] = {}
        self._kept_fds = 0
        self._pass = 0
        # The cgroup check (see group_unchanged): its cpu.stat, kept open,
        # and what it read last.
        self._group_fd = -1
        self._group_path = ""
        self._group_stat = b""
        # Passes skipped in a row (see skip_pass).
        self._skipped = 0
        self.unchanged_due: set[int] = set()
        """The pids the last :meth:`update` reported active only because
        their periodic full look was due: their counters did not move, so
        they did not run (they neither forked, exec'd nor exited); only what
        another process can change about them (their descriptors) needs
        the look."""

    @property
    def kept_fds(self) -> int:
        """How many ``schedstat`` descriptors are open now."""
        return self._kept_fds

    def forget_all(self) -> None:
        """Drop every record and close its descriptors: each process is active at the next look."""
        for record in self._records.values():
            self._close(record)
        self._records.clear()
        self._forget_group()

    def group_unchanged(self, cpu_stat: str) -> bool:
        """Tell whether nothing in a cgroup has run since the previous call.

        For a tree that is all in one cgroup (the session's), one read of
        its ``cpu.stat`` (the CPU time of the whole subtree) instead of one
        per thread: if it did not move, no process of the tree ran, so
        every one is as quiet as :meth:`update` would find it. Call it
        first in a pass; when it returns ``True``, call :meth:`skip_pass`
        instead of :meth:`update`. Time a task spends on a CPU is added at
        the next tick or when it leaves the CPU, so a task that was
        switched in just before this read shows at the next one (as with
        the per-thread counters, see :meth:`update`); the microsecond
        granularity hides a run shorter than 1 us (no fork, exec or exit is
        that short; the periodic full look catches the rest).

        Args:
            cpu_stat: The ``cpu.stat`` file of the tree's cgroup.

        Returns:
            ``True`` if it reads as at the previous call; ``False`` on the
            first call, after :meth:`forget_all`, if it cannot be read, or
            when ``verify_every`` passes in a row were skipped already.
        """
        if self._group_path != cpu_stat:
            self._forget_group()
            try:
                self._group_fd = os.open(cpu_stat, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return False
            self._group_path = cpu_stat
        now = _pread_counters(self._group_fd)
        before, self._group_stat = self._group_stat, now
        # Never more than the verification interval in a row: a process of
        # the tree outside the cgroup (one that forked in the instant before
        # its root was placed) and the changes others make are looked at on
        # the usual schedule.
        return bool(now) and now == before and self._skipped < self._verify_every

    def skip_pass(self) -> None:
        """Count a pass in which :meth:`group_unchanged` said nothing ran.

        The periodic full looks stay on time: they are due by passes,
        skipped ones included.
        """
        self._pass += 1
        self._skipped += 1

    def _forget_group(self) -> None:
        if self._group_fd >= 0:
            os.close(self._group_fd)
        self._group_fd = -1
        self._group_path = ""
        self._group_stat = b""

    def update(self, pids: Iterable[int]) -> set[int]:
        """Look at ``pids`` and return those that are provably quiet.

        A pid is quiet when no thread of it has been switched in since the
        previous call that reported it active (and the periodic full look is
        not due). Call this *before* reading whatever the caller wants to
        skip for quiet processes: the counters of an active process are
        recorded now, so a run that starts after this call shows up in the
        next one.

        Pids not passed are forgotten. A pid seen for the first time, gone,
        or whose counters the kernel does not keep, is active.

        Args:
            pids: The processes to look at.

        Returns:
            The quiet pids.
        """
        self._pass += 1
        self._skipped = 0
        this_pass = self._pass
        records = self._records
        quiet: set[int] = set()
        due: set[int] = set()
        self.unchanged_due = due
        looked = 0
        pread = os.pread
        for pid in pids:
            looked += 1
            record = records.get(pid)
            if record is not None:
                record.seen = this_pass
                fds = record.fds
                if len(fds) == 1 and fds[0] >= 0:
                    # The common case, inline (it runs for every process of
                    # the tree every pass): one thread, a kept descriptor.
                    try:
                        unchanged = pread(fds[0], 128, 0) == record.counters[0]
                    except OSError:
                        unchanged = False
                else:
                    unchanged = self._unchanged(record)
                if unchanged:
                    if this_pass - record.looked <= self._verify_every:
                        quiet.add(pid)
                    else:
                        # The full look is due, but the counters (and so the
                        # threads: only a running thread makes or ends one)
                        # are as recorded: keep the descriptors.
                        record.looked = this_pass
                        due.add(pid)
                    continue
                self._close(record)
                del records[pid]
            fresh = self._baseline(pid, this_pass)
            if fresh is not None:
                records[pid] = fresh
        if len(records) > looked:
            for pid in [pid for pid, r in records.items() if r.seen != this_pass]:
                self._close(records.pop(pid))
        return quiet

    def _unchanged(self, record: _Record) -> bool:
        for fd, path, before in zip(record.fds, record.paths, record.counters, strict=True):
            now = _pread_counters(fd) if fd >= 0 else _read_counters(path)
            if now != before:
                return False
        return True

    def _close(self, record: _Record) -> None:
        for fd in record.fds:
            if fd >= 0:
                os.close(fd)
                self._kept_fds -= 1
        record.fds = []

    def _baseline(self, pid: int, this_pass: int) -> _Record | None:
        threads = read_thread_ids(self._proc_root, pid)
        if not threads:
            return None
        paths = tuple(run_counters_path(self._proc_root, pid, tid) for tid in threads)
        record = _Record(paths, [], [], this_pass, this_pass)
        for path in paths:
            fd = -1
            if self._kept_fds < MAX_KEPT_FDS:
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                except OSError:
                    self._close(record)
                    return None
                self._kept_fds += 1
            record.fds.append(fd)
            data = _pread_counters(fd) if fd >= 0 else _read_counters(path)
            if parse_run_counters(data) is None:
                self._close(record)
                return None
            record.counters.append(data)
        # A thread created after the listing by a thread whose counters were
        # read later would be unwatched: list again and give up if it moved.
        if read_thread_ids(self._proc_root, pid) != threads:
            self._close(record)
            return None
        return record
