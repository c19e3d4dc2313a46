"""Containment by cgroup v2, with real cgroups where this machine allows them."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from trio_observer import Limits
from trio_observer._linux import _cgroup, _cgroup_leftovers
from trio_observer._linux._cgroup import Cgroup, CgroupUnavailableError

SUPPORT = _cgroup.probe()
needs_cgroup = pytest.mark.skipif(
    not SUPPORT.available, reason=f"cgroup v2 not writable here: {SUPPORT.reason}"
)

HYBRID_MOUNTINFO = (
    "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
    "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
    "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
)


def test_hierarchy_found_from_mountinfo_not_assumed() -> None:
    assert _cgroup.find_hierarchy(HYBRID_MOUNTINFO) == (Path("/sys/fs/cgroup/unified"), "/")
    desktop = "25 1 0:22 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
    assert _cgroup.find_hierarchy(desktop) == (Path("/sys/fs/cgroup"), "/")
    escaped = "25 1 0:22 / /mnt/my\\040cg rw - cgroup2 none rw\n"
    assert _cgroup.find_hierarchy(escaped) == (Path("/mnt/my cg"), "/")
    assert _cgroup.find_hierarchy(HYBRID_MOUNTINFO.splitlines()[0]) is None


def test_own_cgroup_is_the_v2_line() -> None:
    text = "4:memory:/a/b\n0::/user.slice/x.scope\n"
    assert _cgroup.own_cgroup(text) == "/user.slice/x.scope"
    assert _cgroup.own_cgroup("4:memory:/a\n") is None


def test_probe_without_v2_says_why() -> None:
    support = _cgroup.probe(mountinfo=HYBRID_MOUNTINFO.splitlines()[0], cgroup_file="0::/\n")
    assert not support.available
    assert "no cgroup v2 hierarchy" in support.reason


def test_probe_unwritable_gives_the_advice(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        _probe_as_nobody_gives_the_advice()
        return
    mountinfo = f"1 1 0:1 / {tmp_path} rw - cgroup2 cgroup2 rw\n"
    (tmp_path / "cgroup.controllers").write_text("")
    (tmp_path / "cgroup.procs").write_text("")
    (tmp_path / "cgroup.procs").chmod(0o444)
    support = _cgroup.probe(mountinfo=mountinfo, cgroup_file="0::/\n")
    assert not support.available
    assert "Delegate=yes" in support.reason


def _probe_as_nobody_gives_the_advice() -> None:
    # Root may write anything, so the probe of this machine's real hierarchy
    # runs in a forked child that has dropped to uid 65534 (no exec: nobody
    # may not run this interpreter from root's home).
    if SUPPORT.parent is None:
        pytest.skip(f"no cgroup v2 hierarchy to probe here: {SUPPORT.reason}")
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(read_fd)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            support = _cgroup.probe()
            os.write(write_fd, f"{support.available}|{support.reason}".encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as reader:
        available, _, reason = reader.read().decode().partition("|")
    os.waitpid(pid, 0)
    assert available == "False", reason
    assert "Delegate=yes" in reason


@pytest.fixture
def session_group() -> Iterator[Cgroup]:
    assert SUPPORT.parent is not None
    group = Cgroup.create_session(SUPPORT.parent, uuid.uuid4().hex)
    try:
        yield group
    finally:
        group.kill()
        for _ in range(1000):
            if not group.populated():
                break
            os.sched_yield()
        group.remove()
    assert not group.path.exists()


_SPAWNED: list[subprocess.Popen[bytes]] = []


@pytest.fixture(autouse=True)
def _close_spawned() -> Iterator[None]:
    yield
    while _SPAWNED:
        child = _SPAWNED.pop()
        if child.poll() is None:
            child.kill()
        for stream in (child.stdin, child.stdout):
            if stream is not None:
                stream.close()
        child.wait()


def _spawn(code: str, **kwargs: object) -> subprocess.Popen[bytes]:
    child: subprocess.Popen[bytes] = subprocess.Popen(  # type: ignore[call-overload]
        [sys.executable, "-c", code], **kwargs
    )
    _SPAWNED.append(child)
    return child


# Escapes once told to: Cgroup.place does not stop the process, and its
# write may wait for an RCU grace period longer than the interpreter's
# start-up on a busy machine (the escape would then happen before the move).
ESCAPE = (
    "import os, subprocess, sys\n"
    "sys.stdin.readline()\n"
    "subprocess.Popen(['env', '-i', 'setsid', sys.executable, '-c',"
    " 'import time; time.sleep(60)'])\n"
    "print('ok', flush=True)\n"
)


@needs_cgroup
async def test_place_then_escapes_stay_inside(session_group: Cgroup) -> None:
    leaf = session_group.leaf("p1")
    child = _spawn(ESCAPE, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    leaf.place(child.pid)
    assert child.stdin is not None
    assert child.stdout is not None
    child.stdin.write(b"go\n")
    child.stdin.close()
    assert child.stdout.readline() == b"ok\n"
    child.wait()
    # The parent has gone; its setsid'd, environment-less grandchild has not
    # left the cgroup.
    members = session_group.members()
    assert len(members) == 1
    assert members[0] != child.pid
    assert session_group.populated()
    session_group.kill()
    with trio.fail_after(30):
        await session_group.wait_empty()
    assert session_group.members() == []


@needs_cgroup
async def test_place_moves_children_forked_before(session_group: Cgroup) -> None:
    child = _spawn(
        "import os, sys, time\n"
        "if os.fork() == 0:\n"
        "    time.sleep(60)\n"
        "print('forked', flush=True); time.sleep(60)\n",
        stdout=subprocess.PIPE,
    )
    assert child.stdout is not None
    assert child.stdout.readline() == b"forked\n"
    moved = session_group.leaf("p").place(child.pid)
    assert len(moved) == 2
    assert moved[0] == child.pid
    assert sorted(session_group.members()) == sorted(moved)
    session_group.kill()
    with trio.fail_after(30):
        await session_group.wait_empty()
    child.wait()


@needs_cgroup
async def test_wait_empty_blocks_until_the_last_member_leaves(session_group: Cgroup) -> None:
    child = _spawn("import sys; sys.stdin.read()", stdin=subprocess.PIPE)
    session_group.leaf("p").place(child.pid)
    done = trio.Event()

    async def waiter() -> None:
        await session_group.wait_empty()
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert not done.is_set()
        assert child.stdin is not None
        child.stdin.close()
        with trio.fail_after(30):
            await done.wait()
    child.wait()


@needs_cgroup
async def test_freeze_stops_members(session_group: Cgroup) -> None:
    child = _spawn("import time; time.sleep(60)")
    leaf = session_group.leaf("p")
    leaf.place(child.pid)
    session_group.freeze()
    for _ in range(100000):
        if "frozen 1" in (session_group.read("cgroup.events") or ""):
            break
        await trio.lowlevel.checkpoint()
    assert "frozen 1" in (session_group.read("cgroup.events") or "")
    session_group.thaw()
    session_group.kill()
    child.wait()


@needs_cgroup
def test_cpu_stat_counts_a_burning_child(session_group: Cgroup) -> None:
    child = _spawn(
        "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n"
    )
    leaf = session_group.leaf("p")
    leaf.place(child.pid)
    child.wait()
    user, system = leaf.cpu_seconds()
    # The burn ran inside (placement comes after interpreter start-up, so
    # only the loop is certain to count).
    assert user + system >= 0.25


@needs_cgroup
def test_limits_without_controllers_say_what_is_missing(session_group: Cgroup) -> None:
    leaf = session_group.leaf("p")
    offered = set((leaf.read("cgroup.controllers") or "").split())
    if "pids" in offered:
        pytest.skip("pids is enabled here; the error path needs it absent")
    with pytest.raises(CgroupUnavailableError, match=r"pids\.max.*pids controller"):
        leaf.set_limits(Limits(pids_max=10))


@needs_cgroup
def test_pids_max_contains_a_fork_loop(session_group: Cgroup) -> None:
    try:
        session_group.enable_controllers(frozenset({"pids"}))
    except CgroupUnavailableError as exc:
        pytest.skip(f"pids controller cannot be enabled here: {exc}")
    leaf = session_group.leaf("p")
    leaf.set_limits(Limits(pids_max=20))
    # The loop starts once the child is in its leaf (see ESCAPE): forks
    # before the move would not count against pids.max.
    child = _spawn(
        "import os, sys\nsys.stdin.readline()\nn = 0\nwhile True:\n"
        "    try:\n        pid = os.fork()\n    except OSError:\n        break\n"
        "    if pid == 0:\n        os.pause()\n    n += 1\n"
        "print(n, flush=True)\n",
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    leaf.place(child.pid)
    assert child.stdin is not None
    assert child.stdout is not None
    child.stdin.write(b"go\n")
    child.stdin.close()
    assert int(child.stdout.readline()) < 20
    assert leaf.pids_peak() == 20


@needs_cgroup
async def test_leftover_of_a_crashed_session_is_cleaned_up() -> None:
    assert SUPPORT.parent is not None
    # A session owner that makes its cgroup, puts a sleeper in it and is
    # SIGKILLed before it can clean up.
    owner = _spawn(
        "import subprocess, sys, uuid\n"
        "from trio_observer._linux._cgroup import Cgroup, probe\n"
        "g = Cgroup.create_session(probe().parent, uuid.uuid4().hex)\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "g.leaf('p').place(p.pid)\n"
        "print(g.path, flush=True)\n"
        "import time; time.sleep(60)\n",
        stdout=subprocess.PIPE,
    )
    assert owner.stdout is not None
    path = Path(owner.stdout.readline().decode().strip())
    assert path.name.startswith(_cgroup.NAME_PREFIX)
    assert path not in [g.path for g in _cgroup_leftovers.leftover_sessions(SUPPORT.parent)]
    sleeper = Cgroup(path).members()
    assert len(sleeper) == 1
    owner.kill()
    owner.wait()
    assert path in [g.path for g in _cgroup_leftovers.leftover_sessions(SUPPORT.parent)]
    with trio.fail_after(30):
        removed = await _cgroup_leftovers.clean_leftovers(SUPPORT.parent)
    assert path in removed
    assert not _exists(path)
    # The orphaned sleeper was reparented and reaped by init (or is a zombie
    # about to be): in either case it no longer runs.
    stat = _read_state(sleeper[0])
    assert stat in (None, "Z", "X")


@needs_cgroup
async def test_two_sweeps_at_once_clean_a_leftover_once_and_neither_fails() -> None:
    # Two sessions opening at the same moment both sweep; the first to
    # take the leftover's lock cleans it, the other leaves it alone.
    assert SUPPORT.parent is not None
    owner = _spawn(
        "import subprocess, sys, uuid\n"
        "from trio_observer._linux._cgroup import Cgroup, probe\n"
        "g = Cgroup.create_session(probe().parent, uuid.uuid4().hex)\n"
        "for name in 'abcd':\n"
        "    p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "    g.leaf(name).place(p.pid)\n"
        "print(g.path, flush=True)\n"
        "import time; time.sleep(60)\n",
        stdout=subprocess.PIPE,
    )
    assert owner.stdout is not None
    path = Path(owner.stdout.readline().decode().strip())
    owner.kill()
    owner.wait()
    results: list[list[Path]] = []

    async def sweep() -> None:
        assert SUPPORT.parent is not None
        results.append(await _cgroup_leftovers.clean_leftovers(SUPPORT.parent))

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sweep)
            nursery.start_soon(sweep)
    assert sorted(path in removed for removed in results) == [False, True]
    assert not _exists(path)


def _read_state(pid: int) -> str | None:
    from trio_observer._linux._procfs import read_stat

    stat = read_stat("/proc", pid)
    return None if stat is None else stat.state


def _exists(path: Path) -> bool:
    return path.exists()


@needs_cgroup
async def test_trial_cgroup_of_a_probe_killed_midway_is_removed_by_the_sweep() -> None:
    assert SUPPORT.parent is not None
    # A probe killed between its mkdir and rmdir leaves this behind.
    gone = await trio.lowlevel.open_process(["true"])
    await gone.wait()
    trial = SUPPORT.parent / f"{_cgroup.NAME_PREFIX}probe-{gone.pid}"
    trial.mkdir()
    # A living probe's trial (this process's name) is left alone.
    mine = SUPPORT.parent / f"{_cgroup.NAME_PREFIX}probe-{os.getpid()}"
    mine.mkdir()
    try:
        removed = await _cgroup_leftovers.clean_leftovers(SUPPORT.parent)
        assert trial in removed
        assert not _exists(trial)
        assert _exists(mine)
    finally:
        mine.rmdir()
        if _exists(trial):
            trial.rmdir()
