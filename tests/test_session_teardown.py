"""What the session's final sweep stops, and when it need not look at all."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
import trio

import trio_observer._linux
from trio_observer import open_session
from trio_observer._linux import _process_tree, _procfs

from .conftest import PY

# A grandchild whose main thread exits (pthread_exit) while another thread
# runs on: its stat reads state Z for the whole process, with 2 threads.
_MAIN_THREAD_EXITS = """
import ctypes, os, sys, threading, time
def watch():
    while True:
        with open('/proc/self/stat') as f:
            text = f.read()
        if text[text.rindex(')') + 2] == 'Z':
            break
        time.sleep(0.005)
    sys.stdout.write(f'{os.getpid()}\\n')
    sys.stdout.flush()
    while True:
        time.sleep(1)
threading.Thread(target=watch).start()
ctypes.CDLL(None).pthread_exit(None)
"""

# The root leaves the grandchild in its process group and exits.
_ROOT = f"""
import subprocess, sys
child = subprocess.Popen([sys.executable, '-c', {_MAIN_THREAD_EXITS!r}], stdout=subprocess.PIPE)
sys.stdout.write(child.stdout.readline().decode())
"""


def _alive(pid: int) -> bool:
    stat = _procfs.read_stat("/proc", pid)
    return stat is not None and not stat.is_dead


@pytest.mark.parametrize("containment", ["process-group", "auto"])
async def test_a_grandchild_whose_main_thread_exited_is_stopped(containment: str) -> None:
    # The sweep's rule (a zombie leader with running threads is alive), and
    # with a cgroup its members' list, which holds the process all the same.
    with trio.fail_after(60):
        async with open_session(grace_period=10, containment=containment) as session:
            root = await session.start_process([PY, "-c", _ROOT], stdout=subprocess.PIPE)
            assert root.stdout is not None
            line = b""
            while not line.endswith(b"\n"):
                chunk = await root.stdout.receive_some()
                assert chunk, "the root ended before the grandchild was ready"
                line += chunk
            grandchild = int(line)
            assert await root.wait() == 0
            stat = _procfs.read_stat("/proc", grandchild)
            assert stat is not None
            assert stat.main_thread_exited
    try:
        assert not _alive(grandchild), "the grandchild survived the session"
    finally:
        if _alive(grandchild):
            os.kill(grandchild, signal.SIGKILL)


async def test_closing_a_session_that_left_nothing_does_not_scan_the_machine(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    scans: list[object] = []
    real_find = _process_tree.find_leftovers

    def counting_find(**kwargs: object) -> object:
        scans.append(kwargs)
        return real_find(**kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(_process_tree, "find_leftovers", counting_find)
    with trio.fail_after(60):
        async with open_session(containment="process-group") as session:
            process = await session.start_process([PY, "-c", "pass"])
            assert await process.wait() == 0
    assert scans == []
    # The same session shape with a group member left behind does scan.
    with trio.fail_after(60):
        async with open_session(grace_period=10, containment="process-group") as session:
            script = (
                "import subprocess, sys\n"
                "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
            )
            process = await session.start_process([PY, "-c", script])
            assert await process.wait() == 0
    assert len(scans) >= 1


def test_capabilities_name_the_containment_and_what_escapes_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from trio_observer import CapabilitySupport, negotiate_capabilities
    from trio_observer._linux import _cgroup

    # Where no cgroup can be made (no v2 hierarchy in this mountinfo);
    # tests/test_cgroup_capabilities.py checks the cgroup row.
    probe = _cgroup.probe
    monkeypatch.setattr(trio_observer._linux, "probe_cgroup", lambda: probe(mountinfo=""))
    report = negotiate_capabilities()
    assert report.containment.name == "process-groups+marker"
    assert report.containment.support is CapabilitySupport.PARTIAL
    assert "setsid" in report.containment.reason
    assert "env -i" in report.containment.reason
