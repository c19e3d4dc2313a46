"""Finding and stopping what a session's processes left behind.

When a session ends, nothing it started may outlive it. Its processes are
reaped by then, but they may have left descendants: members of their process
groups (a shell's background job), and orphans that moved to a group or
session of their own before their parent died. The session is a child
subreaper, so those orphans are re-parented to this process; they are
recognised by the session id every child carries in its environment.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Iterable
from typing import Final

import trio

from .._grace import Grace, terminate_then_kill
from ._procfs import ProcStat, read_children, scan_all

PROC: Final = "/proc"
_PR_SET_CHILD_SUBREAPER: Final = 36
_PR_GET_CHILD_SUBREAPER: Final = 37


def scan(proc_root: str = PROC) -> dict[int, ProcStat]:
    """Read the stat of every process visible in ``proc_root``.

    The one parser (:mod:`._procfs`) does the reading, so the thread-count
    rule of :attr:`ProcStat.is_dead` holds here too: a process whose main
    thread exited while other threads run is alive, and is stopped.
    """
    return scan_all(proc_root)


def has_marker(pid: int, marker: bytes, proc_root: str = PROC) -> bool:
    """True if the process's initial environment holds ``marker`` exactly."""
    return marker_state(pid, marker, proc_root) is True


def marker_state(pid: int, marker: bytes, proc_root: str = PROC) -> bool | None:
    """Whether the process's environment holds ``marker``; None if it is empty.

    An empty or unreadable environment says nothing: a zombie's, or that
    of a process in the middle of exiting, reads as empty, and so does one
    started with no environment at all (``env -i``).
    """
    try:
        with open(f"{proc_root}/{pid}/environ", "rb") as f:
            environ = f.read()
    except OSError:
        return None
    if not environ:
        return None
    return marker in environ.split(b"\0")


def proc_available(proc_root: str = PROC) -> bool:
    """True if ``proc_root`` looks like a Linux procfs."""
    return os.path.exists(f"{proc_root}/self/stat")


@functools.cache
def _libc() -> ctypes.CDLL:
    # Loading the library costs more than the rest of an empty session's
    # open and close together: once per process is enough.
    return ctypes.CDLL(None, use_errno=True)


def _prctl(option: int, arg: object) -> int:
    return int(_libc().prctl(option, arg, 0, 0, 0))


def is_subreaper() -> bool:
    """True if this process is a child subreaper now (False off Linux)."""
    current = ctypes.c_int(0)
    try:
        if _prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(current)) != 0:
            return False
    except (OSError, AttributeError):
        return False
    return bool(current.value)


class _Subreaper:
    """Holds PR_SET_CHILD_SUBREAPER while at least one session is open.

    The attribute is process-wide: while it is set, orphans of *any* child
    of this process come here instead of to init. So it is set when the
    first session opens and cleared when the last one closes, unless this
    process was a subreaper already (then it is left as it was).
    """

    def __init__(self) -> None:
        self._holders = 0
        self._set_by_us = False

    def acquire(self) -> None:
        self._holders += 1
        if self._holders == 1 and not is_subreaper():
            try:
                self._set_by_us = _prctl(_PR_SET_CHILD_SUBREAPER, 1) == 0
            except (OSError, AttributeError):
                # Not Linux: orphans go to init, and teardown relies on
                # process groups alone.
                self._set_by_us = False

    def release(self) -> None:
        self._holders -= 1
        if self._holders == 0 and self._set_by_us:
            self._set_by_us = False
            _prctl(_PR_SET_CHILD_SUBREAPER, 0)


subreaper = _Subreaper()


def find_leftovers(
    *,
    groups: Iterable[int],
    marker: bytes,
    known: Iterable[int] = (),
    exclude: Iterable[int] = (),
    proc_root: str = PROC,
) -> dict[int, ProcStat]:
    """Return the processes that belong to a session's tree.

    A process belongs when it is in one of ``groups`` (as process group or
    session id) and its environment holds ``marker`` or is empty; when it
    is a child of this process carrying ``marker``; when the tree observer
    ``known`` it as a descendant; or when its parent belongs. ``exclude``
    are left out.

    Group membership alone is not enough: a group id whose members are all
    gone may be reused by an unrelated process, which would then be killed.
    An empty environment is accepted for group members because zombies and
    processes in the middle of exiting read as empty (and a member started
    with ``env -i`` is the session's too); an unrelated process would have
    to reuse the group id *and* have no environment to be mistaken.
    """
    table = scan(proc_root)
    own = os.getpid()
    group_set = set(groups)
    excluded = set(exclude)
    excluded.add(own)
    children: dict[int, list[int]] = {}
    for stat in table.values():
        children.setdefault(stat.ppid, []).append(stat.pid)
    found: dict[int, ProcStat] = {}
    known_set = set(known)
    todo = [
        stat.pid
        for stat in table.values()
        if stat.pid in known_set
        or (
            (stat.pgid in group_set or stat.sid in group_set)
            and marker_state(stat.pid, marker, proc_root) is not False
        )
        or (stat.ppid == own and has_marker(stat.pid, marker, proc_root))
    ]
    while todo:
        pid = todo.pop()
        if pid in found or pid not in table:
            continue
        found[pid] = table[pid]
        todo.extend(children.get(pid, ()))
    for pid in excluded:
        found.pop(pid, None)
    return found


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


async def _wait_gone(pids: Iterable[int]) -> None:
    """Wait until every pid has exited (zombies count as exited)."""
    fds: list[int] = []
    try:
        for pid in pids:
            try:
                fds.append(os.pidfd_open(pid))
            except ProcessLookupError:
                continue
        async with trio.open_nursery() as nursery:
            for fd in fds:
                nursery.start_soon(trio.lowlevel.wait_readable, fd)
    finally:
        for fd in fds:
            os.close(fd)


def reap_zombie_children(pids: Iterable[int], exit_codes: dict[int, int] | None = None) -> None:
    """Reap those of ``pids`` that are exited children of this process.

    The exit code (``-signal`` if killed) of each one reaped goes into
    ``exit_codes``, if given: once reaped, nobody else can learn it.
    """
    for pid in pids:
        try:
            reaped, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            # Not our child (its parent in the tree reaped it) or gone.
            continue
        if reaped and exit_codes is not None:
            exit_codes[reaped] = os.waitstatus_to_exitcode(status)


async def stop_leftovers(
    *,
    groups: Iterable[int],
    marker: bytes,
    grace_period: float | Grace,
    known: Iterable[int] = (),
    exclude: Iterable[int] = (),
    proc_root: str = PROC,
    exit_codes: dict[int, int] | None = None,
) -> int:
    """SIGTERM the session's leftover processes, SIGKILL them after ``grace_period``.

    Repeats until a scan finds nothing (a dying tree may still fork), reaps
    the ones that became this process's children, and returns how many
    processes it stopped. Needs procfs and pidfd; elsewhere it returns 0 and
    the caller's process-group signals are all there is. The exit codes of
    those it reaped go into ``exit_codes`` if given (the tree observer
    reports them).
    """
    if not proc_available(proc_root) or not hasattr(os, "pidfd_open"):
        return 0
    groups = tuple(groups)
    known = tuple(known)
    exclude = tuple(exclude)
    if nothing_can_be_left(groups=groups, known=known, marker=marker, proc_root=proc_root):
        return 0
    stopped: set[int] = set()
    grace: float | Grace = grace_period
    for _ in range(8):
        # A thread: the scan reads every process on the machine, tens of
        # milliseconds with thousands of them, which the trio thread must
        # not spend blocked.
        leftovers = await trio.to_thread.run_sync(
            lambda: find_leftovers(
                groups=groups, marker=marker, known=known, exclude=exclude, proc_root=proc_root
            )
        )
        alive = [pid for pid, stat in leftovers.items() if not stat.is_dead]
        reap_zombie_children((pid for pid, stat in leftovers.items() if stat.is_dead), exit_codes)
        if not alive:
            break
        stopped.update(alive)

        def send(sig: int, alive: list[int] = alive) -> None:
            for pid in alive:
                _signal(pid, sig)

        async def wait(alive: list[int] = alive) -> None:
            await _wait_gone(alive)

        await terminate_then_kill(send, wait, grace)
        reap_zombie_children(alive, exit_codes)
        # Whatever is still there after the first round gets no more grace.
        grace = 0.0
    return len(stopped)


def _group_has_members(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def nothing_can_be_left(
    *, groups: Iterable[int], known: Iterable[int], marker: bytes, proc_root: str = PROC
) -> bool:
    """True when a session provably left nothing behind, without a scan.

    Nothing is left when none of ``groups`` has a member, the tree observer
    ``known`` no descendant, and no child of this process carries
    ``marker`` (an adopted orphan). Those are the only ways in which
    :func:`find_leftovers` finds anything: every other match is a
    descendant of one of them. Reads a few files instead of every process's
    stat, so closing a session does not cost in proportion to the machine.
    """
    if any(True for _ in known):
        return False
    if any(_group_has_members(pgid) for pgid in groups):
        return False
    children = read_children(proc_root, os.getpid())
    if children is None:
        # No children files in this kernel: only a scan can tell.
        return False
    return not any(marker_state(pid, marker, proc_root) is True for pid in children)
