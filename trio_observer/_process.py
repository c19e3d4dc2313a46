"""One supervised process: spawn, wait, reap, signals, tree termination."""

from __future__ import annotations

import enum
import functools
import os
import signal
import subprocess
from collections.abc import Awaitable, Callable, Mapping
from typing import IO, Any, Final, final

import trio

from ._checks import check_bytes, check_seconds, check_signal
from ._events import ResourceUsage, TerminationOutcome
from ._grace import Grace, terminate_then_kill
from ._linux import (
    Cgroup,
    reap_usage,
    running_usage,
    spawn_on_pty,
    spawn_with_stdio,
    stdio_spawn_supported,
    with_cgroup,
)
from ._output import OutputLog
from ._pty import PtySize, PtyStream, open_pty

# Every child of a session carries this variable, so that a descendant the
# session adopts (as child subreaper) after it left the process group can
# still be recognised as the session's at teardown.
SESSION_ENV_VAR: Final = "TRIO_OBSERVER_SESSION"
_SESSION_ENV_VAR_BYTES: Final = SESSION_ENV_VAR.encode()


class _Capture(enum.Enum):
    """Pass ``CAPTURE`` as ``stdout=`` or ``stderr=`` to have the session read
    the stream into an :class:`OutputLog` (``process.stdout_log`` /
    ``process.stderr_log``), which any number of readers can follow."""

    CAPTURE = "capture"

    def __repr__(self) -> str:
        return "trio_observer.CAPTURE"


CAPTURE: Final = _Capture.CAPTURE
"""Pass as ``stdout=`` or ``stderr=`` to have the session read the stream
into an :class:`OutputLog` (``process.stdout_log``/``stderr_log``)."""

StdioArg = int | IO[Any] | _Capture | None
"""What ``stdin``/``stdout``/``stderr`` accept: ``None`` (inherit),
``subprocess.PIPE``, ``subprocess.DEVNULL``, ``subprocess.STDOUT`` (stderr
only), an fd or a file object, and ``CAPTURE`` (stdout, stderr)."""


@final
class Pty:
    """The pseudo-terminal of a process started with ``pty=``.

    Everything the process writes to its terminal is captured in :attr:`log`;
    what you :meth:`write` is what it reads as typed input. Once the process
    has been reaped and its output has ended, the session closes the
    terminal: :attr:`log` stays readable, and the other methods raise
    ``trio.ClosedResourceError``. Obtained from :attr:`Process.pty`; not
    constructed by users.
    """

    def __init__(self, stream: PtyStream, log: OutputLog) -> None:
        self._stream = stream
        self.log = log
        """The terminal's output (an :class:`OutputLog`)."""

    @property
    def size(self) -> PtySize:
        """The terminal's current window size."""
        return self._stream.get_size()

    async def write(self, data: bytes | str) -> None:
        """Type ``data`` into the terminal (``str`` is encoded as UTF-8).

        The terminal's line discipline applies: input is echoed, and a
        program reading lines sees them once ``\\n`` (or ``\\r``) arrives.
        """
        if isinstance(data, str):
            data = data.encode("utf-8")
        else:
            check_bytes("data", data)
        await self._stream.send_all(data)

    async def sendline(self, text: bytes | str = "") -> None:
        """Type ``text`` and press Enter (pexpect's ``sendline``).

        Sends ``os.linesep`` after it (``\\n``), which the terminal turns
        into the end of a line, as Enter does.
        """
        if isinstance(text, str):
            line = text.encode("utf-8")
        else:
            check_bytes("text", text)
            line = bytes(text)
        await self._stream.send_all(line + os.linesep.encode())

    @property
    def stream(self) -> PtyStream:
        """The terminal's master side as a ``trio.abc.HalfCloseableStream``.

        For copying the terminal to and from somewhere else (the CLI attaches
        the user's terminal with it). Do not read from it while the session
        captures it: every byte read here is missing from :attr:`log`.
        """
        return self._stream

    def resize(self, rows: int, cols: int) -> None:
        """Change the window size; the process gets SIGWINCH.

        Raises:
          ValueError: ``rows`` or ``cols`` is outside 1..65535.
        """
        self._stream.resize(PtySize(rows=rows, cols=cols))

    async def interrupt(self) -> None:
        """Press Ctrl-C: the terminal sends SIGINT to its foreground group."""
        await self._stream.interrupt()

    async def send_eof(self) -> None:
        """Press Ctrl-D: a program reading lines sees the end of its input.

        Later calls of :meth:`write` raise ``trio.ClosedResourceError``.
        """
        await self._stream.send_eof()


@final
class Process:
    """A process started by a session.

    The session waits for it, reaps it exactly once and emits its lifecycle
    events; this handle lets you wait for it too, signal it and talk to it.
    Obtained from :meth:`Session.start_process`; not constructed by users.
    """

    def __init__(
        self,
        *,
        pid: int,
        argv: tuple[str, ...],
        reap: Callable[[], tuple[int, ResourceUsage]],
        pgid: int,
        stdin: trio.abc.SendStream | None,
        stdout: trio.abc.ReceiveStream | None,
        stderr: trio.abc.ReceiveStream | None,
        stdout_log: OutputLog | None = None,
        stderr_log: OutputLog | None = None,
        pty: Pty | None = None,
    ) -> None:
        self._pid = pid
        self._argv = argv
        self._reap_now = reap
        self._pgid = pgid
        self.stdin = stdin
        """The child's stdin, when started with ``stdin=subprocess.PIPE``."""
        self.stdout = stdout
        """The child's stdout, when started with ``stdout=subprocess.PIPE``."""
        self.stderr = stderr
        """The child's stderr, when started with ``stderr=subprocess.PIPE``."""
        self.stdout_log = stdout_log
        """The captured stdout, when started with ``stdout=CAPTURE``."""
        self.stderr_log = stderr_log
        """The captured stderr, when started with ``stderr=CAPTURE``."""
        self.pty = pty
        """The process's terminal, when started with ``pty=``."""
        self._returncode: int | None = None
        self._termination: TerminationOutcome | None = None
        self._exited = trio.Event()
        self._pidfd = _open_pidfd(pid)
        # Set once the session asked the process to stop, so that the exit
        # can be told apart from a natural one.
        self._stop_requested = False
        self._kill_sent = False
        # Set when start_process failed after the spawn: the session stops
        # the tree itself (Session._abandon), its supervisor only reaps.
        self._abandoned = False
        # The leaf cgroup, when the session contains by cgroup (set by the
        # session right after the spawn), and what the process cost.
        self._leaf: Cgroup | None = None
        self._usage: ResourceUsage | None = None

    def __repr__(self) -> str:
        state = "running" if self._returncode is None else f"exited {self._returncode}"
        return f"<trio_observer.Process {list(self._argv)!r} pid={self._pid} {state}>"

    @property
    def pid(self) -> int:
        """The process id."""
        return self._pid

    @property
    def argv(self) -> tuple[str, ...]:
        """The command line the process was started with."""
        return self._argv

    @property
    def returncode(self) -> int | None:
        """The exit code once the process was reaped, else None.

        Negative when a signal ended the process (``-9`` for SIGKILL), as in
        :mod:`subprocess`.
        """
        return self._returncode

    @property
    def termination(self) -> TerminationOutcome | None:
        """How the process ended, once it was reaped, else None."""
        return self._termination

    def resources(self) -> ResourceUsage:
        """What the process has cost so far, where the kernel says.

        While it runs: its own CPU time and peak RSS from ``/proc/<pid>``,
        and with cgroup containment the tree's figures from its leaf
        cgroup. Once reaped: the ``wait4`` rusage (with the leaf's figures
        at the reap), the same value the ``EXITED`` event carries.

        Returns:
            A :class:`ResourceUsage`; fields the kernel does not give are
            ``None``.
        """
        if self._usage is not None:
            return self._usage
        return with_cgroup(running_usage(self._pid), self._leaf)

    async def wait(self) -> int:
        """Wait until the process has been reaped and return its exit code.

        Any number of tasks may wait at once. Cancelling a wait does not
        affect the process.
        """
        await self._exited.wait()
        assert self._returncode is not None
        return self._returncode

    def poll(self) -> int | None:
        """Return the exit code if the process has been reaped, else None.

        Never blocks, as ``trio.Process.poll``; the session does the reaping,
        so this only reports it (the same as :attr:`returncode`).
        """
        return self._returncode

    async def wait_output(self) -> None:
        """Wait until every captured stream of the process has ended.

        Covers ``stdout_log``, ``stderr_log`` and ``pty.log``: when this
        returns, each of them is closed and holds everything the session
        read (see docs/output.md for when a log is complete). A process
        without captured output returns at once (after a checkpoint).
        Waiting for the exit is separate: the output may end before the
        process does, or after it (a descendant can hold the pipe open).
        """
        await trio.lowlevel.checkpoint()
        for log in (self.stdout_log, self.stderr_log, self.pty.log if self.pty else None):
            if log is not None:
                await log.wait_closed()

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the process (not its descendants).

        Does nothing once the process has been reaped: its pid may already
        belong to somebody else. Until then it uses the process's pidfd
        where Linux has one, so the signal cannot reach a reused pid.

        Raises:
          TypeError: ``sig`` is not an int (a bool is not one).
          ValueError: this platform has no signal ``sig`` (0 sends nothing
            and only checks, as with ``kill(2)``).
        """
        check_signal("sig", sig)
        if self._returncode is not None:
            return
        try:
            if self._pidfd is not None:
                signal.pidfd_send_signal(self._pidfd, sig)
            else:
                os.kill(self._pid, sig)
        except ProcessLookupError:
            # Exited but not reaped yet: nothing left to signal.
            pass

    def terminate(self) -> None:
        """Send SIGTERM to the process."""
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """Send SIGKILL to the process."""
        self.send_signal(signal.SIGKILL)

    def signal_tree(self, sig: int) -> None:
        """Send ``sig`` to the process's whole process group.

        Each process a session starts leads its own process group (with a
        PTY, its own session), so this reaches every descendant that did not
        move itself elsewhere. Does nothing once the process has been
        reaped: from then on its group id may be reused by an unrelated
        process (what the group left behind is stopped by the session when
        its block ends).

        Raises:
          TypeError, ValueError: as :meth:`send_signal`.
        """
        check_signal("sig", sig)
        if self._returncode is not None:
            return
        try:
            os.killpg(self._pgid, sig)
        except (ProcessLookupError, PermissionError):
            # Empty group: nothing to signal.
            pass

    def _group_has_members(self) -> bool:
        # Signal 0 checks without sending. Right after the reap, a group
        # that still has members keeps its id reserved, so the answer is
        # about our group, not a reused one.
        try:
            os.killpg(self._pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    async def terminate_gracefully(self, *, grace_period: float = 5.0) -> int:
        """Stop the process tree: SIGTERM, then SIGKILL after ``grace_period`` seconds.

        Sends SIGTERM to the process group, waits up to ``grace_period``
        seconds of the trio clock for the process to exit, then sends
        SIGKILL to the group. Returns the exit code; :attr:`termination`
        then says whether the process stopped within the grace period
        (``SOFT_EXIT``) or had to be killed (``HARD_KILLED``). This is the
        routine the session uses when it stops a process itself.

        Raises:
          TypeError: ``grace_period`` is not a number.
          ValueError: ``grace_period`` is negative, NaN or too large for a
            float.
        """
        grace_period = check_seconds("grace_period", grace_period)
        if self._returncode is None:
            # The supervisor owns the pidfd; the reap is what we can wait for.
            await self._stop_tree(grace_period, self._exited.wait)
        return await self.wait()

    # -- used by the session ------------------------------------------

    def _request_stop(self, sig: int) -> None:
        self._stop_requested = True
        if sig == signal.SIGKILL:
            self._kill_sent = True
        self.signal_tree(sig)

    async def _wait_exit(self) -> None:
        """Block until the process has exited (not reaped yet).

        Only the supervisor calls this: trio allows one waiter per fd.
        """
        if self._pidfd is not None:
            await trio.lowlevel.wait_readable(self._pidfd)
        else:
            await trio.to_thread.run_sync(_wait_no_reap, self._pid, abandon_on_cancel=True)

    def _reap(self) -> None:
        self._returncode, usage = self._reap_now()
        self._usage = with_cgroup(usage, self._leaf)
        if self._pidfd is not None:
            # Fd numbers are reused: forget it before anyone can trip on it.
            fd, self._pidfd = self._pidfd, None
            os.close(fd)
        if not self._stop_requested:
            self._termination = TerminationOutcome.NATURAL_EXIT
        elif self._kill_sent:
            self._termination = TerminationOutcome.HARD_KILLED
        else:
            self._termination = TerminationOutcome.SOFT_EXIT
        self._exited.set()

    async def _supervise(self, grace_period: float | Grace) -> None:
        """Wait for the exit and reap; if cancelled, stop the tree first."""
        try:
            await self._wait_exit()
        except BaseException:
            with trio.CancelScope(shield=True):
                if self._abandoned:
                    # Already being stopped, with the same grace.
                    await self._wait_exit()
                else:
                    await self._stop_tree(grace_period, self._wait_exit)
                self._reap()
            raise
        self._reap()

    async def _stop_tree(
        self, grace_period: float | Grace, wait: Callable[[], Awaitable[object]]
    ) -> None:
        """Stop the process group by :func:`terminate_then_kill`, the routine
        the final sweep uses too; ``wait`` returns once the process exited."""
        await terminate_then_kill(self._request_stop, wait, grace_period)

    def _has_streams(self) -> bool:
        # What _close_streams closes.
        return not (
            self.stdin is None and self.stdout is None and self.stderr is None and self.pty is None
        )

    def _close_streams(self) -> None:
        for stream in (self.stdin, self.stdout, self.stderr):
            if stream is not None:
                _close_stream(stream)
        if self.pty is not None:
            # Normally closed already, by the session's reader after the
            # reap; closing is idempotent.
            self.pty._stream.close()


def _close_stream(stream: trio.abc.AsyncResource) -> None:
    close = getattr(stream, "close", None)
    if close is not None:
        close()


def _open_pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        # Not Linux, or a kernel before 5.3: fall back to a waiting thread.
        return None


def _wait_no_reap(pid: int) -> None:
    # WNOWAIT leaves the zombie in place, so the pid cannot be reused before
    # the session reaps it (the same trick trio uses).
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)


def spawn_with_pipes(
    argv: tuple[str, ...],
    *,
    stdin: StdioArg,
    stdout: StdioArg,
    stderr: StdioArg,
    cwd: str | os.PathLike[str] | None,
    env: Mapping[str, str] | None,
    session_id: str,
    backlog_bytes: int,
) -> tuple[Process, trio.lowlevel.FdStream | None, trio.lowlevel.FdStream | None]:
    """Start ``argv`` in its own process group with the given stdio.

    Returns the process, with an :class:`OutputLog` of ``backlog_bytes`` for
    each captured stream (for ``CAPTURE``), and the parent ends of those
    streams, which the session pumps into the logs.

    The spawn runs on the trio thread, not in a worker thread as trio does:
    it is a ``vfork``-like clone that costs a few hundred microseconds, and
    the thread hop would add about a third to every spawn. Where glibc
    allows, the child is started by ``posix_spawn`` (``_linux._spawn``),
    else by ``subprocess.Popen``: the same child either way.
    """
    parent_streams: dict[str, trio.lowlevel.FdStream] = {}
    child_fds: list[int] = []
    captured: dict[str, trio.lowlevel.FdStream] = {}

    def pipe_for(name: str, spec: StdioArg, child_reads: bool) -> int | IO[Any] | None:
        if spec is CAPTURE:
            if child_reads:
                raise ValueError("stdin cannot be CAPTURE: it is for stdout and stderr")
        elif spec != subprocess.PIPE:
            return spec
        read_fd, write_fd = os.pipe()
        parent_fd, child_fd = (write_fd, read_fd) if child_reads else (read_fd, write_fd)
        child_fds.append(child_fd)
        stream = trio.lowlevel.FdStream(parent_fd)
        (captured if spec is CAPTURE else parent_streams)[name] = stream
        return child_fd

    try:
        stdio = (
            pipe_for("stdin", stdin, True),
            pipe_for("stdout", stdout, False),
            pipe_for("stderr", stderr, False),
        )
        if stdio_spawn_supported():
            pid = spawn_with_stdio(
                argv,
                stdio=(_fd_of(stdio[0]), _fd_of(stdio[1]), _fd_of(stdio[2])),
                cwd=cwd,
                env=env,
                extra_env=(SESSION_ENV_VAR, session_id),
            )
            reap: Callable[[], tuple[int, ResourceUsage]] = functools.partial(reap_usage, pid)
        else:
            pid, reap = _popen(argv, stdio, cwd, env, session_id)
    except BaseException:
        for stream in (*parent_streams.values(), *captured.values()):
            stream.close()
        raise
    finally:
        for fd in child_fds:
            os.close(fd)

    process = Process(
        pid=pid,
        argv=argv,
        reap=reap,
        pgid=pid,
        stdin=parent_streams.get("stdin"),
        stdout=parent_streams.get("stdout"),
        stderr=parent_streams.get("stderr"),
        stdout_log=OutputLog(max_bytes=backlog_bytes) if "stdout" in captured else None,
        stderr_log=OutputLog(max_bytes=backlog_bytes) if "stderr" in captured else None,
    )
    return process, captured.get("stdout"), captured.get("stderr")


def _fd_of(spec: int | IO[Any] | None) -> int | None:
    return spec if spec is None or isinstance(spec, int) else spec.fileno()


def _popen(
    argv: tuple[str, ...],
    stdio: tuple[int | IO[Any] | None, int | IO[Any] | None, int | IO[Any] | None],
    cwd: str | os.PathLike[str] | None,
    env: Mapping[str, str] | None,
    session_id: str,
) -> tuple[int, Callable[[], tuple[int, ResourceUsage]]]:
    """The portable spawn, where glibc's posix_spawn lacks what we need."""
    popen = subprocess.Popen(
        argv,
        stdin=stdio[0],
        stdout=stdio[1],
        stderr=stdio[2],
        cwd=cwd,
        env=_popen_environment(env, session_id),
        process_group=0,
    )

    def reap() -> tuple[int, ResourceUsage]:
        # wait4 for the rusage; Popen is told the status, so that its own
        # bookkeeping (and its __del__) never waits on a pid reused since.
        returncode, usage = reap_usage(popen.pid)
        popen.returncode = returncode
        return returncode, usage

    return popen.pid, reap


def _popen_environment(
    env: Mapping[str, str] | None, session_id: str
) -> dict[bytes, bytes] | dict[str, str]:
    """The child's environment for Popen: ``env`` (default: ours) plus the session id."""
    data = getattr(os.environ, "_data", None) if env is None else None
    if type(data) is dict:
        # os.environ keeps its current contents encoded, as the child needs
        # them: copying that dict skips decoding every variable here and
        # Popen encoding it again, and it is read on every spawn, so a
        # change to os.environ is seen.
        child_env: dict[bytes, bytes] = dict(data)
        child_env[_SESSION_ENV_VAR_BYTES] = os.fsencode(session_id)
        return child_env
    str_env = dict(os.environ if env is None else env)
    str_env[SESSION_ENV_VAR] = session_id
    return str_env


def spawn_with_pty(
    argv: tuple[str, ...],
    *,
    size: PtySize,
    cwd: str | os.PathLike[str] | None,
    env: Mapping[str, str] | None,
    session_id: str,
    backlog_bytes: int,
) -> tuple[Process, PtyStream]:
    """Start ``argv`` on a new pseudo-terminal that is its controlling tty.

    The child leads a new session (so its pid is also its process group).
    The process's :attr:`Process.pty` holds the master side and an
    :class:`OutputLog` of ``backlog_bytes``; the master is returned too, for
    the caller to pump into that log and close after the reap.
    """
    master_fd, slave_path = open_pty(size)
    try:
        pid = spawn_on_pty(
            argv,
            slave_path=slave_path,
            env=env,
            cwd=cwd,
            extra_env=(SESSION_ENV_VAR, session_id),
        )
    except BaseException:
        os.close(master_fd)
        raise

    stream = PtyStream(master_fd)
    process = Process(
        pid=pid,
        argv=argv,
        reap=functools.partial(reap_usage, pid),
        pgid=pid,
        stdin=None,
        stdout=None,
        stderr=None,
        pty=Pty(stream, OutputLog(max_bytes=backlog_bytes)),
    )
    return process, stream
