"""The session's byte side and tree observation, end to end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import trio
import trio.testing

from trio_observer import (
    CAPTURE,
    EventCategory,
    ObserverBackpressure,
    ObserverEvent,
    ObserverEventKind,
    PtySize,
    TerminationOutcome,
    open_session,
)

from .conftest import PY, children_of

pytestmark = pytest.mark.usefixtures("no_leaks")


async def test_captured_logs_hold_everything_up_to_end_of_stream() -> None:
    script = "import sys; sys.stdout.write('x' * 300000); sys.stderr.write('done')"
    async with open_session() as session:
        process = await session.start_process([PY, "-c", script], stdout=CAPTURE, stderr=CAPTURE)
        assert process.stdout is None
        await process.wait()
    assert process.stdout_log is not None
    assert process.stderr_log is not None
    assert process.stdout_log.snapshot() == b"x" * 300000
    assert process.stdout_log.closed
    assert process.stderr_log.snapshot() == b"done"


async def test_backlog_bytes_bounds_the_log() -> None:
    async with open_session() as session:
        process = await session.start_process(
            [PY, "-c", "print('a' * 999)"], stdout=CAPTURE, backlog_bytes=100
        )
    assert process.stdout_log is not None
    assert process.stdout_log.total_bytes == 1000
    assert process.stdout_log.dropped_bytes == 900
    assert process.stdout_log.snapshot() == b"a" * 99 + b"\n"
    with pytest.RaisesGroup(pytest.RaisesExc(ValueError, match="backlog_bytes must be >= 1")):
        async with open_session() as session:
            await session.start_process([PY, "-c", "pass"], stdout=CAPTURE, backlog_bytes=0)


async def test_a_grandchild_holding_the_pipe_does_not_hang_the_session() -> None:
    # The grandchild inherits stdout and sleeps; the child exits at once.
    script = (
        "import subprocess, sys\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(1000)'],"
        " start_new_session=True)\n"
        "print('child done', flush=True)\n"
    )
    with trio.fail_after(20):
        async with open_session() as session:
            process = await session.start_process([PY, "-c", script], stdout=CAPTURE)
            assert await process.wait() == 0
    assert process.stdout_log is not None
    assert process.stdout_log.snapshot() == b"child done\n"
    assert process.stdout_log.closed


async def test_pty_process_has_a_controlling_terminal() -> None:
    script = (
        "import os, sys\n"
        "print(os.isatty(0), os.tcgetpgrp(0) == os.getpgrp(), os.getsid(0) == os.getpid(),"
        " os.get_terminal_size(0))\n"
        "print(input('name? ')[::-1])\n"
    )
    async with open_session() as session:
        process = await session.start_process([PY, "-c", script], pty=PtySize(rows=30, cols=100))
        assert process.pty is not None
        await process.pty.log.expect(b"name? ", timeout=10)
        assert process.pty.size == PtySize(rows=30, cols=100)
        await process.pty.write("hello\n")
        assert await process.wait() == 0
    output = process.pty.log.snapshot()
    assert b"True True True os.terminal_size(columns=100, lines=30)" in output
    assert b"olleh" in output
    assert process.pty.log.closed


async def test_pty_interrupt_reaches_the_child() -> None:
    # SIGINT at its default disposition: the child must die of it. (Waiting
    # for KeyboardInterrupt in input() is racy in CPython.)
    script = (
        "import signal, sys\n"
        "signal.signal(signal.SIGINT, signal.SIG_DFL)\n"
        "print('ready', flush=True)\n"
        "sys.stdin.read()\n"
    )
    async with open_session() as session:
        process = await session.start_process([PY, "-c", script], pty=True)
        assert process.pty is not None
        await process.pty.log.expect("ready", timeout=10)
        await process.pty.interrupt()
        assert await process.wait() == -signal.SIGINT
        assert process.termination is TerminationOutcome.NATURAL_EXIT


async def test_pty_refuses_stdio_arguments() -> None:
    async with open_session() as session:
        with pytest.raises(ValueError, match="leave stdin, stdout and stderr at None"):
            await session.start_process([PY, "-c", "pass"], pty=True, stdout=CAPTURE)
        assert session.processes == ()


async def test_descendants_and_files_are_observed(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "held.txt")
    script = (
        "import subprocess, sys\n"
        f"f = open({path!r}, 'w')\n"
        "g = subprocess.Popen([sys.executable, '-c', 'import sys; sys.stdin.read()'],"
        " stdin=subprocess.PIPE)\n"
        "print(g.pid, flush=True)\n"
        "sys.stdin.readline()\n"
        "f.close(); g.stdin.close(); g.wait()\n"
    )
    seen: list[ObserverEvent] = []
    async with (
        open_session(poll_interval=0.01) as session,
        session.observers.subscribe(
            [EventCategory.PROCESS, EventCategory.FILE],
            backpressure=ObserverBackpressure.BLOCK,
        ) as sub,
    ):
        process = await session.start_process(
            [PY, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert process.stdout is not None
        assert process.stdin is not None
        line = b""
        while not line.endswith(b"\n"):
            line += await process.stdout.receive_some(1)
        grandchild = int(line)
        with trio.fail_after(20):
            async for event in sub:
                seen.append(event)
                kinds = {(e.kind, e.pid) for e in seen}
                if (ObserverEventKind.DESCENDANT_STARTED, grandchild) in kinds and any(
                    e.kind is ObserverEventKind.FILE_OPEN and e.path == path for e in seen
                ):
                    break
            await process.stdin.send_all(b"go\n")
            # The exit may come from the kernel before the next scan
            # notices the closed file: wait for both.
            async for event in sub:
                seen.append(event)
                if any(
                    e.kind is ObserverEventKind.DESCENDANT_EXITED and e.pid == grandchild
                    for e in seen
                ) and any(e.kind is ObserverEventKind.FILE_CLOSE and e.path == path for e in seen):
                    break
        await process.wait()
    started = next(
        e for e in seen if e.kind is ObserverEventKind.DESCENDANT_STARTED and e.pid == grandchild
    )
    assert started.ppid == process.pid
    assert started.root_pid == process.pid
    exited = next(
        e for e in seen if e.kind is ObserverEventKind.DESCENDANT_EXITED and e.pid == grandchild
    )
    assert exited.exit_code == 0
    assert any(e.kind is ObserverEventKind.FILE_CLOSE and e.path == path for e in seen)


async def test_tree_observer_idle_without_a_sink() -> None:
    async with open_session() as session:
        await session.run_process([PY, "-c", "pass"])
        assert session._tree.statistics().polls == 0
        async with session.observers.subscribe([EventCategory.PROCESS]):
            await session.run_process([PY, "-c", "pass"])
        # A pass already under way when the last sink went may finish.
        await trio.testing.wait_all_tasks_blocked()
        polls = session._tree.statistics().polls
        await session.run_process([PY, "-c", "pass"])
        assert session._tree.statistics().polls == polls


def test_no_stray_imports() -> None:
    assert "trio_observer" in sys.modules


async def test_orphans_are_observed_and_reaped_while_the_session_runs() -> None:
    # The grandchild moves to its own session and outlives its parent; it is
    # re-parented to this process (child subreaper), and when it exits the
    # tree observer reaps it at once instead of leaving a zombie until the
    # session ends.
    script = (
        "import subprocess, sys\n"
        "g = subprocess.Popen([sys.executable, '-c', 'import sys; sys.stdin.read()'],"
        " start_new_session=True)\n"
        "print(g.pid, flush=True)\n"
    )
    async with (
        open_session() as session,
        session.observers.subscribe(
            [EventCategory.PROCESS], backpressure=ObserverBackpressure.BLOCK
        ) as sub,
    ):
        process = await session.start_process(
            [PY, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert process.stdin is not None
        assert process.stdout is not None
        line = b""
        while not line.endswith(b"\n"):
            line += await process.stdout.receive_some(1)
        grandchild = int(line)
        assert await process.wait() == 0
        assert grandchild in children_of(os.getpid())  # adopted
        await process.stdin.aclose()  # the grandchild reads EOF and exits
        with trio.fail_after(20):
            async for event in sub:
                if event.kind is ObserverEventKind.DESCENDANT_EXITED and event.pid == grandchild:
                    break
        assert event.exit_code == 0
        await trio.testing.wait_all_tasks_blocked()
        assert grandchild not in children_of(os.getpid())  # reaped, no zombie


async def test_pty_send_eof_ends_the_input() -> None:
    script = "import sys; print('ready', flush=True); print(len(sys.stdin.read()))"
    async with open_session() as session:
        process = await session.start_process([PY, "-c", script], pty=True)
        assert process.pty is not None
        await process.pty.log.expect("ready", timeout=10)
        await process.pty.write("abc\n")
        await process.pty.send_eof()
        assert await process.wait() == 0
        with pytest.raises(trio.ClosedResourceError):
            await process.pty.write("more")
    assert process.pty.log.snapshot().endswith(b"4\r\n")


async def test_pipes_of_a_reaped_process_are_closed_when_the_session_ends() -> None:
    async with open_session() as session:
        piped = await session.start_process(
            [PY, "-c", "pass"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        plain = await session.start_process([PY, "-c", "pass"])
        await piped.wait()
        await plain.wait()
        # Only a process with something to close is remembered for it.
        assert set(session._reaped) == {piped}
    assert piped.stdin is not None
    assert piped.stdout is not None
    with pytest.raises(trio.ClosedResourceError):
        await piped.stdin.send_all(b"x")
    with pytest.raises(trio.ClosedResourceError):
        await piped.stdout.receive_some()


async def test_a_long_session_keeps_no_record_of_reaped_processes() -> None:
    async with open_session() as session:
        for stdout in (None, CAPTURE):
            process = await session.start_process([PY, "-c", "print('hi')"], stdout=stdout)
            assert session.processes == (process,)
            await process.wait()
            assert len(session.processes) == 0
        assert process.stdout_log is not None
        async for _ in process.stdout_log.cursor():
            pass  # to the end of the stream: the reader has closed the log
        await trio.testing.wait_all_tasks_blocked()
        assert session._readers == {}
        assert session._tree._tree.pids() == []  # nobody observes: nothing kept
