"""The activity check (which processes ran since the last look): counters, kept descriptors."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from tests._fakeproc import TCP_HEADER, FakeProc, inet_hex, set_schedstat, tcp_line
from tests._tree_helpers import (
    Collector,
    K,
    child,
    fake_tree_observer,
    observing,
    settle,
)
from trio_observer._events import EventCategory
from trio_observer._linux import _activity, _cgroup
from trio_observer._linux._activity import VERIFY_EVERY, ActivityWatch
from trio_observer._linux._cgroup import Cgroup
from trio_observer._linux._procfs import read_stat
from trio_observer._linux._tree import TreeObserver

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


def quiet_pair(tmp_path: Path) -> FakeProc:
    """A fake /proc with root 100 and its child 101, both with run counters."""
    fake = FakeProc(tmp_path)
    fake.add(100, 1)
    fake.add(101, 100)
    for pid in (100, 101):
        set_schedstat(fake, pid, 1000, 1)
    return fake


async def passes(clock: trio.testing.MockClock, count: int = 1) -> None:
    """Let the observer make ``count`` passes (poll_interval is 1 s here)."""
    for _ in range(count):
        clock.jump(1.0)
        await settle()


def quiet(watch: ActivityWatch, pids: list[int]) -> set[int]:
    """The pids that one look finds quiet (neither active nor due for a full look)."""
    active = watch.update(pids)
    return set(pids) - active - watch.due


async def until_quiet(watch: ActivityWatch, pids: list[int]) -> None:
    # Python is still starting up at first; a real process's state has no
    # trio event to wait on. Asleep first: two equal reads alone can be a
    # process that waited for a CPU of this busy machine in between.
    for pid in pids:
        await asleep(pid)
    with trio.fail_after(20):
        while quiet(watch, pids) != set(pids):  # noqa: ASYNC110
            await trio.sleep(0.01)


async def asleep(pid: int) -> None:
    # Blocked in its read of stdin: it cannot run until it is sent a line.
    with trio.fail_after(20):
        while (stat := read_stat("/proc", pid)) is None or stat.state != "S":  # noqa: ASYNC110
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
        assert quiet(watch, pids) == {pids[1]}
    watch.forget_all()
    assert watch.kept_fds == 0


@pytest.mark.usefixtures("no_leaks")
async def test_descriptors_are_closed_when_a_pid_is_no_longer_watched() -> None:
    watch = ActivityWatch("/proc", verify_every=10**6)
    async with sleepers(2) as procs:
        pids = [p.pid for p in procs]
        await until_quiet(watch, pids)
        kept = watch.kept_fds
        assert quiet(watch, pids[1:]) == {pids[1]}
        assert 0 < watch.kept_fds < kept
        assert quiet(watch, []) == set()
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
            while pids[2] in quiet(watch, pids):  # noqa: ASYNC110
                await trio.sleep(0.01)
    watch.forget_all()
    assert watch.kept_fds == 0


async def test_fake_descriptors_of_a_quiet_process_are_read_when_it_runs_or_verified(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    fake = quiet_pair(tmp_path)
    fake.set_fd(101, 3, "/data/a")
    collector = Collector()
    observer = fake_tree_observer(fake.path, collector, EventCategory.FILE)

    async with observing(observer):
        await settle()
        assert collector.take_files() == [(K.FILE_OPEN, 3, "/data/a")]
        # 101 was found by that scan, after the counters were read: the next
        # pass takes its baseline (and reads it once more).
        await passes(mock_clock)
        assert collector.take_files() == []
        # Counters unchanged: in this fake, 101 "did not run", so it is not
        # read again (a real process cannot open a file without running).
        fake.set_fd(101, 4, "/data/b")
        await passes(mock_clock)
        assert collector.take_files() == []
        set_schedstat(fake, 101, 1500, 2)
        await passes(mock_clock)
        assert collector.take_files() == [(K.FILE_OPEN, 4, "/data/b")]

        # What the counters cannot see is found by the periodic full look:
        # after VERIFY_EVERY quiet passes in a row, the next one reads all.
        # Here a descriptor appears in the table of 101, which did not run:
        # another process of the tree that shares the table (a clone with
        # CLONE_FILES) did, and ran.
        fake.set_fd(101, 5, "/data/c")
        set_schedstat(fake, 100, 2000, 5)
        await passes(mock_clock, VERIFY_EVERY)
        assert collector.take_files() == []
        await passes(mock_clock)
        assert collector.take_files() == [(K.FILE_OPEN, 5, "/data/c")]


async def test_fake_a_tree_that_did_not_run_is_not_walked_until_it_does(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    fake = quiet_pair(tmp_path)
    collector = Collector()
    observer = fake_tree_observer(fake.path, collector, EventCategory.PROCESS)
    async with observing(observer):
        await settle()
        await passes(mock_clock)
        assert [(e.kind, e.pid) for e in collector.events] == [(K.DESCENDANT_STARTED, 101)]
        collector.events.clear()
        # A child under a parent whose counters did not move: in this fake,
        # nothing ran, so the pass reads no stat or children at all (a real
        # process cannot fork without running). Not even the full look
        # walks the tree: it is for what other processes change.
        fake.add(102, 101)
        set_schedstat(fake, 102, 1000, 1)
        await passes(mock_clock, VERIFY_EVERY + 2)
        assert collector.events == []
        set_schedstat(fake, 101, 1500, 2)
        await passes(mock_clock)
        assert [(e.kind, e.pid, e.ppid) for e in collector.events] == [
            (K.DESCENDANT_STARTED, 102, 101)
        ]


async def test_fake_with_nothing_of_the_tree_run_the_full_look_reads_what_outsiders_change(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    fake = quiet_pair(tmp_path)
    fake.set_fd(101, 0, "pipe:[7]")
    fake.set_fd(101, 3, "/data/a")
    collector = Collector()
    observer = fake_tree_observer(fake.path, collector, EventCategory.FILE)

    async with observing(observer):
        await settle()
        await passes(mock_clock, 2)
        assert collector.take_files() == [(K.FILE_OPEN, 3, "/data/a")]
        # Nothing of the tree runs. A file renamed by someone outside the
        # tree is seen at the periodic look, as a close and an open; that
        # look is then a full one, which also finds the new descriptor.
        fake.set_fd(101, 4, "/data/b")
        fake.set_fd(101, 3, "/data/a-renamed")
        await passes(mock_clock, VERIFY_EVERY + 1)
        assert collector.take_files() == [
            (K.FILE_CLOSE, 3, "/data/a"),
            (K.FILE_OPEN, 3, "/data/a-renamed"),
            (K.FILE_OPEN, 4, "/data/b"),
        ]
        # A descriptor that appears while nothing of the tree runs (only a
        # process of the tree sharing the table could add it, and it would
        # have run): the look reads the paths' links alone, unchanged.
        fake.set_fd(101, 5, "/data/c")
        await passes(mock_clock, VERIFY_EVERY + 1)
        assert collector.take_files() == []
        # Once a process of the tree has run, the next look is in full.
        set_schedstat(fake, 100, 2000, 2)
        await passes(mock_clock, VERIFY_EVERY + 1)
        assert collector.take_files() == [(K.FILE_OPEN, 5, "/data/c")]


async def test_fake_a_held_socket_is_looked_at_in_full_with_nothing_of_the_tree_run(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    fake = FakeProc(tmp_path)
    fake.add(100, 1)
    set_schedstat(fake, 100, 1000, 1)
    fake.set_fd(100, 3, "socket:[555]")
    unbound = tcp_line(0, inet_hex("0.0.0.0", 0), inet_hex("0.0.0.0", 0), 0x07, 555)
    fake.set_net(100, "tcp", TCP_HEADER + unbound)
    collector = Collector()
    observer = fake_tree_observer(fake.path, collector, EventCategory.NETWORK)
    async with observing(observer):
        await settle()
        await passes(mock_clock)
        assert collector.events == []  # not bound yet
        # Another holder of the socket listens on it: the table says so.
        listening = tcp_line(0, inet_hex("127.0.0.1", 8080), inet_hex("0.0.0.0", 0), 0x0A, 555)
        fake.set_net(100, "tcp", TCP_HEADER + listening)
        await passes(mock_clock, VERIFY_EVERY + 1)
        assert [(e.kind, e.fd, e.local_address) for e in collector.events] == [
            (K.SOCKET_LISTEN, 3, "127.0.0.1:8080")
        ]


@pytest.mark.parametrize("seen_alive", [True, False], ids=["seen-alive", "never-seen-alive"])
async def test_fake_zombie_of_a_quiet_parent_is_reported_once(
    tmp_path: Path, mock_clock: trio.testing.MockClock, seen_alive: bool
) -> None:
    # The parent neither reaps its zombie nor runs: its children are read
    # again only by the periodic full look, which must know the zombie.
    fake = FakeProc(tmp_path)
    fake.add(100, 1)
    set_schedstat(fake, 100, 1000, 1)
    if seen_alive:
        fake.add(101, 100)
        set_schedstat(fake, 101, 1000, 1)
    collector = Collector()
    observer = fake_tree_observer(fake.path, collector, EventCategory.PROCESS)
    async with observing(observer):
        await settle()
        await passes(mock_clock)
        fake.add(101, 100, state="Z", exit_status=7 << 8)
        set_schedstat(fake, 101 if seen_alive else 100, 2000, 2)
        await passes(mock_clock, 2 * VERIFY_EVERY + 3)
    assert [(e.kind, e.pid, e.exit_code) for e in collector.events] == [
        (K.DESCENDANT_STARTED, 101, None),
        (K.DESCENDANT_EXITED, 101, 7),
    ]


async def test_fake_zero_counters_prove_nothing(tmp_path: Path) -> None:
    fake = FakeProc(tmp_path)
    fake.add(100, 1)
    set_schedstat(fake, 100, 0, 0)  # a kernel without CONFIG_SCHED_INFO
    watch = ActivityWatch(fake.path)
    assert quiet(watch, [100]) == set()
    assert quiet(watch, [100]) == set()
    set_schedstat(fake, 100, 1000, 3)
    assert quiet(watch, [100]) == set()  # first baseline
    assert quiet(watch, [100]) == {100}
    assert quiet(watch, []) == set()  # forgotten
    assert quiet(watch, [100]) == set()


async def test_a_real_sleeping_process_is_quiet_until_it_runs() -> None:
    script = "import sys\nfor line in sys.stdin:\n    print('ack', flush=True)\n"
    watch = ActivityWatch("/proc", verify_every=1000)
    async with child(script) as proc:
        await proc.send("hello")
        with trio.fail_after(10):
            assert await proc.receive_line() == "ack"
            # It goes back to sleep in read() after printing; wait until the
            # counters stop moving (a real process, the real clock).
            while not quiet(watch, [proc.pid]):  # noqa: ASYNC110  # a real process's state has no trio event
                await trio.sleep(0.01)  # a real process: no event
        assert quiet(watch, [proc.pid]) == {proc.pid}
        await proc.send("again")
        with trio.fail_after(10):
            assert await proc.receive_line() == "ack"
        # It ran after the last look: active, whatever state it is in now.
        assert quiet(watch, [proc.pid]) == set()


CGROUP = _cgroup.probe()
needs_cgroup = pytest.mark.skipif(
    not CGROUP.available, reason=f"no writable cgroup v2 hierarchy: {CGROUP.reason}"
)

# Opens the file named on each line it reads, keeps it open, and says so.
OPENER = """
import sys
held = []
print("ready", flush=True)
for line in sys.stdin:
    held.append(open(line.strip()))
    print("opened", flush=True)
"""


@asynccontextmanager
async def in_a_cgroup(pid: int) -> AsyncIterator[Cgroup]:
    assert CGROUP.parent is not None
    group = Cgroup.create_session(CGROUP.parent, "feedbeef")
    try:
        group.leaf(f"p{pid}").place(pid)
        yield group
    finally:
        group.kill()
        with trio.CancelScope(shield=True), trio.fail_after(10):
            await group.wait_empty()
        group.remove()


@needs_cgroup
@pytest.mark.usefixtures("no_leaks")
async def test_the_cgroup_check_sees_a_run_and_is_bounded() -> None:
    watch = ActivityWatch("/proc", verify_every=5)
    try:
        async with child(OPENER) as proc, in_a_cgroup(proc.pid) as group:
            assert await proc.receive_line() == "ready"
            cpu_stat = str(group.path / "cpu.stat")
            await asleep(proc.pid)
            assert not watch.group_unchanged(cpu_stat)  # the first read: a baseline
            assert watch.group_unchanged(cpu_stat)
            await proc.send("/dev/zero")
            assert await proc.receive_line() == "opened"
            await asleep(proc.pid)
            # It ran (and has left its CPU, so its time is added).
            assert not watch.group_unchanged(cpu_stat)
            # At most verify_every passes in a row are skipped.
            for _ in range(5):
                assert watch.group_unchanged(cpu_stat)
                watch.skip_pass()
            assert not watch.group_unchanged(cpu_stat)
            watch.update([])
            assert watch.group_unchanged(cpu_stat)
            watch.forget_all()
            assert not watch.group_unchanged(cpu_stat)  # a new baseline
    finally:
        watch.forget_all()


@needs_cgroup
@pytest.mark.usefixtures("no_leaks")
async def test_a_quiet_cgroup_skips_passes_and_loses_no_open(tmp_path: Path) -> None:
    opened_file = tmp_path / "data"
    opened_file.touch()
    collector = Collector()
    async with child(OPENER) as proc, in_a_cgroup(proc.pid) as group:
        observer = TreeObserver(
            emit=collector.emit,
            categories=frozenset({EventCategory.PROCESS, EventCategory.FILE}),
            backend="poll",
            cgroup=lambda: group,
        )
        observer.add_root(proc.pid)
        assert await proc.receive_line() == "ready"
        await asleep(proc.pid)
        await observer._pass(scan_tree=True)

        async def passes_until(done: Callable[[int], bool]) -> None:
            with trio.fail_after(20):
                while True:
                    before = observer.statistics().polls
                    await observer._pass(scan_tree=True, may_skip=True)
                    if done(observer.statistics().polls - before):
                        return
                    await trio.sleep(0.01)

        # Asleep in its read: the passes read nothing but cpu.stat.
        await observer._pass(scan_tree=True, may_skip=True)
        assert observer.statistics().polls == 1
        await observer._pass(scan_tree=True, may_skip=True)
        assert observer.statistics().polls == 1
        await proc.send(str(opened_file))
        assert await proc.receive_line() == "opened"
        await passes_until(lambda read: any(e.path == str(opened_file) for e in collector.events))
        opened = [
            e for e in collector.events if e.kind is K.FILE_OPEN and e.path == str(opened_file)
        ]
        assert [(e.pid, e.path) for e in opened] == [(proc.pid, str(opened_file))]
        observer._activity.forget_all()  # what run() does when it stops


@pytest.mark.usefixtures("no_leaks")
async def test_a_file_renamed_by_another_process_is_seen_while_the_tree_sleeps(
    tmp_path: Path,
) -> None:
    held = tmp_path / "held"
    held.touch()
    collector = Collector()
    async with child(OPENER) as proc:
        observer = TreeObserver(
            emit=collector.emit, categories=frozenset({EventCategory.FILE}), backend="poll"
        )
        observer.add_root(proc.pid)
        try:
            assert await proc.receive_line() == "ready"
            await proc.send(str(held))
            assert await proc.receive_line() == "opened"
            await asleep(proc.pid)
            with trio.fail_after(20):
                while not any(e.path == str(held) for e in collector.events):
                    await observer._pass(scan_tree=True)
                    await trio.sleep(0.01)
            # The tree sleeps in its read; this process, outside it, renames
            # the file: the link changes though nothing of the tree ran.
            moved = tmp_path / "moved"
            before = len(collector.events)
            held.rename(moved)
            for _ in range(VERIFY_EVERY + 2):
                await observer._pass(scan_tree=True)
            assert [(e.kind, e.path) for e in collector.events[before:]] == [
                (K.FILE_CLOSE, str(held)),
                (K.FILE_OPEN, str(moved)),
            ]
        finally:
            observer._activity.forget_all()
