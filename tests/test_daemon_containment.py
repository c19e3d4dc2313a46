"""Daemon sessions held by cgroups, and what a daemon killed with SIGKILL leaves."""

from __future__ import annotations

import base64
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

import trio_observer
from trio_observer._daemon._client import DaemonError
from trio_observer._linux import probe_cgroup

from .conftest import PY, reap_zombie_child
from .test_daemon import DaemonProcess, start_daemon

CGROUP = probe_cgroup()
needs_cgroup = pytest.mark.skipif(
    not CGROUP.available, reason=f"cgroup containment is not available: {CGROUP.reason}"
)

# A sleeper that starts a sleeper in a session of its own (setsid: out of
# every process group the daemon knows) and prints its pid; and one that
# ignores SIGTERM. Each prints one line once it is set up.
SETSID_SLEEPER = (
    "import subprocess, sys, time;"
    " child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'],"
    " start_new_session=True); print(child.pid, flush=True); time.sleep(600)"
)
STUBBORN = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
    " print(0, flush=True); time.sleep(600)"
)


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie): the ground truth is /proc."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return text[text.rindex(")") + 2] not in "ZX"


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[list[DaemonProcess]]:
    """Daemons a test starts; each is stopped (or was killed) at the end."""
    started: list[DaemonProcess] = []
    yield started
    for running in started:
        if running.process.poll() is None:
            running.process.send_signal(signal.SIGTERM)
        running.process.communicate(timeout=60)


async def first_line(client: trio_observer.DaemonClient, name: str) -> int:
    output = b""
    stream = await client.stream("output", session="s", process=name, follow=True)
    async for frame in stream:
        output += base64.b64decode(frame["data"])
        if output.endswith(b"\n"):
            await stream.aclose()
            return int(output)
    raise AssertionError(f"{name} ended before it was set up: {output!r}")


async def spawn_sleepers(path: Path, containment: str) -> tuple[dict[str, Any], list[int]]:
    """Create session "s" with ``containment``, start the sleepers; return (session, pids).

    The pids are those of the daemon's listing, then the setsid grandchild's.
    """
    with trio.fail_after(60):
        async with trio_observer.connect(path, autostart=False) as client:
            await client.create_session("s", grace_period=1, containment=containment)
            for name, script in (("sleeper", SETSID_SLEEPER), ("stubborn", STUBBORN)):
                await client.start([PY, "-c", script], session="s", name=name)
            grandchild = await first_line(client, "sleeper")
            await first_line(client, "stubborn")
            (session,) = await client.sessions()
    pids = [int(p["pid"]) for p in session["processes"]]
    assert len(pids) == 2
    return session, [*pids, grandchild]


def sigkill(running: DaemonProcess) -> None:
    running.process.kill()
    # Reaped, so that its pid no longer names a process: a zombie owner
    # would still look alive to the next daemon's sweep.
    running.process.communicate(timeout=60)


@pytest.fixture
def private_cgroup() -> Iterator[Path]:
    """A cgroup of its own below ours, for daemons whose leftovers must be theirs.

    Every session sweeps the crashed sessions' cgroups beside its own; in
    this process's cgroup, a session of another program on the machine (a
    second test suite, say) could sweep a killed daemon's leftovers before
    the next daemon does. Below a cgroup nobody else uses, only the daemons
    started in it look.
    """
    assert CGROUP.parent is not None
    path = CGROUP.parent / f"test-private-{os.getpid()}-{time.monotonic_ns()}"
    path.mkdir()
    yield path
    # The daemons are stopped by now (this fixture is set up before theirs).
    for child in sorted(path.iterdir(), reverse=True):
        if child.is_dir():
            child.rmdir()
    path.rmdir()


def cgroup_of(pid: int) -> str:
    return Path(f"/proc/{pid}/cgroup").read_text()


def in_cgroup(path: Path) -> tuple[str, ...]:
    """A command prefix that moves itself into ``path`` and execs the rest."""
    return ("/bin/sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(path))


@needs_cgroup
async def test_next_daemon_stops_what_a_sigkilled_daemon_left(
    tmp_path: Path, private_cgroup: Path, daemons: list[DaemonProcess]
) -> None:
    path = tmp_path / "d" / "daemon.sock"
    daemons.append(start_daemon(path, prefix=in_cgroup(private_cgroup)))
    session, pids = await spawn_sleepers(path, "auto")
    assert session["containment"] == "cgroup"
    # Ground truth: the kernel puts them below the private cgroup.
    assert all(private_cgroup.name in cgroup_of(pid) for pid in pids)
    sigkill(daemons[0])
    # Nothing stopped them: the daemon had no chance to.
    assert [alive(pid) for pid in pids] == [True, True, True]
    daemons.append(start_daemon(path, prefix=in_cgroup(private_cgroup)))
    # "ready" comes after the sweep: no polling needed.
    assert [alive(pid) for pid in pids] == [False, False, False]
    for pid in pids:
        reap_zombie_child(pid)  # if this process is their subreaper
    async with trio_observer.connect(path, autostart=False) as client:
        assert await client.sessions() == []
    daemons[1].process.send_signal(signal.SIGTERM)
    _, log = daemons[1].process.communicate(timeout=60)
    stopped = next(line for line in log.decode().splitlines() if "owner is gone" in line)
    assert all(str(pid) in stopped for pid in pids), stopped


async def test_process_group_sessions_survive_a_sigkilled_daemon(
    tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    """The fallback, as docs/daemon.md says: nothing can find them again."""
    path = tmp_path / "d" / "daemon.sock"
    daemons.append(start_daemon(path))
    session, pids = await spawn_sleepers(path, "process-group")
    assert session["containment"] == "process-group"
    try:
        sigkill(daemons[0])
        daemons.append(start_daemon(path))
        assert [alive(pid) for pid in pids] == [True, True, True]
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
            reap_zombie_child(pid)


@pytest.mark.parametrize(
    ("value", "code"),
    [("bogus", "bad-params"), (3, "bad-params"), ("", "bad-params")],
)
async def test_containment_param_is_checked(
    tmp_path: Path, daemons: list[DaemonProcess], value: object, code: str
) -> None:
    path = tmp_path / "d" / "daemon.sock"
    daemons.append(start_daemon(path))
    async with trio_observer.connect(path, autostart=False) as client:
        with pytest.raises(DaemonError, match=code) as caught:
            await client.request("create_session", name="s", containment=value)
        assert "containment" in str(caught.value)
        assert await client.sessions() == []
