"""Section ``memory``: Python-side memory per sink and per supervised child.

Memory is measured with :mod:`tracemalloc` (what the Python allocator holds,
not the kernel's side: pipe buffers, the child's own memory), as the
difference in traced bytes around creating ``count`` objects that are then
kept alive. Each side first does the same thing once, untimed and unmeasured,
so that one-off costs (imports, trio's thread pool, caches) are not charged to
the first object. Descriptors are counted in ``/proc/self/fd``.
"""

from __future__ import annotations

import gc
import os
import shutil
import tracemalloc
from collections.abc import Callable

import trio
import trio.testing

import trio_observer
from trio_observer import EventCategory, ObserverBackpressure, ObserverEvent, ObserverRegistry

from ._core import Config, Report, Row, bytes_row

SLEEP = shutil.which("sleep") or "/bin/sleep"
TRUE = shutil.which("true") or "/bin/true"
SINK_CAPACITY = 256


def run(config: Config) -> Report:
    """Bytes per sink, bytes and fds per idle supervised child."""
    sinks = config.pick(1000, 200)
    children = config.pick(50, 10)
    tracemalloc.start()
    try:
        ours_sink, raw_channel = _per_sink(sinks)
        ours_child = trio.run(_session_children, children)
        trio_child = trio.run(_trio_children, children)
    finally:
        tracemalloc.stop()
    return Report(
        rows=[
            bytes_row("per sink: add_channel vs open_memory_channel", ours_sink, raw_channel),
            bytes_row(
                "per idle child: session vs open_process+wait",
                ours_child.bytes,
                trio_child.bytes,
            ),
            Row(
                "fds per idle child: session vs open_process",
                f"{ours_child.fds:.2f}",
                f"{trio_child.fds:.2f}",
                ours_child.fds / trio_child.fds if trio_child.fds else None,
            ),
        ],
        notes=[
            f"{sinks} sinks (LIFECYCLE, DROP_OLDEST, capacity {SINK_CAPACITY}) vs {sinks} "
            f"trio memory channel pairs of the same capacity, all kept alive",
            f"{children} idle children `{SLEEP} 1000` started in one session (no sink) vs "
            "trio.lowlevel.open_process with one task each awaiting wait(); then "
            "stopped by cancelling the session / killing them",
            "tracemalloc: Python allocations only; the children's own memory and "
            "kernel buffers are not included",
        ],
    )


def _traced() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


def _bytes_per(count: int, make: Callable[[], object]) -> float:
    kept: list[object] = [None] * count
    make()
    before = _traced()
    for index in range(count):
        kept[index] = make()
    after = _traced()
    del kept
    return (after - before) / count


def _per_sink(count: int) -> tuple[float, float]:
    registry = ObserverRegistry()

    def add_sink() -> object:
        return registry.add_channel(
            [EventCategory.LIFECYCLE], SINK_CAPACITY, ObserverBackpressure.DROP_OLDEST
        )

    def raw_channel() -> object:
        return trio.open_memory_channel[ObserverEvent](SINK_CAPACITY)

    # The registry keeps its sinks (and their send sides) itself; the
    # receiving ends are what the caller keeps, just like the raw pairs.
    return _bytes_per(count, add_sink), _bytes_per(count, raw_channel)


class _PerChild:
    def __init__(self, total_bytes: int, fds: int, count: int) -> None:
        self.bytes = total_bytes / count
        self.fds = fds / count


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


async def _session_children(count: int) -> _PerChild:
    async with trio_observer.open_session() as session:
        warm = await session.start_process([TRUE])
        await warm.wait()
        await trio.testing.wait_all_tasks_blocked()
        before, fds_before = _traced(), _fd_count()
        for _ in range(count):
            await session.start_process([SLEEP, "1000"])
        # Every supervisor is now parked on its child's pidfd.
        await trio.testing.wait_all_tasks_blocked()
        result = _PerChild(_traced() - before, _fd_count() - fds_before, count)
        session.cancel_scope.cancel()
    return result


async def _trio_children(count: int) -> _PerChild:
    processes: list[trio.Process] = []
    async with trio.open_nursery() as nursery:
        warm = await trio.lowlevel.open_process([TRUE])
        await warm.wait()
        await trio.testing.wait_all_tasks_blocked()
        before, fds_before = _traced(), _fd_count()
        for _ in range(count):
            process = await trio.lowlevel.open_process([SLEEP, "1000"])
            processes.append(process)
            nursery.start_soon(process.wait)
        await trio.testing.wait_all_tasks_blocked()
        result = _PerChild(_traced() - before, _fd_count() - fds_before, count)
        for process in processes:
            process.kill()
    return result
