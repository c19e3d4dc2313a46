"""Leftovers of crashed sessions: the lock a living session holds, the sweep.

A session's cgroup is named for its owner (pid and start time) and locked
by it (``flock`` on its directory) until it closes; a later session, or
the daemon at start, takes one whose owner is gone by both signs, kills
what is inside and removes it (``docs/containment.md``, "Layout and naming").
"""

from __future__ import annotations

import fcntl
import os
import re
from pathlib import Path
from typing import Final

import trio

from ._cgroup import NAME_PREFIX, PROBE_PREFIX, Cgroup, own_start_time
from ._procfs import read_stat

_LEFTOVER_PATIENCE: Final = 5.0
"""Seconds to wait for a killed leftover to empty (its members are not our
children, so their reapers decide when they leave)."""
_NAME_RE: Final = re.compile(r"^trio-observer-(\d+)\.(\d+)-[0-9a-f]+$")


def lock_session(fd: int) -> None:
    """Mark a session cgroup as owned: ``flock`` on its open directory.

    The kernel drops the lock when the owner's last descriptor of it
    closes, which its death does; :func:`leftover_sessions` tries it, so an
    owner in another pid namespace (whose pid in the name means nothing
    here) is not taken for dead.
    """
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _take_lock(path: Path) -> int | None:
    """The descriptor holding ``path``'s lock, or None if somebody holds it.

    None too when it is gone meanwhile, or not ours to judge: leave it.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def leftover_sessions(parent: Path) -> list[Cgroup]:
    """Session cgroups below ``parent`` whose owner process is gone.

    Gone means both: no process with the pid and start time in the name
    (as this process's ``/proc`` sees it), and nobody holds the cgroup's
    lock (:func:`lock_session`).
    """
    sessions, _ = _leftovers(parent)
    for _, lock in sessions:
        os.close(lock)
    return [group for group, _ in sessions]


def _leftovers(parent: Path) -> tuple[list[tuple[Cgroup, int]], list[Path]]:
    """:func:`leftover_sessions`, each with its lock held, and dead probes' trial cgroups.

    The caller closes the lock descriptors. Holding a leftover's lock while
    it is cleaned keeps two sweepers (two sessions opening at once, or a
    daemon starting) from cleaning the same one: the second sees it locked
    and leaves it, instead of reading files the first has just removed.

    A probe's trial lives for one ``mkdir``/``rmdir``; a process killed in
    between leaves it (empty) for good, since its name has no session's
    form: the pid alone says whether it is still in use.
    """
    found: list[tuple[Cgroup, int]] = []
    probes: list[Path] = []
    try:
        names = os.listdir(parent)
    except OSError:
        return found, probes
    own = own_start_time()
    for name in names:
        if not name.startswith(NAME_PREFIX):
            continue
        if name.startswith(PROBE_PREFIX):
            prober = name[len(PROBE_PREFIX) :]
            if (
                prober.isdigit()
                and int(prober) != own[0]
                and read_stat("/proc", int(prober)) is None
            ):
                probes.append(parent / name)
            continue
        match = _NAME_RE.match(name)
        if match is None:
            continue
        pid, start = int(match.group(1)), int(match.group(2))
        if (pid, start) == own:
            continue  # this process's own sessions: alive, as we are
        stat = read_stat("/proc", pid)
        if stat is not None and stat.starttime == start:
            continue
        lock = _take_lock(parent / name)
        if lock is not None:
            found.append((Cgroup(parent / name), lock))
    return found, probes


async def clean_leftovers(parent: Path) -> list[Path]:
    """Kill the processes of crashed sessions' cgroups and remove them.

    Also removes the trial cgroups of probes whose process is gone. Returns
    the paths removed.
    """
    removed: list[Path] = []
    sessions, probes = _leftovers(parent)
    try:
        while sessions:
            group, lock = sessions.pop(0)
            try:
                group.kill()
                with trio.move_on_after(_LEFTOVER_PATIENCE):
                    await group.wait_empty()
                group.remove()
            except OSError:
                continue  # removed meanwhile by someone not sweeping, or not ours
            finally:
                os.close(lock)
            removed.append(group.path)
    finally:
        for _, lock in sessions:
            os.close(lock)
    for path in probes:
        try:
            path.rmdir()
        except OSError:
            continue  # gone meanwhile, or something was put in it: not ours
        removed.append(path)
    return removed
