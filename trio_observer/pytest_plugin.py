"""The pytest plugin (entry point ``pytest11``): a session per test that owns up to leaks.

Loaded by pytest once trio-observer is installed; needs pytest-trio (its
``trio_mode`` or ``@pytest.mark.trio``) for the async fixture.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest

from ._session import Session, open_session


def _open_fds() -> dict[str, str]:
    """Map each open fd to what it is open on.

    By target, not just number: fd numbers are reused, so the fd of this
    very listing may be a test's leaked fd next time. The listing's own fd
    is left out (it is closed again when described).
    """
    found = {}
    try:
        names = os.listdir("/proc/self/fd")
    except FileNotFoundError:
        return {}
    for fd in names:
        try:
            found[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
    return found


@pytest.fixture
async def observer_session() -> AsyncIterator[Session]:
    """A session for one test; teardown fails the test naming what it left behind.

    At teardown every process of the session that is still running is
    named in the failure (then stopped, with its whole tree, as the session
    always does); so is every file descriptor the test opened and did not
    close. The tree is stopped also when the test fails or is interrupted,
    since the session's block ends either way.
    """
    fds = _open_fds()
    left: list[str] = []
    async with open_session() as session:
        yield session
        left = [repr(process) for process in session.processes]
        # A session waits for its processes, like a nursery for tasks; a
        # test's leftovers are stopped instead (SIGTERM, then SIGKILL).
        session.cancel_scope.cancel()
    now = _open_fds()
    leaked = [(fd, now[fd]) for fd in sorted(now, key=int) if fds.get(fd) != now[fd]]
    problems = [f"still running at teardown: {name}" for name in left]
    problems += [f"file descriptor {fd} left open ({what})" for fd, what in leaked]
    if problems:
        pytest.fail("the test left things behind:\n  " + "\n  ".join(problems), pytrace=False)
