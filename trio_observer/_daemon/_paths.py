"""Where the daemon's socket lives, and the checks that keep others out of it."""

from __future__ import annotations

import os
import socket
import stat
import struct
from pathlib import Path
from typing import Final, Protocol

SOCKET_ENV_VAR: Final = "TRIO_OBSERVER_SOCKET"
SOCKET_NAME: Final = "daemon.sock"


class UnsafeSocketDirectory(PermissionError):
    """The socket's directory could let another user in; the daemon refuses it."""


def default_socket_path() -> Path:
    """``$TRIO_OBSERVER_SOCKET``, else ``$XDG_RUNTIME_DIR/trio-observer/daemon.sock``,
    else ``/tmp/trio-observer-<uid>/daemon.sock``."""
    override = os.environ.get(SOCKET_ENV_VAR)
    if override:
        return Path(override)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "trio-observer" / SOCKET_NAME
    return Path(f"/tmp/trio-observer-{os.getuid()}") / SOCKET_NAME


def resolve_socket_path(socket_path: str | os.PathLike[str] | None) -> Path:
    """The path given, else :func:`default_socket_path`."""
    if socket_path is None:
        return default_socket_path()
    if not isinstance(socket_path, (str, os.PathLike)):
        raise TypeError(f"socket must be a path or None, not {type(socket_path).__name__}")
    return Path(socket_path)


def prepare_directory(directory: Path) -> None:
    """Create ``directory`` 0700 if missing, then check it is safe.

    Raises:
      UnsafeSocketDirectory: it is a symlink, is not a directory, is not
        owned by this user, or is accessible to group or others.
    """
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        pass
    check_directory(directory)


def check_directory(directory: Path) -> None:
    """Refuse a socket directory another user could reach (see :func:`prepare_directory`)."""
    info = os.lstat(directory)
    if stat.S_ISLNK(info.st_mode):
        raise UnsafeSocketDirectory(f"socket directory {directory} is a symlink; refusing it")
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafeSocketDirectory(f"socket directory {directory} is not a directory")
    if info.st_uid != os.getuid():
        raise UnsafeSocketDirectory(
            f"socket directory {directory} is owned by uid {info.st_uid}, not {os.getuid()}"
        )
    if info.st_mode & 0o077:
        raise UnsafeSocketDirectory(
            f"socket directory {directory} has mode {stat.S_IMODE(info.st_mode):04o}; "
            "it must not be accessible to group or others (0700)"
        )


_UCRED: Final = struct.Struct("3i")


class _HasSockopt(Protocol):
    def getsockopt(self, level: int, option: int, buflen: int) -> bytes: ...


def peer_uid(sock: _HasSockopt) -> tuple[int, int]:
    """The ``(pid, uid)`` of the process at the other end of a Unix socket."""
    pid, uid, _gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    )
    return pid, uid
