"""What each process cost: on EXITED, from process.resources() and session.resources()."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import trio

import trio_observer
from trio_observer import (
    EventCategory,
    ObserverBackpressure,
    ObserverEvent,
    ObserverEventKind,
    ResourceUsage,
    _session,
)
from trio_observer._linux import _cgroup

SUPPORT = _cgroup.probe()
needs_cgroup = pytest.mark.skipif(
    not SUPPORT.available, reason=f"cgroup v2 not writable here: {SUPPORT.reason}"
)
LIFECYCLE = frozenset({EventCategory.LIFECYCLE})
MIB = 1 << 20

# Burns 0.3 s of user CPU (measured by its own rusage, not a clock) and
# touches 100 MiB, says so, then waits for a line on stdin.
BURNER = (
    "import resource, sys\n"
    "data = b'x' * (100 << 20)\n"
    "while resource.getrusage(resource.RUSAGE_SELF).ru_utime < 0.3:\n"
    "    sum(range(1000))\n"
    "print('ready', flush=True)\n"
    "sys.stdin.readline()\n"
)


async def _burn(session: trio_observer.Session) -> tuple[trio_observer.Process, ResourceUsage]:
    """Run BURNER; return it (reaped) and its resources() while it ran."""
    process = await session.start_process(
        [sys.executable, "-c", BURNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert process.stdin is not None
    assert process.stdout is not None
    with trio.fail_after(60):
        line = b""
        while not line.endswith(b"\n"):
            chunk = await process.stdout.receive_some()
            assert chunk, "the burner ended before it was ready"
            line += chunk
        assert line == b"ready\n"
        running = process.resources()
        await process.stdin.send_all(b"go\n")
        assert await process.wait() == 0
    return process, running


def _check_burned(usage: ResourceUsage) -> None:
    assert usage.user_seconds is not None
    assert 0.3 <= usage.user_seconds < 60
    assert usage.system_seconds is not None
    assert usage.system_seconds >= 0
    assert usage.max_rss_bytes is not None
    assert 100 * MIB <= usage.max_rss_bytes < 1024 * MIB


async def _exited(events: trio.MemoryReceiveChannel[ObserverEvent]) -> ObserverEvent:
    received = [event async for event in events]
    exited = [e for e in received if e.kind is ObserverEventKind.EXITED]
    assert len(exited) == 1
    return exited[0]


async def test_exited_carries_rusage_with_process_groups() -> None:
    async with trio_observer.open_session(containment="process-group") as session:
        _, events = session.observers.add_channel(LIFECYCLE, 8, ObserverBackpressure.BLOCK)
        process, running = await _burn(session)
        # Without a cgroup, /proc/<pid> while running; rusage once reaped.
        _check_burned(running)
        assert running.cgroup_user_seconds is None
        _check_burned(process.resources())
        spent = session.resources()
    exited = await _exited(events)
    assert exited.resources is process.resources()
    assert exited.resources is not None
    _check_burned(exited.resources)
    assert exited.resources.cgroup_user_seconds is None
    assert exited.resources.pids_peak is None
    # The session sums what its reaped processes cost.
    assert spent.user_seconds == process.resources().user_seconds
    assert spent.max_rss_bytes == process.resources().max_rss_bytes


async def test_the_session_sums_every_reaped_process(monkeypatch: pytest.MonkeyPatch) -> None:
    # Two batches of the session's summing (small ones here), and a few
    # over, so that both what is summed and what waits to be are counted.
    monkeypatch.setattr(_session, "_SUM_BATCH", 4)
    count = 2 * _session._SUM_BATCH + 3
    reaped = []
    async with trio_observer.open_session(containment="process-group") as session:
        for _ in range(count):
            process = await session.start_process([sys.executable, "-c", "pass"])
            await process.wait()
            reaped.append(process.resources())
        spent = session.resources()
        assert len(session._unsummed) < _session._SUM_BATCH
    assert all(u.user_seconds is not None and u.system_seconds is not None for u in reaped)
    assert spent.user_seconds == pytest.approx(sum(u.user_seconds or 0 for u in reaped))
    assert spent.system_seconds == pytest.approx(sum(u.system_seconds or 0 for u in reaped))
    assert spent.max_rss_bytes == max(u.max_rss_bytes or 0 for u in reaped)


@needs_cgroup
async def test_exited_carries_rusage_and_leaf_figures_with_a_cgroup() -> None:
    async with trio_observer.open_session(containment="cgroup") as session:
        _, events = session.observers.add_channel(LIFECYCLE, 8, ObserverBackpressure.BLOCK)
        _process, running = await _burn(session)
        _check_burned(running)
        # cpu.stat splits the exact total by sampled ticks: check the total.
        assert running.cgroup_user_seconds is not None
        assert running.cgroup_system_seconds is not None
        assert running.cgroup_user_seconds + running.cgroup_system_seconds >= 0.3
        whole = session.resources()
    exited = await _exited(events)
    usage = exited.resources
    assert usage is not None
    _check_burned(usage)
    assert usage.cgroup_user_seconds is not None
    assert usage.cgroup_system_seconds is not None
    assert usage.cgroup_user_seconds + usage.cgroup_system_seconds >= 0.3
    # The session's cgroup holds every process it ever had. The kernel adds
    # a leaf's time into its parent lazily (rstat), so the parent read just
    # after the leaf may trail it by a fraction of a tick (seen: 0.29838 vs
    # 0.298583 s); 10 ms is well under one process's share.
    assert whole.cgroup_user_seconds is not None
    assert whole.cgroup_user_seconds >= usage.cgroup_user_seconds - 0.01
    # Peaks need their controllers; this machine offers only what it offers.
    if "memory" not in SUPPORT.controllers:
        assert usage.memory_peak_bytes is None
    if "pids" not in SUPPORT.controllers:
        assert usage.pids_peak is None


def test_resources_json_form_lists_only_known_figures() -> None:
    usage = ResourceUsage(user_seconds=0.5, system_seconds=0.25, max_rss_bytes=4096)
    event = trio_observer.ObserverEvent(
        category=EventCategory.LIFECYCLE,
        kind=ObserverEventKind.EXITED,
        pid=42,
        timestamp_ms=1.0,
        exit_code=0,
        resources=usage,
    )
    assert json.loads(event.to_json())["resources"] == {
        "user_seconds": 0.5,
        "system_seconds": 0.25,
        "max_rss_bytes": 4096,
    }
    bare = trio_observer.ObserverEvent(
        category=EventCategory.LIFECYCLE, kind=ObserverEventKind.STARTED, pid=42, timestamp_ms=1.0
    )
    assert "resources" not in bare.to_dict()


async def test_cli_exited_line_shows_resources(tmp_path: Path) -> None:
    out = tmp_path / "events.jsonl"
    code = "import resource\nwhile resource.getrusage(resource.RUSAGE_SELF).ru_utime < 0.1: pass\n"
    result = await trio.run_process(
        [
            sys.executable,
            "-m",
            "trio_observer",
            "run",
            "--events",
            str(out),
            "--",
            sys.executable,
            "-c",
            code,
        ],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    exited = [line for line in lines if line["kind"] == "exited"]
    assert exited
    assert exited[0]["resources"]["user_seconds"] >= 0.1
