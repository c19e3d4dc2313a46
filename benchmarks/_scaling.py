"""Section ``scaling``: how cost grows, each size against its alternative in the same run.

A ratio that holds at one size can still hide a cost that grows with
something it should not grow with (every finished child, every sink, every
reader). This section prints the growth curves, so that a regression in how
cost grows shows up as a ratio that drifts along a row of sizes:

- **children**: N concurrent ``sleep`` children started, then killed and
  reaped. Ours is ``session.start_process`` in a session without sinks,
  then ``kill()`` and ``wait()`` for each; the alternatives are
  ``trio.lowlevel.open_process`` and asyncio's
  ``create_subprocess_exec``, doing the same. Per child: wall time, this
  process's CPU time, fds held and resident memory at the peak (all N
  running). Each trial runs in an event loop of its own (``trio.run`` or
  ``asyncio.run``), so all three pay one loop start-up.
- **emit**: one event to 1, 10 and 100 ``DROP_OLDEST`` sinks through
  ``registry.emit``, against a bare loop calling ``send_nowait`` on as many
  trio memory channels.
- **cursors**: a child writing 20 MB into a captured stdout, read to the end
  by 1, 10 and 100 cursors at once, against one ``receive_some`` loop on
  trio's own pipe.
- **quick starts**: 10,000 ``true`` started one after the other in one
  session, never waited for, in a child Python whose open-file limit is
  1,024; against ``trio.lowlevel.open_process`` with a task awaiting each
  ``wait()``. Peak fds and zombies (sampled as the loop runs), and whether
  the loop failed; three runs of each, alternated, judged on the median.
- **close**: closing a session with 10, 100, 1,000 and 2,000 other
  processes on the machine, empty and after one process ran (the whole
  teardown), against an empty nursery's close (the ``close`` section's
  trials).

The figure shown is the median of the rounds, with the fastest and slowest
round's ratio beside it in the notes.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import trio

import trio_observer
from trio_observer import CAPTURE

from ._close import close_row, measure_close, start_others, stop_others, wait_others
from ._core import Config, Report, Row, Target, fmt_bytes, fmt_seconds
from ._emit import _measure_fanout

SLEEP = shutil.which("sleep") or "/bin/sleep"
HEAD = shutil.which("head") or "/usr/bin/head"
TRUE = shutil.which("true") or "/bin/true"


def run(config: Config) -> Report:
    """Measure the growth curves; see the module docstring."""
    report = Report()
    _children(config, report)
    _quick_starts(config, report)
    _emit(config, report)
    _cursors(config, report)
    _close_curve(config, report)
    return report


# -- helpers --------------------------------------------------------------


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _rss_bytes() -> int:
    with open("/proc/self/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _ratio_row(
    name: str, ours: list[float], alternative: list[float], fmt: Callable[[float], str]
) -> tuple[Row, str]:
    """An info row from paired samples: median figures, median ratio, and the spread."""
    ratios = [a / b for a, b in zip(ours, alternative, strict=True) if b > 0]
    ratio = statistics.median(ratios) if ratios else None
    row = Row(name, fmt(statistics.median(ours)), fmt(statistics.median(alternative)), ratio)
    spread = f"{name}: ratio {min(ratios):.2f}x..{max(ratios):.2f}x" if ratios else name
    return row, spread


def _fmt_count(value: float) -> str:
    return f"{value:.2f}"


# -- children -------------------------------------------------------------


class _Figures:
    """One trial's figures, per child."""

    def __init__(self, count: int, wall: float, cpu: float, fds: int, rss: int) -> None:
        self.wall = wall / count
        self.cpu = cpu / count
        self.fds = fds / count
        self.rss = rss / count


def _measured(count: int, body: Callable[[Callable[[], None]], None]) -> _Figures:
    """Run ``body(at_peak)``; ``at_peak`` is called once all children run."""
    fds0, rss0 = _open_fds(), _rss_bytes()
    peak: list[int] = []

    def at_peak() -> None:
        peak.extend((_open_fds() - fds0, _rss_bytes() - rss0))

    wall0, cpu0 = time.perf_counter(), time.process_time()
    body(at_peak)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return _Figures(count, wall, cpu, peak[0], max(peak[1], 0))


def _ours(count: int, at_peak: Callable[[], None], containment: str = "auto") -> None:
    async def main() -> None:
        async with trio_observer.open_session(containment=containment) as session:
            processes = [await session.start_process([SLEEP, "1000"]) for _ in range(count)]
            at_peak()
            for process in processes:
                process.kill()
            for process in processes:
                await process.wait()

    trio.run(main)


def _trio(count: int, at_peak: Callable[[], None]) -> None:
    async def main() -> None:
        processes = [await trio.lowlevel.open_process([SLEEP, "1000"]) for _ in range(count)]
        at_peak()
        for process in processes:
            process.kill()
        for process in processes:
            await process.wait()

    trio.run(main)


def _asyncio(count: int, at_peak: Callable[[], None]) -> None:
    async def main() -> None:
        processes = [await asyncio.create_subprocess_exec(SLEEP, "1000") for _ in range(count)]
        at_peak()
        for process in processes:
            process.kill()
        for process in processes:
            await process.wait()

    asyncio.run(main())


def _children(config: Config, report: Report) -> None:
    sizes = [10, 100, 1000] if not config.quick else [10, 50]
    trials = {"ours": _ours, "trio": _trio, "asyncio": _asyncio}
    for count in sizes:
        rounds = config.pick(9 if count <= 100 else 3, 1)
        samples: dict[str, list[_Figures]] = {name: [] for name in trials}
        for r in range(rounds):
            names = list(trials)
            names = names[r % len(names) :] + names[: r % len(names)]
            for name in names:
                samples[name].append(_measured(count, lambda peak: trials[name](count, peak)))  # noqa: B023
        ours = samples["ours"]
        for alternative in ("trio", "asyncio"):
            alt = samples[alternative]
            for what, get, fmt in (
                ("wall", lambda f: f.wall, fmt_seconds),
                ("CPU", lambda f: f.cpu, fmt_seconds),
                ("fds", lambda f: f.fds, _fmt_count),
                ("memory", lambda f: f.rss, fmt_bytes),
            ):
                row, spread = _ratio_row(
                    f"{count} children: {what} per child vs {alternative}",
                    [get(f) for f in ours],  # type: ignore[no-untyped-call]
                    [get(f) for f in alt],  # type: ignore[no-untyped-call]
                    fmt,
                )
                report.rows.append(row)
                report.notes.append(spread)
    report.notes.append(
        "children: sleep 1000 x N started, then killed and reaped; ours in a session "
        "without sinks; CPU is this process's; fds and memory at the peak, per child"
    )


# -- emit -----------------------------------------------------------------


def _emit(config: Config, report: Report) -> None:
    report.rows.extend(trio.run(_measure_emit, config, report.notes))


async def _measure_emit(config: Config, notes: list[str]) -> list[Row]:
    events = config.pick(20_000, 2_000)
    rounds = config.pick(9, 2)
    rows = []
    for sinks in (1, 10, 100):
        # The same trials as the fanout section, at the sizes of the curve.
        samples = await _measure_fanout(sinks, events, rounds)
        row, spread = _ratio_row(
            f"emit to {sinks} DROP_OLDEST sinks vs bare send_nowait loop",
            samples["emit"],
            samples["bare loop"],
            fmt_seconds,
        )
        rows.append(row)
        notes.append(spread)
    notes.append("emit: per event, the fanout section's trials (see its note)")
    return rows


# -- cursors --------------------------------------------------------------


def _cursors(config: Config, report: Report) -> None:
    report.rows.extend(trio.run(_measure_cursors, config, report.notes))


async def _measure_cursors(config: Config, notes: list[str]) -> list[Row]:
    size = config.pick(20_000_000, 2_000_000)
    rounds = config.pick(5, 1)
    argv = [HEAD, "-c", str(size), "/dev/zero"]
    rows = []

    async def raw() -> float:
        start = time.perf_counter()
        process = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE)
        assert process.stdout is not None
        seen = 0
        while chunk := await process.stdout.receive_some(65536):
            seen += len(chunk)
        await process.wait()
        if seen != size:
            raise RuntimeError(f"raw read {seen} of {size} bytes")
        return time.perf_counter() - start

    for readers in (1, 10, 100):
        gaps: list[int] = []

        async def ours() -> float:
            start = time.perf_counter()
            async with trio_observer.open_session() as session, trio.open_nursery() as nursery:
                process = await session.start_process(argv, stdout=CAPTURE)
                log = process.stdout_log
                assert log is not None
                for _ in range(readers):  # noqa: B023
                    nursery.start_soon(_follow, log.cursor("oldest"), gaps)  # noqa: B023
                await process.wait()
            return time.perf_counter() - start

        ours_samples: list[float] = []
        raw_samples: list[float] = []
        for r in range(rounds):
            pair = (ours, raw) if r % 2 == 0 else (raw, ours)
            for trial in pair:
                (ours_samples if trial is ours else raw_samples).append(await trial())
        row, spread = _ratio_row(
            f"20 MB captured, {readers} cursors vs one receive_some loop",
            ours_samples,
            raw_samples,
            fmt_seconds,
        )
        rows.append(row)
        notes.append(spread)
        notes.append(
            f"{readers} cursors: {sum(gaps)} bytes reported missed by the cursors "
            f"over {rounds} rounds (the backlog keeps the newest 1 MiB)"
        )
    return rows


async def _follow(cursor: trio_observer.OutputCursor, gaps: list[int]) -> None:
    async for item in cursor:
        if isinstance(item, trio_observer.OutputGap):
            gaps.append(item.missed_bytes)


# -- quick starts -----------------------------------------------------------

# Run in a child Python, so that its fd limit is its own. Prints one JSON
# object: the peaks, the time, and the error if the loop failed.
_QUICK_STARTS = """
import json, os, resource, sys, time
import trio
import trio_observer

which, count, true = sys.argv[1], int(sys.argv[2]), sys.argv[3]
resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))
me = os.getpid()
peak = {"fds": 0, "zombies": 0}

def sample(i):
    peak["fds"] = max(peak["fds"], len(os.listdir("/proc/self/fd")))
    if i % 50 == 0:
        children = []
        # Every thread's: trio's open_process forks from a worker thread.
        for task in os.listdir(f"/proc/{me}/task"):
            with open(f"/proc/{me}/task/{task}/children") as f:
                children += f.read().split()
        zombies = 0
        for pid in children:
            try:
                with open(f"/proc/{pid}/stat", "rb") as f:
                    zombies += f.read().rpartition(b")")[2][1:2] == b"Z"
            except OSError:
                pass
        peak["zombies"] = max(peak["zombies"], zombies)

async def ours():
    async with trio_observer.open_session(containment="process-group") as session:
        for i in range(count):
            await session.start_process([true])
            sample(i)

async def plain():
    async with trio.open_nursery() as nursery:
        for i in range(count):
            process = await trio.lowlevel.open_process([true])
            nursery.start_soon(process.wait)
            sample(i)

start = time.perf_counter()
error = None
try:
    trio.run(ours if which == "ours" else plain)
except BaseException as exc:
    error = repr(exc)[:200]
print(json.dumps({"seconds": time.perf_counter() - start, "error": error, **peak}))
"""


def _quick_start_trial(which: str, count: int) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-c", _QUICK_STARTS, which, str(count), TRUE],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    lines = result.stdout.strip().splitlines()
    if not lines:
        return {"seconds": 0.0, "error": result.stderr[-200:], "fds": 0, "zombies": 0}
    found: dict[str, Any] = json.loads(lines[-1])
    return found


def _quick_starts(config: Config, report: Report) -> None:
    count = config.pick(10_000, 1_000)
    rounds = config.pick(3, 1)
    # Alternated, a child Python each: the peaks are of one moment, so the
    # verdict is on the median round, as everywhere else.
    trials: dict[str, list[dict[str, Any]]] = {"ours": [], "trio": []}
    for _ in range(rounds):
        for which, results in trials.items():
            results.append(_quick_start_trial(which, count))
    ours, plain = trials["ours"], trials["trio"]
    for what in ("fds", "zombies"):
        mine = statistics.median(float(r[what]) for r in ours)
        theirs = statistics.median(float(r[what]) for r in plain)
        report.rows.append(
            Row(
                f"{count} quick starts, 1,024 fd limit: peak {what} vs open_process + wait tasks",
                f"{mine:.0f}",
                f"{theirs:.0f}",
                mine / theirs if theirs else None,
                Target("<=", 1.5) if what == "fds" else None,
            )
        )
    mine_s = statistics.median(float(r["seconds"]) for r in ours)
    theirs_s = statistics.median(float(r["seconds"]) for r in plain)
    report.rows.append(
        Row(
            f"{count} quick starts: time per start vs open_process + wait tasks",
            fmt_seconds(mine_s / count),
            fmt_seconds(theirs_s / count),
            mine_s / theirs_s if theirs_s else None,
        )
    )
    errors = [r["error"] for r in ours + plain if r["error"]]
    report.notes.append(
        f"quick starts: errors: {'; '.join(errors) if errors else 'none'}; {rounds} runs of"
        " each, alternated, in a child Python with RLIMIT_NOFILE 1024, peaks sampled after"
        " every start (zombies every 50th), median run; peak fds of each run: ours "
        + "/".join(str(r["fds"]) for r in ours)
        + ", trio "
        + "/".join(str(r["fds"]) for r in plain)
    )


# -- close ------------------------------------------------------------------


def _close_curve(config: Config, report: Report) -> None:
    report.rows.extend(trio.run(_measure_close_curve, config, report.notes))


async def _measure_close_curve(config: Config, notes: list[str]) -> list[Row]:
    sizes = [10, 100, 1000, 2000] if not config.quick else [10, 100]
    rounds = config.pick(5, 2)
    per_block = config.pick(20, 5)
    rows = []
    helpers: list[subprocess.Popen[bytes]] = []
    running = 0
    try:
        for size in sizes:
            helpers.append(start_others(size - running))
            await wait_others(helpers[-1], size - running)
            running = size
            for run_one, what in ((False, "empty"), (True, "after one process")):
                samples = await measure_close(
                    rounds, per_block, containments=("process-group",), run_one=run_one
                )
                rows.append(
                    close_row(
                        f"close, {what}, {size} other processes vs nursery's close",
                        samples,
                        "process-group",
                        1,
                    )
                )
    finally:
        for helper in helpers:
            stop_others(helper)
    notes.append(
        f"close: median of {rounds} rounds x {per_block} sessions; 'after one process' ran"
        " and reaped `true` in the session (untimed) before the timed close"
    )
    return rows
