"""Pseudo-terminals: creation, spawning on a controlling tty, resize, EIO as EOF.

The child is started on the slave by :func:`trio_observer._linux._spawn.spawn_on_pty`
(``posix_spawn`` with ``setsid``; see that module for why not ``pty.fork``).
"""

from __future__ import annotations

import errno
import fcntl
import math
import os
import select
import struct
import termios
from dataclasses import dataclass
from typing import Final, final

import trio

__all__ = [
    "PtySize",
    "PtyStream",
    "get_size",
    "open_pty",
    "resize",
]

_MAX_DIMENSION: Final = 65535
"""``struct winsize`` holds unsigned shorts."""

_READ_SIZE: Final = 65536
"""Default read size: large enough that a chatty child costs few syscalls."""


@final
@dataclass(frozen=True, slots=True)
class PtySize:
    """The size of a terminal window, in character cells.

    Args:
        rows: Number of lines, 1 to 65535. Defaults to 24, the VT100 size.
        cols: Number of columns, 1 to 65535. Defaults to 80.

    Raises:
        TypeError: If a dimension is not an ``int``.
        ValueError: If a dimension is outside 1 to 65535.
    """

    rows: int = 24
    """Number of lines."""
    cols: int = 80
    """Number of columns."""

    def __post_init__(self) -> None:
        for name in ("rows", "cols"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"PtySize.{name} must be an int, got {value!r}")
            if not 1 <= value <= _MAX_DIMENSION:
                raise ValueError(
                    f"PtySize.{name} must be between 1 and {_MAX_DIMENSION}, got {value!r}"
                )


def open_pty(size: PtySize | None = None) -> tuple[int, str]:
    """Create a pseudo-terminal and return its master fd and slave path.

    The master is close-on-exec and blocking; :class:`PtyStream` makes it
    non-blocking when it takes it over. The slave is opened only long enough
    to learn its path and is closed again, so nothing in this process holds
    it: :func:`spawn_on_pty` opens it by path in the child, which is what
    makes it the child's controlling terminal. Until then, and again once
    every process has closed it, reading the master fails with ``EIO``
    (which :class:`PtyStream` reports as end of stream), so start reading
    only after the spawn.

    Args:
        size: The initial window size; ``PtySize()`` (24x80) when omitted.

    Returns:
        ``(master_fd, slave_path)``. The caller owns ``master_fd``.

    Raises:
        OSError: If the system is out of pseudo-terminals or descriptors.
    """
    if size is None:
        size = PtySize()
    # glibc's openpty opens the slave with O_NOCTTY, so even if this process
    # is a session leader without a terminal it does not acquire this one.
    # Python makes both descriptors non-inheritable (close-on-exec).
    master_fd, slave_fd = os.openpty()
    try:
        slave_path = os.ttyname(slave_fd)
        resize(master_fd, size.rows, size.cols)
    except BaseException:
        os.close(master_fd)
        raise
    finally:
        os.close(slave_fd)
    return master_fd, slave_path


def resize(master_fd: int, rows: int, cols: int) -> None:
    """Set the window size of a pseudo-terminal.

    When the size changes, the kernel sends ``SIGWINCH`` to the terminal's
    foreground process group, which is how full-screen programs learn it.

    Args:
        master_fd: The master side, as returned by :func:`open_pty`.
        rows: Number of lines, 1 to 65535.
        cols: Number of columns, 1 to 65535.

    Raises:
        ValueError: If ``rows`` or ``cols`` is outside 1 to 65535.
        OSError: If ``master_fd`` is not a terminal.
    """
    size = PtySize(rows, cols)
    fcntl.ioctl(master_fd, termios.TIOCSWINSZ, struct.pack("HHHH", size.rows, size.cols, 0, 0))


def get_size(master_fd: int) -> PtySize:
    """Return the current window size of a pseudo-terminal.

    Args:
        master_fd: Either side of the terminal.

    Returns:
        The size. A terminal whose size was never set reports 0x0, which is
        returned as the smallest valid size, 1x1.

    Raises:
        OSError: If ``master_fd`` is not a terminal.
    """
    packed = fcntl.ioctl(master_fd, termios.TIOCGWINSZ, b"\0" * 8)
    rows, cols, _, _ = struct.unpack("HHHH", packed)
    return PtySize(max(rows, 1), max(cols, 1))


def _control_char(fd: int, index: int, default: bytes) -> bytes:
    """Return a special character of the terminal, or ``default`` if disabled."""
    # termios calls on a pty master act on the slave's settings (Linux's
    # tty_mode_ioctl switches to the linked tty), which is what the child sees.
    char = termios.tcgetattr(fd)[6][index]
    if not isinstance(char, bytes) or char == b"\0":
        # b"\0" is _POSIX_VDISABLE: the child turned the character off.
        return default
    return char


def _raise_if_hung_up(master_fd: int) -> None:
    """Raise BrokenResourceError if no process has the slave open.

    Linux accepts writes to such a master into a buffer nobody will read
    (until it is full), so the write itself does not fail; the master's
    POLLHUP is the reliable sign.
    """
    poller = select.poll()
    poller.register(master_fd, select.POLLOUT)
    for _, events in poller.poll(0):
        if events & select.POLLHUP:
            raise trio.BrokenResourceError("no process has the terminal open any more")


class _Busy:
    """Raise BusyResourceError when two tasks use one direction at once."""

    __slots__ = ("_held", "_message")

    def __init__(self, message: str) -> None:
        self._message = message
        self._held = False

    def __enter__(self) -> None:
        if self._held:
            raise trio.BusyResourceError(self._message)
        self._held = True

    def __exit__(self, *exc: object) -> None:
        self._held = False


@final
class PtyStream(trio.abc.HalfCloseableStream):
    """A Trio stream over the master side of a pseudo-terminal.

    Bytes sent are what the child reads as typed input (subject to the
    terminal's line discipline: echo, line editing, ``VINTR`` and so on);
    bytes received are everything the child writes to the terminal.

    Linux reports "every process has closed the slave" by failing reads on
    the master with ``EIO``; this stream reports that as end of stream
    (``b""``), after all the output that was still buffered.

    Args:
        master_fd: The master side, from :func:`open_pty`. The stream takes
            ownership: it makes it non-blocking and closes it on
            :meth:`close`.
    """

    def __init__(self, master_fd: int) -> None:
        os.set_blocking(master_fd, False)
        self._fd = master_fd
        self._eof_sent = False
        self._writable: trio.Event | None = None
        # Whether what was typed so far ends a line: VEOF after a partial
        # line only submits the line, so send_eof() must type it twice.
        self._at_line_start = True
        # When the child last wrote something (trio clock): after the input
        # ends, a quiet child at a prompt is typed VEOF again (copy_input).
        self._last_output = -math.inf
        self._send_busy = _Busy("another task is using this PtyStream for send")
        self._receive_busy = _Busy("another task is using this PtyStream for receive")

    def fileno(self) -> int:
        """Return the master fd, or -1 once the stream is closed."""
        return self._fd

    def _check_open(self) -> int:
        if self._fd < 0:
            raise trio.ClosedResourceError("the PtyStream was already closed")
        return self._fd

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Return some of the child's output, waiting until there is some.

        Args:
            max_bytes: Upper bound on the bytes returned; 65536 when None.

        Returns:
            At least one byte, or ``b""`` once every process has closed the
            slave (and on every call after that).

        Raises:
            ClosedResourceError: If the stream was closed, also while waiting.
            BusyResourceError: If another task is already receiving.
            BrokenResourceError: On an unexpected error from ``read``.
            ValueError: If ``max_bytes`` is less than 1.
        """
        with self._receive_busy:
            if max_bytes is None:
                max_bytes = _READ_SIZE
            elif max_bytes < 1:
                raise ValueError(f"max_bytes must be an integer >= 1, got {max_bytes!r}")
            fd = self._check_open()
            await trio.lowlevel.checkpoint()
            while True:
                fd = self._check_open()
                try:
                    data = os.read(fd, max_bytes)
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(fd)
                except OSError as exc:
                    if exc.errno == errno.EIO:
                        return b""
                    if exc.errno == errno.EBADF:
                        raise trio.ClosedResourceError("the PtyStream was closed") from None
                    raise trio.BrokenResourceError(f"reading the pty master failed: {exc}") from exc
                else:
                    if data:
                        self._last_output = trio.current_time()
                    return data

    async def _wait_writable(self, fd: int) -> None:
        # interrupt() may write while send_all() waits for room, and trio
        # allows one waiter per fd and direction: the first task waits on
        # the fd, the others on it, and all retry their write once it wakes.
        waiter = self._writable
        if waiter is not None:
            await waiter.wait()
            return
        waiter = self._writable = trio.Event()
        try:
            await trio.lowlevel.wait_writable(fd)
        finally:
            self._writable = None
            waiter.set()

    async def _write(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()
        _raise_if_hung_up(self._check_open())
        with memoryview(data) as view:
            sent = 0
            while sent < len(view):
                fd = self._check_open()
                try:
                    sent += os.write(fd, view[sent:])
                except BlockingIOError:
                    # With the slave closed, epoll reports the master
                    # writable (POLLHUP) while writes still fail with EAGAIN:
                    # without this check the loop would spin.
                    _raise_if_hung_up(fd)
                    await self._wait_writable(fd)
                except OSError as exc:
                    if exc.errno == errno.EBADF:
                        raise trio.ClosedResourceError("the PtyStream was closed") from None
                    # EIO: no process has the slave open any more.
                    raise trio.BrokenResourceError(
                        f"writing to the pty master failed: {exc}"
                    ) from exc

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Type ``data`` into the terminal.

        Args:
            data: The bytes to write. In the default (canonical) mode the
                child sees them line by line, after ``\\r`` or ``\\n``.

        Raises:
            ClosedResourceError: If the stream was closed or :meth:`send_eof`
                was called.
            BusyResourceError: If another task is already sending.
            BrokenResourceError: If no process has the slave open any more
                (checked before writing and whenever the buffer is full).
        """
        with self._send_busy:
            self._check_open()
            if self._eof_sent:
                raise trio.ClosedResourceError("send_eof() was already called on this PtyStream")
            await self._write(data)
            if data:
                self._at_line_start = bytes(data[-1:]) in (b"\n", b"\r")

    async def wait_send_all_might_not_block(self) -> None:
        """Wait until the terminal's input buffer has room.

        Raises:
            ClosedResourceError: If the stream was closed or :meth:`send_eof`
                was called.
            BusyResourceError: If another task is already sending.
        """
        with self._send_busy:
            fd = self._check_open()
            if self._eof_sent:
                raise trio.ClosedResourceError("send_eof() was already called on this PtyStream")
            await trio.lowlevel.wait_writable(fd)

    async def send_eof(self) -> None:
        """Type the terminal's end-of-file character (``VEOF``, usually Ctrl-D).

        A terminal has no half-close; this is what a user does instead. In
        canonical mode, at the start of a line, the child's ``read`` then
        returns 0 bytes. After a partial line one ``VEOF`` only submits that
        line, so it is typed twice then: the child reads the partial line,
        then end of file. A child that turned canonical mode off just
        receives the byte(s). After
        this call :meth:`send_all` raises ``ClosedResourceError``, as for any
        half-closed stream; :meth:`interrupt` and receiving still work. A
        second call does nothing.

        Raises:
            ClosedResourceError: If the stream was closed.
            BusyResourceError: If another task is sending.
            BrokenResourceError: If no process has the slave open any more.
        """
        with self._send_busy:
            fd = self._check_open()
            if self._eof_sent:
                await trio.lowlevel.checkpoint()
                return
            self._eof_sent = True
            eof = _control_char(fd, termios.VEOF, b"\x04")
            await self._write(eof if self._at_line_start else eof + eof)

    async def _retype_eof(self) -> None:
        # After send_eof(): type VEOF once more, at a fresh line (the child
        # has consumed what was typed before), for a child that lost the
        # first one (see copy_input).
        with self._send_busy:
            fd = self._check_open()
            await self._write(_control_char(fd, termios.VEOF, b"\x04"))

    async def interrupt(self) -> None:
        """Type the terminal's interrupt character (``VINTR``, usually Ctrl-C).

        With the default settings (``ISIG`` on) the line discipline then
        sends ``SIGINT`` to the terminal's foreground process group and
        discards pending input, exactly as when a user presses Ctrl-C. A
        child that turned ``ISIG`` off (a full-screen editor, say) receives
        the character as input and decides for itself. This may be called
        while another task is blocked in :meth:`send_all`.

        Raises:
            ClosedResourceError: If the stream was closed.
            BrokenResourceError: If no process has the slave open any more.
        """
        fd = self._check_open()
        await self._write(_control_char(fd, termios.VINTR, b"\x03"))

    def resize(self, size: PtySize) -> None:
        """Set the window size; the foreground process group gets ``SIGWINCH``.

        Args:
            size: The new size.

        Raises:
            ClosedResourceError: If the stream was closed.
        """
        resize(self._check_open(), size.rows, size.cols)

    def get_size(self) -> PtySize:
        """Return the current window size.

        Raises:
            ClosedResourceError: If the stream was closed.
        """
        return get_size(self._check_open())

    def close(self) -> None:
        """Close the master; idempotent.

        Closing the master hangs up the terminal: the kernel sends
        ``SIGHUP`` to the child's session, and tasks blocked on this stream
        get ``ClosedResourceError``.
        """
        if self._fd < 0:
            return
        fd = self._fd
        # Set -1 first: fd numbers are reused, and a later call must not
        # close somebody else's descriptor.
        self._fd = -1
        trio.lowlevel.notify_closing(fd)
        os.close(fd)

    async def aclose(self) -> None:
        """Close the master (see :meth:`close`) and checkpoint."""
        self.close()
        await trio.lowlevel.checkpoint()
