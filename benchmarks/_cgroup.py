"""Section ``cgroup``: containment by cgroup v2 against process groups.

- spawn + reap ``/bin/true`` through a session, ``containment="cgroup"``
  against ``"process-group"`` (the same ``start_process`` + ``wait``);
- the same at the mechanism level: ``subprocess.Popen`` in its own process
  group and ``wait4``, with and without what the session adds for a cgroup
  (``CgroupContainment.place``, the leaf's figures at the reap, ``release``);
- stopping a 200-process tree that ignores SIGTERM, from the end of the
  grace period to the last member reaped: ``CgroupContainment.stop`` (freeze,
  SIGTERM, thaw, ``cgroup.kill``, ``populated 0``, reap) against the
  session's process-group sweep (``stop_leftovers``), both with the grace
  period over (the tree has had its SIGTERM);
- 100 ``env -i setsid`` escapes left by a session's process: how many each
  containment stops by the end of the session.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

import trio
import trio.testing

import trio_observer
from trio_observer._linux import _cgroup, subreaper
from trio_observer._linux._cgroup_containment import CgroupContainment, open_cgroup_containment
from trio_observer._linux._cgroup_usage import from_rusage, with_cgroup
from trio_observer._linux._process_tree import stop_leftovers
from trio_observer._linux._procfs import read_stat

from ._core import Config, Report, Row, Target, best, interleave, interleave_async, time_row

TRUE = shutil.which("true") or "/bin/true"
MARKER = "TRIO_OBSERVER_SESSION=be9c4"

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

# Each escaper in its own session before the root exits (until then the
# group sweep would still find it).
ESCAPERS = (
    "import subprocess, sys, time\n"
    "pids = [subprocess.Popen(['env', '-i', 'setsid', 'sleep', '600']).pid for _ in range(100)]\n"
    "def sid(pid):\n"
    "    text = open(f'/proc/{pid}/stat').read()\n"
    "    return int(text[text.rindex(')') + 2:].split()[3])\n"
    "for pid in pids:\n"
    "    while sid(pid) != pid: time.sleep(0.01)\n"
    "open(sys.argv[1], 'w').write(' '.join(map(str, pids)))\n"
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
        _, status, rusage = os.wait4(popen.pid, 0)
        popen.returncode = os.waitstatus_to_exitcode(status)
        with_cgroup(from_rusage(rusage), leaf)
        if containment is not None:
            containment.release(popen.pid)
    return (time.perf_counter() - start) / count


async def _session_spawn(config: Config) -> tuple[Row, str]:
    per_block = config.pick(10, 3)
    rounds = config.pick(40, 2)
    async with (
        trio_observer.open_session(containment="cgroup") as cgroup,
        trio_observer.open_session(containment="process-group") as groups,
    ):

        def block(session: trio_observer.Session) -> Callable[[], Awaitable[float]]:
            async def timed() -> float:
                # Untimed: the previous block's supervisors finish first.
                await trio.testing.wait_all_tasks_blocked()
                start = time.perf_counter()
                for _ in range(per_block):
                    process = await session.start_process([TRUE])
                    await process.wait()
                return (time.perf_counter() - start) / per_block

            return timed

        trials = {"cgroup": block(cgroup), "process-group": block(groups)}
        await interleave_async(trials, 1)
        samples = await interleave_async(trials, rounds)
    row = time_row(
        "spawn+reap true in a session: containment cgroup vs process-group",
        best(samples["cgroup"]),
        best(samples["process-group"]),
        Target("<=", 1.10),
    )
    return row, f"session spawn: median of {rounds} rounds x {per_block}, interleaved"


def _start_tree(size: int) -> subprocess.Popen[bytes]:
    tree = subprocess.Popen(
        [sys.executable, "-c", TREE, str(size)],
        stdout=subprocess.PIPE,
        process_group=0,
        env={**os.environ, MARKER.split("=")[0]: MARKER.split("=")[1]},
    )
    assert tree.stdout is not None
    tree.stdout.readline()
    tree.stdout.close()
    # The grace period is over: every member has had (and ignored) SIGTERM.
    os.killpg(tree.pid, signal.SIGTERM)
    return tree


async def _stop_rows(config: Config, containment: CgroupContainment) -> tuple[Row, str]:
    rounds = config.pick(3, 1)
    size = config.pick(200, 20)
    by_cgroup: list[float] = []
    by_sweep: list[float] = []
    # Orphans of the tree come here to be reaped, as in a session.
    subreaper.acquire()
    try:
        for _ in range(rounds):
            tree = _start_tree(size)
            containment.place(tree.pid)
            exit_codes: dict[int, int] = {}
            start = time.perf_counter()
            await containment.stop(0.0, exit_codes)
            by_cgroup.append(time.perf_counter() - start)
            tree.returncode = exit_codes.get(tree.pid, 0)

            tree = _start_tree(size)
            start = time.perf_counter()
            await stop_leftovers(
                groups=[tree.pid], marker=MARKER.encode(), grace_period=0.0, exit_codes={}
            )
            by_sweep.append(time.perf_counter() - start)
            tree.wait()
    finally:
        subreaper.release()
    row = time_row(
        f"stop {size}-process SIGTERM-ignoring tree after grace, to last reap: "
        "cgroup vs process-group sweep",
        best(by_cgroup),
        best(by_sweep),
    )
    return row, f"stop: median of {rounds}"


async def _escapes(pid_file: str, containment: str) -> int:
    async with trio_observer.open_session(containment=containment, grace_period=5) as session:
        process = await session.start_process([sys.executable, "-c", ESCAPERS, pid_file])
        await process.wait()
    return _stop_survivors(pid_file)


def _stop_survivors(pid_file: str) -> int:
    # How many of the escapers the session stopped; the rest are killed now.
    with open(pid_file) as f:
        pids = [int(p) for p in f.read().split()]
    survivors = [pid for pid in pids if (s := read_stat("/proc", pid)) and not s.is_dead]
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
        try:
            os.waitpid(pid, 0)  # an orphan the session adopted as subreaper
        except ChildProcessError:
            pass
    return len(pids) - len(survivors)


async def _measure(config: Config) -> Report:
    session_row, session_note = await _session_spawn(config)
    per_block = config.pick(20, 3)
    rounds = config.pick(30, 2)
    async with open_cgroup_containment("be9c4") as containment:
        samples = interleave(
            {
                "cgroup": lambda: _spawn_block(per_block, containment),
                "process-group": lambda: _spawn_block(per_block, None),
            },
            rounds,
        )
        mechanism_row = time_row(
            "spawn+reap true, mechanism: Popen+place+usage+release vs Popen",
            best(samples["cgroup"]),
            best(samples["process-group"]),
            Target("<=", 1.10),
        )
        stop_row, stop_note = await _stop_rows(config, containment)
    pid_file = f"/tmp/trio-observer-bench-escapes-{os.getpid()}"
    try:
        caught = {mode: await _escapes(pid_file, mode) for mode in ("cgroup", "process-group")}
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(pid_file)
    return Report(
        rows=[
            session_row,
            mechanism_row,
            stop_row,
            Row(
                "env -i setsid escapes caught, of 100: containment cgroup vs process-group",
                str(caught["cgroup"]),
                str(caught["process-group"]),
                None,
            ),
        ],
        notes=[
            session_note,
            f"mechanism spawn: median of {rounds} rounds x {per_block}, interleaved",
            stop_note,
            "escapes: through open_session, no sink, track_descendants off",
        ],
    )
