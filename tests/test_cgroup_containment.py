"""The cgroup containment strategy: escapes caught, cgroup removed, usage reported."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from trio_observer._linux import _cgroup
from trio_observer._linux._cgroup_containment import (
    CgroupContainment,
    open_cgroup_containment,
)
from trio_observer._linux._cgroup_usage import reap_usage
from trio_observer._linux._procfs import read_stat

SUPPORT = _cgroup.probe()
needs_cgroup = pytest.mark.skipif(
    not SUPPORT.available, reason=f"cgroup v2 not writable here: {SUPPORT.reason}"
)

ESCAPERS = (
    "import subprocess, sys\n"
    "n = int(sys.argv[1])\n"
    "for _ in range(n):\n"
    "    subprocess.Popen(['env', '-i', 'setsid', 'sleep', '60'])\n"
    "print('spawned', flush=True)\n"
)


def _popen(code: str, *args: str, stdout: int | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=stdout)


def _running(pid: int) -> bool:
    stat = read_stat("/proc", pid)
    return stat is not None and stat.state not in ("Z", "X")


@needs_cgroup
async def test_hundred_env_i_setsid_escapes_all_caught() -> None:
    async with open_cgroup_containment("e5ca9e") as containment:
        parent = _popen(ESCAPERS, "100", stdout=subprocess.PIPE)
        containment.place(parent.pid)
        assert parent.stdout is not None
        assert parent.stdout.readline() == b"spawned\n"
        parent.stdout.close()
        assert parent.wait() == 0
        # Each escaper left the process group and session and has no
        # environment; the cgroup holds all of them anyway.
        escaped = containment.members()
        assert len(escaped) == 100
        for pid in escaped:
            stat = read_stat("/proc", pid)
            assert stat is not None
            assert stat.sid == pid
        with trio.fail_after(60):
            await containment.stop(grace_period=30)
        assert containment.members() == []
        assert not any(_running(pid) for pid in escaped)


async def _one_session_path(outcome: str) -> Path:
    path: Path | None = None
    with trio.CancelScope() as scope:
        try:
            async with open_cgroup_containment("5e55") as containment:
                path = containment.group.path
                child = _popen("import time; time.sleep(60)")
                containment.place(child.pid)
                if outcome == "failure":
                    raise KeyError("boom")
                if outcome == "cancellation":
                    scope.cancel()
                    await trio.sleep_forever()
        except KeyError:
            pass
    child.wait()
    assert path is not None
    return path


@needs_cgroup
@pytest.mark.parametrize("outcome", ["success", "failure", "cancellation"])
async def test_session_cgroup_removed_after(outcome: str) -> None:
    path = await _one_session_path(outcome)
    assert not _exists(path)


def _exists(path: Path) -> bool:
    return path.exists()


@needs_cgroup
async def test_close_is_idempotent() -> None:
    assert SUPPORT.parent is not None
    containment = CgroupContainment(_cgroup.Cgroup.create_session(SUPPORT.parent, "c105e"))
    containment.close()
    containment.close()
    assert not _exists(containment.group.path)


def test_rusage_of_a_child_that_burns_cpu_and_memory() -> None:
    code = (
        "import time\n"
        "block = bytearray(200 * 1024 * 1024)\n"
        "for i in range(0, len(block), 4096): block[i] = 1\n"
        "t = time.process_time()\n"
        "while time.process_time() - t < 0.5: pass\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code])
    child.returncode, usage = reap_usage(child.pid)
    assert child.returncode == 0
    assert usage.user_seconds is not None
    assert usage.system_seconds is not None
    assert usage.max_rss_bytes is not None
    assert usage.user_seconds + usage.system_seconds >= 0.45
    assert usage.max_rss_bytes >= 200 * 1024 * 1024
    # Not the parent's figures: this process never held 200 MiB twice over.
    assert usage.max_rss_bytes < 2 * 1024 * 1024 * 1024


def test_rusage_reports_a_signal_as_negative() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    os.kill(child.pid, signal.SIGKILL)
    child.returncode, _ = reap_usage(child.pid)
    assert child.returncode == -signal.SIGKILL
