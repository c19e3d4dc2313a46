"""Opening and closing a session: its containment, the subreaper, its nursery.

:func:`open_session` chooses the containment (a cgroup or process groups)
before the nursery opens, holds the child-subreaper flag while the session
lives, and on the way out has the :class:`~trio_observer.Session` tear its
trees down, all under KI protection (``_ki.py``).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from ._checks import check_seconds
from ._ki import ki_protected_context
from ._limits import Limits, check_limits
from ._linux import CONTAINMENTS, CgroupContainment, choose_limited_containment, subreaper
from ._session import Session


@ki_protected_context
async def open_session(
    *,
    grace_period: float = 5.0,
    poll_interval: float = 0.02,
    track_descendants: bool = False,
    containment: str = "auto",
    limits: Limits | None = None,
    move_self_to_leaf: bool = False,
) -> AsyncIterator[Session]:
    """Open a session: a nursery-like scope for processes.

    ::

        async with trio_observer.open_session() as session:
            process = await session.start_process(["make", "test"])
            await process.wait()

    Leaving the block waits for every process the session started, like a
    nursery waits for its tasks. Cancelling the session (its
    :attr:`~Session.cancel_scope`, an outer cancellation, or an exception in
    the block) stops every process tree: SIGTERM to its process group, then
    SIGKILL after ``grace_period`` seconds. Either way, before the block
    returns, whatever the processes left behind (members of their process
    groups, orphans adopted by this process as child subreaper) is stopped
    the same way and reaped; the tree observer reports the teardown (every
    exit and close it saw, see ``docs/observation.md``); then every observer
    sink is closed, so consumers' ``async for`` loops end, and the session's
    pipes are closed. A consumer that must see the teardown of a cancelled
    session opens its sink outside the block (see ``docs/guide.md``).

    A KeyboardInterrupt (Ctrl-C) that arrives during this teardown does not
    skip it: it ends the grace period, so everything still running and
    every leftover gets SIGKILL at once, and it is raised once the sweep
    is done. However often Ctrl-C is pressed, the teardown still stops and
    reaps the whole tree, with no more waiting than SIGKILL and the
    observer's last drain take.

    Args:
      grace_period: Seconds a process tree gets between SIGTERM and
        SIGKILL. The default, 5 seconds, is what most service managers give;
        it runs on the trio clock, so ``MockClock`` can skip it in tests.
      poll_interval: Seconds of the trio clock between two scans of the
        process tree, while a sink wants ``PROCESS``, ``FILE`` or
        ``NETWORK`` events (see ``docs/observation.md``). 20 ms notices a
        short compiler run without costing more than a few percent of a core.
      track_descendants: Follow the process tree for the whole session, even
        with no sink for ``PROCESS`` events. Off by default, because
        observation should cost nothing unless asked for. Turn it on when
        processes may daemonize (leave the session's process group *and*
        session, then outlive their parent): the session then knows them,
        stops them at the end, and reaps them as soon as they exit. Without
        it, such an orphan that exits before the session ends stays a zombie
        child of this process, because a zombie cannot be told apart from a
        child that other code in the program started.
      containment: How the session holds its processes (see
        ``docs/containment.md``). ``"auto"`` (the default): a cgroup where
        this process may make one, else process groups, as
        ``negotiate_capabilities().containment`` says. ``"cgroup"``: a
        cgroup v2 of the session's own with a leaf per process, stopped by
        ``cgroup.kill``; a process that leaves its group and clears its
        environment is still caught, and an error says why where no cgroup
        can be made. ``"process-group"``: process groups and an environment
        marker only; ``env -i setsid`` escapes them (see ``docs/guide.md``).
      limits: A :class:`Limits` on the session's cgroup: all its processes
        and their descendants together (``start_process`` takes limits for
        one process too). Needs cgroup containment; with ``"auto"`` a limit
        makes a cgroup required rather than fall back to process groups.
        The controllers are enabled in this process's own cgroup, where
        they stay on after the session.
      move_self_to_leaf: Allow the session to move this process into a
        leaf cgroup of its own (``trio-observer-self``, beside the session
        cgroups) when a limit's controller must be enabled in this
        process's cgroup and this process is the only one in it: the
        kernel enables controllers only for the children of a cgroup that
        holds no processes. Off by default, so that nothing is moved
        without being asked; the error then says what to do.

    Raises:
      TypeError: ``grace_period`` or ``poll_interval`` is not a number,
        ``track_descendants`` or ``move_self_to_leaf`` is not a bool, or
        ``limits`` is not a :class:`Limits` (its fields are checked when it
        is built).
      ValueError: ``grace_period`` is negative, NaN or an int too large for
        a float (``math.inf`` waits for SIGTERM forever); ``poll_interval``
        is not a finite number of seconds > 0; ``containment`` is not one of
        ``"auto"``, ``"cgroup"``, ``"process-group"``; ``limits`` with
        ``containment="process-group"``.
      RuntimeError: ``containment="cgroup"`` (or ``limits``) where no cgroup
        can be made, or a limit's controller cannot be enabled; the message
        says why (for example the controller is bound to cgroup v1) and
        what would make it possible.
    """
    grace_period = check_seconds("grace_period", grace_period)
    poll_interval = check_seconds(
        "poll_interval", poll_interval, positive=True, allow_infinite=False
    )
    if not isinstance(track_descendants, bool):
        raise TypeError(
            f"track_descendants must be True or False, not {type(track_descendants).__name__}"
        )
    if not isinstance(containment, str) or containment not in CONTAINMENTS:
        raise ValueError(
            f"containment must be one of {', '.join(map(repr, CONTAINMENTS))}, got {containment!r}"
        )
    checked_limits = check_limits(limits)
    if not isinstance(move_self_to_leaf, bool):
        raise TypeError(
            f"move_self_to_leaf must be True or False, not {type(move_self_to_leaf).__name__}"
        )
    if checked_limits is not None and containment == "process-group":
        raise ValueError(
            "limits need cgroup containment: pass containment='cgroup' (or 'auto'), "
            "not 'process-group'"
        )
    # Before the nursery opens, so that an unavailable cgroup is a plain
    # error and not one wrapped in an exception group.
    chosen = await choose_limited_containment(
        containment, os.urandom(6).hex(), checked_limits, move_self_to_leaf=move_self_to_leaf
    )
    subreaper.acquire()
    try:
        async with _session_scope(
            grace_period, poll_interval, track_descendants, chosen
        ) as session:
            session._containment_mode = containment
            session._move_self_to_leaf = move_self_to_leaf
            yield session
    finally:
        subreaper.release()
        if chosen is not None:
            chosen.close()


@asynccontextmanager
@trio.lowlevel.enable_ki_protection
async def _session_scope(
    grace_period: float,
    poll_interval: float,
    track_descendants: bool,
    chosen: CgroupContainment | None,
) -> AsyncIterator[Session]:
    async with trio.open_nursery() as nursery:
        session = Session(
            nursery,
            grace_period=grace_period,
            poll_interval=poll_interval,
            track_descendants=track_descendants,
        )
        session._containment = chosen
        try:
            yield session
        except BaseException:
            nursery.cancel_scope.cancel()
            raise
        finally:
            session._closing = True
            if session._started_any:
                done = trio.Event()
                nursery.start_soon(session._teardown, done)
                await session._wait_for_teardown(done)
            else:
                # Nothing was ever started: nothing to stop, sweep, drain or
                # report, only the sinks to close.
                session._close()
