"""The tree observer on fake /proc trees: pid reuse, reparenting, zombies, the clock, idling."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import trio
import trio.testing

from tests._fakeproc import TCP_HEADER, FakeProc, inet_hex, tcp_line
from tests._tree_helpers import PROCESS, Collector, K, fake_tree_observer, observing, settle
from trio_observer._events import EventCategory, ObserverEvent
from trio_observer._linux._tree import TreeObserver

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc")


@pytest.mark.parametrize("children_files", [True, False], ids=["children-files", "full-scan"])
async def test_pid_reuse_is_an_exit_and_a_start(
    tmp_path: Path, mock_clock: trio.testing.MockClock, children_files: bool
) -> None:
    fake = FakeProc(tmp_path, children_files=children_files)
    fake.add(100, 1, starttime=10)
    fake.add(101, 100, starttime=20)
    collector = Collector()
    observer = fake_tree_observer(fake.path, collector, EventCategory.PROCESS)
    async with observing(observer):
        await settle()
        assert collector.kinds(101) == [K.DESCENDANT_STARTED]
        # Same pid, same parent, later start time: another process.
        fake.add(101, 100, starttime=30, argv=("other",))
        mock_clock.jump(1.0)
        await settle()
        assert collector.kinds(101) == [K.DESCENDANT_STARTED] * 1 + [
            K.DESCENDANT_EXITED,
            K.DESCENDANT_STARTED,
        ]
        assert collector.events[-1].argv == ("other",)
        assert collector.events[-2].exit_code is None
        mock_clock.jump(1.0)
        await settle()
        assert len(collector.events) == 3
    assert observer.statistics().backend == "poll"


@pytest.mark.parametrize("children_files", [True, False], ids=["children-files", "full-scan"])
async def test_reparented_descendants_stay_in_the_tree(
    tmp_path: Path, mock_clock: trio.testing.MockClock, children_files: bool
) -> None:
    fake = FakeProc(tmp_path, children_files=children_files)
    fake.add(1, 0)
    fake.add(100, 1)
    fake.add(101, 100)
    fake.add(102, 101)
    fake.add(200, 1)  # not ours
    collector = Collector()
    observer = fake_tree_observer(fake.path, collector, EventCategory.PROCESS)
    async with observing(observer):
        await settle()
        assert observer.known_descendants() == {101, 102}
        # 101 exits; its child is adopted by init but is still the tree's.
        fake.remove(101)
        fake.add(102, 1)
        mock_clock.jump(1.0)
        await settle()
        assert observer.known_descendants() == {102}
        assert collector.kinds(101) == [K.DESCENDANT_STARTED, K.DESCENDANT_EXITED]
        assert collector.kinds(102) == [K.DESCENDANT_STARTED]
        fake.add(103, 102)
        mock_clock.jump(1.0)
        await settle()
        started = collector.events[-1]
        assert (started.kind, started.pid, started.ppid) == (K.DESCENDANT_STARTED, 103, 102)
        assert started.root_pid == 100
        # The root exits: its reparented descendants are still followed.
        fake.remove(100)
        fake.add(104, 103)
        mock_clock.jump(1.0)
        await settle()
        assert observer.known_descendants() == {102, 103, 104}
        assert 200 not in {e.pid for e in collector.events}


async def test_zombies_report_their_exit_status_once(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    fake = FakeProc(tmp_path)
    fake.add(100, 1)
    fake.add(101, 100)
    collector = Collector()
    observer = fake_tree_observer(fake.path, collector, EventCategory.PROCESS)
    async with observing(observer):
        await settle()
        fake.add(101, 100, state="Z", exit_status=3 << 8)
        fake.add(102, 100, state="Z", exit_status=15)  # never seen alive; SIGTERM
        for _ in range(3):
            mock_clock.jump(1.0)
            await settle()
    assert [(e.kind, e.pid, e.exit_code) for e in collector.events] == [
        (K.DESCENDANT_STARTED, 101, None),
        (K.DESCENDANT_EXITED, 101, 3),
        (K.DESCENDANT_STARTED, 102, None),
        (K.DESCENDANT_EXITED, 102, -15),
    ]


async def test_the_poll_interval_follows_the_trio_clock(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    fake = FakeProc(tmp_path)
    fake.add(100, 1)
    observer = TreeObserver(
        emit=Collector().emit, categories=PROCESS, proc_root=fake.path, poll_interval=0.5
    )
    observer.add_root(100)
    async with observing(observer):
        await settle()
        assert observer.statistics().polls == 1
        mock_clock.jump(0.49)
        await settle()
        assert observer.statistics().polls == 1
        mock_clock.jump(0.01)
        await settle()
        assert observer.statistics().polls == 2
        mock_clock.jump(5.0)  # a late wake-up scans once, it does not catch up
        await settle()
        assert observer.statistics().polls == 3


async def test_no_work_while_no_category_is_wanted(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    fake = FakeProc(tmp_path)
    fake.add(100, 1)
    fake.add(101, 100)
    collector = Collector()
    observer = TreeObserver(
        emit=collector.emit, categories=frozenset(), proc_root=fake.path, poll_interval=1.0
    )
    observer.add_root(100)
    async with observing(observer):
        for _ in range(3):
            mock_clock.jump(1.0)
            await settle()
        assert observer.statistics().polls == 0
        assert observer.statistics().backend is None
        # LIFECYCLE is not the tree's business: still idle.
        observer.set_categories(frozenset({EventCategory.LIFECYCLE}))
        mock_clock.jump(1.0)
        await settle()
        assert observer.statistics().polls == 0

        observer.set_categories(PROCESS)
        await settle()
        assert observer.statistics().polls == 1
        assert collector.kinds() == [K.DESCENDANT_STARTED]

        observer.set_categories(frozenset())
        await settle()
        fake.remove(101)
        for _ in range(3):
            mock_clock.jump(1.0)
            await settle()
        assert observer.statistics().polls == 1
        assert collector.kinds() == [K.DESCENDANT_STARTED]

        # Resuming reports what changed while nobody was looking.
        observer.set_categories(PROCESS)
        await settle()
        assert collector.kinds() == [K.DESCENDANT_STARTED, K.DESCENDANT_EXITED]


@pytest.mark.parametrize("resubscribe", [True, False], ids=["resubscribed", "left-idle"])
async def test_wait_active_survives_a_run_stopped_during_its_first_pass(
    tmp_path: Path, mock_clock: trio.testing.MockClock, resubscribe: bool
) -> None:
    fake = FakeProc(tmp_path)
    fake.add(100, 1)
    fake.add(101, 100)
    gate = trio.Event()
    emitted: list[ObserverEvent] = []

    async def emit(event: ObserverEvent) -> None:
        # A BLOCK sink that is full until the gate opens.
        await gate.wait()
        emitted.append(event)

    observer = TreeObserver(
        emit=emit, categories=frozenset(), proc_root=fake.path, poll_interval=1.0
    )
    observer.add_root(100)
    returned = trio.Event()

    async def waiter() -> None:
        await observer.wait_active()
        returned.set()

    async with observing(observer), trio.open_nursery() as nursery:
        observer.set_categories(PROCESS)
        nursery.start_soon(waiter)
        await settle()
        assert not returned.is_set()  # the first pass waits to emit 101
        observer.set_categories(frozenset())  # that sink leaves
        if resubscribe:
            # Another sink comes before the run has noticed: the waiter is
            # for the next run, whose first pass is held up the same way
            # (emitting 102: 101 was taken in by the pass that was stopped).
            observer.set_categories(PROCESS)
            fake.add(102, 100)
            await settle()
            assert not returned.is_set()
            gate.set()
        await settle()
        assert returned.is_set()
        assert [e.pid for e in emitted] == ([102] if resubscribe else [])
        gate.set()


async def test_fake_files_open_reopen_close_and_exit(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    fake = FakeProc(tmp_path)
    fake.add(100, 1)
    fake.add(101, 100)
    fake.set_fd(101, 0, "/dev/null")
    fake.set_fd(101, 1, "pipe:[77]")
    fake.set_fd(101, 2, "/dev/pts/3")
    fake.set_fd(101, 3, "/data/a")
    fake.set_fd(101, 4, "anon_inode:[eventfd]")
    fake.set_fd(101, 5, "socket:[99]")
    collector = Collector()
    observer = fake_tree_observer(fake.path, collector, EventCategory.FILE)

    async with observing(observer):
        await settle()
        assert collector.take_files() == [(K.FILE_OPEN, 3, "/data/a")]
        fake.set_fd(101, 3, "/data/b")  # dup2 over it, or close and reopen
        fake.set_fd(101, 6, "/data/c (deleted)")
        mock_clock.jump(1.0)
        await settle()
        assert collector.take_files() == [
            (K.FILE_CLOSE, 3, "/data/a"),
            (K.FILE_OPEN, 3, "/data/b"),
            (K.FILE_OPEN, 6, "/data/c (deleted)"),
        ]
        fake.close_fd(101, 6)
        mock_clock.jump(1.0)
        await settle()
        assert collector.take_files() == [(K.FILE_CLOSE, 6, "/data/c (deleted)")]
        # The process exits holding /data/b: that closes it.
        fake.remove(101)
        mock_clock.jump(1.0)
        await settle()
        assert collector.take_files() == [(K.FILE_CLOSE, 3, "/data/b")]


async def test_fake_sockets_are_joined_with_the_net_tables(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    fake = FakeProc(tmp_path)
    fake.add(100, 1)
    fake.set_fd(100, 3, "socket:[501]")
    fake.set_fd(100, 4, "socket:[502]")
    fake.set_fd(100, 5, "socket:[503]")
    fake.set_net(
        100,
        "tcp6",
        TCP_HEADER
        + tcp_line(0, inet_hex("::1", 8443), inet_hex("::", 0), 0x0A, 501)
        + tcp_line(1, inet_hex("::1", 40000), inet_hex("::1", 8443), 0x01, 502)
        + tcp_line(2, inet_hex("::", 0), inet_hex("::", 0), 0x07, 503),
    )
    collector = Collector()
    observer = fake_tree_observer(fake.path, collector, EventCategory.NETWORK)
    async with observing(observer):
        await settle()
        assert [
            (e.kind, e.fd, e.protocol, e.local_address, e.remote_address) for e in collector.events
        ] == [
            (K.SOCKET_LISTEN, 3, "tcp6", "[::1]:8443", None),
            (K.SOCKET_CONNECT, 4, "tcp6", "[::1]:40000", "[::1]:8443"),
        ]
        collector.events.clear()
        fake.close_fd(100, 4)
        mock_clock.jump(1.0)
        await settle()
        assert [(e.kind, e.fd, e.remote_address) for e in collector.events] == [
            (K.SOCKET_CLOSE, 4, "[::1]:8443")
        ]
        # Without socket descriptors the tables are not read at all.
        collector.events.clear()
        fake.close_fd(100, 3)
        fake.close_fd(100, 5)
        (tmp_path / "100" / "net" / "tcp6").chmod(0)
        mock_clock.jump(1.0)
        await settle()
        assert [e.kind for e in collector.events] == [K.SOCKET_CLOSE]


def test_bad_arguments_are_refused() -> None:
    async def emit(event: ObserverEvent) -> None:
        raise AssertionError("unreachable")

    with pytest.raises(ValueError, match="poll_interval"):
        TreeObserver(emit=emit, poll_interval=0)
    with pytest.raises(ValueError, match="backend"):
        TreeObserver(emit=emit, backend="ebpf")  # type: ignore[arg-type]


async def test_run_twice_is_busy(tmp_path: Path) -> None:
    observer = TreeObserver(emit=Collector().emit, categories=frozenset(), proc_root=str(tmp_path))
    async with observing(observer):
        await settle()
        with pytest.raises(trio.BusyResourceError):
            await observer.run()


async def test_fake_a_zombie_whose_main_thread_had_exited_first_has_no_exit_code(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    # The defect: the exit path forgot that the main thread had gone first
    # before asking, so the zombie's stat (the main thread's own status) was
    # reported as the process's exit code.
    fake = FakeProc(tmp_path)
    fake.add(100, 1)
    fake.add(101, 100)
    collector = Collector()
    observer = fake_tree_observer(fake.path, collector, EventCategory.PROCESS)
    async with observing(observer):
        await settle()
        # pthread_exit in main: a zombie main thread, another thread runs on.
        fake.add(101, 100, state="Z", threads=2)
        mock_clock.jump(1.0)
        await settle()
        fake.add(101, 100, state="Z", threads=1, exit_status=7 << 8)
        mock_clock.jump(1.0)
        await settle()
    assert [(e.kind, e.pid, e.exit_code) for e in collector.events] == [
        (K.DESCENDANT_STARTED, 101, None),
        (K.DESCENDANT_EXITED, 101, None),
    ]
