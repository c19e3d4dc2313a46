"""The cgroup containment strategy: escapes caught, cgroup removed, usage reported."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio
import trio.testing

from trio_observer._grace import Grace
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
    # Each escaper prints its pid once setsid has run, then becomes sleep.
    "    subprocess.Popen(['env', '-i', 'setsid', '/bin/sh', '-c', 'echo $$; exec sleep 60'])\n"
    "print('spawned', flush=True)\n"
)


def _popen(code: str, *args: str, stdout: int | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=stdout)


def _true() -> subprocess.Popen[bytes]:
    return subprocess.Popen(["true"])


def _running(pid: int) -> bool:
    stat = read_stat("/proc", pid)
    return stat is not None and stat.state not in ("Z", "X")


@needs_cgroup
async def test_hundred_env_i_setsid_escapes_all_caught() -> None:
    async with open_cgroup_containment("e5ca9e") as containment:
        parent = _popen(ESCAPERS, "100", stdout=subprocess.PIPE)
        containment.place(parent.pid)
        assert parent.stdout is not None
        # Read once each has left: before, an escaper could still be env.
        lines: list[bytes] = []
        while b"spawned\n" not in lines or len(lines) < 101:
            lines.append(parent.stdout.readline())
            assert lines[-1], lines  # end of file before all had told
        parent.stdout.close()
        assert parent.wait() == 0
        told = {int(line) for line in lines if line != b"spawned\n"}
        # Each escaper left the process group and session and has no
        # environment; the cgroup holds all of them anyway.
        escaped = containment.members()
        assert sorted(escaped) == sorted(told)
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


# A root that ignores SIGTERM, with children in sessions of their own that
# ignore it too: only the kill after the grace period stops them.
STUBBORN_TREE = (
    "import os, signal, sys, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "for _ in range(3):\n"
    "    if os.fork() == 0:\n"
    "        os.setsid()\n"
    "        time.sleep(60)\n"
    "        os._exit(0)\n"
    "print('up', flush=True)\n"
    "time.sleep(60)\n"
)


def _started(code: str) -> subprocess.Popen[bytes]:
    child = _popen(code, stdout=subprocess.PIPE)
    assert child.stdout is not None
    assert child.stdout.readline() == b"up\n"
    child.stdout.close()
    return child


@needs_cgroup
async def test_stop_kills_a_sigterm_ignoring_tree_after_the_grace() -> None:
    async with open_cgroup_containment("5706") as containment:
        child = _popen(STUBBORN_TREE, stdout=subprocess.PIPE)
        containment.place(child.pid)
        assert child.stdout is not None
        assert child.stdout.readline() == b"up\n"
        child.stdout.close()
        members = containment.members()
        assert len(members) == 4
        exit_codes: dict[int, int] = {}
        with trio.fail_after(30):
            await containment.stop(0.2, exit_codes)
        assert containment.members() == []
        assert not any(_running(pid) for pid in members)
        # The root is this process's child: reaped by the stop, its code kept.
        assert exit_codes == {child.pid: -signal.SIGKILL}
        child.returncode = exit_codes[child.pid]


@needs_cgroup
async def test_stop_lets_a_polite_process_exit_on_sigterm() -> None:
    async with open_cgroup_containment("9017e") as containment:
        child = _started("import time; print('up', flush=True); time.sleep(60)")
        containment.place(child.pid)
        exit_codes: dict[int, int] = {}
        with trio.fail_after(30):
            await containment.stop(30, exit_codes)
        assert exit_codes == {child.pid: -signal.SIGTERM}
        child.returncode = exit_codes[child.pid]


@needs_cgroup
async def test_a_hurried_grace_ends_the_stop_with_the_kill_at_once() -> None:
    # The session's Grace: a Ctrl-C during the teardown hurries it, and the
    # cgroup's stop must not wait out its own copy of the seconds.
    async with open_cgroup_containment("60a") as containment:
        child = _started(
            "import signal, time\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "print('up', flush=True); time.sleep(600)\n"
        )
        containment.place(child.pid)
        grace = Grace(600)
        exit_codes: dict[int, int] = {}
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(containment.stop, grace, exit_codes)
                # Blocked: the stop is waiting out the grace period.
                await trio.testing.wait_all_tasks_blocked()
                assert containment.populated()
                grace.hurry()
        assert exit_codes == {child.pid: -signal.SIGKILL}
        child.returncode = exit_codes[child.pid]


@needs_cgroup
async def test_leaves_of_reaped_processes_are_removed_in_batches() -> None:
    async with open_cgroup_containment("ba7c4") as containment:
        names: list[str] = []
        for _ in range(70):
            child = _true()
            leaf = containment.place(child.pid)
            names.append(leaf.path.name)
            child.wait()
            containment.release(child.pid)
        left = {p.name for p in containment.group.path.iterdir() if p.is_dir()}
        # The first batch went when it was full; the rest waits for close
        # (beside the leaf made ahead for the next process).
        assert left.isdisjoint(names[:64])
        assert left > set(names[64:])
        path = containment.group.path
    assert not path.exists()


@needs_cgroup
async def test_a_reused_pid_gets_a_leaf_of_its_own() -> None:
    async with open_cgroup_containment("d1d") as containment:
        first = _started("import time; print('up', flush=True); time.sleep(60)")
        leaf = containment.place(first.pid)
        containment.release(first.pid)
        # The same pid again while the old leaf (still holding its process)
        # is there: a pid reused before the batch removal.
        again = containment.place(first.pid)
        assert again.path != leaf.path
        assert again.members() == [first.pid]
        first.kill()
        first.wait()


@needs_cgroup
async def test_a_cgroup_made_below_a_leaf_by_its_process_is_removed_at_close() -> None:
    # Close removes the leaves it made by name; a cgroup a member made
    # below its own leaf (root may) is found by the walk that follows.
    async with open_cgroup_containment("4e57") as containment:
        child = _started("import time; print('up', flush=True); time.sleep(60)")
        leaf = containment.place(child.pid)
        (leaf.path / "inner").mkdir()
        child.kill()
        child.wait()
        containment.release(child.pid)
        path = containment.group.path
    assert not _exists(path)


@needs_cgroup
async def test_a_kept_probe_that_no_longer_holds_is_probed_again() -> None:
    assert SUPPORT.parent is not None
    assert _cgroup.probe() is _cgroup.probe()  # kept: no trial mkdir per session
    # A kept result whose parent no longer takes a cgroup: a real cgroup
    # that allows no descendants, so the session's mkdir fails (EAGAIN).
    stale = SUPPORT.parent / f"{_cgroup.NAME_PREFIX}probe-stale-{os.getpid()}"
    stale.mkdir()
    try:
        (stale / "cgroup.max.descendants").write_text("0")
        kept = _cgroup.probe()
        _cgroup._probed = (os.getpid(), dataclasses.replace(kept, parent=stale))
        async with open_cgroup_containment("57a1e") as containment:
            assert containment.group.path.parent == SUPPORT.parent
        assert _cgroup.probe().parent == SUPPORT.parent
    finally:
        _cgroup.forget_probe()
        stale.rmdir()
