"""Pseudo-terminals: creation, spawning on a controlling tty, resize, EIO as EOF.

Every Trio program that has started a process is multi-threaded, so the
classic recipe (``pty.fork()``, or ``subprocess`` with a ``preexec_fn`` that
calls ``setsid`` and ``TIOCSCTTY``) is unsafe here: it runs Python code
between ``fork`` and ``exec`` while other threads may hold locks. Instead the
child is started with ``posix_spawn``, whose child side is glibc's own
async-signal-safe code:

* ``POSIX_SPAWN_SETSID`` makes the child a session leader with no controlling
  terminal, and glibc does this *before* it runs the file actions;
* a file action then opens the slave by path without ``O_NOCTTY``. On Linux a
  session leader without a controlling terminal that opens a tty acquires it
  as its controlling terminal, so the child's pid is also its process group,
  its session and the terminal's foreground process group;
* further file actions ``dup2`` it onto stdout and stderr, and close every
  other descriptor (``closefrom``), like ``subprocess``'s ``close_fds=True``.

Python 3.11's :func:`os.posix_spawn` has neither a chdir nor a closefrom
action, so the spawn goes through glibc directly with :mod:`ctypes`
(``posix_spawn_file_actions_addchdir_np``, glibc >= 2.29, and
``posix_spawn_file_actions_addclosefrom_np``, glibc >= 2.34). ``os.chdir`` in
the parent would race with every other thread, and a wrapper program that
changes directory and then execs would add a process start and change what
``argv[0]`` the child sees, so neither is used.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import select
import stat
import struct
import termios
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, final

import trio

__all__ = [
    "PtySize",
    "PtyStream",
    "get_size",
    "open_pty",
    "resize",
    "spawn_on_pty",
]

_MAX_DIMENSION: Final = 65535
"""``struct winsize`` holds unsigned shorts."""

_READ_SIZE: Final = 65536
"""Default read size: large enough that a chatty child costs few syscalls."""

# glibc and musl agree on these values (<spawn.h>); Python does not export them.
_POSIX_SPAWN_SETSIGDEF: Final = 0x04
_POSIX_SPAWN_SETSIGMASK: Final = 0x08
_POSIX_SPAWN_SETSID: Final = 0x80

# Opaque libc objects are allocated generously: glibc's posix_spawnattr_t is
# 336 bytes, posix_spawn_file_actions_t 80 and sigset_t 128 on 64-bit Linux.
# uint64 arrays keep them 8-byte aligned.
_ATTR_WORDS: Final = 128
_FILE_ACTIONS_WORDS: Final = 32
_SIGSET_WORDS: Final = 32


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


def _resolve_executable(program: str, env: Mapping[str, str], cwd: str | None) -> str | None:
    """Find ``program`` the way ``execvp`` in the child would, or None."""

    def runnable(candidate: str) -> bool:
        try:
            st = os.stat(candidate)
        except OSError:
            return False
        return stat.S_ISREG(st.st_mode) and os.access(candidate, os.X_OK)

    base = cwd if cwd is not None else os.getcwd()
    if "/" in program:
        # Like subprocess: a relative path is relative to the child's cwd.
        # An explicit path is not checked further: if it exists, exec
        # reports what is wrong with it (EACCES, ENOEXEC, ...).
        candidate = os.path.join(base, program)
        return candidate if os.path.lexists(candidate) else None
    search = env.get("PATH", os.defpath)
    for directory in search.split(os.pathsep):
        # An empty PATH entry means the current directory (the child's).
        candidate = os.path.join(base, directory or ".", program)
        if runnable(candidate):
            return candidate
    return None


class _Libc:
    """The glibc posix_spawn entry points, typed for ctypes."""

    def __init__(self) -> None:
        lib = ctypes.CDLL(None, use_errno=True)
        ptr = ctypes.c_void_p
        self.posix_spawn = lib.posix_spawn
        self.posix_spawn.argtypes = [
            ctypes.POINTER(ctypes.c_int),
            ctypes.c_char_p,
            ptr,
            ptr,
            ctypes.POINTER(ctypes.c_char_p),
            ctypes.POINTER(ctypes.c_char_p),
        ]
        self.posix_spawn.restype = ctypes.c_int
        signatures: dict[str, list[type]] = {
            "posix_spawn_file_actions_init": [ptr],
            "posix_spawn_file_actions_destroy": [ptr],
            "posix_spawn_file_actions_addopen": [
                ptr,
                ctypes.c_int,
                ctypes.c_char_p,
                ctypes.c_int,
                ctypes.c_uint,
            ],
            "posix_spawn_file_actions_adddup2": [ptr, ctypes.c_int, ctypes.c_int],
            "posix_spawnattr_init": [ptr],
            "posix_spawnattr_destroy": [ptr],
            "posix_spawnattr_setflags": [ptr, ctypes.c_short],
            "posix_spawnattr_setsigmask": [ptr, ptr],
            "posix_spawnattr_setsigdefault": [ptr, ptr],
            "sigemptyset": [ptr],
            "sigfillset": [ptr],
        }
        optional: dict[str, list[type]] = {
            "posix_spawn_file_actions_addchdir_np": [ptr, ctypes.c_char_p],
            "posix_spawn_file_actions_addclosefrom_np": [ptr, ctypes.c_int],
        }
        self.funcs: dict[str, Callable[..., int]] = {}
        for table, required in ((signatures, True), (optional, False)):
            for name, argtypes in table.items():
                func = getattr(lib, name, None)
                if func is None:
                    if required:
                        raise OSError(errno.ENOSYS, f"the C library has no {name}()")
                    continue
                func.argtypes = argtypes
                func.restype = ctypes.c_int
                self.funcs[name] = func

    def call(self, name: str, *args: object) -> None:
        """Call a posix_spawn helper; they return an errno value, not -1."""
        err = self.funcs[name](*args)
        if err:
            raise OSError(err, f"{name}: {os.strerror(err)}")


_libc: _Libc | None = None


def _get_libc() -> _Libc:
    global _libc
    if _libc is None:
        _libc = _Libc()
    return _libc


def _c_strings(items: Sequence[bytes]) -> ctypes.Array[ctypes.c_char_p]:
    """A NULL-terminated ``char *[]``; the array keeps the bytes alive."""
    return (ctypes.c_char_p * (len(items) + 1))(*items, None)


def spawn_on_pty(
    argv: Sequence[str],
    *,
    slave_path: str,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> int:
    """Start a program whose stdio and controlling terminal are a pty slave.

    The child is a session leader: its pid is also its process group id and
    session id, and it is the terminal's foreground process group, so
    ``os.killpg(pid, sig)`` reaches it and every descendant that stayed in
    its group, and ``SIGINT``/``SIGWINCH`` from the terminal reach it. All
    signal dispositions are reset to their defaults and the signal mask is
    emptied, as for a fresh login: a Trio program (or the shell that started
    it) may ignore ``SIGINT`` or ``SIGPIPE``, which would otherwise be
    inherited and make Ctrl-C on the new terminal do nothing. Descriptors
    other than 0, 1 and 2 are closed in the child.

    This does not wait for the child: reap it with ``os.waitpid`` (for
    example after a pidfd from ``os.pidfd_open(pid)`` becomes readable). It
    returns once the child has called ``execve``, so a missing program, a
    bad ``cwd`` or an unopenable slave are reported here, as exceptions.

    Args:
        argv: The program and its arguments. ``argv[0]`` is looked up on the
            child's ``PATH`` unless it contains a ``/``; a relative path is
            relative to ``cwd``, as in :mod:`subprocess`.
        slave_path: The slave device, from :func:`open_pty`.
        env: The child's environment; ``os.environ`` when None.
        cwd: The child's working directory; this process's when None. The
            parent never changes directory: the change happens in the child
            (``posix_spawn_file_actions_addchdir_np``).

    Returns:
        The child's pid.

    Raises:
        ValueError: If ``argv`` is empty.
        FileNotFoundError: If the program cannot be found (``filename`` is
            ``argv[0]``) or ``cwd`` does not exist (``filename`` is ``cwd``).
        OSError: If the spawn fails otherwise, for example ``EACCES``.
        NotImplementedError: If ``cwd`` is given and the C library has no
            ``posix_spawn_file_actions_addchdir_np`` (glibc < 2.29).
    """
    if isinstance(argv, str | bytes) or not argv:
        raise ValueError(f"argv must be a non-empty sequence of strings, not {argv!r}")
    environ: Mapping[str, str] = os.environ if env is None else env
    cwd_str = None if cwd is None else os.fspath(cwd)
    executable = _resolve_executable(argv[0], environ, cwd_str)
    if executable is None:
        if cwd_str is not None and not os.path.isdir(cwd_str):
            raise FileNotFoundError(
                errno.ENOENT, f"{os.strerror(errno.ENOENT)} (cwd for {argv[0]!r})", cwd_str
            )
        raise FileNotFoundError(
            errno.ENOENT, f"{os.strerror(errno.ENOENT)} (program not found on PATH)", argv[0]
        )

    libc = _get_libc()
    if cwd_str is not None and "posix_spawn_file_actions_addchdir_np" not in libc.funcs:
        raise NotImplementedError(
            "cwd needs posix_spawn_file_actions_addchdir_np (glibc >= 2.29), "
            "which this C library lacks"
        )
    c_argv = _c_strings([os.fsencode(arg) for arg in argv])
    c_envp = _c_strings([os.fsencode(f"{key}={value}") for key, value in environ.items()])

    actions = (ctypes.c_uint64 * _FILE_ACTIONS_WORDS)()
    attr = (ctypes.c_uint64 * _ATTR_WORDS)()
    empty_mask = (ctypes.c_uint64 * _SIGSET_WORDS)()
    all_signals = (ctypes.c_uint64 * _SIGSET_WORDS)()
    libc.call("posix_spawn_file_actions_init", actions)
    try:
        libc.call("posix_spawnattr_init", attr)
        try:
            if cwd_str is not None:
                # Before the open, so that a bad cwd fails the spawn before
                # the child has taken the terminal as its controlling tty.
                libc.call("posix_spawn_file_actions_addchdir_np", actions, os.fsencode(cwd_str))
            # No O_NOCTTY: opening it as a fresh session leader is what makes
            # the slave the controlling terminal.
            libc.call(
                "posix_spawn_file_actions_addopen",
                actions,
                0,
                os.fsencode(slave_path),
                os.O_RDWR,
                0,
            )
            libc.call("posix_spawn_file_actions_adddup2", actions, 0, 1)
            libc.call("posix_spawn_file_actions_adddup2", actions, 0, 2)
            if "posix_spawn_file_actions_addclosefrom_np" in libc.funcs:
                # Python already makes its descriptors close-on-exec; this
                # also covers ones opened by C extensions without O_CLOEXEC.
                libc.call("posix_spawn_file_actions_addclosefrom_np", actions, 3)
            libc.call(
                "posix_spawnattr_setflags",
                attr,
                _POSIX_SPAWN_SETSID | _POSIX_SPAWN_SETSIGMASK | _POSIX_SPAWN_SETSIGDEF,
            )
            libc.call("sigemptyset", empty_mask)
            libc.call("posix_spawnattr_setsigmask", attr, empty_mask)
            libc.call("sigfillset", all_signals)
            libc.call("posix_spawnattr_setsigdefault", attr, all_signals)
            pid = ctypes.c_int(0)
            # ctypes releases the GIL for the call; glibc's posix_spawn
            # suspends only this thread until the child has exec'd.
            err = libc.posix_spawn(
                ctypes.byref(pid), os.fsencode(executable), actions, attr, c_argv, c_envp
            )
        finally:
            libc.funcs["posix_spawnattr_destroy"](attr)
    finally:
        libc.funcs["posix_spawn_file_actions_destroy"](actions)
    if err:
        raise _spawn_error(err, argv[0], executable, cwd_str)
    return pid.value


def _spawn_error(err: int, program: str, executable: str, cwd: str | None) -> OSError:
    """Blame the right path for a posix_spawn failure.

    posix_spawn returns one errno for the whole chain (chdir, open, exec), so
    the failing step is found by checking the paths again afterwards.
    """
    message = os.strerror(err)
    cwd_failed = cwd is not None and (not os.path.isdir(cwd) or not os.access(cwd, os.X_OK))
    if cwd_failed and err in (errno.ENOENT, errno.ENOTDIR, errno.EACCES):
        return OSError(err, f"{message} (cwd for {program!r})", cwd)
    return OSError(err, message, executable)


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
                    return os.read(fd, max_bytes)
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(fd)
                except OSError as exc:
                    if exc.errno == errno.EIO:
                        return b""
                    if exc.errno == errno.EBADF:
                        raise trio.ClosedResourceError("the PtyStream was closed") from None
                    raise trio.BrokenResourceError(f"reading the pty master failed: {exc}") from exc

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
                    await trio.lowlevel.wait_writable(fd)
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
        returns 0 bytes; after a partial line it only submits that line, and
        a child that turned canonical mode off just receives the byte. After
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
