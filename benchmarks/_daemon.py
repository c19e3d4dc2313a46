"""Section ``daemon``: the daemon's costs against doing the same in process.

A real daemon process on a temporary socket. Rows:

- spawn + reap of ``true`` through the daemon (``start`` + ``wait``
  requests) vs in a session of this process;
- events per second to a remote subscriber draining a backlog (the events
  of the spawn rounds, buffered in its sink while it was away) vs a raw
  loop writing the very same frames to a Unix socket pair, batched as the
  daemon batches them (``_BATCH`` frames a write), and decoding them (the
  transport's ceiling: target >= 0.7x), and vs an in-process
  subscription receiving as many buffered events;
- resume latency: ``resume`` sent to first event frame received;
- the daemon's memory (RSS) per idle session and per idle subscription.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import trio

import trio_observer
from trio_observer import EventCategory, ObserverBackpressure
from trio_observer._daemon._handlers import _BATCH
from trio_observer._daemon._protocol import FrameDecoder, encode

from ._core import (
    Config,
    Report,
    Row,
    Target,
    fmt_bytes,
    fmt_seconds,
    interleave_async,
    median,
    rate_row,
    time_row,
)

TRUE = shutil.which("true") or "/bin/true"


def run(config: Config) -> Report:
    """Measure the daemon; see the module docstring."""
    return trio.run(_measure, config)


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


async def _raw_seconds(frames: list[dict[str, Any]], batch: int) -> float:
    """Seconds per frame: encode, write ``batch`` frames a ``send_all``, read, decode."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    writer = trio.SocketStream(trio.socket.from_stdlib_socket(a))
    reader = trio.SocketStream(trio.socket.from_stdlib_socket(b))
    received = 0

    async def write() -> None:
        for start in range(0, len(frames), batch):
            await writer.send_all(b"".join(map(encode, frames[start : start + batch])))

    start = time.perf_counter()
    async with writer, reader, trio.open_nursery() as nursery:
        nursery.start_soon(write)
        decoder = FrameDecoder()
        while received < len(frames):
            received += len(decoder.feed(await reader.receive_some(65536)))
    return (time.perf_counter() - start) / len(frames)


async def _remote_seconds(client: trio_observer.DaemonClient, sub_id: str, events: int) -> float:
    """Seconds per event of a ``resume`` from 0: every frame again, from the resend buffer."""
    start = time.perf_counter()
    resumed = await client.resume(sub_id)
    for _ in range(events):
        await resumed.__anext__()
    seconds = (time.perf_counter() - start) / events
    await resumed.aclose()
    return seconds


# Both sides hold their processes the same way: the daemon's default.
CONTAINMENT = "auto"


async def _in_process_rate(count: int) -> float:
    async with (
        trio_observer.open_session(containment=CONTAINMENT) as session,
        session.observers.subscribe(
            [EventCategory.LIFECYCLE], capacity=count * 2, report_missed=True
        ) as sub,
    ):
        for _ in range(count // 2):
            process = await session.start_process([TRUE])
            await process.wait()
        start = time.perf_counter()
        for _ in range(count - count % 2):
            await sub.receive()
        return (count - count % 2) / (time.perf_counter() - start)


async def _measure(config: Config) -> Report:
    processes = config.pick(500, 20)
    rounds = config.pick(7, 2)
    idle = config.pick(50, 5)
    directory = Path(tempfile.mkdtemp(prefix="trio-observer-bench-"))
    path = directory / "d" / "daemon.sock"
    read_fd, write_fd = os.pipe()
    daemon = subprocess.Popen(  # noqa: ASYNC220 - started once, before timing
        [
            sys.executable,
            "-m",
            "trio_observer",
            "daemon",
            "--socket",
            str(path),
            "--ready-fd",
            str(write_fd),
        ],
        pass_fds=[write_fd],
        stdin=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as ready:
        ready.read()
    try:
        async with trio_observer.connect(path, autostart=False) as client:
            created = await client.create_session("default", containment=CONTAINMENT)
            stream = await client.subscribe(capacity=processes * 2 + 16)
            sub_id = stream.result["id"]
            await stream.aclose()
            start = time.perf_counter()
            for index in range(processes):
                await client.start([TRUE], name=f"t{index}")
                await client.wait(f"t{index}")
            remote_spawn = (time.perf_counter() - start) / processes
            async with trio_observer.open_session(containment=CONTAINMENT) as session:
                start = time.perf_counter()
                for _ in range(processes):
                    process = await session.start_process([TRUE])
                    await process.wait()
                local_spawn = (time.perf_counter() - start) / processes
            events = processes * 2
            start = time.perf_counter()
            resumed = await client.resume(sub_id)
            frames = [await resumed.__anext__()]
            latency = time.perf_counter() - start
            while len(frames) < events:
                frames.append(await resumed.__anext__())
            drain_rate = events / (time.perf_counter() - start)
            await resumed.aclose()
            # The rounds resume from 0 again: the same frames, replayed from
            # the resend buffer in the daemon's batches, against raw loops
            # writing them one a write and batched as the daemon does.
            samples = await interleave_async(
                {
                    "remote": partial(_remote_seconds, client, sub_id, events),
                    "raw": partial(_raw_seconds, frames, 1),
                    "raw-batched": partial(_raw_seconds, frames, _BATCH),
                },
                rounds,
            )
            remote, raw, raw_batched = (
                median(samples[k]) for k in ("remote", "raw", "raw-batched")
            )
            local_rate = await _in_process_rate(events)

            base = _rss(daemon.pid)
            for index in range(idle):
                await client.create_session(f"idle{index}")
            per_session = (_rss(daemon.pid) - base) / idle
            base = _rss(daemon.pid)
            for _ in range(idle):
                s = await client.subscribe(
                    session="idle0", backpressure=ObserverBackpressure.DROP_OLDEST.value
                )
                await s.aclose()
            per_subscription = (_rss(daemon.pid) - base) / idle
            await client.shutdown()
            await client.wait_closed()
    finally:
        if daemon.poll() is None:
            daemon.terminate()
        daemon.wait()
        shutil.rmtree(directory, ignore_errors=True)
    return Report(
        rows=[
            time_row("spawn+reap true: daemon vs in-process", remote_spawn, local_spawn),
            rate_row(
                "events/s remote subscriber vs raw frame loop",
                remote,
                raw,
                Target(">=", 0.7),
            ),
            rate_row("events/s remote vs raw loop batched as the daemon", remote, raw_batched),
            rate_row("events/s remote vs in-process subscription", remote, 1 / local_rate),
            Row("resume latency (request to first event)", fmt_seconds(latency), "", None),
            Row("daemon RSS per idle session", fmt_bytes(per_session), "", None),
            Row("daemon RSS per idle subscription", fmt_bytes(per_subscription), "", None),
        ],
        notes=[
            f"{processes} processes, {events} events; {idle} idle sessions/subscriptions; "
            f"containment {created['containment']} on both sides; the events/s rows are the "
            f"median of {rounds} interleaved rounds, the others one round (the machine is "
            "shared: ratios, not absolute figures)",
            f"the first drain of the {events} events buffered in the sink: "
            f"{drain_rate / 1000:.1f} k/s",
        ],
    )
