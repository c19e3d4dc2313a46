"""What a process or a session cost: ``wait4`` rusage, ``/proc``, cgroup files.

The session reaps with :func:`reap_usage` so that the ``EXITED`` event can
carry the figures; a running process is read from ``/proc/<pid>`` (and its
leaf cgroup, with cgroup containment).
"""

from __future__ import annotations

import os
import resource
from collections.abc import Iterable

import trio

from .._events import ResourceUsage
from ._cgroup import Cgroup

_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def from_rusage(usage: resource.struct_rusage) -> ResourceUsage:
    """The rusage of a reaped process (Linux reports ``ru_maxrss`` in KiB)."""
    return ResourceUsage(
        user_seconds=usage.ru_utime,
        system_seconds=usage.ru_stime,
        max_rss_bytes=usage.ru_maxrss * 1024,
    )


def reap_usage(pid: int) -> tuple[int, ResourceUsage]:
    """Reap ``pid`` (blocking) and return its exit code and rusage."""
    _, status, usage = os.wait4(pid, 0)
    return os.waitstatus_to_exitcode(status), from_rusage(usage)


def with_cgroup(usage: ResourceUsage, group: Cgroup | None) -> ResourceUsage:
    """``usage`` plus the tree figures of ``group`` (unchanged without one)."""
    if group is None:
        return usage
    try:
        user, system = group.cpu_seconds()
        memory, pids, oom = group.memory_peak(), group.pids_peak(), group.oom_kills()
    except (OSError, ValueError):
        # The cgroup is gone (removed after a crash of its session).
        return usage
    return ResourceUsage(
        user_seconds=usage.user_seconds,
        system_seconds=usage.system_seconds,
        max_rss_bytes=usage.max_rss_bytes,
        cgroup_user_seconds=user,
        cgroup_system_seconds=system,
        memory_peak_bytes=memory,
        pids_peak=pids,
        oom_kills=oom,
    )


# KI-protected: Process.resources() calls it from the user's code, and a
# Ctrl-C in a `with open()`'s exit call left the file open until the
# exception's frames were collected.
@trio.lowlevel.enable_ki_protection
def running_usage(pid: int, proc_root: str = "/proc") -> ResourceUsage:
    """A living process's own CPU time (``stat``) and peak RSS (``VmHWM``).

    Fields the kernel does not show (the process is gone) are ``None``.
    """
    user = system = None
    try:
        with open(f"{proc_root}/{pid}/stat", "rb") as file:
            text = file.read().decode()
        # The command name may hold spaces and parentheses: split after it.
        rest = text[text.rindex(")") + 2 :].split()
        # Fields 14 and 15 of stat(5); ``rest`` starts at field 3.
        user, system = int(rest[11]) / _TICKS_PER_SECOND, int(rest[12]) / _TICKS_PER_SECOND
    except (OSError, ValueError, IndexError):
        pass
    peak = None
    try:
        with open(f"{proc_root}/{pid}/status", "rb") as file:
            for line in file:
                if line.startswith(b"VmHWM:"):
                    peak = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    return ResourceUsage(user_seconds=user, system_seconds=system, max_rss_bytes=peak)


def total(usages: Iterable[ResourceUsage]) -> ResourceUsage:
    """CPU seconds summed, peaks the largest, over several processes."""
    items = list(usages)

    def add(values: list[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return sum(known) if known else None

    def peak(values: list[int | None]) -> int | None:
        known = [v for v in values if v is not None]
        return max(known) if known else None

    return ResourceUsage(
        user_seconds=add([u.user_seconds for u in items]),
        system_seconds=add([u.system_seconds for u in items]),
        max_rss_bytes=peak([u.max_rss_bytes for u in items]),
    )


def group_usage(group: Cgroup) -> ResourceUsage:
    """A session's cgroup as a whole: every process it ever held."""
    user, system = group.cpu_seconds()
    return ResourceUsage(
        user_seconds=user,
        system_seconds=system,
        cgroup_user_seconds=user,
        cgroup_system_seconds=system,
        memory_peak_bytes=group.memory_peak(),
        pids_peak=group.pids_peak(),
        oom_kills=group.oom_kills(),
    )
