"""Sections ``pty`` and ``expect``: terminal output throughput and expect latency.

``pty`` times a child writing N bytes to its terminal until every byte is
in hand: ours is a session process started with ``pty=True``, timed until
the session block has ended (the reader has seen the terminal hang up and
closed ``process.pty.log``); the alternative is ``ptyprocess.PtyProcess.spawn``
with a ``read(65536)`` loop until ``EOFError``, the usual synchronous way.

``expect`` times how long a match takes to be noticed: a child on a terminal
waits for a line, then takes ``time.monotonic_ns()`` (the same system-wide
clock as ``time.perf_counter`` here) and writes ``MARK <ns> END``. The
latency is from that timestamp to ``expect`` returning in this process.
Ours is ``process.pty.log.expect(regex)`` after ``process.pty.write``; the
alternative is ``pexpect.spawn(...).sendline`` + ``expect(regex)``. One
long-lived child per side; round trips alternate between the two in blocks.
"""

from __future__ import annotations

import re
import statistics
import sys
import time
from collections.abc import Awaitable, Callable

# Neither ships type information; both are used through a few documented calls.
import pexpect  # type: ignore[import-untyped]
import ptyprocess  # type: ignore[import-untyped]
import trio

import trio_observer

from ._core import (
    Config,
    Report,
    Row,
    Target,
    fmt_seconds,
    interleave_async,
    median,
    ratio_spread,
    spread_note,
)

_MB = 1_000_000

_WRITER_CHILD = """
import os, sys
size = int(sys.argv[1])
block = b"x" * 65536
while size > 0:
    size -= os.write(1, block[: min(size, len(block))])
"""

_ECHO_CHILD = """
import os, sys, time
for line in sys.stdin:
    if line.strip() == "quit":
        break
    os.write(1, b"MARK %d END\\n" % time.monotonic_ns())
"""

MARK = re.compile(rb"MARK (\d+) END")


def _check(ok: bool, what: str) -> None:
    # A benchmark that silently lost data would time the wrong thing.
    if not ok:
        raise RuntimeError(f"benchmark data check failed: {what}")


# -- pty throughput ---------------------------------------------------------


def _ptyprocess_read(argv: list[str], size: int) -> float:
    start = time.perf_counter()
    child = ptyprocess.PtyProcess.spawn(argv)
    received = 0
    try:
        while True:
            try:
                received += len(child.read(65536))
            except EOFError:
                break
    finally:
        child.close(force=True)
    elapsed = time.perf_counter() - start
    _check(received == size, f"ptyprocess: {received} bytes")
    return elapsed


def run_throughput(config: Config) -> Report:
    """Terminal output throughput: ``pty=True`` vs ``ptyprocess``."""
    return trio.run(_measure_throughput, config)


async def _measure_throughput(config: Config) -> Report:
    size = config.pick(20 * _MB, 2 * _MB)
    # Both sides mostly wait for the kernel's tty layer, which moves the
    # bytes 4 KiB at a time; 9 rounds keep the median off one stray round.
    rounds = config.pick(9, 1)
    argv = [sys.executable, "-c", _WRITER_CHILD, str(size)]

    async def ours() -> float:
        start = time.perf_counter()
        async with trio_observer.open_session() as session:
            process = await session.start_process(argv, pty=True)
            await process.wait()
        # Leaving the session waits for the terminal reader to reach the hang-up.
        elapsed = time.perf_counter() - start
        pty = process.pty
        _check(pty is not None and pty.log.total_bytes == size, f"pty log of {process!r}")
        return elapsed

    async def alternative() -> float:
        # Blocking on purpose: the synchronous alternative, alone in this loop.
        elapsed = _ptyprocess_read(argv, size)
        await trio.lowlevel.checkpoint()
        return elapsed

    trials: dict[str, Callable[[], Awaitable[float]]] = {
        "pty=True": ours,
        "ptyprocess": alternative,
    }
    await interleave_async(trials, 1)
    samples = await interleave_async(trials, rounds)
    ours_s, alt_s = median(samples["pty=True"]), median(samples["ptyprocess"])
    return Report(
        rows=[
            Row(
                f"terminal output {size // _MB} MB: pty=True vs ptyprocess read(65536)",
                f"{size / ours_s / _MB:.0f} MB/s",
                f"{size / alt_s / _MB:.0f} MB/s",
                alt_s / ours_s,
                Target(">=", 1.0),
                ratio_spread(ours_s, alt_s, invert=True),
            )
        ],
        notes=[
            f"a Python child writing {size} bytes in 64 KiB os.write calls to its terminal; "
            "timed from spawn until every byte is held; ratio is throughput (higher is "
            f"better); median of {rounds} rounds, taken in turn",
            spread_note(samples, "ptyprocess", throughput=True),
        ],
    )


# -- expect latency ---------------------------------------------------------


def run_expect(config: Config) -> Report:
    """Latency from a child's write to ``expect`` returning, vs pexpect."""
    return trio.run(_measure_expect, config)


def _latency(match: re.Match[bytes] | None) -> float:
    now = time.monotonic_ns()
    if match is None:
        raise RuntimeError("benchmark data check failed: no MARK timestamp")
    return (now - int(match.group(1))) / 1e9


async def _measure_expect(config: Config) -> Report:
    per_block = 10
    rounds = config.pick(5, 1)
    argv = [sys.executable, "-c", _ECHO_CHILD]
    latencies: dict[str, list[float]] = {"expect": [], "pexpect": []}

    child = pexpect.spawn(argv[0], argv[1:], timeout=10)
    try:
        async with trio_observer.open_session() as session:
            process = await session.start_process(argv, pty=True)
            pty = process.pty
            assert pty is not None

            async def ours() -> float:
                total = 0.0
                for _ in range(per_block):
                    since = pty.log.total_bytes
                    await pty.write(b"go\n")
                    found = await pty.log.expect(MARK, since=since, timeout=10)
                    latency = _latency(found.match)
                    latencies["expect"].append(latency)
                    total += latency
                return total / per_block

            async def alternative() -> float:
                total = 0.0
                for _ in range(per_block):
                    # Blocking on purpose: pexpect is synchronous.
                    child.sendline("go")
                    child.expect(MARK)
                    latency = _latency(child.match)
                    latencies["pexpect"].append(latency)
                    total += latency
                await trio.lowlevel.checkpoint()
                return total / per_block

            trials: dict[str, Callable[[], Awaitable[float]]] = {
                "expect": ours,
                "pexpect": alternative,
            }
            await interleave_async(trials, 1)
            for values in latencies.values():
                values.clear()
            samples = await interleave_async(trials, rounds)
            await pty.write(b"quit\n")
            await process.wait()
    finally:
        child.close(force=True)

    ours_median = statistics.median(latencies["expect"])
    alt_median = statistics.median(latencies["pexpect"])
    return Report(
        rows=[
            Row(
                "expect latency, median: log.expect vs pexpect.expect",
                fmt_seconds(ours_median),
                fmt_seconds(alt_median),
                ours_median / alt_median,
                Target("<=", 1.0),
            ),
            Row(
                "expect latency, best: log.expect vs pexpect.expect",
                fmt_seconds(min(latencies["expect"])),
                fmt_seconds(min(latencies["pexpect"])),
                min(latencies["expect"]) / min(latencies["pexpect"]),
            ),
        ],
        notes=[
            f"{len(latencies['expect'])} round trips per side ({rounds} blocks of {per_block}, "
            "alternating); latency = from the child's monotonic_ns() just before its write "
            "to the match being returned here; median over all round trips",
            f"90th percentile: expect {fmt_seconds(_p90(latencies['expect']))}, "
            f"pexpect {fmt_seconds(_p90(latencies['pexpect']))}; "
            + spread_note(samples, "pexpect"),
        ],
    )


def _p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
