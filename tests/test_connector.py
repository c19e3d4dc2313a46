"""The process connector: message parsing, loss accounting, the real socket."""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
import sys
import time
from collections import deque
from pathlib import Path

import pytest
import trio
import trio.testing

from tests._fakeproc import FakeProc
from tests._tree_helpers import PROCESS, Collector, child, observing, settle
from trio_observer._events import EventCategory, EventGrade, ObserverEventKind
from trio_observer._linux import _connector
from trio_observer._linux._connector import (
    PROC_CN_MCAST_LISTEN,
    ConnectorBatch,
    ConnectorUnavailableError,
    ExecRecord,
    ExitRecord,
    ForkRecord,
    ProcConnector,
    build_control_message,
    open_connector_socket,
    parse_messages,
    subscription_ack_error,
    wait_status_to_exit_code,
)
from trio_observer._linux._descriptors import DescriptorTracker
from trio_observer._linux._tree import LOSS_PID, TreeObserver
from trio_observer._linux._tree_members import TreeMembers

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")

K = ObserverEventKind


def message(what: int, union: bytes, *, timestamp_ns: int = 5, idx: int = 1) -> bytes:
    """One netlink message as the kernel sends a proc event."""
    event = struct.pack("=IIQ", what, 0, timestamp_ns) + union
    cn = struct.pack("=IIIIHH", idx, 1, 0, 0, len(event), 0) + event
    return struct.pack("=IHHII", 16 + len(cn), 3, 0, 0, 0) + cn


def fork(parent: int, child: int, *, child_tgid: int | None = None) -> bytes:
    tgid = child if child_tgid is None else child_tgid
    return message(1, struct.pack("=IIII", parent, parent, child, tgid))


def exec_(pid: int) -> bytes:
    return message(2, struct.pack("=II", pid, pid))


def exit_(pid: int, status: int, *, tgid: int | None = None) -> bytes:
    return message(
        0x80000000, struct.pack("=IIIIII", pid, pid if tgid is None else tgid, status, 17, 1, 1)
    )


class FakeConnectorSocket:
    """A stand-in for the netlink socket: scripted datagrams and errors.

    A real socketpair provides the readiness trio waits on: one byte per
    scripted item, consumed when the item is received.
    """

    def __init__(self) -> None:
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._script: deque[bytes | OSError] = deque()
        self.closed = False

    def push(self, *items: bytes | OSError) -> None:
        for item in items:
            self._script.append(item)
            self._writer.send(b"!")

    def fileno(self) -> int:
        return self._reader.fileno()

    def recv(self, bufsize: int, /) -> bytes:
        if not self._script:
            raise BlockingIOError(errno.EAGAIN, "nothing queued")
        self._reader.recv(1)
        item = self._script.popleft()
        if isinstance(item, OSError):
            raise item
        return item

    def close(self) -> None:
        assert not self.closed, "closed twice"
        self.closed = True
        self._reader.close()
        self._writer.close()


def enobufs() -> OSError:
    return OSError(errno.ENOBUFS, os.strerror(errno.ENOBUFS))


# ------------------------------------------------------------------ parsing


def test_wait_status_to_exit_code() -> None:
    assert wait_status_to_exit_code(0) == 0
    assert wait_status_to_exit_code(3 << 8) == 3
    assert wait_status_to_exit_code(255 << 8) == 255
    assert wait_status_to_exit_code(9) == -9
    assert wait_status_to_exit_code(9 | 0x80) == -9  # core dumped


def test_parse_messages_of_every_kind() -> None:
    data = fork(10, 11) + exec_(11) + exit_(11, 2 << 8)
    assert parse_messages(data) == [
        ForkRecord(5, 10, 10, 11, 11),
        ExecRecord(5, 11, 11),
        ExitRecord(5, 11, 11, 2),
    ]


def test_parse_messages_skips_what_is_not_a_proc_event() -> None:
    ack = message(0, struct.pack("=I", 0))
    other_channel = message(1, struct.pack("=IIII", 1, 1, 2, 2), idx=7)
    truncated = fork(10, 11)[:-4]
    assert parse_messages(ack + other_channel) == []
    assert parse_messages(truncated) == []
    assert parse_messages(b"") == []
    assert parse_messages(fork(1, 2) + truncated) == [ForkRecord(5, 1, 1, 2, 2)]


def test_control_message_layout() -> None:
    data = build_control_message(PROC_CN_MCAST_LISTEN)
    length, msg_type, *_ = struct.unpack_from("=IHHII", data)
    assert length == len(data) == 16 + 20 + 4
    assert msg_type == 3
    assert struct.unpack_from("=IIIIHH", data, 16) == (1, 1, 0, 0, 4, 0)
    assert struct.unpack_from("=I", data, 36) == (PROC_CN_MCAST_LISTEN,)


# ------------------------------------------------------- the connector object


async def test_receive_nowait_counts_overruns_and_keeps_reading() -> None:
    fake = FakeConnectorSocket()
    connector = ProcConnector(fake)
    fake.push(fork(1, 2), enobufs(), enobufs(), exit_(2, 0))
    with trio.fail_after(10):
        await connector.wait_readable()
    batch = connector.receive_nowait()
    assert batch.overruns == 2
    assert batch.records == [ForkRecord(5, 1, 1, 2, 2), ExitRecord(5, 2, 2, 0)]
    assert connector.receive_nowait().records == []
    connector.close()
    connector.close()  # idempotent
    assert fake.closed
    with pytest.raises(trio.ClosedResourceError):
        connector.receive_nowait()
    with pytest.raises(trio.ClosedResourceError):
        await connector.wait_readable()


def test_held_records_come_first_with_their_overruns() -> None:
    fake = FakeConnectorSocket()
    connector = ProcConnector(fake)
    fake.push(fork(1, 2), enobufs())
    # An overrun asks for the loop now: the tree may have lost records.
    assert connector.hold_queued({100})
    fake.push(exit_(2, 0))
    assert not connector.hold_queued({100})
    fake.push(exec_(7))
    batch = connector.receive_nowait()
    assert batch.records == [ForkRecord(5, 1, 1, 2, 2), ExitRecord(5, 2, 2, 0), ExecRecord(5, 7, 7)]
    assert batch.overruns == 1
    assert connector.receive_nowait() == ConnectorBatch([], 0)
    connector.close()


def test_a_record_about_the_tree_asks_for_the_loop() -> None:
    fake = FakeConnectorSocket()
    connector = ProcConnector(fake)
    fake.push(fork(7, 8), exec_(8), exit_(8, 0))
    assert not connector.hold_queued({100})  # a stranger's
    for record in (fork(100, 101), exec_(100), exit_(100, 0)):
        fake.push(exec_(7), record)
        assert connector.hold_queued({100})
    assert len(connector.receive_nowait().records) == 9
    connector.close()


def test_holding_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_connector, "HELD_RECORDS", 3)
    fake = FakeConnectorSocket()
    connector = ProcConnector(fake)
    fake.push(exec_(7), exec_(8))
    assert not connector.hold_queued({100})
    fake.push(exec_(9))
    assert connector.hold_queued({100})
    assert len(connector.receive_nowait().records) == 3
    connector.close()


async def test_other_receive_errors_propagate() -> None:
    fake = FakeConnectorSocket()
    connector = ProcConnector(fake)
    fake.push(OSError(errno.EBADF, "bad"))
    with pytest.raises(OSError, match="bad"):
        connector.receive_nowait()
    connector.close()


# ---------------------------------------------------- the observer's backend


def _fake_connector_observer(
    proc: FakeProc, sock: FakeConnectorSocket, collector: Collector, poll_interval: float = 0.02
) -> TreeObserver:
    # A PROCESS observer on the connector backend, fed by ``sock``, rooted at 100.
    observer = TreeObserver(
        emit=collector.emit,
        categories=PROCESS,
        proc_root=proc.path,
        backend="connector",
        connector_factory=lambda: sock,
        poll_interval=poll_interval,
    )
    observer.add_root(100)
    return observer


async def test_overrun_is_reported_counted_and_resynchronised(tmp_path: Path) -> None:
    proc = FakeProc(tmp_path)
    proc.add(100, 1)
    sock = FakeConnectorSocket()
    collector = Collector()
    observer = _fake_connector_observer(proc, sock, collector)
    with trio.fail_after(10):
        async with observing(observer):
            assert observer.statistics().backend == "connector"
            proc.add(101, 100)
            sock.push(fork(100, 101))
            started = await collector.wait_for(lambda e: e.pid == 101)
            assert (started.kind, started.grade, started.ppid) == (
                K.DESCENDANT_STARTED,
                EventGrade.EXACT,
                100,
            )
            # 102 is forked while the kernel drops our records.
            proc.add(102, 101)
            sock.push(enobufs())
            lost = await collector.wait_for(lambda e: e.kind is K.OBSERVATION_LOST)
            resynced = await collector.wait_for(lambda e: e.pid == 102)
            assert observer.statistics().lost_overruns == 1
            assert (lost.category, lost.pid, lost.count) == (EventCategory.PROCESS, LOSS_PID, None)
            assert (resynced.kind, resynced.grade, resynced.ppid) == (
                K.DESCENDANT_STARTED,
                EventGrade.INFERRED,
                101,
            )
            assert resynced.root_pid == 100

            proc.remove(101)
            sock.push(exit_(101, 9 << 8))
            exited = await collector.wait_for(lambda e: e.kind is K.DESCENDANT_EXITED)
            assert (exited.pid, exited.exit_code, exited.grade) == (101, 9, EventGrade.EXACT)
            assert observer.known_descendants() == {102}
    assert sock.closed
    assert [(e.kind, e.pid) for e in collector.events] == [
        (K.DESCENDANT_STARTED, 101),
        (K.OBSERVATION_LOST, LOSS_PID),
        (K.DESCENDANT_STARTED, 102),
        (K.DESCENDANT_EXITED, 101),
    ]


async def test_process_only_sleeps_until_a_record_and_wakes_for_files(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    # With PROCESS alone the connector says everything: no timer may be
    # armed (a wake-up every interval costs a busy machine's CPU for
    # nothing). Wanting FILE later must start the scans on the clock at
    # once, without waiting for some record to arrive.
    proc = FakeProc(tmp_path)
    proc.add(100, 1)
    sock = FakeConnectorSocket()
    collector = Collector()
    observer = _fake_connector_observer(proc, sock, collector, poll_interval=1.0)
    async with observing(observer):
        mock_clock.jump(1.0)
        await settle()
        assert trio.lowlevel.current_statistics().seconds_to_next_deadline == float("inf")
        proc.set_fd(100, 3, "/data/a")
        observer.set_categories(frozenset({EventCategory.PROCESS, EventCategory.FILE}))
        await settle()
        assert trio.lowlevel.current_statistics().seconds_to_next_deadline <= 1.0
        mock_clock.jump(1.0)
        await settle()
        assert [(e.kind, e.path) for e in collector.events] == [(K.FILE_OPEN, "/data/a")]


async def test_threads_strangers_and_an_exit_before_its_fork(tmp_path: Path) -> None:
    proc = FakeProc(tmp_path)
    proc.add(100, 1)
    sock = FakeConnectorSocket()
    collector = Collector()
    observer = _fake_connector_observer(proc, sock, collector)
    with trio.fail_after(10):
        async with observing(observer):
            sock.push(
                fork(100, 150, child_tgid=100),  # a new thread of the root
                exit_(150, 0, tgid=100),  # that thread ending
                fork(1, 500),  # somebody else's child
                exit_(500, 0),
                # The child ran and exited on another CPU before the fork
                # message was queued.
                exit_(103, 15),
                fork(100, 103),
                fork(100, 104),
            )
            await collector.wait_for(lambda e: e.pid == 104)
    assert [(e.kind, e.pid, e.exit_code) for e in collector.events] == [
        (K.DESCENDANT_STARTED, 103, None),
        (K.DESCENDANT_EXITED, 103, -15),
        (K.DESCENDANT_STARTED, 104, None),
    ]
    assert observer.statistics().connector_records == 7


async def test_a_main_thread_exit_is_not_the_process_exit(tmp_path: Path) -> None:
    proc = FakeProc(tmp_path)
    proc.add(100, 1)
    proc.add(101, 100)
    proc.add(102, 100)
    sock = FakeConnectorSocket()
    collector = Collector()
    observer = _fake_connector_observer(proc, sock, collector)
    with trio.fail_after(10):
        async with observing(observer):
            sock.push(fork(100, 101), fork(100, 102))
            await collector.wait_for(lambda e: e.pid == 102)
            # pthread_exit in main: the main thread is a zombie, one other
            # thread runs on, and then another one ends.
            proc.add(101, 100, state="Z", threads=2)
            sock.push(exit_(101, 0), exit_(151, 0, tgid=101), fork(100, 103))
            await collector.wait_for(lambda e: e.pid == 103)
            assert collector.kinds(101) == [K.DESCENDANT_STARTED]
            assert 101 in observer.known_descendants()
            # The last thread's exit ends the process, with its status.
            proc.add(101, 100, state="Z", threads=1)
            sock.push(exit_(150, 3 << 8, tgid=101))
            exited = await collector.wait_for(lambda e: e.kind is K.DESCENDANT_EXITED)
            assert (exited.pid, exited.exit_code) == (101, 3)

            # execve in another thread: the main thread is killed and the
            # caller takes over its pid, so /proc shows the process running.
            sock.push(exit_(102, 9), exit_(160, 9, tgid=102), exec_(102), fork(100, 104))
            await collector.wait_for(lambda e: e.pid == 104)
            assert collector.kinds(102, execs=True) == [K.DESCENDANT_STARTED, K.DESCENDANT_EXEC]
            # Its threads' exits are threads' exits again.
            proc.add(102, 100, state="Z", threads=1)
            sock.push(exit_(161, 0, tgid=102), fork(100, 105))
            await collector.wait_for(lambda e: e.pid == 105)
            assert collector.kinds(102, execs=True) == [K.DESCENDANT_STARTED, K.DESCENDANT_EXEC]
            proc.remove(102)
            sock.push(exit_(102, 5 << 8))
            exited = await collector.wait_for(lambda e: e.pid == 102 and e.exit_code == 5)
            assert exited.kind is K.DESCENDANT_EXITED
    assert observer.known_descendants() == {103, 104, 105}


async def test_threads_are_counted_from_the_records_not_read_late_from_proc(
    tmp_path: Path,
) -> None:
    # The defect: the end of a main thread was judged by reading /proc when
    # the record was handled. A process whose other thread had exec'd (or
    # that pthread_exit'd in main) and exited by then was reported exited
    # with the killed main thread's status 0, and its exec and true status
    # ignored; a pid reused by then was taken for the process living on, so
    # its exit and the next process of the pid were never reported.
    proc = FakeProc(tmp_path)
    proc.add(100, 1)
    sock = FakeConnectorSocket()
    collector = Collector()
    observer = _fake_connector_observer(proc, sock, collector)
    with trio.fail_after(10):
        async with observing(observer):
            # When handled, 101 and 102 are gone; 103 is another process.
            proc.add(103, 100, starttime=2000)
            sock.push(
                # execve() in thread 150 kills the main thread (status 0),
                # the program exits 7.
                fork(100, 101),
                fork(101, 150, child_tgid=101),
                exit_(101, 0),
                exec_(101),
                exit_(101, 7 << 8),
                # pthread_exit in main, then thread 160 ends the process: 4.
                fork(100, 102),
                fork(102, 160, child_tgid=102),
                exit_(102, 0),
                exit_(160, 4 << 8, tgid=102),
                # 105's thread 170 calls exit_group(6) while its main
                # thread is in pthread_exit: the main thread keeps 0, and
                # its record comes last.
                fork(100, 105),
                fork(105, 170, child_tgid=105),
                exit_(170, 6 << 8, tgid=105),
                exit_(105, 0),
                # 103 exits 3, and its pid goes to the next child, running.
                fork(100, 103),
                exit_(103, 3 << 8),
                fork(100, 103),
                fork(100, 104),
            )
            await collector.wait_for(lambda e: e.pid == 104)
    assert [(e.kind, e.pid, e.exit_code) for e in collector.events] == [
        (K.DESCENDANT_STARTED, 101, None),
        (K.DESCENDANT_EXEC, 101, None),
        (K.DESCENDANT_EXITED, 101, 7),
        (K.DESCENDANT_STARTED, 102, None),
        (K.DESCENDANT_EXITED, 102, 4),
        (K.DESCENDANT_STARTED, 105, None),
        (K.DESCENDANT_EXITED, 105, 6),
        (K.DESCENDANT_STARTED, 103, None),
        (K.DESCENDANT_EXITED, 103, 3),
        (K.DESCENDANT_STARTED, 103, None),
        (K.DESCENDANT_STARTED, 104, None),
    ]
    assert observer.known_descendants() == {103, 104}


async def test_an_exec_superseded_in_its_batch_has_no_argv(tmp_path: Path) -> None:
    # The defect: each exec record's argv was read from /proc when handled,
    # so in an exec chain read in one batch (sh -c 'exec env ...') every
    # exec showed the last program's command line, graded EXACT.
    proc = FakeProc(tmp_path)
    proc.add(100, 1)
    sock = FakeConnectorSocket()
    collector = Collector()
    observer = _fake_connector_observer(proc, sock, collector)
    with trio.fail_after(10):
        async with observing(observer):
            proc.add(101, 100, argv=("true",))  # by the time it is read
            sock.push(fork(100, 101), exec_(101), exec_(101), fork(100, 102))
            await collector.wait_for(lambda e: e.pid == 102)
    assert [(e.kind, e.pid, e.argv) for e in collector.events if e.pid == 101] == [
        (K.DESCENDANT_STARTED, 101, ("true",)),
        (K.DESCENDANT_EXEC, 101, None),
        (K.DESCENDANT_EXEC, 101, ("true",)),
    ]


async def test_threads_started_before_the_fork_record_are_counted(tmp_path: Path) -> None:
    # The child ran first: its thread's record came before its own fork's.
    proc = FakeProc(tmp_path)
    proc.add(100, 1)
    sock = FakeConnectorSocket()
    collector = Collector()
    observer = _fake_connector_observer(proc, sock, collector)
    with trio.fail_after(10):
        async with observing(observer):
            sock.push(
                fork(101, 150, child_tgid=101),
                fork(101, 151, child_tgid=101),
                exit_(151, 0, tgid=101),
                fork(100, 101),
                exit_(101, 0),  # the main thread; 150 runs on
                fork(100, 102),
            )
            await collector.wait_for(lambda e: e.pid == 102)
            assert collector.kinds(101) == [K.DESCENDANT_STARTED]
            sock.push(exit_(150, 6 << 8, tgid=101))
            exited = await collector.wait_for(lambda e: e.kind is K.DESCENDANT_EXITED)
    assert (exited.pid, exited.exit_code) == (101, 6)


async def test_a_remembered_exit_is_not_paired_with_a_later_process_of_its_pid(
    tmp_path: Path,
) -> None:
    proc = FakeProc(tmp_path)
    proc.add(100, 1)
    members = TreeMembers(
        proc_root=proc.path,
        descriptors=DescriptorTracker(proc.path),
        adopt_marker=None,
        reap_adopted=False,
    )
    members.add_root(100)
    now = time.monotonic_ns()

    def fork_of(child: int) -> list[tuple[ObserverEventKind, int | None]]:
        events = members.on_fork(ForkRecord(now, 100, 100, child, child))
        return [(e.kind, e.exit_code) for e in events]

    # A stranger with pid 101 exited ten minutes ago; the pids came round and
    # the root's new child got 101 (and is gone by now): not its exit.
    assert members.on_exit(ExitRecord(now - 600 * 10**9, 101, 101, 1)) == []
    assert fork_of(101) == [(K.DESCENDANT_STARTED, None)]
    # Recent, but the child is running: not its exit either.
    assert members.on_exit(ExitRecord(now, 102, 102, 1)) == []
    proc.add(102, 100)
    assert fork_of(102) == [(K.DESCENDANT_STARTED, None)]
    assert members.descendants() == {101, 102}
    # The child ran and exited just before the fork message was sent.
    assert members.on_exit(ExitRecord(now - 1000, 103, 103, 2)) == []
    assert fork_of(103) == [(K.DESCENDANT_STARTED, None), (K.DESCENDANT_EXITED, 2)]
    assert members.descendants() == {101, 102}


async def test_a_later_process_of_an_exited_members_pid_is_not_reaped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The defect: a member gone before its fork record was handled has no
    # start time, and reap() took any zombie child of this process at its
    # pid for it: a later process of the pid (another session's child, the
    # pids having come round) lost its exit status to this observer.
    proc = FakeProc(tmp_path)
    proc.add(100, 1)
    members = TreeMembers(
        proc_root=proc.path,
        descriptors=DescriptorTracker(proc.path),
        adopt_marker=None,
        reap_adopted=True,
    )
    members.add_root(100)
    now = time.monotonic_ns()
    ticks = os.sysconf("SC_CLK_TCK")
    boot_ticks = time.clock_gettime_ns(time.CLOCK_BOOTTIME) * ticks // 10**9
    members.on_fork(ForkRecord(now, 100, 100, 101, 101))  # 101 is gone already
    [exited] = members.on_exit(ExitRecord(now, 101, 101, 3))
    assert (exited.kind, exited.exit_code) == (K.DESCENDANT_EXITED, 3)
    reaped: list[int] = []

    def waitpid(pid: int, options: int) -> tuple[int, int]:
        reaped.append(pid)
        return (0, 0)

    monkeypatch.setattr(os, "waitpid", waitpid)
    # Ten seconds later, pid 101 is a zombie child of this process again.
    proc.add(101, os.getpid(), state="Z", starttime=boot_ticks + 10 * ticks)
    members.reap()
    assert reaped == []
    assert not members.reap_pending
    # Its own zombie (started before its exit) is reaped as before.
    members.on_fork(ForkRecord(now, 100, 100, 102, 102))
    members.on_exit(ExitRecord(now, 102, 102, 0))
    proc.add(102, os.getpid(), state="Z", starttime=boot_ticks - ticks)
    members.reap()
    assert reaped == [102]


def refuse() -> FakeConnectorSocket:
    raise ConnectorUnavailableError("refused for the test")


async def test_auto_falls_back_to_polling_and_says_why(tmp_path: Path) -> None:
    proc = FakeProc(tmp_path)
    observer = TreeObserver(
        emit=Collector().emit,
        categories=PROCESS,
        proc_root=proc.path,
        connector_factory=refuse,
    )
    with trio.fail_after(10):
        async with observing(observer):
            stats = observer.statistics()
    assert stats.backend == "poll"
    assert stats.fallback_reason == "refused for the test"


async def test_connector_backend_refused_is_an_error(tmp_path: Path) -> None:
    observer = TreeObserver(
        emit=Collector().emit,
        categories=PROCESS,
        proc_root=str(tmp_path),
        backend="connector",
        connector_factory=refuse,
    )
    with pytest.raises(ConnectorUnavailableError, match="refused for the test"):
        await observer.run()


# -------------------------------------------------------- the real connector


@pytest.mark.usefixtures("no_leaks")
async def test_real_connector_reports_fork_and_exit_code() -> None:
    if os.geteuid() != 0:
        pytest.skip("the process connector needs CAP_NET_ADMIN")
    connector = ProcConnector(open_connector_socket())
    try:
        process = await trio.lowlevel.open_process([sys.executable, "-c", "raise SystemExit(3)"])
        assert await process.wait() == 3
        forks: list[ForkRecord] = []
        exits: list[ExitRecord] = []
        with trio.fail_after(10):
            while not exits:
                await connector.wait_readable()
                for record in connector.receive_nowait().records:
                    if isinstance(record, ForkRecord) and record.child_tgid == process.pid:
                        forks.append(record)
                    elif isinstance(record, ExitRecord) and record.tgid == process.pid:
                        exits.append(record)
    finally:
        connector.close()
    assert forks[0].parent_tgid == os.getpid()
    assert exits[-1].exit_code == 3
    assert forks[0].timestamp_ns <= exits[-1].timestamp_ns


# Forks five children that exit(3) at once, waits until all five are zombies
# (without reaping them), reports their pids, and reaps them only when told.
ZOMBIES_SCRIPT = """
import os, sys
sys.stdin.readline()
pids = []
for _ in range(5):
    pid = os.fork()
    if pid == 0:
        os._exit(3)
    pids.append(pid)
for pid in pids:
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
print(*pids, flush=True)
sys.stdin.readline()
for pid in pids:
    os.waitpid(pid, 0)
print("reaped", flush=True)
sys.stdin.readline()
"""


async def wait_for_a_pass(observer: TreeObserver) -> None:
    """Wait until the observer has started one more pass, and finished it."""
    polls = observer.statistics().polls
    # The pass is due on the real clock; until then every task is blocked.
    while observer.statistics().polls <= polls:
        await trio.testing.wait_all_tasks_blocked(cushion=0.005)
    await trio.testing.wait_all_tasks_blocked()


@pytest.mark.usefixtures("no_leaks")
async def test_connector_reports_a_zombie_once_when_a_rescan_sees_it() -> None:
    if os.geteuid() != 0:
        pytest.skip("the process connector needs CAP_NET_ADMIN")

    collector = Collector()
    observer = TreeObserver(emit=collector.emit, categories=PROCESS, backend="connector")
    async with (
        child(ZOMBIES_SCRIPT) as root,
        observing(observer),
    ):
        observer.add_root(root.pid)
        await root.send("go")
        with trio.fail_after(20):
            zombies = [int(pid) for pid in (await root.receive_line()).split()]
            for pid in zombies:
                await collector.wait_for(
                    lambda e, pid=pid: e.kind is K.DESCENDANT_EXITED and e.pid == pid  # type: ignore[misc]
                )
            # A rescan of the tree from /proc (as after lost records), where
            # the five are still zombies of the root, finds nothing new.
            # (A new root no longer rescans on the connector: see
            # TreeObserver._run_active.) The pass is synchronous, so no record
            # is handled while it runs.
            rescan = observer._pass_events(scan_tree=True)
            assert [e for e in rescan if e.pid in zombies] == []
            await root.send("reap")
            assert await root.receive_line() == "reaped"
        for pid in zombies:
            assert collector.kinds(pid) == [K.DESCENDANT_STARTED, K.DESCENDANT_EXITED]
            exited = [e for e in collector.events if e.pid == pid][-1]
            assert exited.exit_code == 3
            assert exited.grade is EventGrade.EXACT
        assert len(collector.events) == 10


def test_only_the_acknowledgement_of_our_request_is_taken() -> None:
    def ack(their_ack: int, err: int = 0) -> bytes:
        event = struct.pack("=IIQ", 0, 0, 5) + struct.pack("=I", err)
        cn = struct.pack("=IIIIHH", 1, 1, 0, their_ack, len(event), 0) + event
        return struct.pack("=IHHII", 16 + len(cn), 3, 0, 0, 0) + cn

    assert subscription_ack_error(ack(42), 41) == 0
    assert subscription_ack_error(ack(42, errno.EPERM), 41) == errno.EPERM
    # Another process's subscription, multicast to us too.
    assert subscription_ack_error(ack(7), 41) is None
    assert subscription_ack_error(ack(0), 0xFFFFFFFF) == 0
    assert subscription_ack_error(fork(1, 2), 41) is None
    request = build_control_message(PROC_CN_MCAST_LISTEN, ack=41)
    assert struct.unpack_from("=IIIIHH", request, 16)[3] == 41


# Run inside a new pid namespace: a session with a PROCESS sink starts a root
# that starts three children, each blocking on its stdin; the root prints
# their pids (as this namespace numbers them) and ends them when told.
NAMESPACE_ROOT = """
import subprocess, sys
kids = [subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                         stdin=subprocess.PIPE) for _ in range(3)]
print(*[k.pid for k in kids], flush=True)
sys.stdin.readline()
for k in kids:
    k.stdin.close(); k.wait()
"""
NAMESPACE_SESSION = f"""
import json, subprocess, sys
import trio
from trio_observer import (
    EventCategory, ObserverBackpressure, ObserverEventKind, negotiate_capabilities, open_session,
)
ROOT = {NAMESPACE_ROOT!r}

async def main():
    process = negotiate_capabilities()[EventCategory.PROCESS]
    seen = set()
    async with open_session() as session:
        async with session.observers.subscribe(
            [EventCategory.PROCESS], backpressure=ObserverBackpressure.BLOCK
        ) as events:
            root = await session.start_process(
                [sys.executable, "-c", ROOT], stdin=subprocess.PIPE, stdout=subprocess.PIPE
            )
            line = b""
            while not line.endswith(b"\\n"):
                line += await root.stdout.receive_some()
            kids = set(map(int, line.split()))
            with trio.move_on_after(15):
                async for event in events:
                    if event.kind is ObserverEventKind.DESCENDANT_STARTED:
                        seen.add(event.pid)
                    if kids <= seen:
                        break
            await root.stdin.send_all(b"go\\n")
            await root.wait()
    print(json.dumps({{"backend": process.backend, "reason": process.reason,
                      "kids": sorted(kids), "seen": sorted(seen)}}))

trio.run(main)
"""


@pytest.mark.usefixtures("no_leaks")
async def test_in_a_pid_namespace_the_connector_is_not_used_and_descendants_are_polled() -> None:
    if os.geteuid() != 0:
        pytest.skip("unshare --pid needs root")
    probe = await trio.run_process(
        ["unshare", "--pid", "--fork", "--mount-proc", "true"], check=False, capture_stderr=True
    )
    if probe.returncode != 0:
        pytest.skip(f"unshare --pid fails here: {probe.stderr.decode().strip()}")
    # A listener outside: its subscription makes the kernel multicast records
    # (with this namespace's pids) and its acknowledgements to the namespace's
    # socket too, as another observer on the machine would.
    host = ProcConnector(open_connector_socket())
    sock = host._sock
    assert isinstance(sock, socket.socket)
    try:
        async with trio.open_nursery() as nursery:

            async def keep_acknowledging() -> None:
                while True:
                    sock.send(build_control_message(PROC_CN_MCAST_LISTEN, ack=1))
                    host.receive_nowait()
                    await trio.sleep(0.002)

            nursery.start_soon(keep_acknowledging)
            with trio.fail_after(60):
                result = await trio.run_process(
                    [
                        "unshare",
                        "--pid",
                        "--fork",
                        "--mount-proc",
                        sys.executable,
                        "-c",
                        NAMESPACE_SESSION,
                    ],
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                )
            nursery.cancel_scope.cancel()
    finally:
        host.close()
    assert result.returncode == 0, result.stderr.decode()
    report = json.loads(result.stdout)
    assert report["backend"] == "proc-poll"
    assert "namespace" in report["reason"]
    assert set(report["kids"]) <= set(report["seen"])


# Blocks reading stdin; at each line, forks a child that exits at once.
FORKER = """
import os, sys
print("ready", flush=True)
for line in sys.stdin:
    pid = os.fork()
    if pid == 0:
        os._exit(5)
    os.waitpid(pid, 0)
    print(pid, flush=True)
"""


@pytest.mark.parametrize(
    "categories",
    [
        pytest.param(frozenset({EventCategory.PROCESS, EventCategory.FILE}), id="with-files"),
        pytest.param(PROCESS, id="process-only"),
    ],
)
async def test_a_quiet_tree_leaves_the_machines_records_to_the_watch(
    categories: frozenset[EventCategory],
) -> None:
    # While no process of the tree runs, the quiet watch's thread reads the
    # socket: the machine's records do not wake the loop one batch at a
    # time; they are handled, in order, when the tree runs again.
    if os.geteuid() != 0:
        pytest.skip("the process connector needs CAP_NET_ADMIN")
    collector = Collector()
    process = await trio.lowlevel.open_process([sys.executable, "-c", FORKER], stdin=-1, stdout=-1)
    assert process.stdin is not None
    assert process.stdout is not None
    try:
        assert (await process.stdout.receive_some()).startswith(b"ready")
        observer = TreeObserver(
            emit=collector.emit, categories=categories, backend="connector", poll_interval=1.0
        )
        observer.add_root(process.pid)
        async with observing(observer):
            # With PROCESS alone the watch takes the socket after the loop
            # has handled a batch: make one.
            stranger = await trio.lowlevel.open_process(["/bin/true"])
            await stranger.wait()
            with trio.fail_after(20):
                while observer._quiet is None or not observer._quiet.armed:  # noqa: ASYNC110
                    await trio.sleep(0.005)
            handled = observer.statistics().connector_records
            for _ in range(5):  # records of processes outside the tree
                stranger = await trio.lowlevel.open_process(["/bin/true"])
                await stranger.wait()
            await trio.testing.wait_all_tasks_blocked(cushion=0.05)
            assert observer.statistics().connector_records == handled
            await process.stdin.send_all(b"fork\n")
            with trio.fail_after(20):
                started = await collector.wait_for(lambda e: e.kind is K.DESCENDANT_STARTED)
                exited = await collector.wait_for(lambda e: e.kind is K.DESCENDANT_EXITED)
            assert started.grade is EventGrade.EXACT
            assert exited.pid == started.pid
            assert exited.exit_code == 5
            assert observer.statistics().connector_records > handled + 10
    finally:
        process.kill()
        await process.wait()
        await process.stdin.aclose()
        await process.stdout.aclose()
