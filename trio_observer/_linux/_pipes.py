"""Captured pipes grown to 1 MiB, within the user's share of pipe memory.

A pipe holds 64 KiB by default, so a child writing fast blocks each time
the reader is 64 KiB behind, and the reader takes at most 64 KiB per
wakeup. While the session's trio thread is busy (spawning the next child,
moving one into its cgroup), every writer stalls after 64 KiB. At 1 MiB
(``F_SETPIPE_SZ``) the writers keep going meanwhile and the reader takes
fewer, larger reads (see the Output streams section of
``docs/performance.md``).

Pipe memory is limited per user: past ``/proc/sys/fs/pipe-user-pages-soft``
(64 MiB by default) an unprivileged user's new pipes get two pages each,
and that would slow every other program of the user. So without
``CAP_SYS_RESOURCE`` or ``CAP_SYS_ADMIN`` (exempt from the limits) this
process grows pipes only within a quarter of that limit, counted over the
pipes it has grown and not yet released; past it, pipes keep their default
size.
"""

from __future__ import annotations

import fcntl
import functools
import os
from typing import Final

CAPTURE_PIPE_SIZE: Final = 1 << 20
"""The size a captured pipe is grown to, in bytes."""

_PAGE: Final = os.sysconf("SC_PAGE_SIZE")
# The kernel exempts either from the per-user pipe limits
# (pipe_is_unprivileged_user() in fs/pipe.c).
_EXEMPT_CAPABILITIES: Final = (1 << 21) | (1 << 24)  # CAP_SYS_ADMIN, CAP_SYS_RESOURCE

# Pages of the pipes grown and not yet released. A trio run is
# single-threaded; runs in several threads at once can only misjudge the
# share by a pipe or two.
_grown_pages = 0


def _read_int(path: str) -> int | None:
    try:
        with open(path, "rb") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def _exempt_from_limits(status: str = "/proc/self/status") -> bool:
    try:
        with open(status, "rb") as f:
            for line in f:
                if line.startswith(b"CapEff:"):
                    return bool(int(line.split()[1], 16) & _EXEMPT_CAPABILITIES)
    except (OSError, ValueError, IndexError):
        pass
    return False


@functools.cache
def pipe_budget() -> int | None:
    """How many pages of grown pipes this process may hold (None: no limit)."""
    if _exempt_from_limits():
        return None
    # 0 is "no limit"; an unreadable file counts as its default.
    soft = _read_int("/proc/sys/fs/pipe-user-pages-soft")
    hard = _read_int("/proc/sys/fs/pipe-user-pages-hard")
    limits = [n for n in (16384 if soft is None else soft, hard or 0) if n]
    return min(limits) // 4 if limits else None


def grow_pipe(fd: int) -> int:
    """Grow the pipe behind ``fd`` to :data:`CAPTURE_PIPE_SIZE` if the budget allows.

    Returns:
        The pages it now holds, to hand to :func:`release_pipe` once it
        is closed; 0 if it was left as it was (over the budget, or the
        kernel refused: ``pipe-max-size`` lower for this user, or not a
        pipe).
    """
    global _grown_pages
    budget = pipe_budget()
    pages = CAPTURE_PIPE_SIZE // _PAGE
    if budget is not None and _grown_pages + pages > budget:
        return 0
    try:
        size = fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, CAPTURE_PIPE_SIZE)
    except OSError:
        return 0
    pages = size // _PAGE
    _grown_pages += pages
    return pages


def release_pipe(pages: int) -> None:
    """Give back the share of a pipe grown by :func:`grow_pipe` (0: nothing)."""
    global _grown_pages
    _grown_pages -= pages


def grown_pages() -> int:
    """Pages of the pipes grown and not yet released (for tests)."""
    return _grown_pages
