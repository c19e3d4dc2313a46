"""open_session(containment=...): the cgroup catches what process groups miss."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
import trio

import trio_observer
from trio_observer._linux import _cgroup
from trio_observer._linux._procfs import read_stat

SUPPORT = _cgroup.probe()
needs_cgroup = pytest.mark.skipif(
    not SUPPORT.available, reason=f"cgroup v2 not writable here: {SUPPORT.reason}"
)

# Prints the pid of an `env -i setsid` grandchild (own group, own session,
# no marker) and exits, leaving it behind.
ESCAPE = (
    "import subprocess, sys\n"
    "p = subprocess.Popen(['env', '-i', 'setsid', 'sleep', '60'])\n"
    "open(sys.argv[1], 'w').write(str(p.pid))\n"
)


def _running(pid: int) -> bool:
    stat = read_stat("/proc", pid)
    return stat is not None and stat.state not in ("Z", "X")


def _our_session_cgroups() -> list[Path]:
    assert SUPPORT.parent is not None
    mine = f"{_cgroup.NAME_PREFIX}{os.getpid()}."
    return [p for p in SUPPORT.parent.iterdir() if p.name.startswith(mine)]


async def test_containment_must_be_a_known_value() -> None:
    with pytest.raises(ValueError, match=r"containment must be one of 'auto', 'cgroup'"):
        async with trio_observer.open_session(containment="jail"):
            pass


async def _escape(containment: str, pid_file: Path) -> int:
    async with trio_observer.open_session(containment=containment, grace_period=5) as session:
        process = await session.start_process([sys.executable, "-c", ESCAPE, str(pid_file)])
        with trio.fail_after(30):
            assert await process.wait() == 0
        escaped = int(pid_file.read_text())  # noqa: ASYNC240 (a tmp file, at once)
        assert _running(escaped)
    return escaped


@needs_cgroup
async def test_cgroup_catches_env_i_setsid_escape(tmp_path: Path) -> None:
    escaped = await _escape("cgroup", tmp_path / "pid")
    assert not _running(escaped)
    assert _our_session_cgroups() == []


@needs_cgroup
async def test_auto_uses_a_cgroup_here(tmp_path: Path) -> None:
    escaped = await _escape("auto", tmp_path / "pid")
    assert not _running(escaped)


async def test_process_group_containment_misses_the_escape(tmp_path: Path) -> None:
    # The hole that containment by cgroup closes, kept visible.
    escaped = await _escape("process-group", tmp_path / "pid")
    try:
        assert _running(escaped)
    finally:
        os.kill(escaped, signal.SIGKILL)


@needs_cgroup
async def test_session_cgroup_removed_after_failure() -> None:
    with pytest.RaisesGroup(KeyError):
        async with trio_observer.open_session(containment="cgroup") as session:
            await session.start_process([sys.executable, "-c", "import time; time.sleep(60)"])
            raise KeyError("boom")
    assert _our_session_cgroups() == []
