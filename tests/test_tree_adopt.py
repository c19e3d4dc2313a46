"""Orphans re-parented to this process: adopted by the marker in their environment, and reaped."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from subprocess import PIPE

import pytest
import trio
import trio.testing

import trio_observer
from tests._tree_helpers import PROCESS, PY, Collector, K, observing
from trio_observer import EventCategory, ObserverEvent
from trio_observer._events import EventGrade
from trio_observer._linux import _cgroup, _connector
from trio_observer._linux._connector import ConnectorUnavailableError
from trio_observer._linux._procfs import read_stat
from trio_observer._linux._tree import TreeObserver

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc")


MARKER = b"TRIO_OBSERVER_SESSION=test-tree2"

ORPHAN_PARENT_SCRIPT = f"""
import subprocess, sys
# A new session: the grandchild leaves the root's process group, so only the
# marker in its environment ties it to the tree once its parent is gone.
orphan = subprocess.Popen(
    [{PY!r}, "-c", "import sys; sys.stdin.readline(); sys.exit(5)"],
    start_new_session=True,
)
print(orphan.pid, flush=True)
# Exit at once, without waiting: the orphan is re-parented to the test
# process (a child subreaper) and keeps the pipe to its stdin.
"""


def pid_exists(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


def kill_and_reap(pid: int) -> None:
    """Clean up an orphan a failed test left behind (it is our child)."""
    if pid and pid_exists(pid):
        os.kill(pid, 9)
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


def zombie_children_of(pid: int) -> set[int]:
    out = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            stat = read_stat("/proc", int(name))
            if stat is not None and stat.ppid == pid and stat.is_dead:
                out.add(stat.pid)
    return out


@pytest.mark.usefixtures("no_leaks")
async def test_poll_adopts_a_marked_orphan_and_reaps_it() -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_child_subreaper, pr_get_child_subreaper = 36, 37
    was = ctypes.c_int(0)
    assert libc.prctl(pr_get_child_subreaper, ctypes.byref(was), 0, 0, 0) == 0
    assert libc.prctl(pr_set_child_subreaper, 1, 0, 0, 0) == 0
    collector = Collector()
    observer = TreeObserver(
        emit=collector.emit,
        categories=PROCESS,
        backend="poll",
        adopt_marker=MARKER,
        reap_adopted=True,
    )
    env = {**os.environ, MARKER.decode().partition("=")[0]: MARKER.decode().partition("=")[2]}
    process = await trio.lowlevel.open_process(
        [PY, "-c", ORPHAN_PARENT_SCRIPT], stdin=PIPE, stdout=PIPE, env=env
    )
    observer.add_root(process.pid)
    orphan = 0
    try:
        assert process.stdout is not None
        with trio.fail_after(10):
            data = b""
            while not data.endswith(b"\n"):
                data += await process.stdout.receive_some()
            orphan = int(data)
            await process.wait()  # the root is the caller's to reap
        assert read_stat("/proc", orphan) is not None
        assert read_stat("/proc", orphan).ppid == os.getpid()  # type: ignore[union-attr]
        async with observing(observer):
            with trio.fail_after(10):
                started = await collector.wait_for(
                    lambda e: e.kind is K.DESCENDANT_STARTED and e.pid == orphan
                )
            assert started.grade is EventGrade.INFERRED
            assert started.ppid == os.getpid()
            # Its own session and group: no root shares them.
            assert started.root_pid is None
            assert observer.known_descendants() == {orphan}
            # Let it go: it reads the root's old stdin pipe, which we hold.
            assert process.stdin is not None
            await process.stdin.send_all(b"go\n")
            with trio.fail_after(10):
                exited = await collector.wait_for(
                    lambda e: e.kind is K.DESCENDANT_EXITED and e.pid == orphan
                )
                assert exited.exit_code == 5
                # Reaped right after the event was emitted, in the same pass:
                # once every task is blocked, no zombie of ours is left.
                await trio.testing.wait_all_tasks_blocked()
                assert orphan not in zombie_children_of(os.getpid())
                assert not pid_exists(orphan)
        assert collector.kinds(orphan) == [K.DESCENDANT_STARTED, K.DESCENDANT_EXITED]
    finally:
        with trio.CancelScope(shield=True):
            kill_and_reap(orphan)
            process.kill()
            await process.wait()
            for stream in (process.stdin, process.stdout):
                if stream is not None:
                    await stream.aclose()
            libc.prctl(pr_set_child_subreaper, was.value, 0, 0, 0)


@pytest.mark.usefixtures("no_leaks")
async def test_unmarked_orphans_are_not_adopted(mock_clock: trio.testing.MockClock) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    was = ctypes.c_int(0)
    assert libc.prctl(37, ctypes.byref(was), 0, 0, 0) == 0
    assert libc.prctl(36, 1, 0, 0, 0) == 0
    collector = Collector()
    observer = TreeObserver(
        emit=collector.emit, categories=PROCESS, backend="poll", adopt_marker=MARKER
    )
    process = await trio.lowlevel.open_process(
        [PY, "-c", ORPHAN_PARENT_SCRIPT], stdin=PIPE, stdout=PIPE
    )
    observer.add_root(process.pid)
    orphan = 0
    try:
        assert process.stdout is not None
        with trio.fail_after(10):
            data = b""
            while not data.endswith(b"\n"):
                data += await process.stdout.receive_some()
            orphan = int(data)
            await process.wait()
        async with observing(observer):
            # Two full scans after the first one, each driven by the clock:
            # the orphan was looked at.
            for _ in range(2):
                polls = observer.statistics().polls
                mock_clock.jump(0.02)
                await trio.testing.wait_all_tasks_blocked()
                assert observer.statistics().polls == polls + 1
            assert orphan not in observer.known_descendants()
            assert orphan not in {e.pid for e in collector.events}
    finally:
        with trio.CancelScope(shield=True):
            kill_and_reap(orphan)
            process.kill()
            await process.wait()
            for stream in (process.stdin, process.stdout):
                if stream is not None:
                    await stream.aclose()
            libc.prctl(36, was.value, 0, 0, 0)


# The root stays; its child double-forks out of the root's group and session
# with an empty environment (no marker) and leaves the grandchild orphaned
# (re-parented to the session, a child subreaper) before any scan can see it
# under its parent. The grandchild's command line carries a token to find it.
DOUBLE_FORK_ROOT = """
import subprocess, sys, time
grandchild = "import os, sys, time\\nif os.fork():\\n    os._exit(0)\\ntime.sleep(60)\\n"
subprocess.run(["env", "-i", "setsid", sys.executable, "-c", grandchild, sys.argv[1]])
time.sleep(60)
"""


@pytest.mark.skipif(not _cgroup.probe().available, reason="no writable cgroup v2 hierarchy here")
async def test_cgroup_membership_finds_an_env_i_setsid_double_fork(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Polling, as without CAP_NET_ADMIN: the connector would see the forks.
    def refuse(*, ack_timeout: float = 1.0) -> None:
        raise ConnectorUnavailableError("refused by the test: polling")

    monkeypatch.setattr(_connector, "open_connector_socket", refuse)
    token = f"token-{os.getpid()}-{tmp_path.name}"
    async with (
        trio_observer.open_session(
            containment="cgroup", track_descendants=True, grace_period=1, poll_interval=0.05
        ) as session,
        session.observers.subscribe([EventCategory.PROCESS], capacity=1024) as events,
    ):
        root = await session.start_process([PY, "-c", DOUBLE_FORK_ROOT, token])
        with trio.fail_after(30):
            async for event in events:
                assert isinstance(event, ObserverEvent)
                if (
                    event.kind is K.DESCENDANT_STARTED
                    and event.argv is not None
                    and token in event.argv
                    and event.ppid != root.pid  # the orphan, not the intermediate
                ):
                    break
            orphan, middle = event, event.ppid
            if middle != os.getpid():
                # Seen before the process that forked it had exited: the
                # re-parenting comes with that exit.
                async for event in events:
                    assert isinstance(event, ObserverEvent)
                    if event.kind is K.DESCENDANT_EXITED and event.pid == middle:
                        break
        event = orphan
        assert session._tree.statistics().backend == "poll"
        stat = read_stat("/proc", event.pid)
        assert stat is not None
        # Out of the root's group and session, and not its child any more.
        assert (stat.ppid, stat.pgid == root.pid, stat.sid == root.pid) == (
            os.getpid(),
            False,
            False,
        )
        assert event.root_pid == root.pid
        assert event.pid in session._tree.known_descendants()
        # The root (and, by the cgroup, the grandchild) ends with the session.
        root.kill()
