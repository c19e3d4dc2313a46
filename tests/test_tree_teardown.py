"""The end of a session: every event of the teardown is reported before the sinks close.

Real processes record their own pids (in a file), so what the session
reports is checked against what ran, on both backends: the connector when
this process may use it, and polling (the connector refused, as ``auto``
falls back without ``CAP_NET_ADMIN``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Literal

import pytest
import trio
import trio.testing

import trio_observer
from tests._fakeproc import FakeProc
from trio_observer import (
    EventCategory,
    EventGrade,
    ObserverBackpressure,
    ObserverEvent,
    ObserverEventKind,
)
from trio_observer._linux import _connector, _tree
from trio_observer._linux._connector import ConnectorUnavailableError

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc")

PY = sys.executable
Backend = Literal["connector", "poll"]
CONNECTOR_USABLE = os.geteuid() == 0


@pytest.fixture(params=["connector", "poll"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Backend:
    """Run the test with the session on each backend."""
    chosen: Backend = request.param
    if chosen == "connector" and not CONNECTOR_USABLE:
        pytest.skip("the process connector needs CAP_NET_ADMIN")
    if chosen == "poll":

        def refuse(*, ack_timeout: float = 1.0) -> None:
            raise ConnectorUnavailableError("refused by the test: polling")

        monkeypatch.setattr(_connector, "open_connector_socket", refuse)
    return chosen


class Consumer:
    """A BLOCK sink read by a task outside the session: it outlives the block."""

    def __init__(self) -> None:
        self.events: list[ObserverEvent] = []
        self.missed = 0
        self.changed = trio.Event()

    async def run(
        self,
        session: trio_observer.Session,
        categories: list[EventCategory],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async with session.observers.subscribe(
            categories, capacity=4096, backpressure=ObserverBackpressure.BLOCK
        ) as subscription:
            task_status.started()
            async for item in subscription:
                assert isinstance(item, ObserverEvent)
                self.events.append(item)
                self.changed.set()
                self.changed = trio.Event()
            self.missed = subscription.status().missed_events

    async def wait_for(self, kind: ObserverEventKind, pid: int) -> None:
        while not any(e.kind is kind and e.pid == pid for e in self.events):
            await self.changed.wait()

    def of(self, kind: ObserverEventKind, pid: int | None = None) -> list[ObserverEvent]:
        return [e for e in self.events if e.kind is kind and (pid is None or e.pid == pid)]


@asynccontextmanager
async def observed_session(
    categories: list[EventCategory], *, grace_period: float = 5.0
) -> AsyncIterator[tuple[trio_observer.Session, Consumer]]:
    consumer = Consumer()
    async with (
        trio.open_nursery() as outer,
        trio_observer.open_session(grace_period=grace_period) as session,
    ):
        await outer.start(consumer.run, session, categories)
        yield session, consumer


def recorded_pids(path: Path) -> list[int]:
    return [int(line.split()[0]) for line in path.read_text().split("\n") if line.strip()]


@pytest.mark.usefixtures("no_leaks")
async def test_every_process_of_a_storm_is_reported_started_and_exited(tmp_path: Path) -> None:
    # The defect: the root exits and the session cancelled the observer with
    # most of the storm's records still queued on the connector socket.
    if not CONNECTOR_USABLE:
        pytest.skip("the process connector needs CAP_NET_ADMIN")
    log = tmp_path / "pids"
    storm = f"for i in $(seq 150); do sh -c 'echo $$ >> {log}; exit 3' & done; wait"
    with trio.fail_after(60):
        async with observed_session([EventCategory.PROCESS]) as (session, consumer):
            await session.run_process(["sh", "-c", storm])
    pids = recorded_pids(log)
    assert len(pids) == 150
    assert not consumer.of(ObserverEventKind.OBSERVATION_LOST), "the kernel dropped records"
    for pid in pids:
        # Once each, as the kernel told it: a rescan of the tree racing with
        # the queued records used to add inferred exits without a code and
        # second, inferred pairs for zombies.
        starts = consumer.of(ObserverEventKind.DESCENDANT_STARTED, pid)
        assert [e.grade for e in starts] == [EventGrade.EXACT], pid
        exits = consumer.of(ObserverEventKind.DESCENDANT_EXITED, pid)
        assert [(e.grade, e.exit_code) for e in exits] == [(EventGrade.EXACT, 3)], pid
    assert consumer.missed == 0


HOLD_CHILD = """
import subprocess, sys
report = "import os, sys; print(os.getpid(), flush=True); sys.stdin.read()"
child = subprocess.Popen([sys.executable, "-c", report], stdin=subprocess.PIPE)
sys.stdin.readline()
child.stdin.close()
sys.exit(child.wait())
"""


@pytest.mark.usefixtures("no_leaks")
async def test_a_descendant_that_exits_with_the_root_gets_its_exit(backend: Backend) -> None:
    # The defect (polling): the child's start was seen, its exit, just
    # before the root's, came after the last scan and was never reported.
    with trio.fail_after(60):
        async with observed_session([EventCategory.PROCESS]) as (session, consumer):
            root = await session.start_process(
                [PY, "-c", HOLD_CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE
            )
            assert root.stdin is not None
            assert root.stdout is not None
            child = int((await root.stdout.receive_some()).split()[0])
            await consumer.wait_for(ObserverEventKind.DESCENDANT_STARTED, child)
            await root.stdin.send_all(b"go\n")
            assert await root.wait() == 0
    exits = consumer.of(ObserverEventKind.DESCENDANT_EXITED, child)
    assert len(exits) == 1
    assert consumer.missed == 0


HOLD_FILE = """
import sys
held = open(sys.argv[1], "w")
print("open", flush=True)
sys.stdin.readline()
"""


@pytest.mark.usefixtures("no_leaks")
async def test_a_file_held_until_the_root_exits_is_closed(backend: Backend, tmp_path: Path) -> None:
    target = tmp_path / "held.txt"
    with trio.fail_after(60):
        async with observed_session([EventCategory.FILE]) as (session, consumer):
            root = await session.start_process(
                [PY, "-c", HOLD_FILE, str(target)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
            )
            assert root.stdin is not None
            assert root.stdout is not None
            await root.stdout.receive_some()
            while not any(e.path == str(target) for e in consumer.of(ObserverEventKind.FILE_OPEN)):
                await consumer.changed.wait()
            await root.stdin.send_all(b"go\n")
            await root.wait()
    closes = [e for e in consumer.of(ObserverEventKind.FILE_CLOSE) if e.path == str(target)]
    assert [e.pid for e in closes] == [root.pid]
    assert consumer.missed == 0


DAEMONIZE = """
import os, sys
r, w = os.pipe()
if os.fork() == 0:
    if os.fork() == 0:
        os.setsid()
        with open(sys.argv[1], "w") as f:
            f.write(str(os.getpid()))
        os.close(w)
        os.execvp("sleep", ["sleep", "30"])
    os._exit(0)
os.close(w)
os.read(r, 1)  # EOF: the daemon has written its pid and is about to exec
os.wait()
"""


@pytest.mark.usefixtures("no_leaks")
async def test_a_daemon_killed_by_the_teardown_is_reported(
    backend: Backend, tmp_path: Path
) -> None:
    # The defect (polling): the daemon became this process's orphan and was
    # killed and reaped by the final sweep before any scan saw it.
    record = tmp_path / "daemon"
    with trio.fail_after(60):
        async with observed_session([EventCategory.PROCESS]) as (session, consumer):
            await session.run_process([PY, "-c", DAEMONIZE, str(record)])
    daemon = int(record.read_text())
    assert len(consumer.of(ObserverEventKind.DESCENDANT_STARTED, daemon)) == 1
    exits = consumer.of(ObserverEventKind.DESCENDANT_EXITED, daemon)
    assert [e.exit_code for e in exits] == [-signal.SIGTERM]
    assert consumer.missed == 0


THREE_CHILDREN = """
import subprocess, sys, time
children = [subprocess.Popen(["sh", "-c", "echo $$ >> " + sys.argv[1] + "; exec sleep 30"])
            for _ in range(3)]
while len(open(sys.argv[1]).read().split()) < 3:
    time.sleep(0.001)  # until the children have recorded themselves
print("ready", flush=True)
for child in children:
    child.wait()
"""


@pytest.mark.usefixtures("no_leaks")
async def test_a_cancelled_session_reports_the_exits_of_its_teardown(
    backend: Backend, tmp_path: Path
) -> None:
    # The defect: cancelling the session cancelled the observer too, so
    # nothing the teardown stopped was reported, not even the root's exit.
    record = tmp_path / "children"
    with trio.fail_after(60):
        async with observed_session([EventCategory.LIFECYCLE, EventCategory.PROCESS]) as (
            session,
            consumer,
        ):
            record.touch()
            root = await session.start_process(
                [PY, "-c", THREE_CHILDREN, str(record)], stdout=subprocess.PIPE
            )
            assert root.stdout is not None
            assert (await root.stdout.receive_some()).startswith(b"ready")
            children = recorded_pids(record)
            for pid in children:
                # A poll must have seen them alive: the root may reap one
                # (it waits for them) before the session's sweep looks.
                await consumer.wait_for(ObserverEventKind.DESCENDANT_STARTED, pid)
            session.cancel_scope.cancel()
    assert len(children) == 3
    assert [e.pid for e in consumer.of(ObserverEventKind.EXITED)] == [root.pid]
    # Polling learns the code only from a zombie or from the session's own
    # reap; a child the root reaped leaves neither.
    codes = {-signal.SIGTERM} if backend == "connector" else {-signal.SIGTERM, None}
    for pid in children:
        exits = consumer.of(ObserverEventKind.DESCENDANT_EXITED, pid)
        assert len(exits) == 1, pid
        assert exits[0].exit_code in codes, pid
    assert consumer.missed == 0


@pytest.mark.usefixtures("no_leaks")
def test_ctrl_c_to_the_cli_reports_every_exit_of_the_teardown(tmp_path: Path) -> None:
    record = tmp_path / "children"
    events = tmp_path / "events.jsonl"
    record.touch()
    cli = subprocess.Popen(
        [
            PY,
            "-m",
            "trio_observer",
            "run",
            "--category",
            "lifecycle,process",
            "--events",
            str(events),
            "--",
            PY,
            "-c",
            THREE_CHILDREN,
            str(record),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
    )
    try:
        # Once the children have recorded themselves the tree is there to be
        # stopped (observed yet or not: the teardown finds it).
        assert cli.stdout is not None
        assert cli.stdout.readline() == b"ready\n"
        cli.send_signal(signal.SIGINT)
        assert cli.wait(timeout=60) == 128 + signal.SIGINT
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
        assert cli.stdout is not None
        cli.stdout.close()
    lines = [json.loads(line) for line in events.read_text().splitlines()]
    exited = {
        line["pid"]: line.get("exit_code") for line in lines if line["kind"] == "descendant-exited"
    }
    for pid in recorded_pids(record):
        assert exited.get(pid) == -signal.SIGTERM, (pid, lines)
    assert [line["kind"] for line in lines].count("exited") == 1


DAEMONS = """
import subprocess
for _ in range(3):
    subprocess.Popen(["setsid", "sleep", "30"])
print("ready", flush=True)
"""


@pytest.mark.usefixtures("no_leaks")
async def test_a_block_sink_nobody_reads_does_not_hold_the_teardown() -> None:
    # The observer waits on a full BLOCK sink only so long at the end (a
    # second when grace_period=0, once before the sweep and once after);
    # what it could not deliver is counted as missed, not dropped unseen.
    # One backend only: the waiting is the session's, the same for both.
    with trio.fail_after(60):
        async with trio_observer.open_session(grace_period=0) as session:
            sink_id, receiver = session.observers.add_channel(
                [EventCategory.PROCESS], capacity=1, backpressure=ObserverBackpressure.BLOCK
            )
            # The daemons outlive the root; the sweep stops them.
            root = await session.start_process([PY, "-c", DAEMONS], stdout=subprocess.PIPE)
            assert root.stdout is not None
            assert (await root.stdout.receive_some()).startswith(b"ready")
            await root.wait()
    # Open until now, and never read.
    receiver.close()
    status = session.observers.status(sink_id)
    assert status is not None
    assert status.delivered_events == 1
    # Three starts and three exits at least, one of them delivered.
    assert status.missed_events >= 5


async def test_finish_accounts_for_every_member(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    # A fake /proc: at the end one member is gone (reaped by the sweep,
    # which knows its code), one was never seen (reaped by the sweep too),
    # and one is still running, so its end can never be reported.
    fake = FakeProc(tmp_path)
    fake.add(100, 1, starttime=10)
    fake.add(101, 100, starttime=20)
    fake.add(102, 100, starttime=21)
    events: list[ObserverEvent] = []

    async def emit(event: ObserverEvent) -> None:
        events.append(event)

    observer = _tree.TreeObserver(
        emit=emit, categories=frozenset({EventCategory.PROCESS}), proc_root=fake.path
    )
    observer.add_root(100)
    async with trio.open_nursery() as nursery:
        await nursery.start(observer.run)
        assert sorted(e.pid for e in events) == [101, 102]
        fake.remove(100)
        fake.remove(101)
        codes = {101: -signal.SIGKILL, 103: -signal.SIGTERM}
        await observer.settle(exit_codes=codes)
        await observer.finish()
    ends = [(e.kind, e.pid, e.exit_code, e.count) for e in events[2:]]
    assert ends == [
        (ObserverEventKind.DESCENDANT_EXITED, 101, -signal.SIGKILL, None),
        (ObserverEventKind.DESCENDANT_STARTED, 103, None, None),
        (ObserverEventKind.DESCENDANT_EXITED, 103, -signal.SIGTERM, None),
        (ObserverEventKind.OBSERVATION_LOST, _tree.LOSS_PID, None, 1),
    ]
    assert all(e.grade is EventGrade.INFERRED for e in events[2:5])


@trio.lowlevel.enable_ki_protection
def _press_ctrl_c() -> None:
    # Protected, so trio hands the KeyboardInterrupt to the main task where
    # it waits, as it does for a real Ctrl-C while the run loop is idle.
    signal.raise_signal(signal.SIGINT)


def test_ctrl_c_while_a_pass_waits_on_a_full_block_sink_counts_the_rest() -> None:
    # The observer's emit of a pass is interrupted on its first event: the
    # events after it must still be counted missed, not vanish with the task.
    registry = trio_observer.ObserverRegistry()
    sink_id, _receiver = registry.add_channel(
        [EventCategory.PROCESS], 1, ObserverBackpressure.BLOCK
    )
    observer = _tree.TreeObserver(
        emit=registry.emit,
        emit_nowait=registry.emit_nowait,
        categories=frozenset({EventCategory.PROCESS}),
    )
    events = [
        ObserverEvent(
            category=EventCategory.PROCESS,
            kind=ObserverEventKind.DESCENDANT_STARTED,
            pid=100_000 + n,
            timestamp_ms=0.0,
        )
        for n in range(4)
    ]

    async def main() -> None:
        registry.emit_nowait(events[0])  # fills the channel
        async with trio.open_nursery() as nursery:

            async def interrupt() -> None:
                await trio.testing.wait_all_tasks_blocked()
                _press_ctrl_c()

            nursery.start_soon(interrupt)
            await observer._emit_all(events)

    interrupted = False
    try:
        trio.run(main)
    except* KeyboardInterrupt:
        interrupted = True
    assert interrupted
    status = registry.status(sink_id)
    assert status is not None
    assert (status.delivered_events, status.missed_events) == (1, 4)


THREAD_EXEC_ROOT = """
import os, sys, threading
log = sys.argv[1]
children = []
for _ in range(12):
    pid = os.fork()
    if pid == 0:
        # execve() from a thread other than the main one: the kernel ends
        # the main thread first (an exit record for the pid, status 0).
        script = f"echo $$ >> {log}; exit 7"
        threading.Thread(target=os.execv, args=("/bin/sh", ["sh", "-c", script])).start()
        threading.Event().wait()
    children.append(pid)
for pid in children:
    os.waitpid(pid, 0)
"""


@pytest.mark.usefixtures("no_leaks")
async def test_a_thread_that_execs_gets_the_exit_of_its_program(tmp_path: Path) -> None:
    # The defect: the main thread's exit record was judged by reading /proc
    # when it was handled; a process that had exec'd and exited by then was
    # reported exited with status 0 (exact), its exec and status 7 ignored.
    if not CONNECTOR_USABLE:
        pytest.skip("the process connector needs CAP_NET_ADMIN")
    log = tmp_path / "pids"
    with trio.fail_after(30):
        async with observed_session([EventCategory.PROCESS]) as (session, consumer):
            await session.run_process([PY, "-c", THREAD_EXEC_ROOT, str(log)])
    pids = recorded_pids(log)
    assert len(pids) == 12
    assert not consumer.of(ObserverEventKind.OBSERVATION_LOST), "the kernel dropped records"
    for pid in pids:
        exits = consumer.of(ObserverEventKind.DESCENDANT_EXITED, pid)
        assert [(e.grade, e.exit_code) for e in exits] == [(EventGrade.EXACT, 7)], pid
        assert len(consumer.of(ObserverEventKind.DESCENDANT_EXEC, pid)) == 1, pid


PID_REUSE_ROOT = """
import os, sys
log = sys.argv[1]
def child(code):
    pid = os.fork()
    if pid == 0:
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {code}\\n")
        os._exit(code)
    os.waitpid(pid, 0)
    return pid
for _ in range(10):
    first = child(3)
    # The next pid the kernel hands out is first's again (unless another
    # process of the machine forks in between).
    with open("/proc/sys/kernel/ns_last_pid", "w") as f:
        f.write(str(first - 1))
    child(5)
"""


@pytest.mark.usefixtures("no_leaks")
async def test_a_pid_reused_at_once_is_two_processes(tmp_path: Path) -> None:
    # The defect: the exit record of the first process of a pid was judged
    # by reading /proc when handled; the next process of the pid, running
    # by then, was taken for the first one living on (main thread gone), so
    # the first one's exit and the second one's start were never reported.
    if not CONNECTOR_USABLE:
        pytest.skip("the process connector and ns_last_pid need root")
    log = tmp_path / "pids"
    with trio.fail_after(30):
        async with observed_session([EventCategory.PROCESS]) as (session, consumer):
            await session.run_process([PY, "-c", PID_REUSE_ROOT, str(log)])
    recorded: dict[int, list[int]] = {}
    for line in log.read_text().splitlines():
        pid, code = map(int, line.split())
        recorded.setdefault(pid, []).append(code)
    if all(len(codes) == 1 for codes in recorded.values()):
        pytest.skip("no pid was reused (the machine forked in between every time)")
    assert not consumer.of(ObserverEventKind.OBSERVATION_LOST), "the kernel dropped records"
    for pid, codes in recorded.items():
        exits = consumer.of(ObserverEventKind.DESCENDANT_EXITED, pid)
        assert [(e.grade, e.exit_code) for e in exits] == [(EventGrade.EXACT, c) for c in codes]
        assert len(consumer.of(ObserverEventKind.DESCENDANT_STARTED, pid)) == len(codes)
