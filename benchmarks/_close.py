"""Section ``close``: opening and closing an empty session on a busy machine.

The end-of-session sweep used to read every ``/proc/<pid>/stat`` on the trio
thread even when the session had left nothing, so its cost grew with the
machine. Ours is ``open_session()`` entered and exited with nothing in the
block, N other processes running (grandchildren of one helper shell, so
they are not this process's children); the alternative is an empty
``trio.open_nursery()`` in the same run, rounds interleaved. Opening and
closing are timed separately (the target is on the close), median of the
rounds. The target rows use ``containment="process-group"``; the
``containment="auto"`` row (a cgroup of the session's own where this
process may make one) is shown for reference.

:func:`measure_close` is shared with the ``scaling`` section, which runs it
at several numbers of other processes.
"""

from __future__ import annotations

import gc
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable

import trio

import trio_observer

from ._core import Config, Report, Row, Target, _rotations, median, time_row

TRUE = shutil.which("true") or "/bin/true"


async def _session_block(count: int, containment: str, run_one: bool) -> tuple[float, float]:
    """Seconds per open and per close of ``count`` sessions."""
    opened = closed = 0.0
    for _ in range(count):
        start = time.perf_counter()
        scope = trio_observer.open_session(containment=containment)
        session = await scope.__aenter__()
        if run_one:
            # Untimed: a session that ran a process closes through the
            # whole teardown (the leftover check, the drain).
            middle = time.perf_counter()
            await (await session.start_process([TRUE])).wait()
            start += time.perf_counter() - middle
        entered = time.perf_counter()
        await scope.__aexit__(None, None, None)
        done = time.perf_counter()
        opened += entered - start
        closed += done - entered
    return opened / count, closed / count


async def _nursery_block(count: int) -> tuple[float, float]:
    opened = closed = 0.0
    for _ in range(count):
        start = time.perf_counter()
        scope = trio.open_nursery()
        await scope.__aenter__()
        entered = time.perf_counter()
        await scope.__aexit__(None, None, None)
        done = time.perf_counter()
        opened += entered - start
        closed += done - entered
    return opened / count, closed / count


def start_others(count: int) -> subprocess.Popen[bytes]:
    """``count`` idle processes that are not this process's children."""
    loop = f"i=0; while [ $i -lt {count} ]; do sleep 600 & i=$((i+1)); done; wait"
    return subprocess.Popen(["sh", "-c", loop], start_new_session=True)


def stop_others(helper: subprocess.Popen[bytes]) -> None:
    """Kill a :func:`start_others` helper and its processes."""
    os.killpg(helper.pid, signal.SIGKILL)
    helper.wait()


def _children(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return len(f.read().split())
    except FileNotFoundError:
        return 1 << 30


def _wait_children(pid: int, count: int) -> None:
    while _children(pid) < count:
        time.sleep(0.05)


async def wait_others(helper: subprocess.Popen[bytes], count: int) -> None:
    """Wait until the helper has started all ``count`` (its children list)."""
    with trio.fail_after(300):
        await trio.to_thread.run_sync(_wait_children, helper.pid, count, abandon_on_cancel=True)


async def measure_close(
    rounds: int, per_block: int, *, containments: tuple[str, ...], run_one: bool = False
) -> dict[str, list[tuple[float, float]]]:
    """Interleaved rounds of (open, close) seconds: ``nursery`` and one per containment.

    One untimed round first warms the caches (and makes the first cgroup).
    """
    trials: dict[str, Callable[[], Awaitable[tuple[float, float]]]] = {
        "nursery": lambda: _nursery_block(per_block)
    }
    for containment in containments:

        def block(containment: str = containment) -> Awaitable[tuple[float, float]]:
            return _session_block(per_block, containment, run_one)

        trials[containment] = block
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in trials}
    for number, order in enumerate(_rotations(list(trials), rounds + 1)):
        for name in order:
            gc.collect()
            pair = await trials[name]()
            if number:
                samples[name].append(pair)
    return samples


def close_row(
    name: str,
    samples: dict[str, list[tuple[float, float]]],
    ours: str,
    which: int,
    target: Target | None = None,
) -> Row:
    """A row for the opens (``which=0``) or closes (``which=1``) of ``ours`` vs the nursery's."""
    return time_row(
        name,
        median([pair[which] for pair in samples[ours]]),
        median([pair[which] for pair in samples["nursery"]]),
        target,
    )


def run(config: Config) -> Report:
    """Measure session open and close vs an empty nursery; see the module docstring."""
    return trio.run(_measure, config)


async def _measure(config: Config) -> Report:
    others = config.pick(2000, 200)
    rounds = config.pick(9, 3)
    per_block = config.pick(50, 10)
    helper = start_others(others)
    try:
        await wait_others(helper, others)
        samples = await measure_close(rounds, per_block, containments=("process-group", "auto"))
    finally:
        stop_others(helper)
    rows = [
        close_row(
            f"close empty session, {others} other processes vs empty nursery's close",
            samples,
            "process-group",
            1,
            Target("<=", 5.0),
        ),
        close_row("open empty session vs empty nursery's open", samples, "process-group", 0),
        close_row("close, containment=auto vs nursery's close", samples, "auto", 1),
        close_row("open, containment=auto vs nursery's open", samples, "auto", 0),
    ]
    return Report(
        rows=rows,
        notes=[
            f"median of {rounds} rounds x {per_block} opens/closes, trials interleaved;"
            " open and close timed separately (perf_counter around __aenter__/__aexit__)",
        ],
    )
