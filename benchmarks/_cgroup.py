"""Section ``cgroup``: containment by cgroup v2 against process groups.

Measured at the mechanism level (``trio_observer._linux._cgroup_containment``,
not through ``open_session``):

- spawn + reap ``/bin/true`` in its own process group with ``wait4``, with
  and without placing it in a leaf cgroup of its own (mkdir, write
  ``cgroup.procs``, rmdir after the reap);
- stopping a 200-process tree that ignores SIGTERM, from the end of the
  grace period to the last member gone: ``cgroup.kill`` + ``populated 0``
  vs a sweep that scans ``/proc`` for the tree's process group and
  SIGKILLs what it finds until nothing is left;
- 100 ``env -i setsid`` escapes: how many each containment still holds.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import trio

from trio_observer._linux import _cgroup
from trio_observer._linux._cgroup_containment import CgroupContainment, open_cgroup_containment
from trio_observer._linux._procfs import read_stat, scan_all

from ._core import Config, Report, Row, Target, best, interleave, time_row

TRUE = shutil.which("true") or "/bin/true"

TREE = (
    "import os, signal, sys, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "n = int(sys.argv[1])\n"
    "for _ in range(n - 1):\n"
    "    if os.fork() == 0:\n"
    "        time.sleep(600)\n"
    "        os._exit(0)\n"
    "print('up', flush=True)\n"
    "time.sleep(600)\n"
)

ESCAPERS = (
    "import subprocess, sys\n"
    "for _ in range(int(sys.argv[1])):\n"
    "    subprocess.Popen(['env', '-i', 'setsid', 'sleep', '600'])\n"
    "print('spawned', flush=True)\n"
)


def run(config: Config) -> Report:
    """Measure cgroup containment; see the module docstring."""
    support = _cgroup.probe()
    if not support.available:
        return Report(notes=[f"skipped: cgroup v2 not available: {support.reason}"])
    return trio.run(_measure, config)


def _spawn_block(count: int, containment: CgroupContainment | None) -> float:
    start = time.perf_counter()
    for _ in range(count):
        popen = subprocess.Popen([TRUE], process_group=0)
        leaf = containment.place(popen.pid) if containment is not None else None
        _, status, _ = os.wait4(popen.pid, 0)
        popen.returncode = os.waitstatus_to_exitcode(status)
        if leaf is not None:
            leaf.path.rmdir()
    return (time.perf_counter() - start) / count


def _start_tree(size: int) -> subprocess.Popen[bytes]:
    tree = subprocess.Popen(
        [sys.executable, "-c", TREE, str(size)], stdout=subprocess.PIPE, process_group=0
    )
    assert tree.stdout is not None
    tree.stdout.readline()
    tree.stdout.close()
    return tree


def _run_escapers(containment: CgroupContainment) -> subprocess.Popen[bytes]:
    escaper = subprocess.Popen(
        [sys.executable, "-c", ESCAPERS, "100"], stdout=subprocess.PIPE, process_group=0
    )
    containment.place(escaper.pid)
    assert escaper.stdout is not None
    escaper.stdout.readline()
    escaper.stdout.close()
    escaper.wait()
    return escaper


def _sweep_group(pgid: int) -> None:
    # What a process-group sweep does: it cannot kill a group atomically
    # against forks, so it scans and kills until a scan finds nothing.
    while True:
        found = [pid for pid, stat in scan_all("/proc").items() if stat.pgid == pgid]
        alive = [pid for pid in found if (s := read_stat("/proc", pid)) and not s.is_dead]
        if not alive:
            return
        for pid in alive:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


async def _measure(config: Config) -> Report:
    per_block = config.pick(20, 3)
    rounds = config.pick(30, 2)
    size = config.pick(200, 20)
    async with open_cgroup_containment("be9c4") as containment:
        samples = interleave(
            {
                "cgroup": lambda: _spawn_block(per_block, containment),
                "process-group": lambda: _spawn_block(per_block, None),
            },
            rounds,
        )
        spawn_row = time_row(
            "spawn+reap true: cgroup leaf vs process group",
            best(samples["cgroup"]),
            best(samples["process-group"]),
            Target("<=", 1.10),
        )

        stop_rounds = config.pick(3, 1)
        cgroup_stop: list[float] = []
        group_stop: list[float] = []
        for _ in range(stop_rounds):
            tree = _start_tree(size)
            containment.place(tree.pid)
            # The grace period (zero here) after SIGTERM to every member.
            containment.group.freeze()
            containment.group.signal_all(signal.SIGTERM)
            containment.group.thaw()
            start = time.perf_counter()
            containment.group.kill()
            await containment.group.wait_empty()
            cgroup_stop.append(time.perf_counter() - start)
            tree.wait()

            tree = _start_tree(size)
            os.killpg(tree.pid, signal.SIGTERM)
            start = time.perf_counter()
            _sweep_group(tree.pid)
            group_stop.append(time.perf_counter() - start)
            tree.wait()

        escaper = _run_escapers(containment)
        in_cgroup = len(containment.members())
        in_group = sum(
            1
            for stat in scan_all("/proc").values()
            if stat.pgid == escaper.pid and not stat.is_dead
        )
        containment.group.kill()
        await containment.group.wait_empty()

    return Report(
        rows=[
            spawn_row,
            time_row(
                f"stop {size}-process SIGTERM-ignoring tree after grace: cgroup.kill vs sweep",
                best(cgroup_stop),
                best(group_stop),
            ),
            Row(
                "env -i setsid escapes held, of 100: cgroup vs process group",
                str(in_cgroup),
                str(in_group),
                None,
            ),
        ],
        notes=[
            "mechanism level (_linux/_cgroup_containment), not through open_session",
            f"spawn: best of {rounds} rounds x {per_block}, interleaved; "
            f"stop: best of {stop_rounds}",
        ],
    )
