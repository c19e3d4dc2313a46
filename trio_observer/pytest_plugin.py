"""The pytest plugin (entry point ``pytest11``): a session per test that owns up to leaks.

Loaded by pytest once trio-observer is installed; needs pytest-trio (its
``trio_mode`` or ``@pytest.mark.trio``) for the async fixture.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import AsyncIterator, Mapping, Sequence

import pytest
import trio

from ._checks import check_seconds
from ._expect import Pattern, compile_patterns
from ._linux import PROC, read_cmdline, read_stat, scan_all
from ._open_session import open_session
from ._process import CAPTURE, Process
from ._session import Session


def _open_fds() -> dict[str, str]:
    """Map each open fd to what it is open on.

    By target, not just number: fd numbers are reused, so the fd of this
    very listing may be a test's leaked fd next time. The listing's own fd
    is left out (it is closed again when described).
    """
    found = {}
    try:
        names = os.listdir("/proc/self/fd")
    except FileNotFoundError:
        return {}
    for fd in names:
        try:
            found[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
    return found


def _describe(process: Process) -> str:
    """Name a session process still there at teardown: live or zombie."""
    stat = read_stat(PROC, process.pid)
    if process.poll() is not None or (stat is not None and stat.is_dead):
        return f"zombie at teardown (exited, not reaped): {process!r}"
    return f"still running at teardown: {process!r}"


def _own_children() -> dict[int, tuple[int, int]]:
    """This process's children by pid, with their identity (a pid is reused)."""
    me = os.getpid()
    return {pid: stat.identity for pid, stat in scan_all(PROC).items() if stat.ppid == me}


def _settle_children(before: dict[int, tuple[int, int]]) -> list[str]:
    """Name, then kill and reap, children the test started outside the session.

    A zombie is named apart from a live process: they are different bugs
    (a live one was never stopped, a zombie was never waited for).
    """
    problems = []
    for pid, identity in _own_children().items():
        if before.get(pid) == identity:
            continue
        stat = read_stat(PROC, pid)
        if stat is None:
            continue
        argv = " ".join(read_cmdline(PROC, pid) or (stat.comm,))
        if stat.is_dead:
            problems.append(f"zombie child (exited, not reaped): pid {pid} ({stat.comm})")
        else:
            problems.append(f"child process still running: pid {pid} ({argv})")
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass  # someone else reaped it meanwhile
    return problems


@pytest.fixture
async def observer_session() -> AsyncIterator[Session]:
    """A session for one test; teardown fails the test naming what it left behind.

    At teardown every process of the session that is still running is
    named in the failure (then stopped, with its whole tree, as the session
    always does); so is every file descriptor the test opened and did not
    close. The tree is stopped also when the test fails or is interrupted,
    since the session's block ends either way. The session contains by
    cgroup where this process may make one (``open_session``'s default,
    ``containment="auto"``), so even a daemon that left with
    ``env -i setsid`` is stopped.
    """
    fds = _open_fds()
    children = _own_children()
    left: list[str] = []
    async with open_session() as session:
        yield session
        left = [_describe(process) for process in session.processes]
        # A session waits for its processes, like a nursery for tasks; a
        # test's leftovers are stopped instead (SIGTERM, then SIGKILL).
        session.cancel_scope.cancel()
    now = _open_fds()
    leaked = [(fd, now[fd]) for fd in sorted(now, key=int) if fds.get(fd) != now[fd]]
    problems = left + _settle_children(children)
    problems += [f"file descriptor {fd} left open ({what})" for fd, what in leaked]
    if problems:
        pytest.fail("the test left things behind:\n  " + "\n  ".join(problems), pytrace=False)


class ServiceNotReady(Exception):
    """A service started by :func:`start_service` did not become ready.

    Raised when the timeout (on the trio clock) expires, or when the
    service exits first; the message says which, with its output so far.
    """


async def start_service(
    session: Session,
    argv: Sequence[str | os.PathLike[str]],
    *,
    ready_output: Pattern | None = None,
    ready_port: int | None = None,
    host: str = "127.0.0.1",
    timeout: float = 30.0,  # noqa: ASYNC109 - the error must carry the output seen
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> Process:
    """Start a service in ``session`` and return once it is ready.

    Ready means ``ready_output`` appeared in its output (stdout and stderr
    merged, captured in ``process.stdout_log``), and/or a TCP connection to
    ``host:ready_port`` was accepted; with both, both in that order. The
    service stays part of ``session``, so it is stopped with its whole tree
    when the session ends.

    Args:
      session: The session that owns the service.
      argv: The program and its arguments.
      ready_output: A pattern as :meth:`OutputLog.expect` takes it.
      ready_port: A TCP port that accepts connections once ready.
      host: Where ``ready_port`` listens.
      timeout: Seconds on the trio clock to wait for readiness.
      cwd: The service's working directory.
      env: The service's environment (``None``: this process's).

    Returns:
      The running service.

    Raises:
      ValueError: Neither ``ready_output`` nor ``ready_port`` given, or a
        port outside 1-65535, or a negative timeout.
      TypeError: ``ready_output`` is not a pattern, ``timeout`` not a
        number or ``host`` not a str. Every argument is checked before the
        service is started.
      ServiceNotReady: The timeout expired or the service exited first.
    """
    if ready_output is None and ready_port is None:
        raise ValueError("start_service needs ready_output (a pattern) or ready_port (an int)")
    if ready_port is not None and (
        isinstance(ready_port, bool)
        or not isinstance(ready_port, int)
        or not 0 < ready_port < 65536
    ):
        raise ValueError(f"ready_port must be an int in 1-65535, not {ready_port!r}")
    check_seconds("timeout", timeout)
    if not isinstance(host, str):
        raise TypeError(f"host must be a str, not {type(host).__name__}")
    if ready_output is not None:
        # Refused here rather than by expect(), once the service is running.
        compile_patterns(ready_output, "utf-8")
    process = await session.start_process(
        argv, stdout=CAPTURE, stderr=subprocess.STDOUT, cwd=cwd, env=env
    )
    log = process.stdout_log
    assert log is not None  # stdout=CAPTURE always makes one
    try:
        with trio.fail_after(timeout):
            if ready_output is not None:
                # Ends with ExpectEOF if the service exits (its output closes).
                await log.expect(ready_output)
            if ready_port is not None:
                await _wait_for_port(process, host, ready_port)
    except (trio.TooSlowError, EOFError) as error:
        what = "did not become ready in time" if isinstance(error, trio.TooSlowError) else "exited"
        raise ServiceNotReady(
            f"{process!r} {what} (timeout {timeout} s); output so far: {log.snapshot()!r}"
        ) from error
    return process


async def _wait_for_port(process: Process, host: str, port: int) -> None:
    while True:
        if process.poll() is not None:
            raise EOFError(f"exited with {process.returncode} before port {port} listened")
        try:
            stream = await trio.open_tcp_stream(host, port)
        except OSError:
            # Not listening yet: try again soon (a poll, on the trio clock).
            await trio.sleep(0.02)
            continue
        await stream.aclose()
        return


class ServiceStarter:
    """What the ``observer_service`` fixture gives: call it to start a service.

    ``await observer_service(argv, ready_output=..., ready_port=...)`` is
    :func:`start_service` in the fixture's own session; every service is
    stopped with its whole tree after the test, however the test ends.
    """

    def __init__(self, session: Session) -> None:
        self._session = session

    @property
    def session(self) -> Session:
        """The session the services run in."""
        return self._session

    async def __call__(
        self,
        argv: Sequence[str | os.PathLike[str]],
        *,
        ready_output: Pattern | None = None,
        ready_port: int | None = None,
        host: str = "127.0.0.1",
        timeout: float = 30.0,  # noqa: ASYNC109 - see start_service
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Process:
        """Start a service and wait until it is ready; see :func:`start_service`."""
        return await start_service(
            self._session,
            argv,
            ready_output=ready_output,
            ready_port=ready_port,
            host=host,
            timeout=timeout,
            cwd=cwd,
            env=env,
        )


@pytest.fixture
async def observer_service() -> AsyncIterator[ServiceStarter]:
    """Start services for one test; they are stopped (whole tree) after it.

    Unlike ``observer_session`` a running service is no leak: it is meant
    to run until the end of the test, when the session is cancelled
    (SIGTERM, then SIGKILL after the grace period), also when the test
    failed or was interrupted.
    """
    async with open_session() as session:
        yield ServiceStarter(session)
        session.cancel_scope.cancel()
