"""Tests for the pty layer (_pty) and the user-terminal helpers (_terminal)."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import signal
import sys
import termios
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from trio_observer._linux._spawn import spawn_on_pty
from trio_observer._pty import PtySize, PtyStream, get_size, open_pty, resize
from trio_observer._terminal import (
    copy_input,
    copy_output,
    forward_resizes,
    raw_terminal,
    terminal_size,
)

DEADLINE = 10


def open_fds() -> set[int]:
    """The open fds, minus the one listdir used (closed again by now)."""
    listed = [int(name) for name in os.listdir("/proc/self/fd")]

    def is_open(fd: int) -> bool:
        try:
            os.fstat(fd)
        except OSError:
            return False
        return True

    return {fd for fd in listed if is_open(fd)}


class Child:
    """A child on a pty: its pid, the master stream, and a reaper."""

    def __init__(self, pid: int, stream: PtyStream) -> None:
        self.pid = pid
        self.stream = stream
        self.status: int | None = None
        self.output = bytearray()

    async def wait(self) -> int:
        """Wait for the child to exit (pidfd, no polling) and reap it."""
        if self.status is None:
            pidfd = os.pidfd_open(self.pid)
            try:
                with trio.fail_after(DEADLINE):
                    await trio.lowlevel.wait_readable(pidfd)
            finally:
                os.close(pidfd)
            # The pidfd is readable, so the child is a zombie: no blocking.
            _, status = os.waitpid(self.pid, 0)  # noqa: ASYNC222
            self.status = os.waitstatus_to_exitcode(status)
        return self.status

    async def read_until(self, marker: bytes) -> bytes:
        """Read output until ``marker`` appears; return everything so far."""
        with trio.fail_after(DEADLINE):
            while marker not in self.output:
                data = await self.stream.receive_some()
                if not data:
                    raise AssertionError(f"EOF before {marker!r}; got {bytes(self.output)!r}")
                self.output += data
        return bytes(self.output)

    async def read_to_eof(self) -> bytes:
        with trio.fail_after(DEADLINE):
            while data := await self.stream.receive_some():
                self.output += data
        return bytes(self.output)


@asynccontextmanager
async def child_on_pty(
    code: str,
    *,
    size: PtySize | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    argv0: str | None = None,
) -> AsyncIterator[Child]:
    master, slave_path = open_pty(size)
    try:
        pid = spawn_on_pty(
            [argv0 or sys.executable, "-c", code], slave_path=slave_path, env=env, cwd=cwd
        )
    except BaseException:
        os.close(master)
        raise
    child = Child(pid, PtyStream(master))
    try:
        yield child
    finally:
        if child.status is None:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            with trio.CancelScope(shield=True):
                await child.wait()
        child.stream.close()


# -- PtySize, open_pty, sizes -------------------------------------------------


def test_pty_size_defaults_and_validation() -> None:
    assert PtySize() == PtySize(rows=24, cols=80)
    assert PtySize(1, 65535).cols == 65535
    with pytest.raises(ValueError, match=r"PtySize\.rows"):
        PtySize(rows=0)
    with pytest.raises(ValueError, match=r"PtySize\.cols"):
        PtySize(cols=65536)
    with pytest.raises(TypeError, match=r"PtySize\.rows"):
        PtySize(rows=2.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"PtySize\.cols"):
        PtySize(cols=True)


@given(rows=st.integers(-5, 70000), cols=st.integers(-5, 70000))
def test_sizes_are_validated_and_round_trip(rows: int, cols: int) -> None:
    valid = 1 <= rows <= 65535 and 1 <= cols <= 65535
    master, _ = open_pty()
    try:
        if valid:
            resize(master, rows, cols)
            assert get_size(master) == PtySize(rows, cols)
        else:
            with pytest.raises(ValueError, match="rows" if not 1 <= rows <= 65535 else "cols"):
                resize(master, rows, cols)
            assert get_size(master) == PtySize()
    finally:
        os.close(master)


def test_open_pty_master_is_cloexec_and_sized() -> None:
    before = open_fds()
    master, slave_path = open_pty(PtySize(30, 100))
    try:
        assert slave_path.startswith("/dev/pts/")
        assert fcntl.fcntl(master, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        # The slave is not held open in this process.
        assert open_fds() - before == {master}
        assert get_size(master) == PtySize(30, 100)
        resize(master, 5, 6)
        assert get_size(master) == PtySize(5, 6)
        with pytest.raises(ValueError, match="cols"):
            resize(master, 5, 0)
    finally:
        os.close(master)
    assert open_fds() == before


# -- spawning ----------------------------------------------------------------

FACTS = """
import json, os
def link(n):
    try:
        return os.readlink(f"/proc/self/fd/{n}")
    except FileNotFoundError:  # listdir's own fd, closed by now
        return ""
links = {n: link(n) for n in os.listdir("/proc/self/fd")}
print(json.dumps({
    "isatty": [os.isatty(fd) for fd in (0, 1, 2)],
    "foreground": os.tcgetpgrp(0) == os.getpgrp(),
    "session_leader": os.getsid(0) == os.getpid(),
    "group_leader": os.getpgrp() == os.getpid(),
    "ttyname": [os.ttyname(fd) for fd in (0, 1, 2)],
    # Field 7 of /proc/self/stat is the controlling terminal's device number.
    "ctty_rdev": int(open("/proc/self/stat").read().rpartition(")")[2].split()[4]),
    "stdin_rdev": os.fstat(0).st_rdev,
    "size": list(os.get_terminal_size(0)),
    "tty_fds": sorted(n for n, t in links.items() if t.startswith("/dev/pt")),
}), flush=True)
"""


async def test_child_has_the_pty_as_controlling_terminal() -> None:
    async with child_on_pty(FACTS, size=PtySize(30, 100)) as child:
        out = await child.read_to_eof()
        assert await child.wait() == 0
    facts = json.loads(out.decode().strip().splitlines()[-1])
    slave = facts["ttyname"][0]
    assert slave.startswith("/dev/pts/")
    assert facts["isatty"] == [True, True, True]
    assert facts["foreground"]
    assert facts["session_leader"]
    assert facts["group_leader"]
    assert facts["ttyname"] == [slave] * 3
    assert facts["ctty_rdev"] == facts["stdin_rdev"]
    assert facts["size"] == [100, 30]
    # Only 0, 1 and 2 are terminals: the master did not leak in.
    assert facts["tty_fds"] == ["0", "1", "2"]


async def test_child_is_its_own_group_and_session() -> None:
    code = "import sys; print('UP', flush=True); sys.stdin.readline()"
    async with child_on_pty(code) as child:
        await child.read_until(b"UP")
        assert os.getpgid(child.pid) == child.pid
        assert os.getsid(child.pid) == child.pid
        assert os.tcgetpgrp(child.stream.fileno()) == child.pid
        os.killpg(child.pid, signal.SIGTERM)
        assert await child.wait() == -signal.SIGTERM


async def test_child_gets_default_signal_dispositions() -> None:
    # A parent that ignores SIGINT (nohup, a background job) must not pass
    # that on: Ctrl-C on the child's own terminal has to work. Only the
    # disposition at spawn time matters, so restore ours right after it.
    code = "import signal; print('IGNORED', signal.getsignal(signal.SIGINT) is signal.SIG_IGN)"
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    restored = False
    try:
        async with child_on_pty(code) as child:
            signal.signal(signal.SIGINT, previous)
            restored = True
            assert b"IGNORED False" in await child.read_to_eof()
            assert await child.wait() == 0
    finally:
        if not restored:
            signal.signal(signal.SIGINT, previous)


async def test_env_path_is_searched_for_the_program(tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "my-python").symlink_to(sys.executable)
    code = "import os; print('VAR=' + os.environ['ONLY_HERE'])"
    env = {"PATH": str(bindir), "ONLY_HERE": "yes"}
    async with child_on_pty(code, env=env, argv0="my-python") as child:
        assert b"VAR=yes" in await child.read_to_eof()
        assert await child.wait() == 0


async def test_cwd_is_set_in_the_child_only(tmp_path: Path) -> None:
    (tmp_path / "py").symlink_to(sys.executable)
    here = os.getcwd()
    code = "import os; print('CWD=' + os.getcwd())"
    # "./py" is resolved against the child's cwd, as subprocess does.
    async with child_on_pty(code, cwd=tmp_path, argv0="./py") as child:
        out = await child.read_to_eof()
        assert await child.wait() == 0
    assert f"CWD={await trio.Path(tmp_path).resolve()}".encode() in out
    assert os.getcwd() == here


@pytest.mark.parametrize("argv0", ["./py", "py"])
async def test_relative_cwd_and_relative_program(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, argv0: str
) -> None:
    # The child changes directory before it execs, so the program must have
    # been resolved to an absolute path: "./py" against cwd, "py" on a
    # relative PATH entry (".", the child's cwd).
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "py").symlink_to(sys.executable)
    monkeypatch.chdir(tmp_path)
    env = {**os.environ, "PATH": "."}
    code = "import os; print('CWD=' + os.getcwd())"
    async with child_on_pty(code, cwd="sub", argv0=argv0, env=env) as child:
        out = await child.read_to_eof()
        assert await child.wait() == 0
    assert f"CWD={tmp_path / 'sub'}".encode() in out


async def test_missing_program_raises_and_leaks_nothing() -> None:
    before = open_fds()
    master, slave_path = open_pty()
    try:
        with pytest.raises(FileNotFoundError) as info:
            spawn_on_pty(["no-such-program-xyz", "-v"], slave_path=slave_path, env=None, cwd=None)
    finally:
        os.close(master)
    assert info.value.errno == errno.ENOENT
    assert info.value.filename == "no-such-program-xyz"
    assert "no-such-program-xyz" in str(info.value)
    assert open_fds() == before


async def test_bad_cwd_raises_naming_the_cwd_and_leaks_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "gone"
    before = open_fds()
    master, slave_path = open_pty()
    try:
        # sys.executable is found, so this fails inside posix_spawn's chdir.
        with pytest.raises(FileNotFoundError) as info:
            spawn_on_pty([sys.executable, "-c", "pass"], slave_path=slave_path, cwd=missing)
        assert info.value.filename == str(missing)
        # A relative program cannot even be resolved against a missing cwd.
        with pytest.raises(FileNotFoundError) as info:
            spawn_on_pty(["./py"], slave_path=slave_path, cwd=missing)
        assert info.value.filename == str(missing)
    finally:
        os.close(master)
    assert open_fds() == before


async def test_exec_failure_is_reported_by_the_spawn(tmp_path: Path) -> None:
    script = tmp_path / "not-executable"
    script.write_text("print('hi')\n")
    script.chmod(0o644)
    master, slave_path = open_pty()
    try:
        with pytest.raises(PermissionError) as info:
            spawn_on_pty([str(script)], slave_path=slave_path)
        assert info.value.filename == str(script)
    finally:
        os.close(master)


async def test_bad_argv_is_rejected() -> None:
    with pytest.raises(ValueError, match="argv"):
        spawn_on_pty([], slave_path="/dev/null")
    with pytest.raises(ValueError, match="argv"):
        spawn_on_pty("python", slave_path="/dev/null")


async def test_no_fd_leak_over_a_whole_run() -> None:
    before = open_fds()
    async with child_on_pty("print('done')") as child:
        await child.read_to_eof()
        await child.wait()
    assert open_fds() == before


async def test_no_fd_leak_when_cancelled_mid_read() -> None:
    before = open_fds()
    with trio.CancelScope() as scope:
        async with (
            child_on_pty("import sys; sys.stdin.readline()") as child,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(child.read_to_eof)
            await trio.testing.wait_all_tasks_blocked()
            scope.cancel()
    assert scope.cancelled_caught
    # The cleanup killed (SIGKILL, not the hang-up) and reaped the child.
    assert child.status == -signal.SIGKILL
    assert open_fds() == before


# -- talking to the child ----------------------------------------------------


async def test_write_reaches_the_child_and_is_echoed() -> None:
    code = "line = input(); print('GOT:' + line[::-1], flush=True)"
    async with child_on_pty(code) as child:
        await child.stream.send_all(b"hello\n")
        out = await child.read_until(b"GOT:olleh")
        # The line discipline echoes input, translating \n to \r\n.
        assert out.startswith(b"hello\r\n")
        assert await child.wait() == 0


async def test_eof_after_exit_is_empty_bytes_not_eio() -> None:
    code = "print('BYE' * 2000)"
    async with child_on_pty(code) as child:
        # Reap first: the slave is then closed by everyone, and the master
        # reports EIO once its buffer is drained.
        assert await child.wait() == 0
        out = await child.read_to_eof()
        assert out.count(b"BYE") == 2000
        assert await child.stream.receive_some() == b""
        # A write now has nobody to go to.
        with pytest.raises(trio.BrokenResourceError):
            await child.stream.send_all(b"x\n")


async def test_blocked_send_all_breaks_when_the_child_dies() -> None:
    # The child never reads, so the terminal's input buffer fills up.
    code = "import signal; print('UP', flush=True); signal.pause()"
    async with child_on_pty(code) as child:
        await child.read_until(b"UP")

        async def flood() -> None:
            with pytest.raises(trio.BrokenResourceError):
                await child.stream.send_all((b"y" * 99 + b"\n") * 10_000)

        # Without the hang-up check the sender would spin: epoll reports a
        # hung-up master writable while the write keeps failing with EAGAIN.
        with trio.fail_after(DEADLINE):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(flood)
                await trio.testing.wait_all_tasks_blocked()
                os.killpg(child.pid, signal.SIGKILL)
                assert await child.wait() == -signal.SIGKILL


async def test_send_eof_ends_the_childs_input() -> None:
    code = "import sys; data = sys.stdin.read(); print('LEN', len(data), flush=True)"
    async with child_on_pty(code) as child:
        await child.stream.send_all(b"abc\n")
        await child.stream.send_eof()
        await child.stream.send_eof()  # idempotent
        await child.read_until(b"LEN 4")
        with pytest.raises(trio.ClosedResourceError):
            await child.stream.send_all(b"more")
        assert await child.wait() == 0


async def test_send_eof_after_a_partial_line_still_ends_the_input() -> None:
    code = "import sys; data = sys.stdin.read(); print('GOT', repr(data), flush=True)"
    async with child_on_pty(code) as child:
        await child.stream.send_all(b"ab\ncd")  # no final newline
        await child.stream.send_eof()
        await child.read_until(b"GOT 'ab\\ncd'")
        assert await child.wait() == 0


async def test_interrupt_while_send_all_waits_for_room() -> None:
    # ISIG off, and the child reads nothing until SIGUSR1: the terminal's
    # input buffer fills and send_all() waits for room; interrupt() must
    # then wait too (not fail with BusyResourceError), and both complete.
    code = (
        "import os, signal, sys, tty\n"
        "tty.setraw(0)\n"
        "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})\n"
        "print('READY', flush=True)\n"
        "signal.sigwait({signal.SIGUSR1})\n"
        "seen = b''\n"
        "while len(seen) < 100_001:\n"
        "    seen += os.read(0, 65536)\n"
        "print('\\r\\nREAD', len(seen), seen.count(3), flush=True)\n"
    )
    async with child_on_pty(code) as child:
        await child.read_until(b"READY")
        done: list[str] = []

        async def flood() -> None:
            await child.stream.send_all(b"x" * 100_000)
            done.append("send_all")

        async def interrupt() -> None:
            await child.stream.interrupt()
            done.append("interrupt")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(flood)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(interrupt)
            await trio.testing.wait_all_tasks_blocked()
            # send_all still waits; interrupt() either found a byte of room
            # (the kernel moves typed input along on its own schedule) or
            # waits with it, which used to fail with BusyResourceError.
            assert "send_all" not in done
            os.kill(child.pid, signal.SIGUSR1)
        assert sorted(done) == ["interrupt", "send_all"]
        await child.read_until(b"READ 100001 1")
        assert await child.wait() == 0


# CPython's input() writes its prompt and then enters read() without
# checking for signals in between: a SIGINT landing there only sets a flag
# and the read blocks forever. With SIGINT at SIG_DFL the outcome does not
# depend on that timing: the line discipline's SIGINT kills the child.
INTERRUPTIBLE = """
import signal, sys, termios
signal.signal(signal.SIGINT, signal.SIG_DFL)
{setup}
input("PROMPT>")
print("NOT INTERRUPTED", flush=True)
"""


async def test_interrupt_sends_sigint_to_a_child_blocked_in_input() -> None:
    async with child_on_pty(INTERRUPTIBLE.format(setup="")) as child:
        await child.read_until(b"PROMPT>")
        await child.stream.interrupt()
        assert await child.wait() == -signal.SIGINT
        assert b"NOT INTERRUPTED" not in await child.read_to_eof()


async def test_interrupt_uses_the_terminals_own_vintr() -> None:
    # The child moves VINTR to Ctrl-G; \x03 would now be plain input.
    setup = (
        "attrs = termios.tcgetattr(0); attrs[6][termios.VINTR] = b'\\x07'; "
        "termios.tcsetattr(0, termios.TCSANOW, attrs)"
    )
    async with child_on_pty(INTERRUPTIBLE.format(setup=setup)) as child:
        await child.read_until(b"PROMPT>")
        await child.stream.interrupt()
        assert await child.wait() == -signal.SIGINT


async def test_interrupt_is_plain_input_when_isig_is_off() -> None:
    code = """
import termios
attrs = termios.tcgetattr(0)
attrs[3] &= ~termios.ISIG
termios.tcsetattr(0, termios.TCSANOW, attrs)
line = input("PROMPT>")
print("LINE", repr(line), flush=True)
"""
    async with child_on_pty(code) as child:
        await child.read_until(b"PROMPT>")
        await child.stream.interrupt()
        await child.stream.send_all(b"\n")
        await child.read_until(b"LINE '\\x03'")
        assert await child.wait() == 0


RESIZE_WATCHER = """
import os, signal
signal.signal(signal.SIGWINCH, lambda *args: None)
# Blocked, not ignored: a SIGWINCH that comes before sigwait stays pending.
signal.pthread_sigmask(signal.SIG_BLOCK, {{signal.SIGWINCH}})
print("READY", flush=True)
for n in range({count}):
    signal.sigwait({{signal.SIGWINCH}})
    cols, rows = os.get_terminal_size(0)
    print(f"SIZE{{n}}={{rows}}x{{cols}}", flush=True)
"""


async def test_resize_sends_sigwinch_with_the_new_size() -> None:
    async with child_on_pty(RESIZE_WATCHER.format(count=1)) as child:
        await child.read_until(b"READY")
        child.stream.resize(PtySize(40, 120))
        await child.read_until(b"SIZE0=40x120")
        assert child.stream.get_size() == PtySize(40, 120)
        assert await child.wait() == 0


# -- stream mechanics ----------------------------------------------------------


async def test_close_wakes_a_blocked_receiver_and_is_idempotent() -> None:
    code = "import sys; sys.stdin.readline()"
    async with child_on_pty(code) as child:
        stream = child.stream

        async def receive() -> None:
            with pytest.raises(trio.ClosedResourceError):
                await stream.receive_some()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio.BusyResourceError):
                await stream.receive_some()
            await stream.aclose()
        stream.close()
        assert stream.fileno() == -1
        with pytest.raises(trio.ClosedResourceError):
            await stream.send_all(b"x")
        with pytest.raises(trio.ClosedResourceError):
            stream.resize(PtySize())
        # Closing the master hung up the child's terminal: SIGHUP.
        assert await child.wait() == -signal.SIGHUP


async def test_receive_some_rejects_bad_sizes_and_honours_small_ones() -> None:
    async with child_on_pty("print('abcdef')") as child:
        with pytest.raises(ValueError, match="max_bytes"):
            await child.stream.receive_some(0)
        first = await child.stream.receive_some(2)
        assert len(first) <= 2
        child.output += first
        assert b"abcdef" in await child.read_to_eof()


# -- the user's terminal ---------------------------------------------------------


def test_raw_terminal_restores_attributes_even_on_error() -> None:
    user_master, user_slave = os.openpty()
    try:
        original = termios.tcgetattr(user_slave)
        with raw_terminal(user_slave) as raw:
            assert raw
            lflag = termios.tcgetattr(user_slave)[3]
            assert not lflag & (termios.ICANON | termios.ECHO | termios.ISIG)
        assert termios.tcgetattr(user_slave) == original
        with pytest.raises(KeyboardInterrupt), raw_terminal(user_slave):
            raise KeyboardInterrupt
        assert termios.tcgetattr(user_slave) == original
    finally:
        os.close(user_master)
        os.close(user_slave)


def test_raw_terminal_leaves_non_terminals_alone() -> None:
    read_end, write_end = os.pipe()
    try:
        with raw_terminal(read_end) as raw:
            assert not raw
        assert terminal_size(read_end) is None
    finally:
        os.close(read_end)
        os.close(write_end)


async def test_copy_both_ways_through_a_raw_user_terminal() -> None:
    user_master, user_slave = os.openpty()
    user_screen = PtyStream(user_master)
    code = "line = input(); print('PONG:' + line, flush=True)"
    try:
        async with child_on_pty(code) as child:
            with raw_terminal(user_slave):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(copy_input, user_slave, child.stream)
                    nursery.start_soon(copy_output, child.stream, user_slave)
                    # The user types; in raw mode Enter is a bare \r, which the
                    # child's terminal (ICRNL) turns into a newline.
                    await user_screen.send_all(b"ping\r")
                    seen = bytearray()
                    with trio.fail_after(DEADLINE):
                        while b"PONG:ping" not in seen:
                            seen += await user_screen.receive_some()
                    assert await child.wait() == 0
                    nursery.cancel_scope.cancel()
    finally:
        user_screen.close()
        os.close(user_slave)


async def test_piped_input_ends_with_the_terminals_eof() -> None:
    read_end, write_end = os.pipe()
    os.write(write_end, b"one\ntwo\n")
    os.close(write_end)
    code = "import sys; data = sys.stdin.read(); print('LINES', data.count(chr(10)), flush=True)"
    try:
        async with child_on_pty(code) as child:
            await copy_input(read_end, child.stream)
            await child.read_until(b"LINES 2")
            assert await child.wait() == 0
    finally:
        os.close(read_end)


async def test_devnull_input_is_an_immediate_eof() -> None:
    # epoll refuses /dev/null (EPERM); it must be read directly instead.
    null = os.open(os.devnull, os.O_RDONLY)
    code = "import sys; print('READ', repr(sys.stdin.read()), flush=True)"
    try:
        async with child_on_pty(code) as child:
            await copy_input(null, child.stream)
            await child.read_until(b"READ ''")
            assert await child.wait() == 0
    finally:
        os.close(null)


async def test_copy_output_to_a_regular_file(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with target.open("wb") as f:
        async with child_on_pty("print('x' * 100000)") as child:
            await copy_output(child.stream, f.fileno())
            assert await child.wait() == 0
    assert target.read_bytes().count(b"x") == 100000


async def test_forward_resizes_follows_the_users_terminal() -> None:
    user_master, user_slave = os.openpty()
    resize(user_master, 33, 77)
    try:
        async with child_on_pty(RESIZE_WATCHER.format(count=2)) as child:
            await child.read_until(b"READY")
            async with trio.open_nursery() as nursery:
                # The first copy happens before start() returns.
                await nursery.start(forward_resizes, user_slave, child.stream)
                await child.read_until(b"SIZE0=33x77")
                # The user's window changes: the kernel would SIGWINCH the
                # user's foreground group; this test process stands in for it.
                resize(user_master, 50, 150)
                os.kill(os.getpid(), signal.SIGWINCH)
                await child.read_until(b"SIZE1=50x150")
                nursery.cancel_scope.cancel()
            assert await child.wait() == 0
    finally:
        os.close(user_master)
        os.close(user_slave)


async def test_sendline_types_a_line_and_stream_is_public() -> None:
    from trio_observer import open_session

    async with open_session() as session:
        process = await session.start_process(
            [sys.executable, "-c", "print(int(input()) * 2, flush=True)"], pty=True
        )
        assert process.pty is not None
        assert isinstance(process.pty.stream, PtyStream)
        await process.pty.sendline("21")
        with trio.fail_after(30):
            match = await process.pty.log.expect(re.compile(rb"(\d+)\r\n"))
            assert match.data == b"21\r\n"  # the echo
            match = await process.pty.log.expect(re.compile(rb"(\d+)\r\n"))
        assert match.data == b"42\r\n"
        assert await process.wait() == 0
