"""``trio-observer attach``, run for real: the CLI on a real pty against a real daemon."""

from __future__ import annotations

import fcntl
import os
import select
import shutil
import struct
import subprocess
import tempfile
import termios
from collections.abc import AsyncGenerator, Iterator
from contextlib import aclosing
from pathlib import Path

import pytest
import trio

import trio_observer

from .conftest import PY
from .test_daemon import DaemonProcess, start_daemon

# The process on the daemon's terminal: says when it starts and whenever its
# window changes, echoes lines, and answers "size" with what stty sees.
SCRIPT = r"""
import signal, subprocess, sys
def winch(*_):
    out = subprocess.run(["stty", "size"], capture_output=True, text=True).stdout.strip()
    print("WINCH", out, flush=True)
signal.signal(signal.SIGWINCH, winch)
print("READY", flush=True)
for line in sys.stdin:
    line = line.strip()
    if line == "size":
        out = subprocess.run(["stty", "size"], capture_output=True, text=True).stdout.strip()
        print("SIZE", out, flush=True)
    else:
        print("GOT", line[::-1], flush=True)
"""


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProcess]:
    # Not tmp_path: on a machine where other pytest runs of the same user
    # prune old basetemps, the socket could vanish under the daemon.
    directory = Path(tempfile.mkdtemp(prefix="trio-observer-attach-"))
    running = start_daemon(directory / "d" / "daemon.sock")
    try:
        yield running
    finally:
        if running.process.poll() is None:
            running.process.terminate()
        running.process.communicate(timeout=60)
        shutil.rmtree(directory, ignore_errors=True)


def set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def take_controlling_terminal() -> None:
    # Runs in the child after setsid: the pty becomes its terminal, so the
    # kernel sends it SIGWINCH when the test resizes the window.
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Terminal:
    """The user's side of a pty with ``trio-observer attach`` running on it."""

    def __init__(self, socket: Path, name: str) -> None:
        self.master, slave = os.openpty()
        set_size(self.master, 20, 250)
        self.process = subprocess.Popen(
            [PY, "-m", "trio_observer", "attach", name, "--socket", str(socket), "--no-autostart"],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
            preexec_fn=take_controlling_terminal,
        )
        os.close(slave)
        self.screen = b""

    def read_until(self, wanted: bytes, timeout: float = 60) -> bytes:
        while wanted not in self.screen:
            ready, _, _ = select.select([self.master], [], [], timeout)
            assert ready, f"no {wanted!r} on the screen: {self.screen!r}"
            try:
                data = os.read(self.master, 4096)
            except OSError:  # EIO: the attach process closed the terminal
                data = b""
            assert data, f"terminal closed before {wanted!r}: {self.screen!r}"
            self.screen += data
        return self.screen

    def drain(self) -> bytes:
        """Everything left on the screen, for a failure's message."""
        while select.select([self.master], [], [], 0)[0]:
            try:
                data = os.read(self.master, 4096)
            except OSError:
                break
            if not data:
                break
            self.screen += data
        return self.screen

    def type(self, data: bytes) -> None:
        os.write(self.master, data)

    def close(self) -> int:
        try:
            code = self.process.wait(timeout=60)
            assert code == 0, self.drain()
            return code
        finally:
            os.close(self.master)


async def start_tty(daemon: DaemonProcess, name: str) -> None:
    async with trio_observer.connect(daemon.path, autostart=False) as client:
        await client.start([PY, "-c", SCRIPT], name=name, pty=(24, 80))
        seen = b""
        output = await client.output(name, follow=True)
        assert isinstance(output, AsyncGenerator)
        async with aclosing(output) as chunks:
            async for chunk in chunks:
                assert isinstance(chunk, bytes)
                seen += chunk
                if b"READY" in seen:
                    break


async def state_of(daemon: DaemonProcess, name: str) -> str:
    async with trio_observer.connect(daemon.path, autostart=False) as client:
        (session,) = await client.sessions()
        (state,) = [p["state"] for p in session["processes"] if p["name"] == name]
        return str(state)


def test_attach_cli_replays_types_resizes_and_detaches(daemon: DaemonProcess) -> None:
    trio.run(start_tty, daemon, "tty1")
    terminal = Terminal(daemon.path, "tty1")
    try:
        # The backlog first: READY was printed before this client existed.
        terminal.read_until(b"READY")
        # Attaching forwards the user's window (20x70) to the process.
        terminal.read_until(b"WINCH 20 250")
        # Raw mode: the user's Enter (\r) is passed through untouched and
        # the process's terminal turns it into a newline.
        terminal.type(b"hello\r")
        terminal.read_until(b"GOT olleh")
        set_size(terminal.master, 33, 111)
        terminal.read_until(b"WINCH 33 111")
        terminal.type(b"size\r")
        terminal.read_until(b"SIZE 33 111")
        terminal.type(b"\x1d")
        assert terminal.process.wait(timeout=60) == 0, terminal.drain()
        # The user's terminal is back in the mode it had.
        lflag = termios.tcgetattr(terminal.master)[3]
        assert lflag & termios.ICANON
        assert lflag & termios.ECHO
        assert terminal.close() == 0
    finally:
        if terminal.process.poll() is None:
            terminal.process.kill()
            terminal.process.wait()
    assert trio.run(state_of, daemon, "tty1") == "running"
    # A later attach finds the process as it was, backlog and all.
    again = Terminal(daemon.path, "tty1")
    try:
        again.read_until(b"SIZE 33 111")
        again.type(b"back\r")
        again.read_until(b"GOT kcab")
        again.type(b"\x1d")
        assert again.close() == 0
    finally:
        if again.process.poll() is None:
            again.process.kill()
            again.process.wait()


def test_second_attach_watches_read_only(daemon: DaemonProcess) -> None:
    trio.run(start_tty, daemon, "tty2")
    writer = Terminal(daemon.path, "tty2")
    watcher = None
    try:
        writer.read_until(b"READY")
        watcher = Terminal(daemon.path, "tty2")
        watcher.read_until(b"watching read-only")
        watcher.read_until(b"READY")
        watcher.type(b"ignored\r")
        writer.type(b"typed\r")
        writer.read_until(b"GOT depyt")
        watcher.read_until(b"GOT depyt")
        assert b"deringi" not in watcher.screen + writer.screen
        # The watcher's keys go nowhere, but its detach key works.
        watcher.type(b"\x1d")
        assert watcher.close() == 0
        writer.type(b"\x1d")
        assert writer.close() == 0
    finally:
        for terminal in (writer, watcher):
            if terminal is not None and terminal.process.poll() is None:
                terminal.process.kill()
                terminal.process.wait()
    assert trio.run(state_of, daemon, "tty2") == "running"
