"""TreeObserver: descendants, files and sockets of real and fake process trees."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from subprocess import PIPE
from typing import Literal

import pytest
import trio
import trio.testing

from tests.test_procfs import TCP_HEADER, FakeProc, inet_hex, tcp_line
from trio_observer._events import EventCategory, EventGrade, ObserverEvent, ObserverEventKind
from trio_observer._linux._activity import VERIFY_EVERY, ActivityWatch
from trio_observer._linux._procfs import read_stat
from trio_observer._linux._tree import TreeObserver

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc")

PY = sys.executable
K = ObserverEventKind
PROCESS = frozenset({EventCategory.PROCESS})
ALL = frozenset({EventCategory.PROCESS, EventCategory.FILE, EventCategory.NETWORK})


class Collector:
    """An ``emit`` that records events and lets a test wait for one."""

    def __init__(self) -> None:
        self.events: list[ObserverEvent] = []
        self._changed = trio.Event()

    async def emit(self, event: ObserverEvent) -> None:
        self.events.append(event)
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    async def wait_for(self, predicate: Callable[[ObserverEvent], bool]) -> ObserverEvent:
        """Wait (bounded by the caller's deadline) for a matching event."""
        while True:
            for event in self.events:
                if predicate(event):
                    return event
            await self._changed.wait()

    def kinds(self, pid: int | None = None, *, execs: bool = False) -> list[ObserverEventKind]:
        """The kinds of the events (of ``pid``), without the execs unless asked.

        A poll sees an exec only if it happened to look before it, so most
        tests leave them out.
        """
        return [
            e.kind
            for e in self.events
            if (pid is None or e.pid == pid) and (execs or e.kind is not K.DESCENDANT_EXEC)
        ]

    def take_files(self) -> list[tuple[ObserverEventKind, int | None, str | None]]:
        """The (kind, fd, path) of the events so far, which are then forgotten."""
        out = [(e.kind, e.fd, e.path) for e in self.events]
        self.events.clear()
        return out


# ---------------------------------------------------------------- real trees


class Child:
    """A real child process driven line by line over its stdin and stdout."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self._buffer = b""

    @property
    def pid(self) -> int:
        return self.process.pid

    async def send(self, line: str) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send_all(line.encode() + b"\n")

    async def receive_line(self) -> str:
        assert self.process.stdout is not None
        while b"\n" not in self._buffer:
            chunk = await self.process.stdout.receive_some()
            assert chunk, "child closed its stdout"
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()


@asynccontextmanager
async def child(script: str) -> AsyncIterator[Child]:
    """Run ``script``; kill and reap it (and close its pipes) on the way out.

    Descendants in these scripts block on a pipe from their parent, so they
    see EOF and exit when their parent dies.
    """
    process = await trio.lowlevel.open_process([PY, "-c", script], stdin=PIPE, stdout=PIPE)
    try:
        yield Child(process)
    finally:
        with trio.CancelScope(shield=True):
            process.kill()
            await process.wait()
            for stream in (process.stdin, process.stdout):
                if stream is not None:
                    await stream.aclose()


@asynccontextmanager
async def observing(observer: TreeObserver) -> AsyncIterator[None]:
    async with trio.open_nursery() as nursery:
        await nursery.start(observer.run)
        yield
        nursery.cancel_scope.cancel()


# A child that starts a grandchild, which starts a great-grandchild; each
# blocks reading its stdin (a pipe from its parent) and reports pids upward.
TREE_SCRIPT = f"""
import subprocess, sys
LEAF = "import sys; sys.stdin.read()"
MIDDLE = (
    "import subprocess, sys\\n"
    "leaf = subprocess.Popen([{PY!r}, '-c', {{LEAF!r}}], stdin=subprocess.PIPE)\\n"
    "print(leaf.pid, flush=True)\\n"
    "sys.stdin.read()\\n"
    "leaf.stdin.close(); leaf.wait()\\n"
).format(LEAF=LEAF)
middle = subprocess.Popen([{PY!r}, "-c", MIDDLE], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
leaf_pid = middle.stdout.readline().strip().decode()
print(middle.pid, leaf_pid, flush=True)
sys.stdin.readline()
middle.stdin.close(); middle.wait()
print("done", flush=True)
sys.stdin.readline()
"""


@pytest.mark.usefixtures("no_leaks")
async def test_poll_reports_descendants_with_their_parents() -> None:
    collector = Collector()
    observer = TreeObserver(emit=collector.emit, categories=PROCESS, backend="poll")
    async with child(TREE_SCRIPT) as root, observing(observer):
        observer.add_root(root.pid)
        with trio.fail_after(10):
            middle, leaf = map(int, (await root.receive_line()).split())
            started = {
                pid: await collector.wait_for(
                    lambda e, pid=pid: e.kind is K.DESCENDANT_STARTED and e.pid == pid  # type: ignore[misc]
                )
                for pid in (middle, leaf)
            }
        assert started[middle].ppid == root.pid
        assert started[leaf].ppid == middle
        for event in started.values():
            assert event.root_pid == root.pid
            assert event.grade is EventGrade.INFERRED
            assert event.category is EventCategory.PROCESS
            # Read when the scan saw the process: before and after its exec
            # it is Python's; in the middle of the exec the kernel shows an
            # empty command line, and argv is None ("where readable").
            assert event.argv is None or event.argv[:2] == (PY, "-c")
        assert observer.known_descendants() == {middle, leaf}
        assert observer.statistics().backend == "poll"

        await root.send("stop")
        with trio.fail_after(10):
            assert await root.receive_line() == "done"
            for pid in (middle, leaf):
                await collector.wait_for(
                    lambda e, pid=pid: e.kind is K.DESCENDANT_EXITED and e.pid == pid  # type: ignore[misc]
                )
        assert observer.known_descendants() == set()
        # The root's own start and exit are the session's events, not ours.
        assert root.pid not in {e.pid for e in collector.events}


ZOMBIE_SCRIPT = f"""
import os, subprocess, sys
grandchild = subprocess.Popen([{PY!r}, "-c", "import sys; sys.exit(4)"])
# Wait for the exit without reaping it: the grandchild stays a zombie.
os.waitid(os.P_PID, grandchild.pid, os.WEXITED | os.WNOWAIT)
print(grandchild.pid, flush=True)
sys.stdin.readline()
grandchild.wait()
"""


@pytest.mark.usefixtures("no_leaks")
async def test_poll_reads_the_exit_code_of_an_unreaped_descendant() -> None:
    collector = Collector()
    observer = TreeObserver(emit=collector.emit, categories=PROCESS, backend="poll")
    async with child(ZOMBIE_SCRIPT) as root, observing(observer):
        observer.add_root(root.pid)
        with trio.fail_after(10):
            grandchild = int(await root.receive_line())
            exited = await collector.wait_for(
                lambda e: e.kind is K.DESCENDANT_EXITED and e.pid == grandchild
            )
        assert exited.exit_code == 4
        assert exited.ppid == root.pid
        assert collector.kinds(grandchild) == [K.DESCENDANT_STARTED, K.DESCENDANT_EXITED]
        await root.send("reap")
        with trio.fail_after(10):
            await root.process.wait()


SHORT_LIVED_SCRIPT = f"""
import os, subprocess, sys
sys.stdin.readline()
ok = subprocess.Popen([{PY!r}, "-c", "import sys; sys.exit(7)"])
ok.wait()
killed = subprocess.Popen([{PY!r}, "-c", "import os; os.kill(os.getpid(), 9)"])
killed.wait()
print(ok.pid, killed.pid, flush=True)
sys.stdin.readline()
"""


@pytest.mark.usefixtures("no_leaks")
async def test_connector_sees_short_lived_grandchildren_with_exit_codes() -> None:
    if os.geteuid() != 0:
        pytest.skip("the process connector needs CAP_NET_ADMIN")
    collector = Collector()
    observer = TreeObserver(emit=collector.emit, categories=PROCESS, backend="connector")
    # observing() returns once the connector is subscribed; the root forks
    # only when told to, after that.
    async with child(SHORT_LIVED_SCRIPT) as root, observing(observer):
        observer.add_root(root.pid)
        await root.send("go")
        with trio.fail_after(10):
            ok, killed = map(int, (await root.receive_line()).split())
            exits = {
                pid: await collector.wait_for(
                    lambda e, pid=pid: e.kind is K.DESCENDANT_EXITED and e.pid == pid  # type: ignore[misc]
                )
                for pid in (ok, killed)
            }
        assert exits[ok].exit_code == 7
        assert exits[killed].exit_code == -9
        for pid in (ok, killed):
            assert collector.kinds(pid, execs=True) == [
                K.DESCENDANT_STARTED,
                K.DESCENDANT_EXEC,
                K.DESCENDANT_EXITED,
            ]
            for event in collector.events:
                if event.pid == pid:
                    assert event.grade is EventGrade.EXACT
                    assert event.ppid == root.pid
                    assert event.root_pid == root.pid
        assert observer.statistics().backend == "connector"
        assert observer.statistics().connector_records > 0


# The grandchild's main thread exits (pthread_exit) while a worker thread
# runs on: once the main thread is a zombie, the worker forks a marker (so the
# test knows the observer has looked since), then waits for a line and ends
# the process with status 3. It shares the root's stdin and stdout.
MAIN_THREAD_EXIT_GRANDCHILD = """
import ctypes, os, subprocess, sys, threading, time
def worker():
    while open("/proc/self/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
        time.sleep(0.01)
    marker = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                              stdin=subprocess.PIPE)
    print(os.getpid(), marker.pid, flush=True)
    sys.stdin.readline()
    marker.stdin.close(); marker.wait()
    os._exit(3)
threading.Thread(target=worker).start()
ctypes.CDLL(None).pthread_exit(None)
"""
MAIN_THREAD_EXIT_SCRIPT = f"""
import subprocess, sys
sys.exit(subprocess.call([{PY!r}, "-c", {MAIN_THREAD_EXIT_GRANDCHILD!r}]))
"""


@pytest.mark.parametrize("backend", ["poll", "connector"])
@pytest.mark.usefixtures("no_leaks")
async def test_a_process_whose_main_thread_exited_lives_until_its_last_thread(
    backend: Literal["poll", "connector"],
) -> None:
    if backend == "connector" and os.geteuid() != 0:
        pytest.skip("the process connector needs CAP_NET_ADMIN")
    collector = Collector()
    observer = TreeObserver(emit=collector.emit, categories=PROCESS, backend=backend)
    async with child(MAIN_THREAD_EXIT_SCRIPT) as root, observing(observer):
        observer.add_root(root.pid)
        with trio.fail_after(10):
            grandchild, marker = map(int, (await root.receive_line()).split())
            await collector.wait_for(lambda e: e.kind is K.DESCENDANT_STARTED and e.pid == marker)
        # Seen after the main thread's exit: the process is still there.
        assert collector.kinds(grandchild) == [K.DESCENDANT_STARTED]
        assert grandchild in observer.known_descendants()
        await root.send("go")
        with trio.fail_after(10):
            exited = await collector.wait_for(
                lambda e: e.kind is K.DESCENDANT_EXITED and e.pid == grandchild
            )
            await root.process.wait()
    assert collector.kinds(grandchild) == [K.DESCENDANT_STARTED, K.DESCENDANT_EXITED]
    # The connector has the last thread's status; stat only the main thread's.
    assert exited.exit_code == (3 if backend == "connector" else None)


FILE_SCRIPT = """
import sys
path = sys.argv[1]
for line in sys.stdin:
    if line.strip() == "open":
        f = open(path, "w")
        print(f.fileno(), flush=True)
    elif line.strip() == "close":
        f.close()
        print("closed", flush=True)
"""


@pytest.mark.usefixtures("no_leaks")
async def test_a_file_held_open_is_seen_opened_then_closed(tmp_path: Path) -> None:
    target = tmp_path / "held.txt"
    collector = Collector()
    observer = TreeObserver(
        emit=collector.emit, categories=frozenset({EventCategory.FILE}), backend="poll"
    )
    script = FILE_SCRIPT.replace("sys.argv[1]", repr(str(target)))
    async with child(script) as root, observing(observer):
        observer.add_root(root.pid)
        with trio.fail_after(10):
            await root.send("open")
            fd = int(await root.receive_line())
            opened = await collector.wait_for(
                lambda e: e.kind is K.FILE_OPEN and e.path == str(target)
            )
            await root.send("close")
            assert await root.receive_line() == "closed"
            closed = await collector.wait_for(
                lambda e: e.kind is K.FILE_CLOSE and e.path == str(target)
            )
        for event in (opened, closed):
            assert event.pid == root.pid
            assert event.fd == fd
            assert event.root_pid == root.pid
            assert event.category is EventCategory.FILE
            assert event.grade is EventGrade.INFERRED
        # Only FILE was asked for; pipes and /dev/null are never files.
        assert {e.category for e in collector.events} == {EventCategory.FILE}
        assert all(e.path and e.path.startswith("/") for e in collector.events)
        assert not any(e.path == "/dev/null" for e in collector.events)


SOCKET_SCRIPT = """
import socket, sys
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen()
print(listener.getsockname()[1], flush=True)
sys.stdin.readline()
client = socket.create_connection(listener.getsockname())
server, _ = listener.accept()
print(client.getsockname()[1], flush=True)
sys.stdin.readline()
listener.close()
print("closed", flush=True)
sys.stdin.readline()
"""


@pytest.mark.usefixtures("no_leaks")
async def test_sockets_listen_connect_and_close_are_seen() -> None:
    collector = Collector()
    observer = TreeObserver(
        emit=collector.emit, categories=frozenset({EventCategory.NETWORK}), backend="poll"
    )
    async with child(SOCKET_SCRIPT) as root, observing(observer):
        observer.add_root(root.pid)
        with trio.fail_after(10):
            port = int(await root.receive_line())
            address = f"127.0.0.1:{port}"
            listen = await collector.wait_for(
                lambda e: e.kind is K.SOCKET_LISTEN and e.local_address == address
            )
            await root.send("connect")
            client_port = int(await root.receive_line())
            connect = await collector.wait_for(
                lambda e: (
                    e.kind is K.SOCKET_CONNECT and e.local_address == f"127.0.0.1:{client_port}"
                )
            )
            # The accepted end is connected too, seen from the other side.
            accepted = await collector.wait_for(
                lambda e: e.kind is K.SOCKET_CONNECT and e.local_address == address
            )
            await root.send("close")
            assert await root.receive_line() == "closed"
            close = await collector.wait_for(
                lambda e: e.kind is K.SOCKET_CLOSE and e.fd == listen.fd
            )
        assert listen.protocol == "tcp"
        assert listen.pid == root.pid
        assert listen.remote_address is None
        assert connect.remote_address == address
        assert accepted.remote_address == f"127.0.0.1:{client_port}"
        assert close.local_address == address
        assert {e.category for e in collector.events} == {EventCategory.NETWORK}


# ----------------------------------------------------------- fake /proc trees


async def settle() -> None:
    await trio.testing.wait_all_tasks_blocked()


@pytest.mark.parametrize("children_files", [True, False], ids=["children-files", "full-scan"])
async def test_pid_reuse_is_an_exit_and_a_start(
    tmp_path: Path, mock_clock: trio.testing.MockClock, children_files: bool
) -> None:
    fake = FakeProc(tmp_path, children_files=children_files)
    fake.add(100, 1, starttime=10)
    fake.add(101, 100, starttime=20)
    collector = Collector()
    observer = TreeObserver(
        emit=collector.emit, categories=PROCESS, proc_root=fake.path, poll_interval=1.0
    )
    observer.add_root(100)
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
    observer = TreeObserver(
        emit=collector.emit, categories=PROCESS, proc_root=fake.path, poll_interval=1.0
    )
    observer.add_root(100)
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
    observer = TreeObserver(
        emit=collector.emit, categories=PROCESS, proc_root=fake.path, poll_interval=1.0
    )
    observer.add_root(100)
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
    observer = TreeObserver(
        emit=collector.emit,
        categories=frozenset({EventCategory.FILE}),
        proc_root=fake.path,
        poll_interval=1.0,
    )
    observer.add_root(100)

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
    observer = TreeObserver(
        emit=collector.emit,
        categories=frozenset({EventCategory.NETWORK}),
        proc_root=fake.path,
        poll_interval=1.0,
    )
    observer.add_root(100)
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


# ------------------------------------------------------- skipping quiet ones


def set_schedstat(fake: FakeProc, pid: int, runtime: int, scheduled: int) -> None:
    """Write the run counters the kernel keeps in ``<pid>/schedstat``."""
    (fake.root / str(pid) / "schedstat").write_text(f"{runtime} 0 {scheduled}\n")


async def test_fake_descriptors_of_a_quiet_process_are_read_when_it_runs_or_verified(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    fake = FakeProc(tmp_path)
    fake.add(100, 1)
    fake.add(101, 100)
    for pid in (100, 101):
        set_schedstat(fake, pid, 1000, 1)
    fake.set_fd(101, 3, "/data/a")
    collector = Collector()
    observer = TreeObserver(
        emit=collector.emit,
        categories=frozenset({EventCategory.FILE}),
        proc_root=fake.path,
        poll_interval=1.0,
    )
    observer.add_root(100)

    async with observing(observer):
        await settle()
        assert collector.take_files() == [(K.FILE_OPEN, 3, "/data/a")]
        # 101 was found by that scan, after the counters were read: the next
        # pass takes its baseline (and reads it once more).
        mock_clock.jump(1.0)
        await settle()
        assert collector.take_files() == []
        # Counters unchanged: in this fake, 101 "did not run", so it is not
        # read again (a real process cannot open a file without running).
        fake.set_fd(101, 4, "/data/b")
        mock_clock.jump(1.0)
        await settle()
        assert collector.take_files() == []
        set_schedstat(fake, 101, 1500, 2)
        mock_clock.jump(1.0)
        await settle()
        assert collector.take_files() == [(K.FILE_OPEN, 4, "/data/b")]

        # What the counters cannot see is found by the periodic full look:
        # after VERIFY_EVERY quiet passes in a row, the next one reads all.
        fake.set_fd(101, 5, "/data/c")
        for _ in range(VERIFY_EVERY):
            mock_clock.jump(1.0)
            await settle()
        assert collector.take_files() == []
        mock_clock.jump(1.0)
        await settle()
        assert collector.take_files() == [(K.FILE_OPEN, 5, "/data/c")]


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
    observer = TreeObserver(
        emit=collector.emit, categories=PROCESS, proc_root=fake.path, poll_interval=1.0
    )
    observer.add_root(100)
    async with observing(observer):
        await settle()
        mock_clock.jump(1.0)
        await settle()
        fake.add(101, 100, state="Z", exit_status=7 << 8)
        set_schedstat(fake, 101 if seen_alive else 100, 2000, 2)
        for _ in range(2 * VERIFY_EVERY + 3):
            mock_clock.jump(1.0)
            await settle()
    assert [(e.kind, e.pid, e.exit_code) for e in collector.events] == [
        (K.DESCENDANT_STARTED, 101, None),
        (K.DESCENDANT_EXITED, 101, 7),
    ]


async def test_fake_zero_counters_prove_nothing(tmp_path: Path) -> None:
    fake = FakeProc(tmp_path)
    fake.add(100, 1)
    set_schedstat(fake, 100, 0, 0)  # a kernel without CONFIG_SCHED_INFO
    watch = ActivityWatch(fake.path)
    assert watch.update([100]) == set()
    assert watch.update([100]) == set()
    set_schedstat(fake, 100, 1000, 3)
    assert watch.update([100]) == set()  # first baseline
    assert watch.update([100]) == {100}
    assert watch.update([]) == set()  # forgotten
    assert watch.update([100]) == set()


async def test_a_real_sleeping_process_is_quiet_until_it_runs() -> None:
    script = "import sys\nfor line in sys.stdin:\n    print('ack', flush=True)\n"
    watch = ActivityWatch("/proc", verify_every=1000)
    async with child(script) as proc:
        await proc.send("hello")
        with trio.fail_after(10):
            assert await proc.receive_line() == "ack"
            # It goes back to sleep in read() after printing; wait until the
            # counters stop moving (a real process, the real clock).
            while not watch.update([proc.pid]):  # noqa: ASYNC110  # a real process's state has no trio event
                await trio.sleep(0.01)  # a real process: no event
        assert watch.update([proc.pid]) == {proc.pid}
        await proc.send("again")
        with trio.fail_after(10):
            assert await proc.receive_line() == "ack"
        # It ran after the last look: active, whatever state it is in now.
        assert watch.update([proc.pid]) == set()


# ------------------------------------------------------- orphans we adopt

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


# The grandchild is forked (with the root's command line) and execs a new
# program only when told; the root ends it when told again.
EXEC_SCRIPT = """
import os, sys
r, w = os.pipe()
os.set_inheritable(r, True)
pid = os.fork()
if pid == 0:
    os.close(w)
    os.read(r, 1)
    os.execv(sys.executable, [sys.executable, "-c",
             "import os, sys; os.read(int(sys.argv[1]), 1)", str(r), "exec-marker"])
os.close(r)
print(pid, flush=True)
sys.stdin.readline()
os.write(w, b"x")
sys.stdin.readline()
os.close(w)
os.waitpid(pid, 0)
"""


@pytest.mark.parametrize("backend", ["poll", "connector"])
@pytest.mark.usefixtures("no_leaks")
async def test_an_exec_is_reported_with_the_new_command_line(
    backend: Literal["poll", "connector"],
) -> None:
    if backend == "connector" and os.geteuid() != 0:
        pytest.skip("the process connector needs CAP_NET_ADMIN")
    collector = Collector()
    observer = TreeObserver(emit=collector.emit, categories=PROCESS, backend=backend)
    async with child(EXEC_SCRIPT) as root, observing(observer):
        observer.add_root(root.pid)
        with trio.fail_after(10):
            grandchild = int(await root.receive_line())
            started = await collector.wait_for(
                lambda e: e.kind is K.DESCENDANT_STARTED and e.pid == grandchild
            )
            await root.send("exec")
            exec_event = await collector.wait_for(
                lambda e: e.kind is K.DESCENDANT_EXEC and e.pid == grandchild
            )
            await root.send("stop")
            await root.process.wait()
    # Seen at the fork: the root's command line (or none, if unreadable).
    assert started.argv is None or "exec-marker" not in started.argv
    assert exec_event.argv is not None
    assert exec_event.argv[-1] == "exec-marker"
    assert exec_event.ppid == root.pid
    assert exec_event.root_pid == root.pid
    expected = EventGrade.EXACT if backend == "connector" else EventGrade.INFERRED
    assert exec_event.grade is expected
    assert collector.kinds(grandchild, execs=True).count(K.DESCENDANT_EXEC) == 1
