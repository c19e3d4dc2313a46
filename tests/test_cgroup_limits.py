"""Limits (memory.max, pids.max, cpu.max) on sessions and processes, with real cgroups.

On a machine whose cgroup v2 hierarchy lacks a controller (the development
machine: memory, pids and cpu are bound to cgroup v1) the error paths run
and the happy paths skip with the probe's own reason; on one that has them
(a systemd machine, CI) it is the other way round.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from trio_observer import (
    EventCategory,
    Limits,
    ObserverEventKind,
    ResourceUsage,
    open_session,
)
from trio_observer._limits import check_limits
from trio_observer._linux import _cgroup, limit_support
from trio_observer._linux._cgroup import Cgroup
from trio_observer._linux._procfs import read_stat

SUPPORT = _cgroup.probe()
REASONS = limit_support(SUPPORT)
needs_cgroup = pytest.mark.skipif(
    not SUPPORT.available, reason=f"cgroup v2 not writable here: {SUPPORT.reason}"
)
FIELD_OF = {"memory": "memory_max", "pids": "pids_max", "cpu": "cpu_max"}
SAMPLE = {"memory": 64 << 20, "pids": 20, "cpu": 0.5}


def needs_limit(controller: str) -> pytest.MarkDecorator:
    reason = REASONS[controller]
    return pytest.mark.skipif(
        reason is not None, reason=f"{controller} limits cannot be set here: {reason}"
    )


def refused_here(controller: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        not SUPPORT.available or REASONS[controller] is None,
        reason=f"{controller} limits can be set here (or no cgroup): the error path needs "
        "a cgroup without the controller",
    )


def ours() -> list[Path]:
    """Session cgroups this process made (their name carries our pid)."""
    if SUPPORT.parent is None:
        return []
    return sorted(SUPPORT.parent.glob(f"{_cgroup.NAME_PREFIX}{os.getpid()}.*"))


# --- Limits: the value and its checks ---------------------------------------


def test_cpu_max_is_a_quota_per_100ms_period() -> None:
    assert Limits(cpu_max=0.5).files() == {"cpu.max": "50000 100000"}
    assert Limits(cpu_max=2).files() == {"cpu.max": "200000 100000"}
    assert Limits(cpu_max=0.01).files() == {"cpu.max": "1000 100000"}
    both = Limits(memory_max=1 << 20, pids_max=7)
    assert both.files() == {"memory.max": "1048576", "pids.max": "7"}
    assert both.controllers() == {"memory", "pids"}


def test_empty_limits_ask_for_nothing() -> None:
    assert not Limits()
    assert check_limits(Limits()) is None
    assert check_limits(None) is None
    limits = Limits(pids_max=3)
    assert check_limits(limits) is limits


@pytest.mark.parametrize(
    ("field", "value", "error", "message"),
    [
        ("memory_max", True, TypeError, "memory_max must be an int, not bool"),
        ("memory_max", 1.5, TypeError, "memory_max must be an int, not float"),
        ("memory_max", "1G", TypeError, "memory_max must be an int, not str"),
        ("memory_max", 0, ValueError, "memory_max must be >= 1, got 0"),
        ("memory_max", -5, ValueError, "memory_max must be >= 1, got -5"),
        ("memory_max", 2**63, ValueError, "memory_max must be at most"),
        ("pids_max", False, TypeError, "pids_max must be an int, not bool"),
        ("pids_max", 0, ValueError, "pids_max must be >= 1, got 0"),
        ("pids_max", 4_194_305, ValueError, "pids_max must be at most 4194304"),
        ("cpu_max", True, TypeError, "cpu_max must be a number of CPUs, not bool"),
        ("cpu_max", "0.5", TypeError, "cpu_max must be a number of CPUs, not str"),
        ("cpu_max", 0, ValueError, "cpu_max must be a number of CPUs from 0.01"),
        ("cpu_max", 0.009, ValueError, "from 0.01 to 1000000, got 0.009"),
        ("cpu_max", -1.0, ValueError, "got -1.0"),
        ("cpu_max", math.nan, ValueError, "got nan"),
        ("cpu_max", math.inf, ValueError, "got inf"),
        ("cpu_max", 10**400, ValueError, "cpu_max must be a number of CPUs"),
        ("cpu_max", 1_000_001, ValueError, "got 1000001"),
    ],
)
def test_bad_limits_are_refused_naming_the_field(
    field: str, value: object, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=re.escape(message)):
        Limits(**{field: value})  # type: ignore[arg-type]


@given(st.integers(min_value=-(2**70), max_value=2**70))
def test_int_limits_accept_exactly_their_range(value: int) -> None:
    for field, maximum in (("memory_max", 2**63 - 1), ("pids_max", 4_194_304)):
        if 1 <= value <= maximum:
            assert getattr(Limits(**{field: value}), field) == value
        else:
            with pytest.raises(ValueError, match=field):
                Limits(**{field: value})


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_cpu_max_accepts_exactly_its_range(value: float) -> None:
    if 0.01 <= value <= 1_000_000:
        quota, period = Limits(cpu_max=value).files()["cpu.max"].split()
        assert period == "100000"
        assert 1000 <= int(quota) <= 100_000_000_000
    else:
        with pytest.raises(ValueError, match="cpu_max"):
            Limits(cpu_max=value)


# --- open_session(limits=...): refused before anything is made -------------


async def test_limits_must_be_a_limits_object() -> None:
    with pytest.raises(
        TypeError, match=r"limits must be a trio_observer\.Limits or None, not dict"
    ):
        async with open_session(containment="auto", limits={"pids_max": 5}):  # type: ignore[arg-type]
            pass
    with pytest.raises(TypeError, match="move_self_to_leaf must be True or False, not str"):
        async with open_session(move_self_to_leaf="yes"):  # type: ignore[arg-type]
            pass


async def test_limits_with_process_groups_are_a_value_error() -> None:
    with pytest.raises(ValueError, match=r"limits need cgroup containment.*not 'process-group'"):
        async with open_session(containment="process-group", limits=Limits(pids_max=5)):
            pass
    # Nothing to keep: accepted on any containment.
    async with open_session(containment="process-group", limits=Limits()) as session:
        process = await session.start_process([sys.executable, "-c", "pass"], limits=Limits())
        assert await process.wait() == 0


async def test_auto_with_limits_does_not_fall_back_where_no_cgroup_can_be_made(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    probe = _cgroup.probe
    # A cgroup file without a v2 entry: probed for real, with that input.
    monkeypatch.setattr(_cgroup, "probe", lambda: probe(cgroup_file="1:pids:/\n"))
    with pytest.raises(RuntimeError) as caught:
        async with open_session(containment="auto", limits=Limits(pids_max=5)):
            pytest.fail("a limit that cannot be kept was ignored")
    assert "limits need cgroup containment" in str(caught.value)
    assert "this process has no cgroup v2 entry" in str(caught.value)
    # Without limits, auto still falls back to process groups.
    async with open_session(containment="auto") as session:
        assert await (await session.start_process([sys.executable, "-c", "pass"])).wait() == 0


@pytest.mark.parametrize("containment", ["cgroup", "auto"])
@pytest.mark.parametrize("controller", ["memory", "pids", "cpu"])
async def test_session_limit_without_its_controller_says_why(
    containment: str, controller: str
) -> None:
    if not SUPPORT.available or REASONS[controller] is None:
        pytest.skip(f"{controller} limits can be set here (or no cgroup): {SUPPORT.reason}")
    assert SUPPORT.parent is not None
    limits = Limits(**{FIELD_OF[controller]: SAMPLE[controller]})  # type: ignore[arg-type]
    with pytest.raises(RuntimeError) as caught:
        async with open_session(containment=containment, limits=limits):
            pytest.fail("a limit that cannot be kept was ignored")
    message = str(caught.value)
    assert f"cannot set {controller}.max to " in message
    listed = ", ".join(sorted(SUPPORT.controllers)) or "none"
    assert f"the {controller} controller is not available in {SUPPORT.parent}" in message
    assert f"(its cgroup.controllers lists: {listed})" in message
    bound = _cgroup.v1_mount(controller)
    if bound is not None:
        assert f"it is bound to cgroup v1 (mounted at {bound})" in message
    # The same words as the capability report, which does not write.
    reason = REASONS[controller]
    assert reason is not None
    assert reason in message
    # The session's cgroup was made, then removed again.
    assert ours() == []


@refused_here("memory")
async def test_every_missing_limit_is_named() -> None:
    limits = Limits(memory_max=1 << 30, pids_max=100, cpu_max=1.5)
    with pytest.raises(RuntimeError) as caught:
        async with open_session(containment="cgroup", limits=limits):
            pass
    message = str(caught.value)
    assert "cannot set memory.max to 1073741824, pids.max to 100, cpu.max to 150000 100000" in (
        message
    )
    for controller in ("memory", "pids", "cpu"):
        why = REASONS[controller]
        if why is not None and "is not available" in why:
            assert f"the {controller} controller is not available" in message


# --- start_process(limits=...): refused, and the session goes on -----------

SLEEPER = "import sys; sys.stdin.readline()"


@needs_cgroup
@pytest.mark.parametrize("pty", [False, True])
async def test_a_refused_process_limit_leaves_the_session_going(pty: bool) -> None:
    limited = [c for c in ("memory", "pids", "cpu") if REASONS[c] is not None]
    if not limited:
        pytest.skip("every limit can be set here: the error path needs a missing controller")
    controller = limited[0]
    limits = Limits(**{FIELD_OF[controller]: SAMPLE[controller]})  # type: ignore[arg-type]
    async with (
        open_session(containment="cgroup") as session,
        session.observers.subscribe([EventCategory.LIFECYCLE]) as events,
    ):
        running = await session.start_process(
            [sys.executable, "-c", SLEEPER], stdin=subprocess.PIPE
        )
        with pytest.raises(RuntimeError, match=f"cannot set {controller}.max"):
            await session.start_process(
                [sys.executable, "-c", "raise SystemExit(3)"], pty=pty, limits=limits
            )
        with pytest.raises(TypeError, match=r"limits must be a trio_observer\.Limits"):
            await session.start_process(
                [sys.executable, "-c", "raise SystemExit(3)"],
                pty=pty,
                limits=5,  # type: ignore[arg-type]
            )
        # The session and its running process go on.
        after = await session.start_process([sys.executable, "-c", "pass"], pty=pty)
        assert await after.wait() == 0
        assert running.stdin is not None
        await running.stdin.send_all(b"\n")
        assert await running.wait() == 0
        seen = []
        with trio.fail_after(30):
            async for event in events:
                seen.append((event.kind, event.pid))
                if len(seen) == 4:
                    break
    # No event for the refused starts: nothing was spawned.
    assert set(seen) == {
        (ObserverEventKind.STARTED, running.pid),
        (ObserverEventKind.STARTED, after.pid),
        (ObserverEventKind.EXITED, after.pid),
        (ObserverEventKind.EXITED, running.pid),
    }


async def test_run_process_takes_limits_through_start_process() -> None:
    async with open_session() as session:
        with pytest.raises(ValueError, match="containment='process-group'"):
            await session.run_process([sys.executable, "-c", "pass"], limits=Limits(pids_max=4))
        done = await session.run_process([sys.executable, "-c", "pass"], limits=Limits())
        assert done.returncode == 0


@needs_cgroup
async def test_limits_on_an_ended_session_are_refused_as_closed() -> None:
    async with open_session(containment="cgroup") as session:
        pass
    with pytest.raises(trio.ClosedResourceError, match="this session has ended"):
        await session.start_process([sys.executable, "-c", "pass"], limits=Limits(pids_max=4))


async def test_process_limits_on_a_process_group_session_are_a_value_error() -> None:
    async with open_session() as session:
        with pytest.raises(ValueError, match="containment='process-group'"):
            await session.start_process([sys.executable, "-c", "pass"], limits=Limits(pids_max=4))
        process = await session.start_process([sys.executable, "-c", "pass"])
        assert await process.wait() == 0


# --- without the memory controller, no OOM figure --------------------------


@needs_cgroup
@pytest.mark.skipif(REASONS["memory"] is None, reason="the memory controller is on here")
async def test_without_the_memory_controller_oom_kills_is_none() -> None:
    async with open_session(containment="cgroup") as session:
        async with session.observers.subscribe([EventCategory.LIFECYCLE]) as events:
            process = await session.start_process([sys.executable, "-c", "pass"])
            assert await process.wait() == 0
            async for event in events:
                if event.kind is ObserverEventKind.EXITED:
                    assert event.resources is not None
                    assert event.resources.oom_kills is None
                    assert "oom_kills" not in event.resources.to_dict()
                    break
        assert process.resources().oom_kills is None
        assert session.resources().oom_kills is None


def test_oom_kills_is_read_from_memory_events(tmp_path: Path) -> None:
    # The format of memory.events (Documentation/admin-guide/cgroup-v2.rst),
    # read through the same method as a real leaf's.
    (tmp_path / "memory.events").write_text(
        "low 0\nhigh 0\nmax 17\noom 2\noom_kill 1\noom_group_kill 0\n"
    )
    assert Cgroup(tmp_path).oom_kills() == 1
    assert Cgroup(tmp_path / "absent").oom_kills() is None
    assert ResourceUsage(oom_kills=1).to_dict() == {"oom_kills": 1}


# --- the happy paths (a machine with the controllers) ----------------------

FORK_LOOP = (
    "import os, sys\nn = 0\nwhile True:\n"
    "    try:\n        pid = os.fork()\n    except OSError:\n        break\n"
    "    if pid == 0:\n        os.setsid()\n        os.pause()\n    n += 1\n"
    "    print(pid, flush=True)\n"
    "print('refused', n, flush=True)\nsys.stdin.readline()\n"
)


@needs_cgroup
@needs_limit("pids")
@pytest.mark.parametrize("where", ["session", "process"])
async def test_pids_max_contains_a_bounded_fork_loop(where: str) -> None:
    limits = Limits(pids_max=20)
    forked: list[int] = []
    async with open_session(
        containment="cgroup", grace_period=1, limits=limits if where == "session" else None
    ) as session:
        process = await session.start_process(
            [sys.executable, "-c", FORK_LOOP],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            limits=limits if where == "process" else None,
        )
        assert process.stdout is not None
        text = b""
        with trio.fail_after(60):
            while b"refused" not in text:
                chunk = await process.stdout.receive_some()
                assert chunk, "the fork loop ended without being refused"
                text += chunk
        lines = text.decode().split()
        forked = [int(p) for p in lines[: lines.index("refused")]]
        assert len(forked) < 20
        assert process.resources().pids_peak == 20
        session.cancel_scope.cancel()
    # The session ends with nothing left: every setsid'd child is gone.
    for pid in forked:
        stat = read_stat("/proc", pid)
        assert stat is None or stat.state in ("Z", "X"), f"fork-loop child {pid} survived"
    assert ours() == []


ALLOCATE = (
    "import sys\nblocks = []\n"
    "for _ in range(64):\n"
    "    blocks.append(b'x' * (16 << 20))\n"  # written, so resident
    "print('survived', flush=True)\n"
)


@needs_cgroup
@needs_limit("memory")
async def test_memory_max_kills_an_allocation_and_the_exit_says_oom() -> None:
    # A session limit too, so that the memory controller is on from the start.
    async with open_session(containment="cgroup", limits=Limits(memory_max=256 << 20)) as session:
        # Swap would let the allocation live on, slowly, above memory.max.
        assert session._containment is not None
        swap = session._containment.group.path / "memory.swap.max"
        if swap.exists():
            swap.write_text("0")
        async with session.observers.subscribe([EventCategory.LIFECYCLE]) as events:
            process = await session.start_process(
                [sys.executable, "-c", ALLOCATE],
                stdout=subprocess.PIPE,
                limits=Limits(memory_max=64 << 20),
            )
            with trio.fail_after(120):
                assert await process.wait() == -9
                async for event in events:
                    if event.kind is ObserverEventKind.EXITED:
                        break
    usage = event.resources
    assert usage is not None
    assert usage.oom_kills is not None
    assert usage.oom_kills >= 1
    assert process.resources().oom_kills == usage.oom_kills


@needs_cgroup
@needs_limit("cpu")
@pytest.mark.parametrize("where", ["session", "process"])
async def test_cpu_max_is_written(where: str) -> None:
    limits = Limits(cpu_max=0.5)
    async with open_session(
        containment="cgroup", limits=limits if where == "session" else None
    ) as session:
        process = await session.start_process(
            [sys.executable, "-c", SLEEPER],
            stdin=subprocess.PIPE,
            limits=limits if where == "process" else None,
        )
        assert session._containment is not None
        group = session._containment.group if where == "session" else process._leaf
        assert group is not None
        assert group.read("cpu.max") == "50000 100000\n"
        assert process.stdin is not None
        await process.stdin.send_all(b"\n")
        assert await process.wait() == 0


# --- this process's own cgroup holds processes ------------------------------

CHECK_IN_CGROUP = """
import json, sys
import trio
from trio_observer import Limits, negotiate_capabilities, open_session

async def main():
    sys.stdin.readline()  # placed in the test cgroup by now
    try:
        async with open_session(containment="cgroup", limits=Limits(pids_max=50),
                                move_self_to_leaf=sys.argv[1] == "move") as session:
            p = await session.start_process([sys.executable, "-c", "pass"])
            await p.wait()
            error = None
    except RuntimeError as exc:
        error = str(exc)
    print(json.dumps({"error": error, "cgroup": open("/proc/self/cgroup").read(),
                      "report": negotiate_capabilities().containment.limits}))

trio.run(main)
"""


@pytest.fixture
def test_cgroup() -> Iterator[Cgroup]:
    if not SUPPORT.available or SUPPORT.parent is None:
        pytest.skip(f"cgroup v2 not writable here: {SUPPORT.reason}")
    # Not named like a session's cgroup: no leftover sweep may take it.
    group = Cgroup(SUPPORT.parent / f"test-limits-{uuid.uuid4().hex[:8]}")
    group.path.mkdir()
    try:
        yield group
    finally:
        if group.populated():
            group.kill()
            trio.run(group.wait_empty)
        group.remove()


def _run_check_in(group: Cgroup, mode: str, *, company: bool) -> dict[str, str | None]:
    child = subprocess.Popen(
        [sys.executable, "-c", CHECK_IN_CGROUP, mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    sleeper = None
    try:
        group.place(child.pid)
        if company:
            sleeper = subprocess.Popen([sys.executable, "-c", SLEEPER], stdin=subprocess.PIPE)
            group.place(sleeper.pid)
        out, _ = child.communicate("\n", timeout=120)
    finally:
        if sleeper is not None:
            sleeper.kill()
            sleeper.communicate()
    assert child.returncode == 0
    result: dict[str, str | None] = json.loads(out)
    return result


@pytest.mark.skipif(os.geteuid() != 0, reason="making a test cgroup and moving into it needs root")
@pytest.mark.parametrize("mode", ["ask", "move"])
def test_own_cgroup_holding_processes_gets_advice(test_cgroup: Cgroup, mode: str) -> None:
    result = _run_check_in(test_cgroup, mode, company=False)
    pids_offered = "pids" in test_cgroup.controllers()
    if mode == "move" and pids_offered:
        # Allowed, and this process alone: it moved into its own leaf.
        assert result["error"] is None
        assert result["cgroup"] is not None
        assert f"0::/{test_cgroup.path.name}/{_cgroup.SELF_LEAF}\n" in result["cgroup"]
        return
    error = result["error"]
    assert error is not None
    # Refused by the kernel (EBUSY) where pids is offered, else foreseen.
    assert str(test_cgroup.path) in error
    assert "holds processes (pid " in error
    assert "(this process)" in error
    assert "no internal processes" in error or "once it is offered" in error
    assert "move_self_to_leaf=True" in error
    assert f"mkdir {test_cgroup.path}/leaf" in error
    # The capability report gives the same advice, without writing.
    report = result["report"]
    assert report is not None
    assert "pids.max: " in report
    assert f"{test_cgroup.path} holds processes (pid " in report
    assert "move_self_to_leaf=True" in report
    # Never moved without being asked, nor when moving would not help.
    assert result["cgroup"] is not None
    assert f"0::/{test_cgroup.path.name}\n" in result["cgroup"]
    assert not (test_cgroup.path / _cgroup.SELF_LEAF).exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="making a test cgroup and moving into it needs root")
def test_own_cgroup_shared_with_another_process_is_not_left(test_cgroup: Cgroup) -> None:
    result = _run_check_in(test_cgroup, "move", company=True)
    error = result["error"]
    assert error is not None
    assert "other processes live in it too" in error
    assert not (test_cgroup.path / _cgroup.SELF_LEAF).exists()
