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
from collections.abc import Sequence
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
        # The one-thread processes with a kept descriptor (most of a tree),
        # as (descriptor, baseline) beside their records: the loop that runs
        # for every process every pass unpacks a tuple, nothing more.
        self._singles: dict[int, tuple[int, bytes]] = {}
        # The pids last given to update (None: resynchronise at the next),
        # and those of them without a record (new, or a baseline that
        # failed): tried again at every pass.
        self._given: list[int] | None = None
        self._missing: list[int] = []
        self._kept_fds = 0
        self._pass = 0
        # The earliest pass at which some record's full look is due, so
        # that a pass with none due does not look at every record for it.
        self._next_due = 0
        # The cgroup check (see group_unchanged): its cpu.stat, kept open,
        # and what it read last.
        self._group_fd = -1
        self._group_path = ""
        self._group_stat = b""
        # Passes skipped in a row (see skip_pass).
        self._skipped = 0
        # The last pass that found some process active (or forgot them all):
        # the processes' changes to each other are all older than it.
        self._last_active = 0
        self.due: set[int] = set()
        """The pids the last :meth:`update` found due for their periodic
        full look: their counters did not move, so they did not run (they
        neither forked, exec'd nor exited); only what another process can
        change about them (their descriptors) needs the look."""
        self.outside_due: set[int] = set()
        """Those due for the full look whose last full look came after the
        last run of *any* process given to :meth:`update`: no process of
        the tree can have changed them since (a descriptor table is shared
        only between a process and the clone it made with ``CLONE_FILES``,
        which the tree holds too), so only what a process outside the tree
        can change needs the look (renamed or deleted files, the state of
        shared sockets)."""

    @property
    def kept_fds(self) -> int:
        """How many ``schedstat`` descriptors are open now."""
        return self._kept_fds

    def forget_all(self) -> None:
        """Drop every record and close its descriptors: each process is active at the next look."""
        for record in self._records.values():
            self._close(record)
        self._records.clear()
        self._singles.clear()
        self._given = None
        self._missing = []
        self._last_active = self._pass
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

    def skip_passes(self, count: int) -> None:
        """Count ``count`` passes not made because nothing ran (see :meth:`quiet_snapshot`).

        As :meth:`skip_pass` each: the periodic full looks stay on time.
        """
        self._pass += count
        self._skipped += count

    def quiet_snapshot(self) -> list[tuple[int, bytes]] | None:
        """Return what to re-read to learn that the tree is still as quiet as at the last pass.

        Call it right after a pass that found nothing active: the
        descriptors and the bytes they held at that pass, to re-read with
        ``pread(fd, 128, 0)`` until one differs (something ran), instead of
        making passes. With a cgroup, its ``cpu.stat`` alone; else every
        watched thread's ``schedstat``. The descriptors stay open until the
        next call that changes what is watched (:meth:`update`,
        :meth:`group_unchanged`, :meth:`forget_all`).

        Returns:
            The pairs, or ``None`` when some process cannot be watched that
            way (no baseline yet, or a thread past :data:`MAX_KEPT_FDS`).
        """
        if self._group_fd >= 0:
            return [(self._group_fd, self._group_stat)] if self._group_stat else None
        if self._missing or self._given is None:
            return None
        snapshot = list(self._singles.values())
        if len(self._singles) < len(self._records):
            for pid, record in self._records.items():
                if pid in self._singles:
                    continue
                if -1 in record.fds:
                    return None
                snapshot.extend(zip(record.fds, record.counters, strict=True))
        return snapshot

    def passes_until_due(self) -> int:
        """How many passes after the last one the next with work due is, if none is skipped early.

        With nothing run meanwhile, the passes before it would find nothing
        (:meth:`quiet_snapshot` tells whether something ran): a caller that
        makes none of them calls :meth:`skip_passes` with their number
        before that pass, which then does the full looks due.
        """
        if self._group_fd >= 0:
            # group_unchanged gives in after verify_every skips in a row.
            return max(1, self._verify_every - self._skipped + 1)
        return max(1, self._next_due - self._pass)

    def _forget_group(self) -> None:
        if self._group_fd >= 0:
            os.close(self._group_fd)
        self._group_fd = -1
        self._group_path = ""
        self._group_stat = b""

    def update(self, pids: Sequence[int]) -> set[int]:
        """Look at ``pids`` and return those that may have done something.

        A pid is *quiet* when no thread of it has been switched in since the
        previous call that reported it active; it is returned (active) when
        its counters moved, when it is seen for the first time, when it is
        gone, or when the kernel does not keep its counters. A quiet pid
        whose periodic full look is due is not returned but put in
        :attr:`due`. Call this *before* reading whatever the caller wants to
        skip for quiet processes: the counters of an active process are
        recorded now, so a run that starts after this call shows up in the
        next one.

        Pids not passed are forgotten. Passing the same list as last time
        (the common case: the tree did not change) costs one ``pread`` per
        thread and no other work per process.

        Args:
            pids: The processes to look at.

        Returns:
            The active pids (a new set); the quiet ones are the others.
        """
        self._pass += 1
        self._skipped = 0
        this_pass = self._pass
        if not isinstance(pids, list):
            pids = list(pids)
        if pids != self._given:
            self._watch(pids)
        records = self._records
        pread = os.pread
        try:
            moved = [
                pid for pid, (fd, before) in self._singles.items() if pread(fd, 128, 0) != before
            ]
        except OSError:
            # Some task was reaped (ESRCH): the same loop, one call at a time.
            moved = [
                pid for pid, (fd, before) in self._singles.items() if _pread_counters(fd) != before
            ]
        if len(self._singles) < len(records):
            moved.extend(
                pid
                for pid, record in records.items()
                if pid not in self._singles and not self._unchanged(record)
            )
        active = set(moved)
        for pid in moved:
            self._drop(pid)
            self._missing.append(pid)
        if self._missing:
            active.update(self._missing)
            self._missing = [
                pid for pid in self._missing if not self._take_baseline(pid, this_pass)
            ]
        if active:
            self._last_active = this_pass
        due: set[int] = set()
        outside: set[int] = set()
        self.due, self.outside_due = due, outside
        if this_pass >= self._next_due:
            # Due when this_pass - looked > verify_every: not later than the
            # per-pass check this replaces would have found it.
            limit = this_pass - self._verify_every
            earliest = this_pass
            for pid, record in records.items():
                if record.looked < limit:
                    # The full look is due, but the counters (and so the
                    # threads: only a running thread makes or ends one)
                    # are as recorded: keep the descriptors.
                    (outside if self._last_active <= record.looked else due).add(pid)
                    record.looked = this_pass
                earliest = min(earliest, record.looked)
            self._next_due = earliest + self._verify_every + 1
        return active

    def _watch(self, pids: list[int]) -> None:
        """Follow ``pids`` from now on: forget the others, baseline the new ones."""
        wanted = set(pids)
        for pid in [pid for pid in self._records if pid not in wanted]:
            self._drop(pid)
        # A copy: the comparison at the next pass must not see the caller's
        # later changes to its list.
        self._given = list(pids)
        records = self._records
        self._missing = [pid for pid in dict.fromkeys(pids) if pid not in records]

    def _unchanged(self, record: _Record) -> bool:
        for fd, path, before in zip(record.fds, record.paths, record.counters, strict=True):
            now = _pread_counters(fd) if fd >= 0 else _read_counters(path)
            if now != before:
                return False
        return True

    def _drop(self, pid: int) -> None:
        self._close(self._records.pop(pid))
        self._singles.pop(pid, None)

    def _close(self, record: _Record) -> None:
        for fd in record.fds:
            if fd >= 0:
                os.close(fd)
                self._kept_fds -= 1
        record.fds = []

    def _take_baseline(self, pid: int, this_pass: int) -> bool:
        record = self._baseline(pid, this_pass)
        if record is None:
            return False
        self._records[pid] = record
        if len(record.fds) == 1 and record.fds[0] >= 0:
            self._singles[pid] = (record.fds[0], record.counters[0])
        self._next_due = min(self._next_due, this_pass + self._verify_every + 1)
        return True

    def _baseline(self, pid: int, this_pass: int) -> _Record | None:
        threads = read_thread_ids(self._proc_root, pid)
        if not threads:
            return None
        paths = tuple(run_counters_path(self._proc_root, pid, tid) for tid in threads)
        record = _Record(paths, [], [], this_pass)
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
