"""Starting programs with glibc's ``posix_spawn``, thread-safely and cheaply.

Every Trio program that has started a process is multi-threaded, so the
classic terminal recipe (``pty.fork()``, or ``subprocess`` with a
``preexec_fn`` that calls ``setsid`` and ``TIOCSCTTY``) is unsafe here: it
runs Python code between ``fork`` and ``exec`` while other threads may hold
locks. Instead every child of a session is started with ``posix_spawn``,
whose child side is glibc's own async-signal-safe code (a ``vfork``-like
clone), for a terminal and for pipes alike:

* On a terminal, ``POSIX_SPAWN_SETSID`` makes the child a session leader with
  no controlling terminal, and glibc does this *before* it runs the file
  actions; a file action then opens the slave by path without
  ``O_NOCTTY``. On Linux a session leader without a controlling terminal
  that opens a tty acquires it as its controlling terminal, so the child's
  pid is also its process group, its session and the terminal's foreground
  process group. Further file actions ``dup2`` it onto stdout and stderr.
* With pipes (or inherited, or ``/dev/null``, or given fds),
  ``POSIX_SPAWN_SETPGROUP`` puts the child in a new process group of its
  own, and ``dup2`` actions lay out its fds 0, 1 and 2, as
  ``subprocess.Popen(process_group=0)`` would.

Either way every other descriptor is closed in the child (``closefrom``),
like ``subprocess``'s ``close_fds=True``. Starting pipe children this way
rather than with ``Popen`` skips Popen's Python-level set-up and its
exec-error pipe (glibc reports a failed ``execve`` as ``posix_spawn``'s
return value), and the environment block of ``os.environ`` is kept
encoded between spawns for as long as ``os.environ`` does not change.

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
import os
import signal
import stat
import subprocess
from collections.abc import Callable, Mapping, Sequence
from typing import Final, final

__all__ = ["spawn_on_pty", "spawn_with_stdio", "stdio_spawn_supported"]

# glibc and musl agree on these values (<spawn.h>); Python does not export them.
_POSIX_SPAWN_SETPGROUP: Final = 0x02
_POSIX_SPAWN_SETSIGDEF: Final = 0x04
_POSIX_SPAWN_SETSIGMASK: Final = 0x08
_POSIX_SPAWN_SETSID: Final = 0x80

# Opaque libc objects are allocated generously: glibc's posix_spawnattr_t is
# 336 bytes, posix_spawn_file_actions_t 80 and sigset_t 128 on 64-bit Linux.
# uint64 arrays keep them 8-byte aligned.
_ATTR_WORDS: Final = 128
_FILE_ACTIONS_WORDS: Final = 32
_SIGSET_WORDS: Final = 32

_ADDCHDIR: Final = "posix_spawn_file_actions_addchdir_np"
_ADDCLOSEFROM: Final = "posix_spawn_file_actions_addclosefrom_np"

Redirect = int | None
"""What one of the child's fds 0, 1, 2 becomes: ``None`` (inherited), an fd
of ours (``dup2``), ``subprocess.DEVNULL`` or, for fd 2,
``subprocess.STDOUT`` (a copy of the child's fd 1)."""


class _Libc:
    """The glibc posix_spawn entry points, typed for ctypes, and the
    attributes every spawn of one kind shares (built once: posix_spawn only
    reads them)."""

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
            "posix_spawnattr_setflags": [ptr, ctypes.c_short],
            "posix_spawnattr_setpgroup": [ptr, ctypes.c_int],
            "posix_spawnattr_setsigmask": [ptr, ptr],
            "posix_spawnattr_setsigdefault": [ptr, ptr],
            "sigemptyset": [ptr],
            "sigfillset": [ptr],
            "sigaddset": [ptr, ctypes.c_int],
        }
        optional: dict[str, list[type]] = {
            _ADDCHDIR: [ptr, ctypes.c_char_p],
            _ADDCLOSEFROM: [ptr, ctypes.c_int],
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
        self.terminal_attr = self._terminal_attr()
        self.group_attr = self._group_attr()

    def call(self, name: str, *args: object) -> None:
        """Call a posix_spawn helper; they return an errno value, not -1."""
        err = self.funcs[name](*args)
        if err:
            raise OSError(err, f"{name}: {os.strerror(err)}")

    def _terminal_attr(self) -> ctypes.Array[ctypes.c_uint64]:
        # Every disposition back to its default and an empty mask, as for
        # a fresh login: a Trio program (or the shell that started it) may
        # ignore SIGINT or SIGPIPE, which would otherwise be inherited and
        # make Ctrl-C on the new terminal do nothing.
        attr = (ctypes.c_uint64 * _ATTR_WORDS)()
        empty_mask = (ctypes.c_uint64 * _SIGSET_WORDS)()
        all_signals = (ctypes.c_uint64 * _SIGSET_WORDS)()
        self.call("posix_spawnattr_init", attr)
        self.call(
            "posix_spawnattr_setflags",
            attr,
            _POSIX_SPAWN_SETSID | _POSIX_SPAWN_SETSIGMASK | _POSIX_SPAWN_SETSIGDEF,
        )
        self.call("sigemptyset", empty_mask)
        self.call("posix_spawnattr_setsigmask", attr, empty_mask)
        self.call("sigfillset", all_signals)
        self.call("posix_spawnattr_setsigdefault", attr, all_signals)
        return attr

    def _group_attr(self) -> ctypes.Array[ctypes.c_uint64]:
        # What subprocess.Popen(process_group=0) does, restore_signals
        # included: Python ignores SIGPIPE and SIGXFSZ, and a child that
        # inherited that would not die of a closed pipe. Other dispositions
        # and the signal mask are inherited, as with Popen (an ignored
        # SIGHUP under nohup stays ignored).
        attr = (ctypes.c_uint64 * _ATTR_WORDS)()
        defaults = (ctypes.c_uint64 * _SIGSET_WORDS)()
        self.call("posix_spawnattr_init", attr)
        self.call("posix_spawnattr_setflags", attr, _POSIX_SPAWN_SETPGROUP | _POSIX_SPAWN_SETSIGDEF)
        self.call("posix_spawnattr_setpgroup", attr, 0)
        self.call("sigemptyset", defaults)
        for sig in (signal.SIGPIPE, signal.SIGXFSZ):
            self.call("sigaddset", defaults, sig)
        self.call("posix_spawnattr_setsigdefault", attr, defaults)
        return attr


_libc: _Libc | OSError | None = None


def _get_libc() -> _Libc:
    global _libc
    if _libc is None:
        try:
            _libc = _Libc()
        except OSError as exc:
            _libc = exc
    if isinstance(_libc, OSError):
        raise _libc
    return _libc


def stdio_spawn_supported() -> bool:
    """Whether :func:`spawn_with_stdio` works with this C library.

    It needs glibc >= 2.34 (chdir and closefrom file actions); elsewhere
    the caller starts pipe children with ``subprocess.Popen``.
    """
    try:
        funcs = _get_libc().funcs
    except OSError:
        return False
    return _ADDCHDIR in funcs and _ADDCLOSEFROM in funcs


def _c_strings(items: Sequence[bytes], *extra: bytes) -> ctypes.Array[ctypes.c_char_p]:
    """A NULL-terminated ``char *[]``; the array keeps the bytes alive."""
    return (ctypes.c_char_p * (len(items) + len(extra) + 1))(*items, *extra, None)


# os.environ as the child's envp, kept between spawns: the entries
# ("KEY=value" bytes) made from a snapshot of os.environ._data, and the
# NULL-terminated arrays of them, each with one extra variable (a session's
# id), found by that variable as given (a str pair, so that a spawn encodes
# nothing). Comparing the snapshot with _data is one C-level dict
# comparison, so a change to os.environ is still seen at the next spawn,
# and only then is the block made again. The block is replaced whole, so a
# thread never pairs a snapshot with other entries.
_MAX_EXTRAS: Final = 16


@final
class _EnvironBlock:
    __slots__ = ("arrays", "entries", "skip", "snapshot")

    def __init__(self, data: dict[bytes, bytes], skip: str | None) -> None:
        self.snapshot = dict(data)
        self.skip = skip
        skip_key = None if skip is None else os.fsencode(skip)
        self.entries = [k + b"=" + v for k, v in self.snapshot.items() if k != skip_key]
        self.arrays: dict[tuple[str, str] | None, ctypes.Array[ctypes.c_char_p]] = {}


_environ_block: _EnvironBlock | None = None


def _extra_entries(extra: tuple[str, str] | None) -> tuple[bytes, ...]:
    return () if extra is None else (os.fsencode(extra[0]) + b"=" + os.fsencode(extra[1]),)


def _envp(
    env: Mapping[str, str] | None, extra: tuple[str, str] | None
) -> ctypes.Array[ctypes.c_char_p]:
    """The child's ``envp``: ``env`` (default: os.environ now) and ``extra``,
    which replaces a variable of its name."""
    global _environ_block
    skip = None if extra is None else extra[0]
    data = getattr(os.environ, "_data", None) if env is None else None
    if type(data) is not dict:
        source = os.environ if env is None else env
        skip_key = None if skip is None else os.fsencode(skip)
        entries = [os.fsencode(k) + b"=" + os.fsencode(v) for k, v in source.items()]
        return _c_strings(
            [e for e in entries if e.partition(b"=")[0] != skip_key], *_extra_entries(extra)
        )
    block = _environ_block
    if block is None or block.skip != skip or block.snapshot != data:
        block = _environ_block = _EnvironBlock(data, skip)
    array = block.arrays.get(extra)
    if array is None:
        if len(block.arrays) >= _MAX_EXTRAS:
            block.arrays.clear()
        array = block.arrays[extra] = _c_strings(block.entries, *_extra_entries(extra))
    return array


# The executable and argv of recent spawns as posix_spawn takes them
# (encoded, argv as a NULL-terminated array), so that starting the same
# command again converts nothing; posix_spawn only reads them.
_MAX_COMMANDS: Final = 32
_commands: dict[tuple[str, tuple[str, ...]], tuple[bytes, ctypes.Array[ctypes.c_char_p]]] = {}


def _command(executable: str, argv: Sequence[str]) -> tuple[bytes, ctypes.Array[ctypes.c_char_p]]:
    key = (executable, tuple(argv))
    command = _commands.get(key)
    if command is None:
        if len(_commands) >= _MAX_COMMANDS:
            _commands.clear()
        command = _commands[key] = (
            os.fsencode(executable),
            _c_strings([os.fsencode(arg) for arg in argv]),
        )
    return command


@final
class _FileActions:
    """A ``posix_spawn_file_actions_t``, destroyed with this object (not
    before: a cached one may be in use by another thread's spawn)."""

    __slots__ = ("_destroy", "buffer")

    def __init__(self, libc: _Libc) -> None:
        self.buffer = (ctypes.c_uint64 * _FILE_ACTIONS_WORDS)()
        libc.call("posix_spawn_file_actions_init", self.buffer)
        self._destroy = libc.funcs["posix_spawn_file_actions_destroy"]

    def __del__(self) -> None:
        self._destroy(self.buffer)


# File actions hold fd numbers and a path, nothing that changes: the same
# layout (same cwd, same fds, which pipes reuse) is built once.
_MAX_ACTIONS: Final = 32
_actions_cache: dict[tuple[str | None, str | None, tuple[Redirect, ...] | None], _FileActions] = {}


def _find_program(program: str, env: Mapping[str, str] | None, cwd: str | None) -> str | None:
    """What the child should exec for ``program``, found as subprocess finds it.

    A name with a ``/`` is used as it is (relative to the child's ``cwd``,
    like subprocess): exec itself reports what is wrong with it. A bare
    name is looked up on the child's ``PATH`` (``env``'s, else ours); an
    entry that exists but cannot be run is kept in case nothing better
    turns up, so that exec reports it (``PermissionError``) as subprocess
    would. None: nothing of that name anywhere.
    """
    if "/" in program:
        return program
    environ: Mapping[str, str] = os.environ if env is None else env
    fallback = None
    for directory in environ.get("PATH", os.defpath).split(os.pathsep):
        candidate = os.path.join(directory, program)
        # Checked here, exec'd in the child after its chdir: a relative
        # candidate must be checked relative to the child's cwd.
        checked = candidate if cwd is None else os.path.join(cwd, candidate)
        try:
            st = os.stat(checked)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and os.access(checked, os.X_OK):
            return candidate
        if fallback is None:
            fallback = candidate
    return fallback


def spawn_on_pty(
    argv: Sequence[str],
    *,
    slave_path: str,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    extra_env: tuple[str, str] | None = None,
) -> int:
    """Start a program whose stdio and controlling terminal are a pty slave.

    The child is a session leader: its pid is also its process group id and
    session id, and it is the terminal's foreground process group, so
    ``os.killpg(pid, sig)`` reaches it and every descendant that stayed in
    its group, and ``SIGINT``/``SIGWINCH`` from the terminal reach it. All
    signal dispositions are reset to their defaults and the signal mask is
    emptied, as for a fresh login. Descriptors other than 0, 1 and 2 are
    closed in the child.

    This does not wait for the child: reap it with ``os.waitpid`` (for
    example after a pidfd from ``os.pidfd_open(pid)`` becomes readable). It
    returns once the child has called ``execve``, so a missing program, a
    bad ``cwd`` or an unopenable slave are reported here, as exceptions.

    Args:
        argv: The program and its arguments. ``argv[0]`` is looked up on the
            child's ``PATH`` unless it contains a ``/``; a relative path is
            relative to ``cwd``, as in :mod:`subprocess`.
        slave_path: The slave device, from :func:`open_pty`.
        env: The child's environment; ``os.environ`` (as it is now) when None.
        cwd: The child's working directory; this process's when None. The
            parent never changes directory: the change happens in the child
            (``posix_spawn_file_actions_addchdir_np``).
        extra_env: One more variable ``(name, value)`` for the child, in
            place of any of that name in ``env``.

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
    libc = _get_libc()
    return _spawn(libc, libc.terminal_attr, argv, env, extra_env, cwd, slave_path, None)


def spawn_with_stdio(
    argv: Sequence[str],
    *,
    stdio: tuple[Redirect, Redirect, Redirect],
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    extra_env: tuple[str, str] | None = None,
) -> int:
    """Start a program in a new process group of its own, as ``Popen`` would.

    The same child as ``subprocess.Popen(argv, stdin=..., stdout=...,
    stderr=..., cwd=cwd, env=env, process_group=0)`` (``close_fds`` and
    ``restore_signals`` at their defaults): its pid is its process group
    id, SIGPIPE and SIGXFSZ are back at their defaults, it inherits the
    other dispositions and the signal mask, and it has no descriptor but 0,
    1 and 2. Returns once the child has called ``execve``; reap it with
    ``os.waitpid``. Needs :func:`stdio_spawn_supported`.

    Args:
        argv: The program and its arguments, found as in :func:`spawn_on_pty`.
        stdio: What the child's fds 0, 1 and 2 become (see ``Redirect``).
        env: The child's environment; ``os.environ`` (as it is now) when None.
        cwd: The child's working directory; this process's when None.
        extra_env: One more variable ``(name, value)`` for the child, in
            place of any of that name in ``env``.

    Returns:
        The child's pid.

    Raises:
        ValueError: If ``argv`` is empty.
        FileNotFoundError: If the program cannot be found (``filename`` is
            ``argv[0]``) or ``cwd`` does not exist (``filename`` is ``cwd``).
        NotADirectoryError: If ``cwd`` is not a directory.
        OSError: If the spawn fails otherwise, for example ``EACCES``.
    """
    libc = _get_libc()
    return _spawn(libc, libc.group_attr, argv, env, extra_env, cwd, None, stdio)


def _spawn(
    libc: _Libc,
    attr: ctypes.Array[ctypes.c_uint64],
    argv: Sequence[str],
    env: Mapping[str, str] | None,
    extra_env: tuple[str, str] | None,
    cwd: str | os.PathLike[str] | None,
    terminal: str | None,
    stdio: tuple[Redirect, Redirect, Redirect] | None,
) -> int:
    if isinstance(argv, str | bytes) or not argv:
        raise ValueError(f"argv must be a non-empty sequence of strings, not {argv!r}")
    cwd_str = None if cwd is None else os.fspath(cwd)
    executable = _find_program(argv[0], env, cwd_str)
    if executable is None:
        if cwd_str is not None and not os.path.isdir(cwd_str):
            raise _spawn_error(errno.ENOENT, argv[0], cwd_str)
        raise FileNotFoundError(
            errno.ENOENT, f"{os.strerror(errno.ENOENT)} (program not found on PATH)", argv[0]
        )
    if cwd_str is not None and _ADDCHDIR not in libc.funcs:
        raise NotImplementedError(
            "cwd needs posix_spawn_file_actions_addchdir_np (glibc >= 2.29), "
            "which this C library lacks"
        )
    c_executable, c_argv = _command(executable, argv)
    c_envp = _envp(env, extra_env)
    key = (cwd_str, terminal, stdio)
    actions = _actions_cache.get(key)
    copies: list[int] = []
    try:
        if actions is None:
            actions = _file_actions(libc, cwd_str, terminal, stdio, copies)
            if not copies:
                if len(_actions_cache) >= _MAX_ACTIONS:
                    _actions_cache.clear()
                _actions_cache[key] = actions
        pid = ctypes.c_int(0)
        # ctypes releases the GIL for the call; glibc's posix_spawn
        # suspends only this thread until the child has exec'd.
        err = libc.posix_spawn(
            ctypes.byref(pid), c_executable, actions.buffer, attr, c_argv, c_envp
        )
    finally:
        for fd in copies:
            os.close(fd)
    if err:
        # glibc has reaped the child that failed to exec: nothing is left.
        raise _spawn_error(err, argv[0], cwd_str)
    return pid.value


def _file_actions(
    libc: _Libc,
    cwd: str | None,
    terminal: str | None,
    stdio: tuple[Redirect, Redirect, Redirect] | None,
    copies: list[int],
) -> _FileActions:
    actions = _FileActions(libc)
    buffer = actions.buffer
    if cwd is not None:
        # First, so that a bad cwd fails the spawn before the child has
        # taken a terminal as its controlling tty.
        libc.call(_ADDCHDIR, buffer, os.fsencode(cwd))
    if terminal is not None:
        # No O_NOCTTY: opening it as a fresh session leader is what makes
        # the slave the controlling terminal.
        libc.call(
            "posix_spawn_file_actions_addopen", buffer, 0, os.fsencode(terminal), os.O_RDWR, 0
        )
        libc.call("posix_spawn_file_actions_adddup2", buffer, 0, 1)
        libc.call("posix_spawn_file_actions_adddup2", buffer, 0, 2)
    if stdio is not None:
        _add_redirects(libc, buffer, stdio, copies)
    if _ADDCLOSEFROM in libc.funcs:
        # Python already makes its descriptors close-on-exec; this also
        # covers inheritable ones and those opened by C extensions.
        libc.call(_ADDCLOSEFROM, buffer, 3)
    return actions


def _add_redirects(
    libc: _Libc,
    actions: ctypes.Array[ctypes.c_uint64],
    stdio: tuple[Redirect, Redirect, Redirect],
    copies: list[int],
) -> None:
    """File actions that make the child's fds 0, 1, 2 what ``stdio`` says."""
    for target, source in enumerate(stdio):
        if source is None:
            continue
        if source == subprocess.DEVNULL:
            libc.call(
                "posix_spawn_file_actions_addopen", actions, target, b"/dev/null", os.O_RDWR, 0
            )
        elif source == subprocess.STDOUT:
            libc.call("posix_spawn_file_actions_adddup2", actions, 1, target)
        else:
            if source < target and stdio[source] not in (None, source):
                # The actions run in order: the child's fd `source` has
                # been replaced by the time this one runs, so take a copy
                # of ours (close-on-exec, so it never reaches the child).
                source = os.dup(source)
                copies.append(source)
            # dup2 onto itself clears close-on-exec (POSIX 2008, glibc 2.29).
            libc.call("posix_spawn_file_actions_adddup2", actions, source, target)


def _spawn_error(err: int, program: str, cwd: str | None) -> OSError:
    """Blame the right path for a posix_spawn failure.

    posix_spawn returns one errno for the whole chain (chdir, open, exec), so
    the failing step is found by checking the cwd again afterwards. The
    OSError constructor picks the subclass (``FileNotFoundError``,
    ``NotADirectoryError``, ``PermissionError``) from the errno.
    """
    message = os.strerror(err)
    cwd_failed = cwd is not None and (not os.path.isdir(cwd) or not os.access(cwd, os.X_OK))
    if cwd_failed and err in (errno.ENOENT, errno.ENOTDIR, errno.EACCES):
        return OSError(err, f"{message} (cwd for {program!r})", cwd)
    return OSError(err, message, program)
