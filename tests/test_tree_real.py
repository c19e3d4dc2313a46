"""The tree observer on real process trees: descendants, exit codes, execs, files, sockets."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Literal

import pytest
import trio
import trio.testing

from tests._tree_helpers import PROCESS, PY, Collector, K, child, observing
from trio_observer._events import EventCategory, EventGrade
from trio_observer._linux._tree import TreeObserver

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc")


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
