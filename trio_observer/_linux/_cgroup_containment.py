"""The cgroup containment strategy a session holds: place, stop, members, close.

A session (or the CLI) opens one with :func:`choose_containment`; it cleans
up leftovers of crashed sessions, makes the session's cgroup and gives
every placed process a leaf of its own (per-process accounting and kill).
What a process cost is read by ``_cgroup_usage``.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, final

import trio

from .._grace import Grace, terminate_then_kill
from . import _cgroup, _cgroup_leftovers
from ._cgroup import Cgroup, CgroupUnavailableError

if TYPE_CHECKING:
    from .._limits import Limits

_BATCH = 64
"""Leaves of reaped processes removed together (see ``release``)."""


def _reap_if_ours(pid: int, pidfd: int, exit_codes: dict[int, int] | None) -> None:
    try:
        result = os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG)
    except ChildProcessError:
        return  # not ours, or reaped already by its owner
    if result is None or exit_codes is None:
        return
    # Killed or dumped: -signal, as subprocess and the rest of the session say.
    code = result.si_status if result.si_code == os.CLD_EXITED else -result.si_status
    exit_codes[pid] = code


@final
class CgroupContainment:
    """Every process of a session in a leaf of the session's cgroup."""

    def __init__(self, group: Cgroup) -> None:
        self.group = group
        # Leaves are made and filled relative to the session's directory:
        # one path lookup fewer per file on the spawn path.
        dir_fd = os.open(group.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            # Held until close (or death): a session in another pid
            # namespace cannot tell from the name whether we live.
            _cgroup_leftovers.lock_session(dir_fd)
        except BaseException:
            os.close(dir_fd)
            raise
        self._dir_fd: int | None = dir_fd
        self._leaves: dict[int, Cgroup] = {}
        self._released: list[str] = []
        # The leaf the next process goes into, made ahead: (name, its
        # cgroup.procs opened for writing).
        self._spare: tuple[str, int] | None = None
        self._made = 0

    def place(self, pid: int, limits: Limits | None = None) -> Cgroup:
        """Move ``pid`` (and any child it already has) into a leaf of its own.

        Called right after the vfork-based spawn returns: the window in which
        the child could fork outside is the time between ``execve`` and this
        write, before the program's own start-up has run. The leaf was made
        (and its ``cgroup.procs`` opened) after the previous placement, so
        the window is one ``write``; the next leaf is made after it, while
        this child is still starting up. ``limits`` are written on the leaf
        before the move, so the process never runs in it unlimited (their
        controllers were enabled before the spawn, see
        ``_cgroup_limits.prepare``).

        Raises:
            trio.ClosedResourceError: The containment was closed.
        """
        self.prepare()
        assert self._spare is not None
        name, procs_fd = self._spare
        self._spare = None
        leaf = Cgroup(self.group.path / name, self.group)
        try:
            if limits is not None:
                leaf.set_limits(limits)
            # Stopped while it is moved: the write waits for an RCU grace
            # period (below), tens of milliseconds on a busy machine, and a
            # running child could fork and detach a daemon meanwhile, born
            # outside. A fork racing the SIGSTOP is restarted by the kernel
            # after the stop, so it is born inside. The pid is our unreaped
            # child, so it cannot have been reused.
            os.kill(pid, signal.SIGSTOP)
            try:
                _cgroup.move_tree(procs_fd, pid)
            finally:
                os.kill(pid, signal.SIGCONT)
        finally:
            os.close(procs_fd)
        self._leaves[pid] = leaf
        # Removing leaves waits for the kernel's cgroup lock, which a
        # removal holds a while after it returns: in batches, after the move.
        if len(self._released) >= _BATCH:
            self._remove_released()
        with contextlib.suppress(OSError):
            # Failing here (out of fds, say) is not this process's fault:
            # prepare() before the next spawn raises it, before anything runs.
            self.prepare()
        return leaf

    def prepare(self) -> None:
        """Make the leaf the next :meth:`place` uses, unless it is made already.

        The session calls it before each spawn, so that what can fail here
        (``mkdir``, ``open``) fails before there is a process to leave behind.

        Raises:
            OSError: The leaf could not be made.
            trio.ClosedResourceError: The containment was closed.
        """
        if self._spare is not None:
            return
        dir_fd = self._open_dir()
        self._made += 1
        name = f"l{self._made}"
        os.mkdir(name, dir_fd=dir_fd)
        try:
            procs_fd = os.open(f"{name}/cgroup.procs", os.O_WRONLY | os.O_CLOEXEC, dir_fd=dir_fd)
        except OSError:
            os.rmdir(name, dir_fd=dir_fd)
            raise
        self._spare = (name, procs_fd)

    def _open_dir(self) -> int:
        if self._dir_fd is None:
            raise trio.ClosedResourceError("this session's cgroup has been removed")
        return self._dir_fd

    def leaf_of(self, pid: int) -> Cgroup | None:
        """The leaf a placed process lives in (until it is released)."""
        return self._leaves.get(pid)

    def release(self, pid: int) -> None:
        """Forget the leaf of a reaped process; it is removed in a later batch.

        Not at once: after an ``rmdir`` the kernel holds its cgroup lock
        for an RCU grace period, and the next placement would wait for it.
        The leaves are removed 64 at a time, after a placement, and the rest
        when the session closes. A leaf that still holds a descendant stays
        until then.
        """
        leaf = self._leaves.pop(pid, None)
        if leaf is not None:
            self._released.append(leaf.path.name)

    def _remove_released(self) -> None:
        dir_fd = self._open_dir()
        kept: list[str] = []
        for name in self._released:
            try:
                os.rmdir(name, dir_fd=dir_fd)
            except FileNotFoundError:
                pass
            except OSError:
                # EBUSY: a descendant is still inside. Tried again at close;
                # never an error here, after a process was placed.
                kept.append(name)
        self._released = kept

    def members(self) -> list[int]:
        """Every living process of the session, from ``cgroup.procs``.

        One read per leaf, no ``/proc`` scan: the kernel's own list.
        """
        return self.group.members()

    def populated(self) -> bool:
        """Whether any process is still in the session's cgroup (one read)."""
        return self.group.populated()

    async def stop(
        self, grace_period: float | Grace, exit_codes: dict[int, int] | None = None
    ) -> None:
        """Freeze, SIGTERM all, thaw, grace on the trio clock, ``cgroup.kill``, wait, reap.

        The grace is :func:`~trio_observer._grace.terminate_then_kill`'s, so
        a :class:`Grace` that is hurried (a Ctrl-C during the teardown) ends
        it here as everywhere else. Members are listed while frozen (nobody
        can fork then) and held by pidfds, so that those that are this
        process's children (orphans adopted as child subreaper) are reaped
        and not left as zombies; ``populated 0`` comes before a process
        becomes a zombie. The exit code of each one reaped goes into
        ``exit_codes``, so the tree observer can report it.
        """
        group = self.group
        if not group.populated():
            await trio.lowlevel.checkpoint()
            return
        pidfds: dict[int, int] = {}

        def send(sig: int) -> None:
            # Frozen, so that the list is complete: a member cannot fork
            # between the read of cgroup.procs and the signal.
            group.freeze()
            try:
                self._hold(pidfds)
                if sig == signal.SIGKILL:
                    group.kill()
                else:
                    for fd in pidfds.values():
                        try:
                            signal.pidfd_send_signal(fd, sig)
                        except ProcessLookupError:
                            pass
            finally:
                # Frozen members get the signal once they run again.
                group.thaw()

        try:
            await terminate_then_kill(send, group.wait_empty, grace_period)
            for pid, fd in pidfds.items():
                await trio.lowlevel.wait_readable(fd)
                _reap_if_ours(pid, fd, exit_codes)
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
        if self._dir_fd is None:
            return
        fd, self._dir_fd = self._dir_fd, None
        os.close(fd)
        made = self._released + [leaf.path.name for leaf in self._leaves.values()]
        if self._spare is not None:
            os.close(self._spare[1])
            made.append(self._spare[0])
            self._spare = None
        self._leaves.clear()
        self._released.clear()
        if self.group.populated():
            self.group.kill()
        try:
            self.group.remove(made)
        except OSError:
            pass


@asynccontextmanager
async def open_cgroup_containment(session_id: str) -> AsyncIterator[CgroupContainment]:
    """A session's cgroup for the duration of the block, removed after it.

    What is still inside when the block ends is killed and waited for (at
    most 5 seconds) before the cgroup is removed.

    Raises:
        CgroupUnavailableError: This process may not create cgroups here;
            the message says why and what would make it possible.
    """
    containment = await choose_containment("cgroup", session_id)
    assert containment is not None
    try:
        yield containment
    finally:
        with trio.CancelScope(shield=True):
            if containment.populated():
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
    for kept in (True, False):
        support = _cgroup.probe()
        if not support.available or support.parent is None:
            if mode == "cgroup":
                raise CgroupUnavailableError(
                    f"containment='cgroup' is not available: {support.reason}"
                )
            return None
        await _cgroup_leftovers.clean_leftovers(support.parent)
        try:
            group = Cgroup.create_session(support.parent, session_id)
        except OSError:
            if not kept:
                raise
            # The probe's success is kept per process (see probe): what
            # held then may not now, so it is tried again before failing.
            _cgroup.forget_probe()
            continue
        return CgroupContainment(group)
    raise AssertionError("unreachable")
