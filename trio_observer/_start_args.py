"""The one check of start_process/run_process arguments, before any await.

The spawn routes would each fail differently on bad input: Popen (the
fallback) with ``AttributeError`` or "embedded null byte", glibc's
``posix_spawn`` by truncating an argument at a NUL or turning a non-str
environment value into a string. Checking once, here,
makes both paths refuse the same inputs with a ``TypeError``/``ValueError``
that names the argument.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import final

from ._checks import check_int
from ._limits import Limits, check_limits
from ._process import CAPTURE, StdioArg
from ._pty import PtySize

_STDIO_CONSTANTS = {
    subprocess.PIPE: "subprocess.PIPE",
    subprocess.DEVNULL: "subprocess.DEVNULL",
    subprocess.STDOUT: "subprocess.STDOUT",
}


@final
@dataclass(frozen=True, slots=True)
class StartArguments:
    """Checked arguments of :meth:`Session.start_process`."""

    argv: tuple[str, ...]
    stdin: StdioArg
    stdout: StdioArg
    stderr: StdioArg
    cwd: str | None
    env: dict[str, str] | None
    pty: PtySize | None
    backlog_bytes: int
    limits: Limits | None
    """``None`` when no limit is set (``Limits()`` included)."""


def check_start_arguments(
    argv: Sequence[str | os.PathLike[str]],
    *,
    stdin: StdioArg = None,
    stdout: StdioArg = None,
    stderr: StdioArg = None,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    pty: bool | PtySize = False,
    backlog_bytes: int = 1 << 20,
    limits: Limits | None = None,
) -> StartArguments:
    """Check every argument of ``start_process``; ``run_process`` calls it too.

    Raises:
      TypeError: an argument has the wrong type (the message names it).
      ValueError: an argument has a refused value (the message names it
        and says what is allowed).
    """
    args = _check_argv(argv)
    streams = {
        "stdin": _check_stdio("stdin", stdin),
        "stdout": _check_stdio("stdout", stdout),
        "stderr": _check_stdio("stderr", stderr),
    }
    if stdin is CAPTURE:
        raise ValueError("stdin cannot be CAPTURE: it is for stdout and stderr")
    for name, spec in (("stdin", stdin), ("stdout", stdout)):
        if isinstance(spec, int) and spec == subprocess.STDOUT:
            raise ValueError(
                f"{name} cannot be subprocess.STDOUT: it is for stderr (merging it into stdout)"
            )
    checked_cwd = None if cwd is None else _check_path("cwd", cwd)
    checked_env = None if env is None else _check_env(env)
    size: PtySize | None
    if pty is False:
        size = None
    elif pty is True:
        size = PtySize()
    elif isinstance(pty, PtySize):
        size = pty
    else:
        raise TypeError(f"pty must be True, False or a PtySize, not {pty!r}")
    if size is not None and (stdin, stdout, stderr) != (None, None, None):
        raise ValueError(
            "pty: a process on a terminal reads and writes the terminal; "
            "leave stdin, stdout and stderr at None"
        )
    check_int("backlog_bytes", backlog_bytes, minimum=1)
    return StartArguments(
        argv=args,
        cwd=checked_cwd,
        env=checked_env,
        pty=size,
        backlog_bytes=backlog_bytes,
        limits=check_limits(limits),
        **streams,
    )


def _check_argv(argv: object) -> tuple[str, ...]:
    if isinstance(argv, list | tuple) and argv and all(_plain(arg) for arg in argv):
        # The common case, without the ABC checks below (a few microseconds
        # of every spawn).
        return tuple(argv)
    if isinstance(argv, (str, bytes, os.PathLike)):
        raise TypeError("argv must be a sequence of arguments such as ['ls', '-l'], not a string")
    if not isinstance(argv, Sequence):
        raise TypeError(
            f"argv must be a sequence of arguments such as ['ls', '-l'], not {type(argv).__name__}"
        )
    if not argv:
        raise ValueError("argv must not be empty: it needs at least the program to run")
    return tuple(_check_path(f"argv[{i}]", arg) for i, arg in enumerate(argv))


def _plain(arg: object) -> bool:
    return type(arg) is str and "\0" not in arg


def _check_path(name: str, value: object) -> str:
    text = os.fspath(value) if isinstance(value, os.PathLike) else value
    if not isinstance(text, str):
        raise TypeError(f"{name} must be str or os.PathLike[str], not {type(value).__name__}")
    if "\0" in text:
        raise ValueError(f"{name} must not contain a NUL byte, got {text!r}")
    return text


def _check_env(env: object) -> dict[str, str]:
    if not isinstance(env, Mapping):
        raise TypeError(f"env must be a mapping of str to str, not {type(env).__name__}")
    checked: dict[str, str] = {}
    for key, value in env.items():
        if not isinstance(key, str):
            raise TypeError(f"env keys must be str, not {type(key).__name__} ({key!r})")
        if not isinstance(value, str):
            raise TypeError(f"env[{key!r}] must be a str, not {type(value).__name__}")
        if not key or "=" in key or "\0" in key:
            raise ValueError(f"env key {key!r} is not a variable name (empty, '=' or NUL in it)")
        if "\0" in value:
            raise ValueError(f"env[{key!r}] must not contain a NUL byte")
        checked[key] = value
    return checked


def _check_stdio(name: str, spec: object) -> StdioArg:
    allowed = (
        "None, subprocess.PIPE, subprocess.DEVNULL, CAPTURE (stdout/stderr), "
        "subprocess.STDOUT (stderr), an open fd or a file with fileno()"
    )
    if spec is None or spec is CAPTURE:
        return spec
    if isinstance(spec, bool):
        raise TypeError(f"{name} must be one of {allowed}, not {spec!r}")
    if isinstance(spec, int):
        if spec in _STDIO_CONSTANTS:
            return spec
        if spec < 0:
            raise ValueError(f"{name} must be one of {allowed}, got {spec}")
        _check_open_fd(name, spec)
        return spec
    fileno = getattr(spec, "fileno", None)
    if fileno is None or not callable(fileno):
        raise TypeError(f"{name} must be one of {allowed}, not {type(spec).__name__}")
    try:
        fd = fileno()
    except (OSError, ValueError) as exc:
        raise ValueError(f"{name}: the file has no usable fd ({exc})") from exc
    if isinstance(fd, bool) or not isinstance(fd, int):
        raise TypeError(f"{name}.fileno() must return an int, not {type(fd).__name__}")
    _check_open_fd(name, fd)
    return spec  # type: ignore[return-value]


def _check_open_fd(name: str, fd: int) -> None:
    try:
        os.fstat(fd)
    except OSError:
        raise ValueError(f"{name}: fd {fd} is not open in this process") from None
