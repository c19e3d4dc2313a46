"""Shared fixtures: fd and process leak checks for every test."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator

import pytest

PY = sys.executable

# A suite started as a background job of a script (`pytest &`) inherits
# SIGINT ignored, and so would every program it starts: Python then keeps
# SIG_IGN instead of installing KeyboardInterrupt, trio installs no Ctrl-C
# handler, and the tests of Ctrl-C would wait for an interrupt that never
# comes (a spawn loop ran on for minutes). They test Ctrl-C as a terminal
# delivers it, so the suite restores Python's own handler first.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def open_fds() -> set[str]:
    """The fd numbers this process has open (trio's test_for_leaking_fds)."""
    return set(os.listdir("/proc/self/fd"))


def children_of(pid: int) -> set[int]:
    """Live or zombie processes whose parent is ``pid``, read from /proc."""
    found = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                text = f.read()
        except OSError:
            continue
        if int(text[text.rindex(")") + 2 :].split()[1]) == pid:
            found.add(int(name))
    return found


@pytest.fixture
def no_leaks() -> Iterator[None]:
    """Fail if the test leaves an fd open or a child (or zombie) behind."""
    fds_before = open_fds()
    children_before = children_of(os.getpid())
    yield
    assert open_fds() <= fds_before, "fd leaked"
    assert children_of(os.getpid()) <= children_before, "child process left behind"


def reap_zombie_child(pid: int) -> bool:
    """Reap ``pid`` if it is a child of this process; say whether it was."""
    if pid not in children_of(os.getpid()):
        return False
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG)
    return True
