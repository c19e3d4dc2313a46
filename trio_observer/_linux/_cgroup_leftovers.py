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


def _locked(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return True  # gone meanwhile, or not ours to judge: leave it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def leftover_sessions(parent: Path) -> list[Cgroup]:
    """Session cgroups below ``parent`` whose owner process is gone.

    Gone means both: no process with the pid and start time in the name
    (as this process's ``/proc`` sees it), and nobody holds the cgroup's
    lock (:func:`lock_session`).
    """
    return _leftovers(parent)[0]


def _leftovers(parent: Path) -> tuple[list[Cgroup], list[Path]]:
    """:func:`leftover_sessions`, and the trial cgroups of probes whose process is gone.

    A probe's trial lives for one ``mkdir``/``rmdir``; a process killed in
    between leaves it (empty) for good, since its name has no session's
    form: the pid alone says whether it is still in use.
    """
    found: list[Cgroup] = []
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
        if (stat is None or stat.starttime != start) and not _locked(parent / name):
            found.append(Cgroup(parent / name))
    return found, probes


async def clean_leftovers(parent: Path) -> list[Path]:
    """Kill the processes of crashed sessions' cgroups and remove them.

    Also removes the trial cgroups of probes whose process is gone. Returns
    the paths removed.
    """
    removed: list[Path] = []
    sessions, probes = _leftovers(parent)
    for group in sessions:
        group.kill()
        with trio.move_on_after(_LEFTOVER_PATIENCE):
            await group.wait_empty()
        try:
            group.remove()
        except OSError:
            continue
        removed.append(group.path)
    for path in probes:
        try:
            path.rmdir()
        except OSError:
            continue  # gone meanwhile, or something was put in it: not ours
        removed.append(path)
    return removed
