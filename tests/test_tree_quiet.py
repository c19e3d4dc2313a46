"""The quiet watch: a quiet tree's counters are re-read by a thread, not by trio-loop passes."""

from __future__ import annotations

import os
import resource
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import pytest
import trio

from tests._tree_helpers import Collector, K, observing
from trio_observer._events import EventCategory
from trio_observer._linux._activity import ActivityWatch
from trio_observer._linux._procfs import read_stat, run_counters_path
from trio_observer._linux._quiet_watch import QuietWatch
from trio_observer._linux._tree import TreeObserver

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc")

FILES = frozenset({EventCategory.FILE})

# Blocks reading stdin; at each line, opens the file named on it and says so.
OPENER = (
    "import sys\n"
    "held = []\n"
    "print('ready', flush=True)\n"
    "for line in sys.stdin:\n"
    "    held.append(open(line.strip()))\n"
    "    print('opened', flush=True)\n"
)


async def _checks(watch: QuietWatch, count: int) -> None:
    # The thread's reads have no trio event to wait on.
    with trio.fail_after(20):
        while watch.checks < count:  # noqa: ASYNC110
            await trio.sleep(0.005)


async def _line(stream: trio.abc.ReceiveStream) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = await stream.receive_some()
        assert chunk, f"end of stream after {data!r}"
        data += chunk
    return data


def _watch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "trio_observer quiet watch"]


@asynccontextmanager
async def _watch(interval: float = 0.005) -> AsyncIterator[tuple[QuietWatch, trio.Event]]:
    moved = trio.Event()
    watch = QuietWatch(interval, moved.set, trio.lowlevel.current_trio_token())
    try:
        yield watch, moved
    finally:
        watch.close()


@contextmanager
def _counters(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    # A file standing in for a schedstat: its path, and a descriptor open on it.
    path = tmp_path / "counters"
    path.write_bytes(b"1 2 3\n")
    fd = os.open(path, os.O_RDONLY)
    try:
        yield path, fd
    finally:
        os.close(fd)


async def test_the_watch_calls_back_once_a_descriptor_reads_differently(tmp_path: Path) -> None:
    with _counters(tmp_path) as (path, fd):
        async with _watch() as (watch, moved):
            watch.arm([(fd, b"1 2 3\n")])
            await _checks(watch, 3)
            assert not moved.is_set()
            assert watch.armed
            path.write_bytes(b"1 2 4\n")
            with trio.fail_after(20):
                await moved.wait()
            # Once per arm: the thread let go of the snapshot.
            assert not watch.armed
    assert _watch_threads() == []


async def test_a_disarmed_watch_reads_nothing(tmp_path: Path) -> None:
    with _counters(tmp_path) as (path, fd):
        async with _watch() as (watch, moved):
            watch.arm([(fd, b"1 2 3\n")])
            await _checks(watch, 1)
            watch.disarm()
            checks = watch.checks
            path.write_bytes(b"1 2 4\n")
            # Twenty intervals: a watch that still read would have called back.
            await trio.sleep(0.1)
            assert watch.checks == checks
            assert not moved.is_set()


async def test_a_failed_thread_wakes_the_loop_and_is_reported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reported: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: reported.append(args.exc_value))
    readable, writable = os.pipe()
    os.write(writable, b"x")

    def broken() -> bool:
        raise RuntimeError("a bug in the drain")

    try:
        async with _watch() as (watch, moved):
            watch.arm([], (readable, broken))
            with trio.fail_after(20):
                await moved.wait()
            assert isinstance(watch.failed, RuntimeError)
            assert not watch.armed
    finally:
        os.close(readable)
        os.close(writable)
    assert len(reported) == 1
    assert isinstance(reported[0], RuntimeError)


async def test_a_descriptor_past_fd_setsize_is_watched() -> None:
    # A session with a thousand children holds descriptors past 1024, where
    # select() cannot wait.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 2100:
        pytest.skip(f"the hard limit of open files is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2100), hard))
    readable, writable = os.pipe()
    high = os.dup2(readable, 2050)
    try:
        async with _watch() as (watch, moved):
            watch.arm([], (high, lambda: True))
            os.write(writable, b"x")
            with trio.fail_after(20):
                await moved.wait()
            assert watch.failed is None
    finally:
        for fd in (readable, writable, high):
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_a_reaped_task_counts_as_moved() -> None:
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    process = await trio.lowlevel.open_process(sleeper)
    fd = os.open(run_counters_path("/proc", process.pid, process.pid), os.O_RDONLY)
    try:
        async with _watch() as (watch, moved):
            watch.arm([(fd, os.pread(fd, 128, 0))])
            process.kill()
            await process.wait()
            with trio.fail_after(20):
                await moved.wait()
    finally:
        os.close(fd)


@asynccontextmanager
async def _opener() -> AsyncIterator[tuple[trio.Process, trio.abc.ReceiveStream]]:
    process = await trio.lowlevel.open_process([sys.executable, "-c", OPENER], stdin=-1, stdout=-1)
    assert process.stdin is not None
    assert process.stdout is not None
    try:
        assert await _line(process.stdout) == b"ready\n"
        with trio.fail_after(20):
            # Blocked in its read: it cannot run until sent a line.
            while (stat := read_stat("/proc", process.pid)) is None or stat.state != "S":  # noqa: ASYNC110
                await trio.sleep(0.005)
        yield process, process.stdout
    finally:
        with trio.CancelScope(shield=True):
            process.kill()
            await process.wait()
            await process.stdin.aclose()
            await process.stdout.aclose()


async def _armed(observer: TreeObserver) -> QuietWatch:
    with trio.fail_after(20):
        while (watch := observer._quiet) is None or not watch.armed:  # noqa: ASYNC110
            await trio.sleep(0.005)
    return watch


async def test_a_quiet_tree_costs_no_pass_until_it_runs(tmp_path: Path) -> None:
    collector = Collector()
    async with _opener() as (process, stdout):
        observer = TreeObserver(
            emit=collector.emit, categories=FILES, backend="poll", poll_interval=0.01
        )
        observer.add_root(process.pid)
        async with observing(observer):
            watch = await _armed(observer)
            polls = observer.statistics().polls
            await _checks(watch, watch.checks + 5)
            # Five intervals read by the thread, no pass (the full look is
            # due 25 intervals after the last).
            assert observer.statistics().polls == polls
            assert process.stdin is not None
            target = tmp_path / "opened-later"
            target.write_text("")
            await process.stdin.send_all(f"{target}\n".encode())
            assert await _line(stdout) == b"opened\n"
            with trio.fail_after(20):
                await collector.wait_for(lambda e: e.kind is K.FILE_OPEN and e.path == str(target))
    assert _watch_threads() == []


async def test_a_root_added_to_a_quiet_tree_is_looked_at_now(tmp_path: Path) -> None:
    # A root is spawned by us: it moves no counter of the tree, so the
    # nap must end for it (else its files would wait for the full look,
    # 25 intervals away: 25 s here).
    collector = Collector()
    target = tmp_path / "held-by-the-second-root"
    target.write_text("")
    async with _opener() as (first, _), _opener() as (second, second_out):
        assert second.stdin is not None
        await second.stdin.send_all(f"{target}\n".encode())
        assert await _line(second_out) == b"opened\n"
        observer = TreeObserver(
            emit=collector.emit, categories=FILES, backend="poll", poll_interval=1.0
        )
        observer.add_root(first.pid)
        async with observing(observer):
            await _armed(observer)
            observer.add_root(second.pid)
            with trio.fail_after(10):
                await collector.wait_for(lambda e: e.kind is K.FILE_OPEN and e.path == str(target))


async def test_the_snapshot_is_what_the_last_look_read(tmp_path: Path) -> None:
    async with _opener() as (process, _):
        watch = ActivityWatch("/proc", verify_every=1000)
        try:
            assert watch.quiet_snapshot() is None  # nothing looked at yet
            watch.update([process.pid])
            snapshot = watch.quiet_snapshot()
            assert snapshot is not None
            assert len(snapshot) == 1
            fd, before = snapshot[0]
            assert before == os.pread(fd, 128, 0)
            assert watch.passes_until_due() > 1
        finally:
            watch.forget_all()
