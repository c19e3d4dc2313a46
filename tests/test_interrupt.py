"""Signals and KeyboardInterrupt at the worst moments leave nothing behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio
import trio.testing

from trio_observer import EventCategory, ObserverBackpressure, TerminationOutcome, open_session

PY = sys.executable

# Runs the real CLI, but signals it (SIGTERM/SIGHUP to itself) the moment
# the session's spawn has started CMD: the narrowest window between CMD
# existing and anything else the CLI does. The pid goes to a file first, so
# the test can check CMD is gone afterwards whatever became of the CLI.
_SIGNAL_RIGHT_AFTER_START = """
import os, sys
import trio_observer._process as spawning
from trio_observer._cli._main import main

pid_file, sig = sys.argv[1], int(sys.argv[2])
real_spawn = spawning.spawn_with_stdio

def signalled_spawn(*args, **kwargs):
    pid = real_spawn(*args, **kwargs)
    with open(pid_file, "w") as f:
        f.write(str(pid))
    os.kill(os.getpid(), sig)
    return pid

spawning.spawn_with_stdio = signalled_spawn
sys.exit(main(["run", "--grace-period", "30", "--", *sys.argv[3:]]))
"""


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except FileNotFoundError:
        return True
    # A zombie is already dead (init reaps it soon); a live one escaped.
    return text[text.rindex(")") + 2] in "ZX"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_right_after_cmd_started_stops_cmd(tmp_path: Path, sig: signal.Signals) -> None:
    pid_file = tmp_path / "cmd.pid"
    cmd = [PY, "-c", "import time; time.sleep(60)"]
    cli = subprocess.run(
        [PY, "-c", _SIGNAL_RIGHT_AFTER_START, str(pid_file), str(int(sig)), *cmd],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        # Not a pipe: an orphaned CMD would hold it open past the CLI.
        stderr=subprocess.DEVNULL,
        timeout=60,
    )
    pid = int(pid_file.read_text())
    try:
        assert _gone(pid), f"CMD {pid} outlived the CLI (exit {cli.returncode})"
        assert cli.returncode == 128 + sig
    finally:
        if not _gone(pid):
            os.kill(pid, signal.SIGKILL)


# CMD for the test below: it writes its pid, then a line for each SIGTERM
# it gets (and ignores), so that the test knows when the CLI has started
# stopping it.
_TERM_COUNTER = """
import os, signal, sys, time
out = open(sys.argv[1], "a", buffering=1)
signal.signal(signal.SIGTERM, lambda *_: out.write("TERM\\n"))
out.write(f"{os.getpid()}\\n")
while True:
    time.sleep(60)
"""


def _wait_for_line(path: Path, text: str, cli: subprocess.Popen[bytes]) -> list[str]:
    # A real condition with a deadline: CMD wrote the line (or the CLI died).
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and cli.poll() is None:
        lines = path.read_text().split() if path.exists() else []
        if text in lines or (text == "pid" and lines):
            return lines
        time.sleep(0.01)
    raise AssertionError(f"CMD never wrote {text!r} (CLI exit {cli.poll()})")


@pytest.mark.parametrize("containment", ["process-group", "auto"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_second_signal_during_the_teardown_still_stops_cmd(
    tmp_path: Path, sig: signal.Signals, containment: str
) -> None:
    # The first signal starts the teardown (SIGTERM to CMD, which ignores
    # it, then a 60 s grace); the second, while the grace runs, must not
    # kill the CLI and leave CMD running: it ends the grace (SIGKILL now).
    out = tmp_path / "cmd.out"
    cli = subprocess.Popen(
        [
            *(PY, "-m", "trio_observer", "run", "--grace-period", "60"),
            *("--containment", containment, "--", PY, "-c", _TERM_COUNTER, str(out)),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    pid = 0
    try:
        pid = int(_wait_for_line(out, "pid", cli)[0])
        cli.send_signal(sig)
        _wait_for_line(out, "TERM", cli)
        cli.send_signal(sig)
        # Half the grace period: only a teardown cut short ends in time.
        returncode = cli.wait(timeout=30)
        assert _gone(pid), f"CMD {pid} outlived the CLI (exit {returncode})"
        assert returncode == 128 + sig
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
        if pid and not _gone(pid):
            os.kill(pid, signal.SIGKILL)


async def test_a_start_cancelled_while_started_waits_stops_its_process() -> None:
    # STARTED waits on a full BLOCK sink (the first STARTED fills it, nobody
    # receives); the caller's scope is cancelled, so no handle is returned.
    # The process must not run on unowned, with the block waiting for it.
    with trio.fail_after(30):
        async with (
            open_session(grace_period=10) as session,
            session.observers.subscribe(
                [EventCategory.LIFECYCLE], capacity=1, backpressure=ObserverBackpressure.BLOCK
            ),
        ):
            first = await session.start_process(
                [PY, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
            )
            with trio.CancelScope() as scope:

                async def cancel_when_blocked() -> None:
                    await trio.testing.wait_all_tasks_blocked()
                    scope.cancel()

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(cancel_when_blocked)
                    await session.start_process([PY, "-c", "import time; time.sleep(60)"])
                    pytest.fail("start_process returned although its STARTED was blocked")
            assert scope.cancelled_caught
            (process,) = [p for p in session.processes if p is not first]
            assert await process.wait() == -signal.SIGTERM
            assert process.termination is TerminationOutcome.SOFT_EXIT
            assert first.stdin is not None
            await first.stdin.aclose()


# As above, with Ctrl-C in place of the cancellation: trio delivers it to
# the main task where STARTED waits, and the handle is never returned. (In
# a process of its own: under pytest-trio the main task is not the test's.)
_CTRL_C_WHILE_STARTED_WAITS = """
import os, signal, sys
import trio, trio.testing
from trio_observer import EventCategory, ObserverBackpressure, open_session

seen = []

@trio.lowlevel.enable_ki_protection
async def press_ctrl_c_when_blocked(session):
    # Protected, so that trio delivers the SIGINT to the main task.
    await trio.testing.wait_all_tasks_blocked()
    seen.extend(session.processes)
    os.kill(os.getpid(), signal.SIGINT)

async def main():
    try:
        async with (
            open_session(grace_period=30) as session,
            session.observers.subscribe(
                [EventCategory.LIFECYCLE], capacity=1, backpressure=ObserverBackpressure.BLOCK
            ),
        ):
            await session.start_process([sys.executable, "-c", "pass"])
            session._nursery.start_soon(press_ctrl_c_when_blocked, session)
            await session.start_process([sys.executable, "-c", "import time; time.sleep(60)"])
            print("start_process returned")
    except* KeyboardInterrupt:
        first, process = seen
        # The first one was stopped too, by the interrupted session, if it
        # was still running.
        assert first.returncode is not None
        print(process.returncode, process.termination.value)

trio.run(main)
"""


def test_ctrl_c_while_started_waits_stops_its_process() -> None:
    result = subprocess.run(
        [PY, "-c", _CTRL_C_WHILE_STARTED_WAITS],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        # The 30 s grace (or a process left running) shows as this timeout.
        timeout=20,
    )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.split() == [b"%d" % -signal.SIGTERM, b"soft-exit"]


# A loop that starts processes until a SIGINT (sent by a thread at a random
# moment) interrupts it, many times over; every pid is recorded by the
# session's spawn, patched to write it first. The parent checks that none
# survived.
_INTERRUPTED_SPAWN_LOOP = """
import os, random, signal, sys, threading, time
import trio
import trio_observer._process as spawning
from trio_observer import open_session

pid_file, trials = sys.argv[1], int(sys.argv[2])
real_spawn = spawning.spawn_with_stdio

def recording_spawn(*args, **kwargs):
    pid = real_spawn(*args, **kwargs)
    with open(pid_file, "a") as f:
        f.write(f"{pid}\\n")
    return pid

spawning.spawn_with_stdio = recording_spawn

timers = []

async def spawn_loop():
    # Armed inside trio.run, so the SIGINT always finds trio's handler.
    timer = threading.Timer(random.uniform(0, 0.04), os.kill, (os.getpid(), signal.SIGINT))
    timers.append(timer)
    timer.start()
    async with open_session(grace_period=5) as session:
        while True:
            await session.start_process([sys.executable, "-c", "import time; time.sleep(30)"])

interrupted = 0
for trial in range(trials):
    try:
        trio.run(spawn_loop)
    except* KeyboardInterrupt:
        interrupted += 1
    timers[-1].join()
print(interrupted)
"""


def test_ctrl_c_anywhere_in_a_spawn_loop_leaves_nothing(tmp_path: Path) -> None:
    pid_file = tmp_path / "pids"
    pid_file.touch()
    trials = 40
    result = subprocess.run(
        [PY, "-c", _INTERRUPTED_SPAWN_LOOP, str(pid_file), str(trials)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        # A hang (an event nobody sets) shows up as this timeout.
        timeout=240,
    )
    pids = [int(line) for line in pid_file.read_text().split()]
    survivors = [pid for pid in pids if not _gone(pid)]
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    assert result.returncode == 0, result.stderr.decode()
    assert int(result.stdout) == trials
    assert pids, "no process was started"
    assert survivors == []


def test_a_long_start_loop_under_a_low_fd_limit_does_not_pile_up(tmp_path: Path) -> None:
    # 600 quick starts with 128 fds: if start_process never yields, the
    # supervisors never reap, every pidfd stays open and the loop fails
    # with EMFILE after about a hundred.
    script = (
        "import resource, sys, trio\n"
        "from trio_observer import open_session\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))\n"
        "async def main():\n"
        "    async with open_session() as session:\n"
        "        for _ in range(600):\n"
        "            await session.start_process(['/bin/true'])\n"
        "trio.run(main)\n"
    )
    result = subprocess.run([PY, "-c", script], capture_output=True, timeout=240)
    assert result.returncode == 0, result.stderr.decode()[-2000:]


# A session tearing down a tree that ignores SIGTERM (a root, and a daemon
# in a session of its own) with a long grace period, and Ctrl-C pressed
# while the teardown waits: the sweep must still run, at once with SIGKILL.
_CTRL_C_DURING_TEARDOWN = """
import os, signal, subprocess, sys
import trio, trio.testing
from trio_observer import open_session

pid_file, presses, containment = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ROOT = '''
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
DAEMON = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)"
daemon = subprocess.Popen([sys.executable, "-c", DAEMON], start_new_session=True)
print(daemon.pid, flush=True)
time.sleep(300)
'''

@trio.lowlevel.enable_ki_protection
def ctrl_c():
    os.kill(os.getpid(), signal.SIGINT)

async def press():
    for _ in range(presses):
        # Every task blocked: the teardown is waiting out the grace period.
        await trio.testing.wait_all_tasks_blocked()
        ctrl_c()

async def main():
    async with trio.open_nursery() as outer:
        async with open_session(grace_period=120, containment=containment) as session:
            root = await session.start_process([sys.executable, "-c", ROOT], stdout=subprocess.PIPE)
            line = b""
            while not line.endswith(b"\\n"):
                line += await root.stdout.receive_some()
            with open(pid_file, "w") as f:
                f.write(f"{root.pid} {line.decode()}")
            outer.start_soon(press)
            session.cancel_scope.cancel()

try:
    trio.run(main)
except* KeyboardInterrupt:
    print("interrupted")
"""


@pytest.mark.parametrize("containment", ["process-group", "auto"])
@pytest.mark.parametrize("presses", [1, 3])
def test_ctrl_c_during_the_teardown_still_sweeps_the_tree(
    tmp_path: Path, presses: int, containment: str
) -> None:
    pid_file = tmp_path / "pids"
    try:
        result = subprocess.run(
            [PY, "-c", _CTRL_C_DURING_TEARDOWN, str(pid_file), str(presses), containment],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            # Half the grace period: only a teardown that Ctrl-C cut short
            # (SIGKILL at once) ends in time.
            timeout=60,
        )
    finally:
        text = pid_file.read_text() if pid_file.exists() else ""
        pids = [int(word) for word in text.split()]
        survivors = [pid for pid in pids if not _gone(pid)]
        for pid in survivors:
            os.kill(pid, signal.SIGKILL)
    assert result.stdout.decode().split() == ["interrupted"], result.stderr.decode()
    assert len(pids) == 2
    assert survivors == []
