"""Section ``otel``: the cost of OpenTelemetry export.

Per event: one event through :meth:`OTelExporter.emit` (attributes
built, a log record handed to the SDK's ``BatchLogRecordProcessor`` whose
exporter does nothing, the metrics it moves recorded on an SDK
``MeterProvider``) vs ``emit_nowait`` of the same event to one
``DROP_OLDEST`` sink: what a consumer pays per event on top of receiving it.

A build: the wall time of a 500-process "build" (``/bin/true``, 8 at
a time) in a session exported by ``export_session`` vs the same build in a
session without the exporter, rounds taken in turn, and the CPU the trio
thread spent in the same rounds.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

from trio_observer import (
    EventCategory,
    ObserverBackpressure,
    ObserverEvent,
    ObserverEventKind,
    ObserverRegistry,
    OTelExporter,
    ResourceUsage,
    Session,
    TerminationOutcome,
    open_session,
)

from ._core import (
    Config,
    Report,
    Target,
    interleave,
    interleave_async,
    median,
    spread_note,
    time_row,
)

TRUE = shutil.which("true") or "/bin/true"


def _events(count: int) -> list[ObserverEvent]:
    # Started/exited pairs, as a build makes them: both paths of the
    # exporter, and each exit with the resource usage a session with cgroup
    # containment reports (five of its fields known).
    out = []
    for i in range(count // 2):
        pid = 10_000 + i
        out.append(
            ObserverEvent(
                category=EventCategory.LIFECYCLE,
                kind=ObserverEventKind.STARTED,
                pid=pid,
                ppid=1,
                timestamp_ms=float(i),
                argv=(TRUE, "--flag"),
            )
        )
        out.append(
            ObserverEvent(
                category=EventCategory.LIFECYCLE,
                kind=ObserverEventKind.EXITED,
                pid=pid,
                ppid=1,
                timestamp_ms=float(i) + 0.5,
                exit_code=0,
                termination=TerminationOutcome.NATURAL_EXIT,
                resources=ResourceUsage(
                    user_seconds=0.001,
                    system_seconds=0.0,
                    max_rss_bytes=27_222_016,
                    cgroup_user_seconds=0.0,
                    cgroup_system_seconds=0.0,
                ),
            )
        )
    return out


def _sdk() -> tuple[Any, Any]:
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs.export import BatchLogRecordProcessor, LogRecordExporter
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    class NoOpExporter(LogRecordExporter):
        def export(self, batch: Sequence[Any]) -> Any:
            from opentelemetry.sdk._logs.export import LogRecordExportResult

            return LogRecordExportResult.SUCCESS

        def shutdown(self) -> None:
            pass

        def force_flush(self, timeout_millis: int = 30_000) -> bool:
            return True

    logger_provider = LoggerProvider()
    logger_provider.add_log_record_processor(BatchLogRecordProcessor(NoOpExporter()))
    return logger_provider, MeterProvider(metric_readers=[InMemoryMetricReader()])


def run_event(config: Config) -> Report:
    """Per-event cost of ``OTelExporter.emit`` vs ``emit_nowait`` to one sink."""
    count = config.pick(2048, 256)
    rounds = config.pick(15, 2)
    events = _events(count)
    logger_provider, meter_provider = _sdk()
    exporter = OTelExporter(logger_provider=logger_provider, meter_provider=meter_provider)
    registry = ObserverRegistry()
    _, receive = registry.add_channel(
        [EventCategory.LIFECYCLE], count, ObserverBackpressure.DROP_OLDEST
    )

    def ours() -> float:
        start = time.perf_counter()
        for event in events:
            exporter.emit(event, session_id="bench")
        elapsed = time.perf_counter() - start
        # Let the batch worker empty its queue outside the timed region, so
        # that no round drops records (2048 is the SDK's queue size).
        logger_provider.force_flush()
        return elapsed / count

    def alternative() -> float:
        start = time.perf_counter()
        for event in events:
            registry.emit_nowait(event)
        elapsed = time.perf_counter() - start
        while True:
            try:
                receive.receive_nowait()
            except trio.WouldBlock:
                break
        return elapsed / count

    trials = {"otel": ours, "sink": alternative}
    interleave(trials, 1)
    samples = interleave(trials, rounds)
    logger_provider.shutdown()
    meter_provider.shutdown()
    return Report(
        rows=[
            time_row(
                "OTelExporter.emit vs emit_nowait to a DROP_OLDEST sink, per event",
                median(samples["otel"]),
                median(samples["sink"]),
            )
        ],
        notes=[
            f"median of {rounds} rounds x {count} events (started/exited pairs, exits with "
            "resource usage); ours: attributes, Logger.emit into a BatchLogRecordProcessor "
            "with a no-op exporter, counters and histogram on an SDK MeterProvider",
            spread_note(samples, "sink"),
        ],
    )


def run(config: Config) -> Report:
    """Both measurements, as one section."""
    event, build = run_event(config), run_build(config)
    return Report(rows=event.rows + build.rows, notes=event.notes + build.notes)


def run_build(config: Config) -> Report:
    """Wall time of a 500-process build, exported vs not exported."""
    return trio.run(_measure_build, config)


async def _discard(
    session: Session, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    # What export_session does, less the export: the cost of having a
    # consumer at all (events built and routed, the task woken once for
    # everything buffered, as export_session drains).
    async with session.observers.subscribe(
        [EventCategory.LIFECYCLE], capacity=1024, report_missed=True
    ) as subscription:
        task_status.started()
        while True:
            try:
                await subscription.receive()
            except trio.EndOfChannel:
                return
            while True:
                try:
                    subscription.receive_nowait()
                except trio.WouldBlock:
                    break
                except trio.EndOfChannel:
                    return


async def _build(
    processes: int,
    exporter: OTelExporter | None,
    consume: bool = False,
    cpu: list[float] | None = None,
) -> float:
    """Wall seconds of one build; its CPU seconds on this (the trio) thread go to ``cpu``."""
    start, start_cpu = time.perf_counter(), time.thread_time()
    async with trio.open_nursery() as nursery, open_session() as session:
        if exporter is not None:
            await nursery.start(exporter.export_session, session)
        elif consume:
            await nursery.start(_discard, session)
        limit = trio.CapacityLimiter(8)

        async def one() -> None:
            async with limit:
                await session.run_process([TRUE])

        async with trio.open_nursery() as build:
            for _ in range(processes):
                build.start_soon(one)
    if cpu is not None:
        cpu.append(time.thread_time() - start_cpu)
    return time.perf_counter() - start


async def _measure_build(config: Config) -> Report:
    processes = config.pick(500, 50)
    rounds = config.pick(11, 1)
    logger_provider, meter_provider = _sdk()
    exporter = OTelExporter(logger_provider=logger_provider, meter_provider=meter_provider)

    # The trio thread's CPU per round: the machine's other load moves it far
    # less than the wall time, and it is what the export adds to the
    # session's own thread.
    cpu: dict[str, list[float]] = {"exported": [], "plain": [], "consumed": []}

    async def exported() -> float:
        return await _build(processes, exporter, cpu=cpu["exported"])

    async def plain() -> float:
        return await _build(processes, None, cpu=cpu["plain"])

    async def consumed() -> float:
        return await _build(processes, None, consume=True, cpu=cpu["consumed"])

    trials: dict[str, Callable[[], Awaitable[float]]] = {
        "exported": exported,
        "plain": plain,
        "consumed": consumed,
    }
    samples = await interleave_async(trials, rounds)
    status = exporter.status()
    logger_provider.shutdown()
    meter_provider.shutdown()
    return Report(
        rows=[
            time_row(
                f"{processes}-process build, exported vs not",
                median(samples["exported"]),
                median(samples["plain"]),
                Target("<=", 1.1),
            ),
            time_row(
                f"{processes}-process build, exported vs a consumer that discards",
                median(samples["exported"]),
                median(samples["consumed"]),
            ),
            time_row(
                f"{processes}-process build, trio-thread CPU, exported vs not",
                median(cpu["exported"]),
                median(cpu["plain"]),
            ),
            time_row(
                f"{processes}-process build, trio-thread CPU, exported vs a consumer",
                median(cpu["exported"]),
                median(cpu["consumed"]),
            ),
        ],
        notes=[
            f"median of {rounds} rounds, taken in turn; /bin/true, 8 at a time, "
            "default containment (auto); exported: export_session into a "
            "BatchLogRecordProcessor with a no-op exporter and an SDK MeterProvider; "
            "consumer: a DROP_OLDEST subscription drained and discarded, no export",
            spread_note(samples, "plain"),
            "trio-thread CPU: time.thread_time() of the thread trio runs on, the same rounds "
            "(the SDK's own threads not counted; with a no-op exporter they do little)",
            f"records emitted {status.records_emitted}, events missed {status.events_missed}",
        ],
    )
