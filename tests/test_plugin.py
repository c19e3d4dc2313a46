"""The pytest plugin, run the way a user runs it: pytester in a subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

INI = """
[pytest]
trio_mode = true
"""


def test_a_clean_test_passes_and_a_leaky_one_names_its_leftovers(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeini(INI)
    pytester.makepyfile(
        """
        import os
        import sys

        from trio_observer import Session


        async def test_clean(observer_session: Session) -> None:
            done = await observer_session.run_process([sys.executable, "-c", "pass"])
            assert done.returncode == 0


        async def test_leaves_a_process(observer_session: Session) -> None:
            await observer_session.start_process(
                [sys.executable, "-c", "import time; time.sleep(60)"]
            )


        async def test_leaves_an_fd(observer_session: Session) -> None:
            global kept
            kept = os.open(os.devnull, os.O_RDONLY)
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines(
        [
            "*still running at teardown: <trio_observer.Process *time.sleep(60)* running>*",
            "*file descriptor * left open (/dev/null)*",
        ]
    )


SERVICE_TESTS = """
import os
import sys

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from trio_observer.pytest_plugin import ServiceNotReady, ServiceStarter

# The service and a child of its own each write their pid to PIDS, then the
# service listens on a port and says so; both would run for a minute.
SERVICE = '''
import os, socket, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
with open(sys.argv[1], "a") as f:
    f.write(f"{os.getpid()}\\\\n{child.pid}\\\\n")
s = socket.socket()
s.bind(("127.0.0.1", int(sys.argv[2]) if len(sys.argv) > 2 else 0))
s.listen()
print("listening on", s.getsockname()[1], flush=True)
time.sleep(60)
'''
PIDS = os.environ["PIDS_FILE"]


async def start(observer_service: ServiceStarter) -> int:
    service = await observer_service(
        [sys.executable, "-c", SERVICE, PIDS], ready_output=b"listening on ", timeout=60
    )
    assert service.stdout_log is not None
    await service.stdout_log.expect(b"\\n")  # the rest of the line: the port
    port = int(service.stdout_log.snapshot().split()[-1])
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.aclose()
    return port


async def test_passes(observer_service: ServiceStarter) -> None:
    await start(observer_service)


async def test_fails(observer_service: ServiceStarter) -> None:
    await start(observer_service)
    assert False, "the test fails with the service running"


async def test_by_port(observer_service: ServiceStarter) -> None:
    await start(observer_service)
    # A free port, for a service that listens there only once it started
    # its child: the wait polls until the connection is accepted.
    probe = trio.socket.socket()
    await probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    await observer_service(
        [sys.executable, "-c", SERVICE, PIDS, str(port)], ready_port=port, timeout=60
    )
    assert len(open(PIDS).read().split()) % 2 == 0


async def test_never_ready(observer_service: ServiceStarter) -> None:
    with pytest.raises(ServiceNotReady, match="did not become ready"):
        await observer_service(
            [sys.executable, "-c", "import time; time.sleep(60)"],
            ready_output="never printed",
            timeout=0.5,
        )


async def test_exits_first(observer_service: ServiceStarter) -> None:
    with pytest.raises(ServiceNotReady, match="exited"):
        await observer_service(
            [sys.executable, "-c", "print('bye')"], ready_output="never printed"
        )


async def test_interrupted(observer_service: ServiceStarter) -> None:
    await start(observer_service)
    print("service ready", flush=True)
    await trio.sleep_forever()  # until Ctrl-C (SIGINT from the outer test)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _pids(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()]


def test_services_are_stopped_however_the_test_ends(
    pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pids_file = tmp_path / "pids"
    pids_file.touch()
    monkeypatch.setenv("PIDS_FILE", str(pids_file))
    pytester.makeini(INI)
    pytester.makepyfile(test_service=SERVICE_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-k", "not test_interrupted")
    result.assert_outcomes(passed=4, failed=1)
    pids = _pids(pids_file)
    assert len(pids) == 8  # test_passes, test_fails, test_by_port twice: service + child
    # The runner (and with it the session) has ended: whatever was left
    # would now be an orphan under init, so a live pid is an escape.
    assert [pid for pid in pids if _alive(pid)] == []


def test_services_are_stopped_when_the_test_is_interrupted(
    pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pids_file = tmp_path / "pids"
    pids_file.touch()
    monkeypatch.setenv("PIDS_FILE", str(pids_file))
    pytester.makeini(INI)
    pytester.makepyfile(test_service=SERVICE_TESTS)
    # A real Ctrl-C: SIGINT to the pytest process while the test waits.
    runner = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-s", "-k", "test_interrupted"],
        cwd=pytester.path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert runner.stdout is not None
    output = b""
    while b"service ready" not in output:
        line = runner.stdout.readline()
        assert line, f"the runner ended first: {output.decode()}"
        output += line
    runner.send_signal(signal.SIGINT)
    rest, _ = runner.communicate(timeout=120)
    output += rest
    assert b"KeyboardInterrupt" in output, output.decode()
    pids = _pids(pids_file)
    assert len(pids) == 2
    assert [pid for pid in pids if _alive(pid)] == []


def test_a_zombie_is_named_apart_from_a_live_process(pytester: pytest.Pytester) -> None:
    pytester.makeini(INI)
    pytester.makepyfile(
        """
        import os
        import sys

        import trio

        from trio_observer import Session


        def state(pid: int) -> str:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rpartition(")")[2].split()[0]


        async def test_leaves_children(observer_session: Session) -> None:
            # Children of the test itself, outside the session: one exits
            # and is never waited for, one runs on.
            dead = os.posix_spawn(sys.executable, [sys.executable, "-c", "pass"], os.environ)
            os.posix_spawn(
                sys.executable, [sys.executable, "-c", "import time; time.sleep(60)"], os.environ
            )
            while state(dead) != "Z":
                await trio.sleep(0.01)
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    # Two calls: the order of the two lines follows their pids.
    result.stdout.fnmatch_lines(["*zombie child (exited, not reaped): pid * (python*)*"])
    result.stdout.fnmatch_lines(["*child process still running: pid * (*time.sleep(60)*)*"])
