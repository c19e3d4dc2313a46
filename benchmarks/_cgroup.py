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
  containment stops by the end of the session;
- 100 concurrent ``sleep`` children (the scaling section's trial) with the
  default containment (a cgroup here) against ``containment="process-group"``
  and against ``trio.lowlevel.open_process``, in the same rounds: what the
  default costs per child;
- what each step of a placement costs this process in CPU (``thread_time``),
  against the ``subprocess.Popen`` of the same child: the leaf's ``mkdir``
  and ``open``, ``SIGSTOP`` + ``SIGCONT``, the ``cgroup.procs`` write (also
  its wall time: the RCU grace period), the children check, the leaf's
  figures at the reap, the leaf's ``rmdir``;
- the wall time of the first placement after a pause without moves (a
  whole RCU grace period) against the placement right after it.
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

from . import _scaling
from ._core import (
    Config,
    Report,
    Row,
    Target,
    fmt_seconds,
    interleave,
    interleave_async,
    median,
    time_row,
)

TRUE = shutil.which("true") or "/bin/true"
SLEEP = shutil.which("sleep") or "/bin/sleep"
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
    report = trio.run(_measure, config)
    # Outside that trio.run: each trial runs a loop of its own.
    rows, notes = _children_rows(config)
    return Report(rows=rows + report.rows, notes=notes + report.notes)


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
        median(samples["cgroup"]),
        median(samples["process-group"]),
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
        median(by_cgroup),
        median(by_sweep),
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


def _children_rows(config: Config) -> tuple[list[Row], list[str]]:
    count = config.pick(100, 10)
    rounds = config.pick(7, 1)
    trials: dict[str, Callable[[Callable[[], None]], None]] = {
        "auto": lambda peak: _scaling._ours(count, peak),
        "process-group": lambda peak: _scaling._ours(count, peak, "process-group"),
        "trio": lambda peak: _scaling._trio(count, peak),
    }
    samples: dict[str, list[_scaling._Figures]] = {name: [] for name in trials}
    for r in range(rounds):
        names = list(trials)
        for name in names[r % 3 :] + names[: r % 3]:
            samples[name].append(_scaling._measured(count, trials[name]))
    rows, notes = [], []
    for ours, alternative in (
        ("auto", "process-group"),
        ("auto", "trio"),
        ("process-group", "trio"),
    ):
        for what in ("CPU", "wall"):
            row, spread = _scaling._ratio_row(
                f"{count} children: {what} per child, containment={ours} vs {alternative}",
                [f.cpu if what == "CPU" else f.wall for f in samples[ours]],
                [f.cpu if what == "CPU" else f.wall for f in samples[alternative]],
                fmt_seconds,
            )
            rows.append(row)
            notes.append(spread)
    notes.append(
        f"children: the scaling section's trial (sleep 1000 x {count} started, killed, "
        f"reaped; no sink), median of {rounds} rounds, each trial in a trio.run of its own"
    )
    return rows, notes


def _placement_steps(config: Config, containment: CgroupContainment) -> tuple[list[Row], str]:
    count = config.pick(100, 10)
    cpu = dict.fromkeys(
        ("Popen", "mkdir+open", "stop+cont", "write", "children", "reap", "rmdir"), 0.0
    )
    write_wall = 0.0
    children = []

    def step(name: str, start: float) -> float:
        now = time.thread_time()
        cpu[name] += now - start
        return now

    for _ in range(count):
        t = time.thread_time()
        containment.prepare()
        t = step("mkdir+open", t)
        child = subprocess.Popen([SLEEP, "1000"])
        t = step("Popen", t)
        assert containment._spare is not None
        name, procs_fd = containment._spare
        containment._spare = None
        os.kill(child.pid, signal.SIGSTOP)
        t = step("stop+cont", t)
        wall = time.perf_counter()
        os.write(procs_fd, b"%d" % child.pid)
        write_wall += time.perf_counter() - wall
        t = step("write", t)
        _cgroup._children(child.pid)
        t = step("children", t)
        os.kill(child.pid, signal.SIGCONT)
        step("stop+cont", t)
        os.close(procs_fd)
        containment._leaves[child.pid] = _cgroup.Cgroup(
            containment.group.path / name, containment.group
        )
        children.append(child)
    for child in children:
        child.kill()
    for child in children:
        _, status, rusage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        t = time.thread_time()
        with_cgroup(from_rusage(rusage), containment.leaf_of(child.pid))
        step("reap", t)
        containment.release(child.pid)
    t = time.thread_time()
    containment._remove_released()
    step("rmdir", t)
    spawn = cpu.pop("Popen") / count
    what = {
        "mkdir+open": "the next leaf's mkdir + open of its cgroup.procs (kernel)",
        "stop+cont": "SIGSTOP + SIGCONT around the move",
        "write": "the cgroup.procs write, CPU (kernel)",
        "children": "children check after the move (first /proc read of the pid)",
        "reap": "the leaf's figures at the reap (cpu.stat)",
        "rmdir": "the leaf's rmdir, batched (kernel)",
    }
    rows = [
        Row(
            f"placement CPU: {what[k]} vs Popen",
            fmt_seconds(v / count),
            fmt_seconds(spawn),
            v / count / spawn,
        )
        for k, v in cpu.items()
    ]
    rows.append(
        Row(
            "placement wall: the cgroup.procs write (RCU grace period) vs Popen's CPU",
            fmt_seconds(write_wall / count),
            fmt_seconds(spawn),
            write_wall / count / spawn,
        )
    )
    return rows, (
        f"placement steps: {count} sleep children placed one after another, per child; "
        "CPU is this thread's (time.thread_time), alternative the Popen of the same child"
    )


def _place_pair(containment: CgroupContainment) -> tuple[float, float]:
    # Two sleep children placed one right after the other: the wall time of
    # each place().
    walls = []
    children = []
    for _ in range(2):
        child = subprocess.Popen([SLEEP, "1000"])
        children.append(child)
        start = time.perf_counter()
        containment.place(child.pid)
        walls.append(time.perf_counter() - start)
    for child in children:
        child.kill()
        child.wait()
        containment.release(child.pid)
    return walls[0], walls[1]


async def _idle_placement_row(config: Config, containment: CgroupContainment) -> tuple[Row, str]:
    # The first placement after a pause pays a whole RCU grace period (the
    # kernel's cgroup_threadgroup_rwsem leaves its fast path a grace period
    # after the last move); one right after it does not. Both are timed in
    # each round, through the session's own place().
    rounds = config.pick(9, 2)
    idle = 0.05
    first: list[float] = []
    then: list[float] = []
    for _ in range(rounds):
        await trio.sleep(idle)
        after_pause, right_after = _place_pair(containment)
        first.append(after_pause)
        then.append(right_after)
    row = time_row(
        f"placement wall: first place() after {idle * 1e3:.0f} ms without a move vs the next",
        median(first),
        median(then),
    )
    return row, (
        f"idle placement: median of {rounds} rounds; a move elsewhere on the machine "
        "within the pause (another process's cgroup work) makes the first one fast too"
    )


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
            median(samples["cgroup"]),
            median(samples["process-group"]),
            Target("<=", 1.10),
        )
        stop_row, stop_note = await _stop_rows(config, containment)
        step_rows, step_note = _placement_steps(config, containment)
        idle_row, idle_note = await _idle_placement_row(config, containment)
    pid_file = f"/tmp/trio-observer-bench-escapes-{os.getpid()}"
    try:
        caught = {mode: await _escapes(pid_file, mode) for mode in ("cgroup", "process-group")}
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(pid_file)
    return Report(
        rows=[
            *step_rows,
            idle_row,
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
            step_note,
            idle_note,
        ],
    )
