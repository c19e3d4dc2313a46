"""Section ``close``: closing an empty session with many processes on the machine.

The end-of-session sweep used to read every ``/proc/<pid>/stat`` on the trio
thread even when the session had left nothing, so its cost grew with the
machine. Ours is ``async with open_session(): pass`` with N other
processes running (grandchildren of one helper shell, so they are not this
process's children); the alternative is ``async with trio.open_nursery():
pass`` in the same run, rounds interleaved. The verdict is on the median of
the rounds.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import time
from collections.abc import Awaitable, Callable

import trio

import trio_observer

from ._core import Config, Report, Target, interleave_async, spread_note, time_row


def run(config: Config) -> Report:
    """Measure session close vs an empty nursery; see the module docstring."""
    return trio.run(_measure, config)


async def _session_block(count: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
        async with trio_observer.open_session():
            pass
    return (time.perf_counter() - start) / count


async def _nursery_block(count: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
        async with trio.open_nursery():
            pass
    return (time.perf_counter() - start) / count


def _start_others(count: int) -> subprocess.Popen[bytes]:
    loop = f"i=0; while [ $i -lt {count} ]; do sleep 600 & i=$((i+1)); done; wait"
    return subprocess.Popen(["sh", "-c", loop], start_new_session=True)


def _children(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return len(f.read().split())
    except FileNotFoundError:
        return 1 << 30


def _wait_children(pid: int, count: int) -> None:
    while _children(pid) < count:
        time.sleep(0.05)


async def _measure(config: Config) -> Report:
    others = config.pick(2000, 200)
    rounds = config.pick(9, 3)
    per_block = config.pick(50, 10)
    helper = _start_others(others)
    try:
        # Wait until the helper has started them all (its children list).
        with trio.fail_after(120):
            await trio.to_thread.run_sync(
                _wait_children, helper.pid, others, abandon_on_cancel=True
            )
        trials: dict[str, Callable[[], Awaitable[float]]] = {
            "session": lambda: _session_block(per_block),
            "nursery": lambda: _nursery_block(per_block),
        }
        await interleave_async(trials, 1)
        samples = await interleave_async(trials, rounds)
    finally:
        os.killpg(helper.pid, signal.SIGKILL)
        helper.wait()
    ours = statistics.median(samples["session"])
    alternative = statistics.median(samples["nursery"])
    return Report(
        rows=[
            time_row(
                f"close empty session, {others} other processes vs empty nursery",
                ours,
                alternative,
                Target("<=", 5.0),
            )
        ],
        notes=[
            f"median of {rounds} rounds x {per_block} opens/closes, trials interleaved",
            spread_note(samples, "nursery"),
        ],
    )
