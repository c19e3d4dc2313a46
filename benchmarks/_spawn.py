"""Section ``spawn``: start and reap ``/bin/true`` through a session.

Ours is ``await session.start_process([true])`` then ``await process.wait()``
in a session with one ``LIFECYCLE`` sink: ``DROP_OLDEST``, capacity 1024,
drained by a consumer task, so that both events of every process are built,
delivered and received inside the timed region. (With ``BLOCK`` the figure
would be the same as long as the consumer keeps up; ``DROP_OLDEST`` keeps a
slow round from turning into a stall.) A second session without any sink
shows what the observation costs on top of supervision.

The alternatives do the same work, start one process and reap it, in the
same run, block by block in turn: ``os.posix_spawn`` + ``os.waitpid`` (the
floor: no pipes, no bookkeeping), ``subprocess.run`` and
``trio.run_process``. Beside the wall time per process, one row compares
our own CPU time per spawn+reap (``time.process_time``: this process only,
the children's CPU is not in it) with that of the posix_spawn loop: on a
busy machine it moves less than the wall time.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Awaitable, Callable

import trio
import trio.testing

import trio_observer
from trio_observer import EventCategory, ObserverBackpressure

from ._core import Config, Report, Target, interleave_async, median, spread_note, time_row

TRUE = shutil.which("true") or "/bin/true"


def run(config: Config) -> Report:
    """Measure spawn + reap per process; see the module docstring."""
    return trio.run(_measure, config)


def _posix_spawn_block(count: int) -> float:
    env = os.environ
    start = time.perf_counter()
    for _ in range(count):
        pid = os.posix_spawn(TRUE, [TRUE], env)
        os.waitpid(pid, 0)
    return (time.perf_counter() - start) / count


def _subprocess_block(count: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
        subprocess.run([TRUE], check=True)
    return (time.perf_counter() - start) / count


async def _drain(events: trio.MemoryReceiveChannel[trio_observer.ObserverEvent]) -> None:
    async for _ in events:
        pass


async def _measure(config: Config) -> Report:
    per_block = config.pick(5, 3)
    rounds = config.pick(100, 3)

    async with (
        trio.open_nursery() as consumers,
        # Process groups: the cgroup placement's cost is the cgroup
        # section's (it compares the two containments).
        trio_observer.open_session(containment="process-group") as observed,
        trio_observer.open_session(containment="process-group") as bare,
    ):
        _, events = observed.observers.add_channel(
            [EventCategory.LIFECYCLE], 1024, ObserverBackpressure.DROP_OLDEST
        )
        consumers.start_soon(_drain, events)

        def session_block(session: trio_observer.Session) -> Callable[[], Awaitable[float]]:
            async def block() -> float:
                start = time.perf_counter()
                for _ in range(per_block):
                    process = await session.start_process([TRUE])
                    await process.wait()
                return (time.perf_counter() - start) / per_block

            return block

        async def trio_block() -> float:
            start = time.perf_counter()
            for _ in range(per_block):
                await trio.run_process([TRUE])
            return (time.perf_counter() - start) / per_block

        cpu: dict[str, list[float]] = {name: [] for name in ("session+sink", "posix_spawn")}

        def settled(
            name: str, block: Callable[[], Awaitable[float]]
        ) -> Callable[[], Awaitable[float]]:
            async def run() -> float:
                # Untimed: let the consumer and supervisors of the previous
                # block finish, so no trial pays for another one's leftovers.
                await trio.testing.wait_all_tasks_blocked()
                # Our own CPU time too (children not included): on a busy
                # machine it moves less than the wall time, which then
                # depends on when the scheduler runs us and the child.
                start = time.process_time()
                seconds = await block()
                if name in cpu:
                    cpu[name].append((time.process_time() - start) / per_block)
                return seconds

            return run

        async def posix_block() -> float:
            return _posix_spawn_block(per_block)

        async def subprocess_block() -> float:
            return _subprocess_block(per_block)

        trials: dict[str, Callable[[], Awaitable[float]]] = {
            "session+sink": session_block(observed),
            "session": session_block(bare),
            "posix_spawn": posix_block,
            "subprocess.run": subprocess_block,
            "trio.run_process": trio_block,
        }
        settled_trials = {name: settled(name, block) for name, block in trials.items()}
        # One untimed round warms caches, imports and trio's thread pool.
        await interleave_async(settled_trials, 1)
        for rounds_cpu in cpu.values():
            rounds_cpu.clear()
        samples = await interleave_async(settled_trials, rounds)

    status_note = (
        "ours = start_process + wait in a session with one LIFECYCLE sink "
        "(DROP_OLDEST, capacity 1024, drained by a consumer task); containment=process-group"
    )
    ours = median(samples["session+sink"])
    floor = median(samples["posix_spawn"])
    return Report(
        rows=[
            time_row("spawn+reap true vs posix_spawn+waitpid", ours, floor, Target("<=", 1.10)),
            time_row("spawn+reap true vs subprocess.run", ours, median(samples["subprocess.run"])),
            time_row(
                "spawn+reap true vs trio.run_process", ours, median(samples["trio.run_process"])
            ),
            time_row(
                "our CPU per spawn+reap vs posix_spawn+waitpid's",
                median(cpu["session+sink"]),
                median(cpu["posix_spawn"]),
            ),
            time_row("session without sink vs posix_spawn", median(samples["session"]), floor),
            time_row(
                "ref: subprocess.run vs posix_spawn", median(samples["subprocess.run"]), floor
            ),
            time_row(
                "ref: trio.run_process vs posix_spawn", median(samples["trio.run_process"]), floor
            ),
        ],
        notes=[
            status_note,
            f"median of {rounds} rounds x {per_block} processes each, trials interleaved",
            spread_note(samples, "posix_spawn"),
        ],
    )
