"""The user's own terminal, for running a child on a pty interactively.

``trio-observer run --pty`` puts the user's terminal in raw mode, so every
key (Ctrl-C included) goes to the child's pseudo-terminal and is interpreted
by *its* line discipline, then copies bytes both ways and passes window size
changes on.

These helpers never set ``O_NONBLOCK`` on the user's descriptors. The open
file description behind stdin is shared with the shell that started us (and
stdin and stdout are often one description), so a flag set here would leak
into the shell if we died, and a flag one copier restored on exit would turn
the other copier's reads blocking under its feet. Instead they wait for
readiness with :func:`trio.lowlevel.wait_readable` / ``wait_writable`` and
then do one plain ``read``/``write``, which the readiness guarantees will
not block (regular files and devices like /dev/null, which epoll refuses,
never block anyway).
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import signal
import stat
import termios
import tty
from collections.abc import Iterator
from typing import Final

import trio

from ._pty import PtySize, PtyStream

__all__ = [
    "copy_input",
    "copy_output",
    "forward_resizes",
    "raw_terminal",
    "terminal_size",
    "write_all",
]

_CHUNK: Final = 4096
"""Largest single write to the user: PIPE_BUF, so a pipe that reported
writable takes it without blocking."""

_READ_SIZE: Final = 65536


@contextlib.contextmanager
def raw_terminal(fd: int) -> Iterator[bool]:
    """Put a terminal in raw mode for the duration of a ``with`` block.

    Raw mode (as ``tty.setraw``) turns off echo, line editing, signal keys
    and output processing, so keystrokes such as Ctrl-C and Ctrl-Z reach
    the child's pty as bytes. The original attributes are restored when the
    block exits, however it exits: normally, by an exception, by
    cancellation or by ``KeyboardInterrupt``. A process killed by a signal
    it does not handle cannot restore anything; a CLI should turn
    ``SIGTERM``/``SIGHUP`` into cancellation (``trio.open_signal_receiver``)
    so that this block's exit runs.

    Args:
        fd: The user's terminal, usually ``sys.stdin.fileno()``. If it is not
            a terminal (a pipe, a file) nothing is changed.

    Yields:
        True if raw mode was entered, False if ``fd`` is not a terminal.

    Raises:
        termios.error: If the attributes cannot be read or set.
    """
    if not os.isatty(fd):
        yield False
        return
    original = termios.tcgetattr(fd)
    # TCSADRAIN, not setraw's default TCSAFLUSH: keys typed before the child
    # started are kept and forwarded rather than discarded.
    tty.setraw(fd, termios.TCSADRAIN)
    try:
        yield True
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, original)


def terminal_size(fd: int) -> PtySize | None:
    """Return the window size of the user's terminal, or None.

    Args:
        fd: Any descriptor; usually stdin or stdout.

    Returns:
        The size, or None if ``fd`` is not a terminal or reports a size of
        zero (a terminal nobody ever sized).
    """
    try:
        columns, lines = os.get_terminal_size(fd)
    except OSError:
        return None
    if columns < 1 or lines < 1:
        return None
    return PtySize(rows=lines, cols=columns)


async def forward_resizes(
    user_fd: int,
    pty: PtyStream,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Keep the child's window size equal to the user's terminal's, forever.

    The size is copied once at start (the terminal may have changed since
    the pty was opened) and again after every ``SIGWINCH`` this process
    receives. Run it with ``nursery.start``: once started, no resize can be
    missed. It returns when ``pty`` is closed; otherwise cancel it.

    Args:
        user_fd: The user's terminal. If it is not a terminal, this waits
            for cancellation without resizing anything.
        pty: The child's terminal.
        task_status: For ``nursery.start``; started once the signal handler
            is installed and the first copy is done.

    Raises:
        RuntimeError: If not called from the main thread (a Python limit on
            signal handlers).
    """
    with trio.open_signal_receiver(signal.SIGWINCH) as resizes:
        try:
            _copy_size(user_fd, pty)
            task_status.started()
            # The receiver coalesces a burst of SIGWINCHs into one wake-up;
            # only the latest size matters, so that loses nothing.
            async for _ in resizes:
                _copy_size(user_fd, pty)
        except trio.ClosedResourceError:
            return


def _copy_size(user_fd: int, pty: PtyStream) -> None:
    size = terminal_size(user_fd)
    if size is not None and size != pty.get_size():
        # Only on change: TIOCSWINSZ with the same size sends no SIGWINCH
        # anyway, but skipping it avoids a needless syscall per signal.
        pty.resize(size)


async def read_user(fd: int, never_blocks: bool) -> bytes:
    """Read what the user typed (or piped) on ``fd``, without changing its flags.

    Args:
        fd: The user's input, usually ``0``.
        never_blocks: ``fd_never_blocks(fd)``, computed once by the caller.

    Returns:
        Up to one read's worth of bytes; ``b""`` at end of input or when the
        user's terminal hung up.

    Raises:
        OSError: If reading ``fd`` fails otherwise.
    """
    if never_blocks:
        await trio.lowlevel.checkpoint()
    else:
        await trio.lowlevel.wait_readable(fd)
    try:
        return os.read(fd, _READ_SIZE)
    except OSError as exc:
        if exc.errno == errno.EIO:
            # The user's terminal hung up (its window was closed).
            return b""
        raise


def fd_never_blocks(fd: int) -> bool:
    """Whether epoll refuses ``fd`` because its I/O never blocks.

    That is regular files and devices without poll support such as
    ``/dev/null`` (stdin of a daemon, or of a CI job); epoll_ctl answers
    EPERM for both, and a plain read or write on them returns at once.
    """
    if stat.S_ISREG(os.fstat(fd).st_mode):
        return True
    probe = select.epoll()
    try:
        probe.register(fd, select.EPOLLIN | select.EPOLLOUT)
    except PermissionError:
        return True
    finally:
        probe.close()
    return False


# After piped input ends: how long the child must be quiet before VEOF is
# typed again (doubled after each VEOF the child answers with silence), and
# how many VEOFs in a row without any output in between: 0.2 + 0.4 + ... +
# 3.2 s covers a slow start of a program that prints nothing before it reads.
_EOF_QUIET = 0.2
_EOF_TRIES = 6


async def _retype_eof_while_quiet(pty: PtyStream) -> None:
    """Type VEOF again while the child sits quiet, as a user at a prompt would.

    The first VEOF can be lost: typed before the child read the lines
    before it, it ends canonical input, but a readline program (python3,
    bash) turns canonical mode off to read its line and never sees it as
    the end. A user in front of a real terminal would press Ctrl-D at the
    next prompt, so this does: whenever the child's output has been quiet
    for ``_EOF_QUIET`` seconds since its last output and our last VEOF, it
    types VEOF once more; each VEOF answered by silence doubles the wait,
    and after ``_EOF_TRIES`` of them in a row it gives up (the child ignores
    them). Returns when the terminal
    is gone.
    """
    silent_tries = 1
    last_eof = trio.current_time()
    seen_output = pty._last_output
    while silent_tries < _EOF_TRIES:
        quiet_from = max(pty._last_output, last_eof)
        quiet = (
            _EOF_QUIET * 2 ** (silent_tries - 1) if pty._last_output == seen_output else _EOF_QUIET
        )
        if trio.current_time() < quiet_from + quiet:
            await trio.sleep_until(quiet_from + quiet)
            continue
        if pty._last_output != seen_output:
            seen_output = pty._last_output
            silent_tries = 0
        await pty._retype_eof()
        last_eof = trio.current_time()
        silent_tries += 1


async def copy_input(user_fd: int, pty: PtyStream) -> None:
    """Copy what the user types (or pipes in) to the child's terminal.

    Returns when the user's input ends or the child's terminal is gone.
    When the input is not a terminal (``echo hi | trio-observer run --pty
    cat``), its end is passed on as the child terminal's end-of-file
    character, so a child reading to end of input finishes (typed again
    while the child sits quiet at a prompt, see docs/pty.md); a terminal's
    input only ends when it hangs up, and then nothing is sent.

    Args:
        user_fd: Where the input comes from, usually ``0``. Its flags are
            not changed.
        pty: The child's terminal.

    Raises:
        OSError: If reading ``user_fd`` fails.
    """
    never_blocks = fd_never_blocks(user_fd)
    interactive = os.isatty(user_fd)
    try:
        while True:
            data = await read_user(user_fd, never_blocks)
            if not data:
                if not interactive:
                    await pty.send_eof()
                    await _retype_eof_while_quiet(pty)
                return
            await pty.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        # The child (and everything else) closed its terminal, or the
        # session closed the pty: there is nobody left to type to.
        return


async def copy_output(pty: PtyStream, user_fd: int) -> None:
    """Copy everything the child writes to its terminal to the user.

    Returns at the child terminal's end of stream, that is once every
    process has closed it.

    Args:
        pty: The child's terminal.
        user_fd: Where the output goes, usually ``1``. Its flags are not
            changed.

    Raises:
        OSError: If writing to ``user_fd`` fails (``BrokenPipeError`` when
            the reader of a pipe went away).
        trio.ClosedResourceError: If ``pty`` is closed meanwhile.
    """
    never_blocks = fd_never_blocks(user_fd)
    while True:
        data = await pty.receive_some()
        if not data:
            return
        await _write_user(user_fd, data, never_blocks)


async def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to the user's ``fd`` without changing its flags."""
    await _write_user(fd, data, fd_never_blocks(fd))


async def _write_user(fd: int, data: bytes, never_blocks: bool) -> None:
    with memoryview(data) as view:
        sent = 0
        while sent < len(view):
            if never_blocks:
                await trio.lowlevel.checkpoint()
            else:
                await trio.lowlevel.wait_writable(fd)
            try:
                sent += os.write(fd, view[sent : sent + _CHUNK])
            except BlockingIOError:
                # Someone else made the description non-blocking and it is
                # full after all: wait for readiness again.
                continue
