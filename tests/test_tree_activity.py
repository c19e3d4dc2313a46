"""The activity check's kept schedstat descriptors, on real processes."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from trio_observer._linux import _activity
from trio_observer._linux._activity import ActivityWatch

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc")

SLEEPER = "import sys; sys.stdin.read()"


@asynccontextmanager
async def sleepers(count: int) -> AsyncIterator[list[trio.Process]]:
    """Start ``count`` processes that block reading stdin; kill and reap them after."""
    procs = [
        await trio.lowlevel.open_process([sys.executable, "-c", SLEEPER], stdin=-1)
        for _ in range(count)
    ]
    try:
        yield procs
    finally:
        with trio.CancelScope(shield=True):
            for proc in procs:
                proc.kill()
                await proc.wait()
                assert proc.stdin is not None
                await proc.stdin.aclose()


async def until_quiet(watch: ActivityWatch, pids: list[int]) -> None:
    # Python is still starting up at first; a real process's state has no
    # trio event to wait on.
    with trio.fail_after(20):
        while watch.update(pids) != set(pids):  # noqa: ASYNC110
            await trio.sleep(0.01)


@pytest.mark.usefixtures("no_leaks")
async def test_a_kept_descriptor_of_a_reaped_process_does_not_read_as_quiet() -> None:
    watch = ActivityWatch("/proc", verify_every=10**6)
    async with sleepers(2) as procs:
        pids = [p.pid for p in procs]
        await until_quiet(watch, pids)
        assert watch.kept_fds >= 2
        procs[0].kill()
        await procs[0].wait()
        # Its descriptor now reads nothing (the task is gone), so it cannot
        # pass for quiet, nor ever read a later process with the same pid.
        assert watch.update(pids) == {pids[1]}
    watch.forget_all()
    assert watch.kept_fds == 0


@pytest.mark.usefixtures("no_leaks")
async def test_descriptors_are_closed_when_a_pid_is_no_longer_watched() -> None:
    watch = ActivityWatch("/proc", verify_every=10**6)
    async with sleepers(2) as procs:
        pids = [p.pid for p in procs]
        await until_quiet(watch, pids)
        kept = watch.kept_fds
        assert watch.update(pids[1:]) == {pids[1]}
        assert 0 < watch.kept_fds < kept
        assert watch.update([]) == set()
        assert watch.kept_fds == 0


@pytest.mark.usefixtures("no_leaks")
async def test_past_the_bound_threads_are_read_by_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_activity, "MAX_KEPT_FDS", 1)
    watch = ActivityWatch("/proc", verify_every=10**6)
    async with sleepers(3) as procs:
        pids = [p.pid for p in procs]
        await until_quiet(watch, pids)
        assert watch.kept_fds == 1
        # The ones read by path still see a process that runs.
        assert procs[2].stdin is not None
        await procs[2].stdin.send_all(b"x")
        with trio.fail_after(20):
            while pids[2] in watch.update(pids):  # noqa: ASYNC110
                await trio.sleep(0.01)
    watch.forget_all()
    assert watch.kept_fds == 0
