"""Sections ``capture`` and ``lines``: captured pipe output and reading it as lines.

``capture`` times a child writing N bytes to a pipe until every byte is in
hand: ours is a session with ``stdout=CAPTURE`` (the session's reader task
pumps the pipe into an :class:`~trio_observer.OutputLog`), timed until the
session block has ended, so the log is closed with all N bytes in it. The
alternatives are what a user would write instead: trio's own
``open_process(stdout=PIPE)`` with a ``receive_some(65536)`` loop, and a
blocking ``subprocess.run(capture_output=True)``. The child is
``head -c N /dev/zero`` for all three, so the child costs the same. A
second row runs 50 such writers at once, all captured in one session with
the default backlog, against one ``receive_some`` task per trio pipe. As in
``lines``, the target rows open the session with
``containment="process-group"``: they measure capturing, and a cgroup's
placement costs one RCU grace period per session and a few hundred
microseconds per process (the ``cgroup`` section), the same whatever the
process writes. ``ref`` rows give the same captures with the default
containment (a cgroup where one can be made) and pump the 50 pipes without
a session.

``lines`` times one million short lines from ``cat`` of a file (and from
a Python child), read as ``str`` lines: ours through
``log.cursor().lines()`` (one ``async for`` step per line) and
``log.cursor().line_batches()`` (one per chunk, then a plain ``for`` over
the chunk's lines) on a captured stdout, the alternative by iterating the
stdout file object of ``subprocess.Popen(..., stdout=PIPE, text=True)``,
line by line. Same child for both. Each side checks that it saw every line.
The target rows open the session with ``containment="process-group"``:
they measure reading lines, and a cgroup's placement costs one wait per
process (an RCU grace period, see the containment section) that is the
same whatever the process prints; two info rows give the same readers
with the default containment. The ``ref`` rows are the floors, without the
library: a bare trio ``receive_some`` loop that decodes and splits each
chunk (what ``line_batches()`` does), the same handing each line out
through an async generator (what ``lines()`` does), and the ``async for``
step alone over lines already split.
"""

from __future__ import annotations

import codecs
import functools
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Literal

import trio

import trio_observer
from trio_observer._linux import grow_pipe, release_pipe
from trio_observer._linux._pipes import pipe_budget
from trio_observer._output import BURST_SIZE, pump_stream

from ._core import (
    Config,
    Report,
    Row,
    Target,
    interleave_async,
    median,
    ratio_spread,
    spread_note,
    time_row,
)

HEAD = shutil.which("head") or "/usr/bin/head"
CAT = shutil.which("cat") or "/usr/bin/cat"

_MB = 1_000_000

Containment = Literal["auto", "process-group"]


def _mb_row(name: str, size: int, ours: float, alternative: float, target: Target | None) -> Row:
    # Throughput in MB/s; the ratio is ours / alternative in MB/s (higher is better).
    return Row(
        name,
        f"{size / ours / _MB:.0f} MB/s",
        f"{size / alternative / _MB:.0f} MB/s",
        alternative / ours,
        target,
        ratio_spread(ours, alternative, invert=True),
    )


def _with_cpu(
    trial: Callable[[], Awaitable[float]], store: list[float]
) -> Callable[[], Awaitable[float]]:
    async def timed() -> float:
        before = resource.getrusage(resource.RUSAGE_SELF)
        elapsed = await trial()
        after = resource.getrusage(resource.RUSAGE_SELF)
        store.append(
            after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime,
        )
        return elapsed

    return timed


def _pipe_note() -> str:
    budget = pipe_budget()
    if budget is None:
        return "every one (exempt from the per-user pipe limits)"
    return f"as many as fit in {budget} pages (a quarter of this user's pipe limit)"


def _check(ok: bool, what: str) -> None:
    # A benchmark that silently lost data would time the wrong thing.
    if not ok:
        raise RuntimeError(f"benchmark data check failed: {what}")


def _subprocess_run(argv: list[str], size: int) -> float:
    start = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, check=True)
    elapsed = time.perf_counter() - start
    _check(len(result.stdout) == size, f"subprocess.run: {len(result.stdout)} bytes")
    return elapsed


def _popen_lines(argv: list[str], count: int) -> float:
    seen = 0
    start = time.perf_counter()
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) as process:
        assert process.stdout is not None
        for _line in process.stdout:
            seen += 1
    elapsed = time.perf_counter() - start
    _check(seen == count, f"Popen: {seen} lines")
    return elapsed


class _ListIterator:
    """The cheapest async iterator: ``__anext__`` pops a prebuilt list."""

    __slots__ = ("_items",)

    def __init__(self, reversed_items: list[str]) -> None:
        self._items = reversed_items

    def __aiter__(self) -> _ListIterator:
        return self

    async def __anext__(self) -> str:
        if self._items:
            return self._items.pop()
        raise StopAsyncIteration


async def _yield_each(items: list[str]) -> AsyncIterator[str]:
    for item in items:
        yield item


# -- capture --------------------------------------------------------------


def run_capture(config: Config) -> Report:
    """Captured pipe throughput vs a raw trio loop and ``subprocess.run``."""
    return trio.run(_measure_capture, config)


async def _measure_capture(config: Config) -> Report:
    size = config.pick(100 * _MB, 10 * _MB)
    rounds = config.pick(5, 2)
    argv = [HEAD, "-c", str(size), "/dev/zero"]

    async def ours(containment: str = "auto") -> float:
        start = time.perf_counter()
        async with trio_observer.open_session(containment=containment) as session:
            process = await session.start_process(argv, stdout=trio_observer.CAPTURE)
            await process.wait()
        # Leaving the session waits for its reader to reach end of file.
        elapsed = time.perf_counter() - start
        log = process.stdout_log
        _check(log is not None and log.total_bytes == size, f"captured {log!r}")
        return elapsed

    async def raw_trio() -> float:
        start = time.perf_counter()
        process = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE)
        stream = process.stdout
        assert stream is not None
        received = 0
        async with stream:
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    break
                received += len(data)
        await process.wait()
        elapsed = time.perf_counter() - start
        _check(received == size, f"received {received} bytes")
        return elapsed

    async def subprocess_run() -> float:
        # Blocking on purpose: this is the synchronous alternative, and
        # nothing else runs in this trio loop meanwhile.
        elapsed = _subprocess_run(argv, size)
        await trio.lowlevel.checkpoint()
        return elapsed

    writers = 50
    each = config.pick(20 * _MB, 2 * _MB)
    many_argv = [HEAD, "-c", str(each), "/dev/zero"]

    async def ours_many(containment: str = "auto") -> float:
        start = time.perf_counter()
        async with trio_observer.open_session(containment=containment) as session:
            processes = [
                await session.start_process(many_argv, stdout=trio_observer.CAPTURE)
                for _ in range(writers)
            ]
        elapsed = time.perf_counter() - start
        for process in processes:
            log = process.stdout_log
            _check(log is not None and log.total_bytes == each, f"captured {log!r}")
        return elapsed

    async def on_trio_pipes(read: Callable[[trio.lowlevel.FdStream], Awaitable[int]]) -> float:
        # 50 trio pipes, each read to its end by a task of its own.
        received: list[int] = []

        async def drain(process: trio.Process) -> None:
            stream = process.stdout
            assert isinstance(stream, trio.lowlevel.FdStream)
            async with stream:
                received.append(await read(stream))
            await process.wait()

        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(writers):
                process = await trio.lowlevel.open_process(many_argv, stdout=subprocess.PIPE)
                nursery.start_soon(drain, process)
        elapsed = time.perf_counter() - start
        _check(received == [each] * writers, f"received {received} bytes")
        return elapsed

    async def count(stream: trio.lowlevel.FdStream) -> int:
        received = 0
        while data := await stream.receive_some(65536):
            received += len(data)
        return received

    async def pump(stream: trio.lowlevel.FdStream) -> int:
        # The capture alone, without the session: an OutputLog with the
        # default backlog, fed as the session's reader does (pipe grown to
        # 1 MiB where allowed, 256 KiB reads while it flows).
        log = trio_observer.OutputLog()
        grown = grow_pipe(stream.fileno())
        try:
            await pump_stream(stream, log, burst_size=BURST_SIZE if grown else None)
        finally:
            release_pipe(grown)
        return log.total_bytes

    trials: dict[str, Callable[[], Awaitable[float]]] = {
        "CAPTURE": ours,
        "CAPTURE process-group": functools.partial(ours, "process-group"),
        "receive_some loop": raw_trio,
        "subprocess.run": subprocess_run,
        f"CAPTURE x{writers}": ours_many,
        f"CAPTURE process-group x{writers}": functools.partial(ours_many, "process-group"),
        f"receive_some x{writers}": functools.partial(on_trio_pipes, count),
        f"pump_stream x{writers}": functools.partial(on_trio_pipes, pump),
    }
    # This process's CPU per trial as well: unlike the wall time, it hardly
    # moves with the machine's load, so it shows what the reader costs.
    cpu: dict[str, list[float]] = {name: [] for name in trials}
    trials = {name: _with_cpu(trial, cpu[name]) for name, trial in trials.items()}
    await interleave_async(trials, 1)
    for values in cpu.values():
        values.clear()
    samples = await interleave_async(trials, rounds)
    many = {k: v for k, v in samples.items() if f"x{writers}" in k}
    for key in many:
        del samples[key]
    label = f"{size // _MB} MB"
    return Report(
        rows=[
            _mb_row(
                f"capture {label}, containment=process-group: CAPTURE vs trio receive_some(65536)",
                size,
                median(samples["CAPTURE process-group"]),
                median(samples["receive_some loop"]),
                Target(">=", 0.9),
            ),
            _mb_row(
                f"capture {writers} x {each // _MB} MB at once, containment=process-group: "
                "CAPTURE vs receive_some",
                writers * each,
                median(many[f"CAPTURE process-group x{writers}"]),
                median(many[f"receive_some x{writers}"]),
                Target(">=", 0.9),
            ),
            _mb_row(
                f"ref: capture {label}, default containment, vs receive_some",
                size,
                median(samples["CAPTURE"]),
                median(samples["receive_some loop"]),
                None,
            ),
            _mb_row(
                f"ref: {writers} x CAPTURE, default containment, vs receive_some",
                writers * each,
                median(many[f"CAPTURE x{writers}"]),
                median(many[f"receive_some x{writers}"]),
                None,
            ),
            _mb_row(
                f"ref: {writers} x pump_stream, no session, vs receive_some",
                writers * each,
                median(many[f"pump_stream x{writers}"]),
                median(many[f"receive_some x{writers}"]),
                None,
            ),
            time_row(
                f"ref: capture {label}, this process's CPU: CAPTURE vs receive_some",
                median(cpu["CAPTURE"]),
                median(cpu["receive_some loop"]),
            ),
            time_row(
                f"ref: {writers} x {each // _MB} MB, this process's CPU: CAPTURE vs receive_some",
                median(cpu[f"CAPTURE x{writers}"]),
                median(cpu[f"receive_some x{writers}"]),
            ),
            time_row(
                f"ref: {writers} x {each // _MB} MB, this process's CPU: pump_stream vs "
                "receive_some",
                median(cpu[f"pump_stream x{writers}"]),
                median(cpu[f"receive_some x{writers}"]),
            ),
            _mb_row(
                f"capture {label}: CAPTURE vs subprocess.run",
                size,
                median(samples["CAPTURE"]),
                median(samples["subprocess.run"]),
                None,
            ),
        ],
        notes=[
            f"child `head -c {size} /dev/zero` on all sides; timed from spawn until every "
            f"byte is held (ours: until the session block ends, the log closed); "
            f"median of {rounds} rounds; the target rows use containment=process-group, "
            "the default-containment rows (auto: a cgroup where one can be made) add its "
            "placement; the CPU and subprocess.run rows use the default containment",
            f"captured pipes grown to 1 MiB: {_pipe_note()}",
            spread_note(samples, "receive_some loop", throughput=True),
            f"{writers} writers: `head -c {each} /dev/zero` each, all in one session with "
            "the default 1 MiB backlog per stream, against one receive_some(65536) task "
            f"per trio pipe; timed from the first spawn until every byte is held",
            spread_note(many, f"receive_some x{writers}", throughput=True),
        ],
    )


# -- lines ----------------------------------------------------------------

_LINES_CHILD = """
import sys
import tempfile
n = int(sys.argv[1])
write = sys.stdout.write
for start in range(0, n, 10000):
    write("".join([f"line {i} ok\\n" for i in range(start, min(n, start + 10000))]))
"""


def run_lines(config: Config) -> Report:
    """``cursor.lines()`` vs iterating a ``Popen`` stdout file object."""
    count = config.pick(1_000_000, 100_000)
    with tempfile.TemporaryDirectory(prefix="bench-lines-") as tmp:
        path = os.path.join(tmp, "lines.txt")
        with open(path, "w") as f:
            f.writelines(f"line {i} ok\n" for i in range(count))
        return trio.run(_measure_lines, config, count, path, os.path.getsize(path))


async def _measure_lines(config: Config, count: int, path: str, size: int) -> Report:
    rounds = config.pick(7, 1)
    children = {
        "cat": [CAT, path],
        "python": [sys.executable, "-c", _LINES_CHILD, str(count)],
    }

    async def ours(argv: list[str], batches: bool, containment: Containment) -> float:
        seen = gaps = 0
        start = time.perf_counter()
        async with trio_observer.open_session(containment=containment) as session:
            # The default backlog (1 MiB), as a user has it. The reader
            # cannot fall behind by more than a chunk or two: it runs in
            # the same thread as the session's pump, and each takes one
            # step per scheduling round. The check below would catch it.
            process = await session.start_process(argv, stdout=trio_observer.CAPTURE)
            log = process.stdout_log
            assert log is not None
            if batches:
                async for batch in log.cursor().line_batches():
                    if isinstance(batch, list):
                        # Touch every line, as the Popen loop does.
                        for _line in batch:
                            seen += 1
                    else:
                        gaps += 1
            else:
                async for line in log.cursor().lines():
                    if isinstance(line, str):
                        seen += 1
                    else:
                        gaps += 1
            await process.wait()
        elapsed = time.perf_counter() - start
        _check(seen == count and gaps == 0, f"{batches=}: {seen} lines, {gaps} gaps")
        return elapsed

    async def popen(argv: list[str]) -> float:
        # Blocking on purpose, as _subprocess_run.
        elapsed = _popen_lines(argv, count)
        await trio.lowlevel.checkpoint()
        return elapsed

    async def floor() -> float:
        # The async-for protocol alone, one await per line, over lines that
        # are already split: what any per-line async iterator pays at least.
        lines = [f"line {i} ok" for i in range(count)]
        lines.reverse()
        seen = 0
        start = time.perf_counter()
        async for _line in _ListIterator(lines):
            seen += 1
        elapsed = time.perf_counter() - start
        _check(seen == count, f"floor: {seen} lines")
        return elapsed

    async def generator_floor() -> float:
        # The same, through an async generator (what lines() runs on).
        lines = [f"line {i} ok" for i in range(count)]
        seen = 0
        start = time.perf_counter()
        async for _line in _yield_each(lines):
            seen += 1
        elapsed = time.perf_counter() - start
        _check(seen == count, f"generator floor: {seen} lines")
        return elapsed

    async def split_chunks(argv: list[str]) -> AsyncIterator[list[str]]:
        # A bare receive_some loop that decodes and splits each chunk, no session.
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        pending = ""
        process = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE)
        stream = process.stdout
        assert stream is not None
        async with stream:
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    break
                lines = (pending + decoder.decode(data)).split("\n")
                pending = lines.pop()
                yield lines
        await process.wait()
        _check(not pending, f"chunk split: {pending!r} left")

    async def chunk_split(argv: list[str]) -> float:
        # The floor for any trio reader that hands out every line a chunk at a time.
        seen = 0
        start = time.perf_counter()
        async for lines in split_chunks(argv):
            for _line in lines:
                seen += 1
        elapsed = time.perf_counter() - start
        _check(seen == count, f"chunk split: {seen} lines")
        return elapsed

    async def split_lines(argv: list[str]) -> AsyncIterator[str]:
        async for lines in split_chunks(argv):
            for line in lines:
                yield line

    async def chunk_split_each(argv: list[str]) -> float:
        # The floor for any trio reader that hands out every line one
        # async-for step at a time: the same, through an async generator.
        seen = 0
        start = time.perf_counter()
        async for _line in split_lines(argv):
            seen += 1
        elapsed = time.perf_counter() - start
        _check(seen == count, f"chunk split, line by line: {seen} lines")
        return elapsed

    trials: dict[str, Callable[[], Awaitable[float]]] = {
        "async-for floor": floor,
        "async generator floor": generator_floor,
        "chunk split cat": functools.partial(chunk_split, children["cat"]),
        "chunk split per line cat": functools.partial(chunk_split_each, children["cat"]),
    }
    for child, argv in children.items():
        trials[f"lines() {child}"] = functools.partial(ours, argv, False, "process-group")
        trials[f"line_batches() {child}"] = functools.partial(ours, argv, True, "process-group")
        trials[f"Popen {child}"] = functools.partial(popen, argv)
    trials["lines() auto cat"] = functools.partial(ours, children["cat"], False, "auto")
    trials["line_batches() auto cat"] = functools.partial(ours, children["cat"], True, "auto")
    await interleave_async(trials, 1)
    samples = await interleave_async(trials, rounds)
    return Report(
        rows=[
            time_row(
                f"{count} lines from cat: cursor.lines() vs Popen iteration",
                median(samples["lines() cat"]),
                median(samples["Popen cat"]),
                Target("<=", 1.5),
            ),
            time_row(
                f"{count} lines from cat: cursor.line_batches() vs Popen iteration",
                median(samples["line_batches() cat"]),
                median(samples["Popen cat"]),
                Target("<=", 1.0),
            ),
            time_row(
                f"{count} lines from cat: lines(), default containment, vs Popen",
                median(samples["lines() auto cat"]),
                median(samples["Popen cat"]),
            ),
            time_row(
                f"{count} lines from cat: line_batches(), default containment, vs Popen",
                median(samples["line_batches() auto cat"]),
                median(samples["Popen cat"]),
            ),
            time_row(
                "ref: bare trio receive_some + decode + split vs Popen (cat)",
                median(samples["chunk split cat"]),
                median(samples["Popen cat"]),
            ),
            time_row(
                "ref: the same, then an async generator step per line, vs Popen (cat)",
                median(samples["chunk split per line cat"]),
                median(samples["Popen cat"]),
            ),
            time_row(
                "ref: async-for over split lines (__anext__ class) vs Popen (cat)",
                median(samples["async-for floor"]),
                median(samples["Popen cat"]),
            ),
            time_row(
                "ref: async-for over split lines (async generator) vs Popen (cat)",
                median(samples["async generator floor"]),
                median(samples["Popen cat"]),
            ),
            time_row(
                f"{count} lines from python: cursor.lines() vs Popen iteration",
                median(samples["lines() python"]),
                median(samples["Popen python"]),
            ),
            time_row(
                f"{count} lines from python: cursor.line_batches() vs Popen iteration",
                median(samples["line_batches() python"]),
                median(samples["Popen python"]),
            ),
        ],
        notes=[
            f"`line <i> ok` lines (about {size / _MB:.1f} MB); child `cat` of a "
            "prepared file (so the reader dominates), or a Python child printing them in "
            "10000-line writes (the child dominates); timed from spawn to the last line read; "
            "ours with the default 1 MiB backlog, checked to lose no line, in a session "
            'with containment="process-group" except the two "default containment" rows '
            '(containment="auto": a cgroup where one can be made); '
            "ref rows: no session, trio.lowlevel.open_process; "
            f"Popen with text=True so both sides yield str; median of {rounds} rounds",
            spread_note({k: v for k, v in samples.items() if k.endswith("cat")}, "Popen cat"),
            spread_note({k: v for k, v in samples.items() if k.endswith("python")}, "Popen python"),
        ],
    )
