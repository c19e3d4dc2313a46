"""The cgroup containment strategy a session holds: place, stop, members, close.

A session (or the CLI) opens one with :func:`open_cgroup_containment`; it
cleans up leftovers of crashed sessions, makes the session's cgroup and
gives every placed process a leaf of its own (per-process accounting and
kill). What a process cost is read by ``_cgroup_usage``.
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, final

import trio

from . import _cgroup
from ._cgroup import Cgroup, CgroupUnavailableError

if TYPE_CHECKING:
    from .._limits import Limits


def _reap_if_ours(pidfd: int) -> None:
    try:
        os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG)
    except ChildProcessError:
        pass  # not ours, or reaped already by its owner


@final
class CgroupContainment:
    """Every process of a session in a leaf of the session's cgroup."""

    def __init__(self, group: Cgroup) -> None:
        self.group = group
        self._leaves: dict[int, Cgroup] = {}
        self._closed = False

    def place(self, pid: int, limits: Limits | None = None) -> Cgroup:
        """Move ``pid`` (and any child it already has) into a leaf of its own.

        Called right after the vfork-based spawn returns: the window in which
        the child could fork outside is the time between ``execve`` and this
        write, before the program's own start-up has run. ``limits`` are
        written on the leaf before the move, so the process never runs in
        it unlimited (their controllers were enabled before the spawn, see
        ``_cgroup_limits.prepare``).
        """
        leaf = self.group.leaf(f"p{pid}")
        if limits is not None:
            leaf.set_limits(limits)
        leaf.place(pid)
        self._leaves[pid] = leaf
        return leaf

    def leaf_of(self, pid: int) -> Cgroup | None:
        """The leaf a placed process lives in."""
        return self._leaves.get(pid)

    def members(self) -> list[int]:
        """Every living process of the session, from ``cgroup.procs``."""
        return self.group.members()

    async def stop(self, grace_period: float) -> None:
        """Freeze, SIGTERM all, thaw, grace on the trio clock, ``cgroup.kill``, wait, reap.

        Members are listed while frozen (nobody can fork then) and held by
        pidfds, so that those that are this process's children (orphans
        adopted as child subreaper) are reaped and not left as zombies;
        ``populated 0`` comes before a process becomes a zombie.
        """
        if not self.group.populated():
            return
        pidfds: dict[int, int] = {}
        try:
            self.group.freeze()
            try:
                self._hold(pidfds)
                self.group.signal_all(signal.SIGTERM)
            finally:
                self.group.thaw()
            with trio.move_on_after(grace_period):
                await self.group.wait_empty()
            if self.group.populated():
                self.group.freeze()
                try:
                    self._hold(pidfds)
                finally:
                    self.group.thaw()
                self.group.kill()
                await self.group.wait_empty()
            for fd in pidfds.values():
                await trio.lowlevel.wait_readable(fd)
                _reap_if_ours(fd)
        finally:
            for fd in pidfds.values():
                os.close(fd)

    def _hold(self, pidfds: dict[int, int]) -> None:
        for pid in self.group.members():
            if pid not in pidfds:
                try:
                    pidfds[pid] = os.pidfd_open(pid)
                except ProcessLookupError:
                    pass

    def close(self) -> None:
        """Kill what is left and remove the session's cgroup; idempotent.

        Members killed here leave their cgroup when they exit; a cgroup
        that still holds an exiting member is left for the next session's
        leftover sweep rather than waited for without a checkpoint.
        """
        if self._closed:
            return
        self._closed = True
        if self.group.populated():
            self.group.kill()
        try:
            self.group.remove()
        except OSError:
            pass


@asynccontextmanager
async def open_cgroup_containment(session_id: str) -> AsyncIterator[CgroupContainment]:
    """A session's cgroup for the duration of the block, removed after it.

    Raises:
        CgroupUnavailableError: This process may not create cgroups here;
            the message says why and what would make it possible.
    """
    support = _cgroup.probe()
    if not support.available or support.parent is None:
        raise CgroupUnavailableError(f"cgroup containment is not available: {support.reason}")
    await _cgroup.clean_leftovers(support.parent)
    containment = CgroupContainment(Cgroup.create_session(support.parent, session_id))
    try:
        yield containment
    finally:
        with trio.CancelScope(shield=True):
            if containment.group.populated():
                containment.group.kill()
                with trio.move_on_after(5):
                    await containment.group.wait_empty()
        containment.close()


CONTAINMENTS = ("auto", "cgroup", "process-group")
"""The values of ``open_session(containment=...)``."""


async def choose_containment(mode: str, session_id: str) -> CgroupContainment | None:
    """The session's cgroup for ``mode``, or ``None`` for process groups.

    ``"auto"`` takes a cgroup where one can be made and falls back to
    process groups otherwise; ``"cgroup"`` raises instead of falling back.

    Raises:
        CgroupUnavailableError: ``mode`` is ``"cgroup"`` and this process
            may not make one here (the message says why and what to do).
    """
    if mode == "process-group":
        return None
    support = _cgroup.probe()
    if not support.available or support.parent is None:
        if mode == "cgroup":
            raise CgroupUnavailableError(f"containment='cgroup' is not available: {support.reason}")
        return None
    await _cgroup.clean_leftovers(support.parent)
    return CgroupContainment(Cgroup.create_session(support.parent, session_id))
