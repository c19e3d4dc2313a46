"""A daemon told to stop: every session at once, a second signal hurries it, none is left.

Ground truth is the processes' own records: each writes down its pid when
it is set up and again when SIGTERM reaches it (which it then ignores), and
``/proc`` says whether it still runs.
"""

from __future__ import annotations

import functools
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

import trio_observer
from trio_observer._daemon._client import DaemonError
from trio_observer._daemon._sessions import DaemonSession

from .conftest import PY, reap_zombie_child
from .test_daemon import DaemonProcess, start_daemon
from .test_daemon_containment import alive

# Set up, it writes "up <pid>"; at each SIGTERM "term <pid>", and goes on.
STUBBORN = (
    "import os, signal, sys, time\n"
    "def note(word):\n"
    "    with open(sys.argv[1], 'a') as f: f.write(f'{word} {os.getpid()}\\n')\n"
    "signal.signal(signal.SIGTERM, lambda *_: note('term'))\n"
    "note('up')\n"
    "while True: time.sleep(60)\n"
)


def _notes(path: Path, word: str) -> set[int]:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return set()
    return {int(line.split()[1]) for line in lines if line.split()[0] == word}


async def _wait_notes(path: Path, word: str, count: int) -> set[int]:
    # The processes write the file; there is nothing here to wait on.
    with trio.fail_after(20):
        while len(found := _notes(path, word)) < count:  # noqa: ASYNC110
            await trio.sleep(0.01)
    return found


@pytest.fixture
def stopping(tmp_path: Path) -> Iterator[DaemonProcess]:
    running = start_daemon(tmp_path / "d" / "daemon.sock")
    yield running
    if running.process.poll() is None:
        running.process.kill()
    running.process.communicate(timeout=60)
    # What a failed test left: a process-group session's trees outlive a
    # killed daemon.
    for pid in _notes(tmp_path / "notes", "up"):
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
        reap_zombie_child(pid)


async def _stubborn_sessions(running: DaemonProcess, notes: Path, count: int) -> set[int]:
    """``count`` sessions with a long grace period, each running a STUBBORN."""
    with trio.fail_after(60):
        async with trio_observer.connect(running.path, autostart=False) as client:
            for n in range(count):
                # process-group: what the cgroup would catch after a killed
                # daemon, nothing catches here.
                await client.create_session(f"s{n}", grace_period=600, containment="process-group")
                await client.start([PY, "-c", STUBBORN, str(notes)], session=f"s{n}")
            return await _wait_notes(notes, "up", count)


def _finish(running: DaemonProcess, pids: set[int]) -> int:
    code = running.process.wait(timeout=60)
    left = {pid for pid in pids if alive(pid)}
    assert left == set(), f"still running after the daemon exited: {left}"
    return code


async def test_a_second_sigterm_ends_the_grace_period_instead_of_killing_the_daemon(
    tmp_path: Path, stopping: DaemonProcess
) -> None:
    # The first SIGTERM closes the session with its 600 s grace period;
    # the second used to find the default handler back and kill the
    # daemon, and the process that ignores SIGTERM ran on.
    notes = tmp_path / "notes"
    pids = await _stubborn_sessions(stopping, notes, 1)
    stopping.process.send_signal(signal.SIGTERM)
    await _wait_notes(notes, "term", 1)
    stopping.process.send_signal(signal.SIGTERM)
    assert _finish(stopping, pids) == 0


async def test_shutdown_stops_every_session_at_once(
    tmp_path: Path, stopping: DaemonProcess
) -> None:
    # Closed one after another, the second session's tree got its SIGTERM
    # only once the first one's grace period had run out.
    notes = tmp_path / "notes"
    pids = await _stubborn_sessions(stopping, notes, 2)
    stopping.process.send_signal(signal.SIGTERM)
    assert await _wait_notes(notes, "term", 2) == pids
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    assert _finish(stopping, pids) == 0


async def test_a_session_asked_for_during_shutdown_is_refused(
    tmp_path: Path, stopping: DaemonProcess
) -> None:
    # Created after the shutdown had listed the sessions to close, it was
    # never closed: the daemon waited for it for ever.
    notes = tmp_path / "notes"
    pids = await _stubborn_sessions(stopping, notes, 1)
    with trio.fail_after(60):
        async with trio_observer.connect(stopping.path, autostart=False) as client:
            stopping.process.send_signal(signal.SIGTERM)
            await _wait_notes(notes, "term", 1)
            with pytest.raises(DaemonError, match="stopping") as refused:
                await client.create_session("late")
            assert refused.value.code == "daemon-stopping"
            with pytest.raises(DaemonError, match="stopping"):
                # The default session is made on a first start.
                await client.start([PY, "-c", "pass"])
            sessions = await client.sessions()
            assert [s["name"] for s in sessions] == ["s0"]
    stopping.process.send_signal(signal.SIGTERM)
    assert _finish(stopping, pids) == 0


async def test_a_session_closed_while_it_opens_still_ends() -> None:
    # close() before run() had its Session only marked it closing, and
    # nothing cancelled it later: close_session (and so the daemon's
    # shutdown) waited for ever.
    daemon_session = DaemonSession(
        "s", grace_period=1, track_descendants=False, containment="process-group"
    )
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                functools.partial(daemon_session.run, task_status=trio.TASK_STATUS_IGNORED)
            )
            daemon_session.close()
            await daemon_session.closed.wait()
