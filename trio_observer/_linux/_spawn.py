"""Starting a program on a terminal with ``posix_spawn``, thread-safely.

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
import os
import stat
from collections.abc import Callable, Mapping, Sequence
from typing import Final

__all__ = ["spawn_on_pty"]

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


def _resolve_executable(program: str, env: Mapping[str, str], cwd: str | None) -> str | None:
    """Find ``program`` the way ``execvp`` in the child would, or None."""

    def runnable(candidate: str) -> bool:
        try:
            st = os.stat(candidate)
        except OSError:
            return False
        return stat.S_ISREG(st.st_mode) and os.access(candidate, os.X_OK)

    # Absolute, because the child changes directory before it execs: a
    # relative candidate would then be looked up from the wrong place.
    base = os.path.abspath(cwd) if cwd is not None else os.getcwd()
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
