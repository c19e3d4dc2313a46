"""Sessions: spawn, reap, events, cancellation and teardown of whole trees."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import AsyncIterator
from functools import partial

import pytest
import trio
import trio.testing

from trio_observer import (
    EventCategory,
    ObserverBackpressure,
    ObserverEvent,
    ObserverEventKind,
    Process,
    TerminationOutcome,
    UnsupportedCategoryError,
    negotiate_capabilities,
    open_session,
)

from .conftest import PY, reap_zombie_child

pytestmark = pytest.mark.usefixtures("no_leaks")

LIFECYCLE = [EventCategory.LIFECYCLE]

# A child that spawns a grandchild, prints its pid and waits for it.
SPAWN_GRANDCHILD = (
    "import subprocess, sys\n"
    "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(1000)']{extra})\n"
    "print(g.pid, flush=True)\n"
    "{then}\n"
)


def alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except FileNotFoundError:
        return False
    return text[text.rindex(")") + 2] not in "ZX"


async def read_line(stream: trio.abc.ReceiveStream) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = await stream.receive_some(1)
        assert chunk, f"EOF before a full line: {data!r}"
        data += chunk
    return data


async def collect(channel: trio.MemoryReceiveChannel[ObserverEvent]) -> list[ObserverEvent]:
    return [event async for event in channel]


async def test_start_wait_and_lifecycle_events() -> None:
    async with open_session() as session:
        _, events = session.observers.add_channel(LIFECYCLE, 8, ObserverBackpressure.BLOCK)
        process = await session.start_process([PY, "-c", "raise SystemExit(7)"])
        assert await process.wait() == 7
        assert process.returncode == 7
        assert process.termination is TerminationOutcome.NATURAL_EXIT
    received = await collect(events)  # the session closed the sink: the loop ends
    assert [e.kind for e in received] == [ObserverEventKind.STARTED, ObserverEventKind.EXITED]
    started, exited = received
    assert started.pid == exited.pid == process.pid
    assert started.ppid == os.getpid()
    assert started.argv == (PY, "-c", "raise SystemExit(7)")
    assert started.exit_code is None
    assert exited.exit_code == 7
    assert exited.termination is TerminationOutcome.NATURAL_EXIT
    assert started.timestamp_ms <= exited.timestamp_ms


async def test_signal_death_is_a_negative_exit_code() -> None:
    async with open_session() as session:
        _, events = session.observers.add_channel(LIFECYCLE, 8, ObserverBackpressure.BLOCK)
        process = await session.start_process(
            [PY, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"]
        )
        assert await process.wait() == -signal.SIGKILL
    exited = (await collect(events))[-1]
    assert exited.kind is ObserverEventKind.EXITED
    assert exited.exit_code == -signal.SIGKILL


async def test_many_tasks_can_wait() -> None:
    results: list[int] = []
    async with open_session() as session:
        process = await session.start_process([PY, "-c", "raise SystemExit(3)"])

        async def waiter() -> None:
            results.append(await process.wait())

        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(waiter)
    assert results == [3] * 5


async def test_pipes_round_trip() -> None:
    async with open_session() as session:
        process = await session.start_process(
            [PY, "-c", "import sys; sys.stdout.write(sys.stdin.read().upper())"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert process.stdin is not None
        assert process.stdout is not None
        assert process.stderr is None
        await process.stdin.send_all(b"hello")
        await process.stdin.aclose()
        output = b""
        while chunk := await process.stdout.receive_some():
            output += chunk
        assert output == b"HELLO"
        assert await process.wait() == 0


async def test_devnull_and_stderr_to_stdout() -> None:
    async with open_session() as session:
        process = await session.start_process(
            [PY, "-c", "import sys; print(repr(sys.stdin.read())); print('e', file=sys.stderr)"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        assert process.stdout is not None
        output = b""
        while chunk := await process.stdout.receive_some():
            output += chunk
        assert output.split() == [b"''", b"e"]
        await process.wait()


async def test_bad_argv() -> None:
    async with open_session() as session:
        with pytest.raises(ValueError, match="argv must not be empty"):
            await session.start_process([])
        with pytest.raises(TypeError, match="not a string"):
            await session.start_process("ls -l")
        assert session.processes == ()


async def test_missing_program_leaves_the_session_working() -> None:
    async with open_session() as session:
        _, events = session.observers.add_channel(LIFECYCLE, 8, ObserverBackpressure.BLOCK)
        with pytest.raises(FileNotFoundError):
            await session.start_process(
                ["/nonexistent/program"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
            )
        process = await session.start_process([PY, "-c", "pass"])
        assert await process.wait() == 0
    kinds = [(e.kind, e.pid) for e in await collect(events)]
    assert kinds == [
        (ObserverEventKind.STARTED, process.pid),
        (ObserverEventKind.EXITED, process.pid),
    ]


async def test_leaving_the_block_waits_for_processes() -> None:
    read_fd, write_fd = os.pipe()
    finished = trio.Event()

    async def run_session() -> None:
        async with open_session() as session:
            # The child exits when the pipe's write end is closed.
            await session.start_process([PY, "-c", "import sys; sys.stdin.read()"], stdin=read_fd)
            os.close(read_fd)
        finished.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_session)
        await trio.testing.wait_all_tasks_blocked()
        assert not finished.is_set()
        os.close(write_fd)
    assert finished.is_set()


async def test_cancellation_stops_the_whole_tree() -> None:
    async with open_session(grace_period=30) as session:
        _, events = session.observers.add_channel(LIFECYCLE, 8, ObserverBackpressure.BLOCK)
        process = await session.start_process(
            [PY, "-c", SPAWN_GRANDCHILD.format(extra="", then="g.wait()")],
            stdout=subprocess.PIPE,
        )
        assert process.stdout is not None
        grandchild = int(await read_line(process.stdout))
        assert alive(grandchild)
        session.cancel_scope.cancel()
    assert process.returncode == -signal.SIGTERM
    assert process.termination is TerminationOutcome.SOFT_EXIT
    assert not alive(grandchild)
    exited = (await collect(events))[-1]
    assert exited.kind is ObserverEventKind.EXITED
    assert exited.termination is TerminationOutcome.SOFT_EXIT


async def test_outer_cancellation_stops_the_tree() -> None:
    with trio.move_on_after(0.2):
        async with open_session() as session:
            process = await session.start_process([PY, "-c", "import time; time.sleep(1000)"])
            await process.wait()
    assert process.returncode == -signal.SIGTERM


async def test_sigkill_after_grace_period_on_the_trio_clock(
    mock_clock: trio.testing.MockClock,
) -> None:
    ignore_term = (
        "import signal, sys\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ready', flush=True)\n"
        "sys.stdin.read()\n"
    )
    async with open_session(grace_period=10) as session:
        process = await session.start_process(
            [PY, "-c", ignore_term], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert process.stdout is not None
        assert await read_line(process.stdout) == b"ready\n"
        session.cancel_scope.cancel()
        with trio.CancelScope(shield=True):
            await trio.testing.wait_all_tasks_blocked()
            # SIGTERM was sent and ignored; nothing happens until the clock moves.
            assert process.returncode is None
            mock_clock.jump(9.9)
            await trio.testing.wait_all_tasks_blocked()
            assert process.returncode is None
            mock_clock.jump(0.1)
    assert process.returncode == -signal.SIGKILL
    assert process.termination is TerminationOutcome.HARD_KILLED


async def test_terminate_gracefully() -> None:
    on_term = (
        "import signal, sys\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(5))\n"
        "print('ready', flush=True)\n"
        "signal.pause()\n"
    )
    async with open_session() as session:
        process = await session.start_process([PY, "-c", on_term], stdout=subprocess.PIPE)
        assert process.stdout is not None
        await read_line(process.stdout)
        assert await process.terminate_gracefully(grace_period=30) == 5
        assert process.termination is TerminationOutcome.SOFT_EXIT
        with pytest.raises(ValueError, match="grace_period must be >= 0"):
            await process.terminate_gracefully(grace_period=-1)


async def test_descendants_left_behind_are_stopped_when_the_block_ends() -> None:
    # The grandchild moves to a session of its own (so killpg cannot reach
    # it) and its parent exits: it is adopted by this process, the child
    # subreaper, and recognised by the session id in its environment.
    script = SPAWN_GRANDCHILD.format(extra=", start_new_session=True", then="")
    async with open_session(containment="process-group") as session:
        process = await session.start_process([PY, "-c", script], stdout=subprocess.PIPE)
        assert process.stdout is not None
        grandchild = int(await read_line(process.stdout))
        assert await process.wait() == 0
        assert alive(grandchild)
    assert not alive(grandchild)


async def test_process_group_leftovers_are_stopped() -> None:
    script = SPAWN_GRANDCHILD.format(extra="", then="")
    async with open_session(containment="process-group") as session:
        process = await session.start_process([PY, "-c", script], stdout=subprocess.PIPE)
        assert process.stdout is not None
        grandchild = int(await read_line(process.stdout))
        await process.wait()
    assert not alive(grandchild)


async def test_error_in_block_stops_processes_and_propagates() -> None:
    with pytest.RaisesGroup(pytest.RaisesExc(KeyError, match="boom")):
        async with open_session() as session:
            process = await session.start_process([PY, "-c", "import time; time.sleep(1000)"])
            raise KeyError("boom")
    assert process.returncode == -signal.SIGTERM


async def test_sinks_close_when_the_session_ends() -> None:
    seen: list[ObserverEventKind] = []

    async def consume(sub: AsyncIterator[ObserverEvent]) -> None:
        async for event in sub:
            seen.append(event.kind)

    async with (
        trio.open_nursery() as nursery,
        open_session() as session,
        session.observers.subscribe(LIFECYCLE) as sub,
    ):
        nursery.start_soon(consume, sub)
        await session.run_process([PY, "-c", "pass"])
        # Still inside the subscription: the consumer ends only when
        # the session (or the subscription) ends.
    assert seen == [ObserverEventKind.STARTED, ObserverEventKind.EXITED]


async def test_run_process_under_nursery_start() -> None:
    async with open_session() as session, trio.open_nursery() as nursery:
        process = await nursery.start(
            partial(session.run_process, [PY, "-c", "raise SystemExit(2)"], check=False)
        )
        assert isinstance(process, Process)
        assert await process.wait() == 2


async def test_start_after_the_session_ended() -> None:
    async with open_session() as session:
        pass
    with pytest.raises(trio.ClosedResourceError, match="session has ended"):
        await session.start_process([PY, "-c", "pass"])
    with pytest.raises(trio.ClosedResourceError):
        session.observers.add_channel(LIFECYCLE, 1, ObserverBackpressure.BLOCK)


async def test_grace_period_is_checked() -> None:
    with pytest.raises(ValueError, match="grace_period must be >= 0"):
        async with open_session(grace_period=-1):
            pass
    with pytest.raises(ValueError, match="grace_period"):
        async with open_session(grace_period=float("nan")):
            pass


async def test_timestamps_follow_the_trio_clock(mock_clock: trio.testing.MockClock) -> None:
    # The normal path uses no timers: with the clock standing still, a
    # process is spawned, reaped and reported.
    async with open_session() as session:
        _, events = session.observers.add_channel(LIFECYCLE, 8, ObserverBackpressure.BLOCK)
        start = trio.current_time()
        process = await session.start_process([PY, "-c", "pass"])
        await process.wait()
        mock_clock.jump(42)
    started, exited = await collect(events)
    assert started.timestamp_ms == pytest.approx(start * 1000)
    assert exited.timestamp_ms == pytest.approx(start * 1000)
    assert trio.current_time() == pytest.approx(start + 42)


async def test_stuck_block_consumer_does_not_hang_cancellation() -> None:
    async with open_session() as session:
        sink_id, events = session.observers.add_channel(LIFECYCLE, 1, ObserverBackpressure.BLOCK)
        await session.start_process([PY, "-c", "import time; time.sleep(1000)"])
        # STARTED filled the channel; nobody reads it.
        session.cancel_scope.cancel()
    status = session.observers.status(sink_id)
    assert status is not None
    assert (status.delivered_events, status.missed_events) == (1, 1)
    events.close()


async def test_children_carry_the_session_id() -> None:
    async with open_session() as session:
        process = await session.start_process(
            [PY, "-c", "import os; print(os.environ['TRIO_OBSERVER_SESSION'])"],
            stdout=subprocess.PIPE,
            env={"PATH": os.environ.get("PATH", "")},
        )
        assert process.stdout is not None
        assert (await read_line(process.stdout)).strip().decode() == session.id
        await process.wait()


async def test_subreaper_only_while_a_session_is_open() -> None:
    from trio_observer._linux._process_tree import is_subreaper

    assert not is_subreaper()
    async with open_session():
        assert is_subreaper()
        async with open_session():
            assert is_subreaper()
        assert is_subreaper()  # the outer session still holds it
    assert not is_subreaper()


# A grandchild that daemonizes (its own session) and waits for the end of
# its stdin, while its parent prints its pid and exits at once: the test
# makes it exit only once it is an orphan of this process (a child
# subreaper), by closing the pipe.
DAEMONIZE = SPAWN_GRANDCHILD.replace(
    "'import time; time.sleep(1000)'", "'import sys; sys.stdin.read()'"
).format(extra=", start_new_session=True", then="")


async def wait_for_exit(pid: int) -> None:
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return  # exited and already reaped
    try:
        await trio.lowlevel.wait_readable(fd)
    finally:
        os.close(fd)


EXACT_PROCESS_EVENTS = negotiate_capabilities()[EventCategory.PROCESS].backend == "proc-connector"


@pytest.mark.parametrize(
    "track",
    [
        pytest.param(
            True,
            marks=pytest.mark.skipif(
                not EXACT_PROCESS_EVENTS,
                reason="a daemon that exits at once is seen only by the process connector "
                "(polling is documented to miss it); the connector needs CAP_NET_ADMIN",
            ),
        ),
        False,
    ],
)
async def test_track_descendants_reaps_daemons_that_exit(track: bool) -> None:
    async with open_session(track_descendants=track, containment="process-group") as session:
        process = await session.start_process(
            [PY, "-c", DAEMONIZE], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert process.stdin is not None
        assert process.stdout is not None
        grandchild = int(await read_line(process.stdout))
        await process.wait()
        await process.stdin.aclose()  # the orphaned daemon reads EOF and exits
        await wait_for_exit(grandchild)
    zombie = reap_zombie_child(grandchild)  # and clean up for the leak check
    # Documented: without tracking, the session cannot attribute the zombie.
    assert zombie is not track


async def test_block_sinks_get_every_exit_after_its_start() -> None:
    # A BLOCK sink of capacity 1 whose consumer starts late: STARTED of the
    # second process waits for room while both processes exit. Nothing may
    # be lost and no EXITED may overtake its STARTED.
    async with open_session() as session:
        sink_id, events = session.observers.add_channel(LIFECYCLE, 1, ObserverBackpressure.BLOCK)
        received: list[tuple[ObserverEventKind, int]] = []
        may_read = trio.Event()
        started: list[Process] = []
        both_started = trio.Event()

        async def consume() -> None:
            await may_read.wait()
            async for event in events:
                received.append((event.kind, event.pid))

        async def start(argv: list[str]) -> None:
            started.append(await session.start_process(argv))
            if len(started) == 2:
                both_started.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(consume)
            await start([PY, "-c", "pass"])  # its STARTED fills the channel
            nursery.start_soon(start, [PY, "-c", "pass"])
            await started[0].wait()
            await trio.testing.wait_all_tasks_blocked()
            assert len(started) == 1  # the second STARTED waits for room...
            may_read.set()  # ...until the consumer reads
            await both_started.wait()
            await started[1].wait()
            await trio.testing.wait_all_tasks_blocked()
            status = session.observers.status(sink_id)
            session.observers.remove(sink_id)
    assert status is not None
    assert (status.delivered_events, status.missed_events) == (4, 0)
    for process in started:
        mine = [kind for kind, pid in received if pid == process.pid]
        assert mine == [ObserverEventKind.STARTED, ObserverEventKind.EXITED]


async def test_no_process_can_join_a_session_that_is_winding_down() -> None:
    outcome: list[BaseException] = []
    async with trio.open_nursery() as outer, open_session() as session:
        keeper = await session.start_process(
            [PY, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
        )

        async def late_start() -> None:
            await trio.testing.wait_all_tasks_blocked()
            # The block has ended; the session waits for `keeper`.
            try:
                await session.start_process([PY, "-c", "pass"])
            except trio.ClosedResourceError as exc:
                outcome.append(exc)
            assert keeper.stdin is not None
            await keeper.stdin.aclose()

        outer.start_soon(late_start)
    assert len(outcome) == 1
    assert "session has ended" in str(outcome[0])


async def test_signal_tree_does_nothing_after_the_reap(monkeypatch: pytest.MonkeyPatch) -> None:
    async with open_session() as session:
        process = await session.start_process([PY, "-c", "pass"])
        await process.wait()
    sent: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "killpg", lambda pgid, sig: sent.append((pgid, sig)))
    process.signal_tree(signal.SIGKILL)
    assert sent == []  # the group id may belong to someone else by now


class _SpawnCounter(trio.abc.Instrument):
    def __init__(self) -> None:
        self.spawned: list[trio.lowlevel.Task] = []

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        self.spawned.append(task)


async def test_an_empty_session_starts_no_task_and_its_sinks_still_close() -> None:
    # Nothing was started, so there is nothing to observe, stop, sweep or
    # drain: the tree observer's task waits for the first process, and the
    # close does not start a teardown task. Its sinks are closed all the same.
    counter = _SpawnCounter()
    trio.lowlevel.add_instrument(counter)
    try:
        async with open_session() as session:
            _, events = session.observers.add_channel(
                LIFECYCLE, 16, ObserverBackpressure.DROP_OLDEST
            )
    finally:
        trio.lowlevel.remove_instrument(counter)
    assert counter.spawned == []
    with pytest.raises(trio.EndOfChannel):
        await events.receive()


async def test_the_first_process_starts_the_tree_observer() -> None:
    # The other side: a session that starts a process runs its observer
    # and its teardown as before, and a sink wanting PROCESS sees the tree.
    try:
        negotiate_capabilities().require(EventCategory.PROCESS)
    except UnsupportedCategoryError as exc:
        pytest.skip(f"this machine cannot observe PROCESS events: {exc}")
    counter = _SpawnCounter()
    trio.lowlevel.add_instrument(counter)
    try:
        with trio.fail_after(60):
            async with open_session() as session:
                _, events = session.observers.add_channel(
                    [EventCategory.PROCESS], 64, ObserverBackpressure.DROP_OLDEST
                )
                script = SPAWN_GRANDCHILD.format(extra="", then="g.kill(); g.wait()")
                process = await session.start_process([PY, "-c", script])
                await process.wait()
    finally:
        trio.lowlevel.remove_instrument(counter)
    names = [task.name for task in counter.spawned]
    assert any("_run_tree_observer" in name for name in names), names
    assert any("_teardown" in name for name in names), names
    kinds = [event.kind async for event in events]
    assert ObserverEventKind.DESCENDANT_STARTED in kinds
