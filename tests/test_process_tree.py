"""Which processes the end-of-session sweep takes for the session's own.

A fake /proc makes pid reuse easy to stage: a process that merely has a
recycled group id must never be taken.
"""

from __future__ import annotations

import os
from pathlib import Path

from trio_observer._linux._process_tree import find_leftovers
from trio_observer._linux._procfs import parse_stat

MARKER = b"TRIO_OBSERVER_SESSION=abc"
OWN = os.getpid()
GROUP = 500


def add_process(
    root: Path, pid: int, *, ppid: int, pgid: int, state: str = "S", marked: bool = False
) -> None:
    directory = root / str(pid)
    directory.mkdir()
    # pid (comm) state ppid pgrp session tty tpgid flags ... starttime (22nd)
    fields = [state, str(ppid), str(pgid), str(pgid)] + ["0"] * 15 + [str(1000 + pid)]
    (directory / "stat").write_text(f"{pid} (sleep) {' '.join(fields)} 0 0\n")
    if state == "Z":
        environ = b""  # what a zombie's environ reads as
    else:
        environ = b"\0".join([b"PATH=/bin"] + ([MARKER] if marked else [])) + b"\0"
    (directory / "environ").write_bytes(environ)


def test_parse_stat_survives_parentheses_in_the_name() -> None:
    stat = parse_stat("7 (a) b) (c) S 1 7 7 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 99 0 0")
    assert (stat.state, stat.ppid, stat.pgid, stat.sid, stat.starttime) == ("S", 1, 7, 7, 99)


def test_group_membership_alone_is_not_enough(tmp_path: Path) -> None:
    add_process(tmp_path, 1000, ppid=1, pgid=GROUP)  # a reused group id
    add_process(tmp_path, 1001, ppid=1, pgid=GROUP, marked=True)
    add_process(tmp_path, 1002, ppid=OWN, pgid=GROUP, state="Z")  # our zombie
    add_process(tmp_path, 1003, ppid=1001, pgid=GROUP)  # child of a member
    add_process(tmp_path, 1004, ppid=OWN, pgid=1004, marked=True)  # adopted daemon
    add_process(tmp_path, 1005, ppid=OWN, pgid=1005)  # someone else's child
    add_process(tmp_path, 1006, ppid=1, pgid=1006)  # the tree observer knows it
    add_process(tmp_path, 1007, ppid=1, pgid=GROUP, state="R")  # exiting: empty
    (tmp_path / "1007" / "environ").write_bytes(b"")
    found = find_leftovers(groups=[GROUP], marker=MARKER, known=[1006], proc_root=str(tmp_path))
    assert sorted(found) == [1001, 1002, 1003, 1004, 1006, 1007]


def test_exclude(tmp_path: Path) -> None:
    add_process(tmp_path, 1001, ppid=1, pgid=GROUP, marked=True)
    assert (
        find_leftovers(groups=[GROUP], marker=MARKER, exclude=[1001], proc_root=str(tmp_path)) == {}
    )
