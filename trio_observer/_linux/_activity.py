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

from ._procfs import read_run_counters, read_thread_ids, run_counters_path

VERIFY_EVERY: Final = 25
"""After this many quiet passes in a row a process is looked at in full
anyway (0.5 s at the default 20 ms interval), for the changes the counters
cannot see."""


@dataclass(slots=True)
class _Record:
    threads: tuple[int, ...]
    paths: tuple[str, ...]
    counters: tuple[tuple[int, int], ...]
    quiet_passes: int


def _read_counters(path: str) -> tuple[int, int] | None:
    # The hot loop: one open, read and close per thread per pass, so without
    # the helpers of ._procfs.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fields = os.read(fd, 128).split()
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(fields) < 3 or fields[2] == b"0":
        return None
    return int(fields[0]), int(fields[2])


@final
class ActivityWatch:
    """Tell apart the processes that ran since the previous look from those that did not.

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

    def forget_all(self) -> None:
        """Drop every record: each process is active at the next :meth:`update`."""
        self._records.clear()

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
        quiet: set[int] = set()
        records: dict[int, _Record] = {}
        for pid in pids:
            record = self._records.get(pid)
            if record is not None and record.quiet_passes < self._verify_every:
                if len(record.paths) == 1:
                    same = _read_counters(record.paths[0]) == record.counters[0]
                else:
                    same = tuple(map(_read_counters, record.paths)) == record.counters
                if same:
                    record.quiet_passes += 1
                    records[pid] = record
                    quiet.add(pid)
                    continue
            fresh = self._baseline(pid)
            if fresh is not None:
                records[pid] = fresh
        self._records = records
        return quiet

    def _baseline(self, pid: int) -> _Record | None:
        threads = read_thread_ids(self._proc_root, pid)
        if not threads:
            return None
        counters: list[tuple[int, int]] = []
        for tid in threads:
            pair = read_run_counters(self._proc_root, pid, tid)
            if pair is None:
                return None
            counters.append(pair)
        # A thread created after the listing by a thread whose counters were
        # read later would be unwatched: list again and give up if it moved.
        if read_thread_ids(self._proc_root, pid) != threads:
            return None
        paths = tuple(run_counters_path(self._proc_root, pid, tid) for tid in threads)
        return _Record(tuple(threads), paths, tuple(counters), 0)
