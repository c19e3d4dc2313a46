"""The exporter's cost per event: what it takes from its subscription per wakeup."""

from __future__ import annotations

import trio
import trio.testing
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from trio_observer import (
    EventCategory,
    ObserverEvent,
    ObserverEventKind,
    OTelExporter,
    open_session,
)


class TaskSteps(trio.abc.Instrument):
    """Counts how many times one task is run by the scheduler."""

    def __init__(self) -> None:
        self.task: trio.lowlevel.Task | None = None
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task:
            self.steps += 1


async def test_the_exporter_takes_everything_buffered_in_one_wakeup() -> None:
    """Woken once for a burst, not once per event: a schedule point per
    event was a large part of the export's cost in a build."""
    memory = InMemoryLogRecordExporter()  # type: ignore[no-untyped-call]
    provider = LoggerProvider()
    provider.add_log_record_processor(SimpleLogRecordProcessor(memory))
    reader = InMemoryMetricReader()
    exporter = OTelExporter(
        logger_provider=provider, meter_provider=MeterProvider(metric_readers=[reader])
    )
    steps = TaskSteps()
    async with trio.open_nursery() as nursery, open_session() as session:

        async def export(task_status: trio.TaskStatus[None]) -> None:
            steps.task = trio.lowlevel.current_task()
            await exporter.export_session(session, task_status=task_status)

        await nursery.start(export)
        await trio.testing.wait_all_tasks_blocked()
        trio.lowlevel.add_instrument(steps)
        for pid in range(1, 101):
            session.observers.emit_nowait(
                ObserverEvent(
                    category=EventCategory.LIFECYCLE,
                    kind=ObserverEventKind.STARTED,
                    pid=pid,
                    timestamp_ms=0.0,
                )
            )
        await trio.testing.wait_all_tasks_blocked()
        trio.lowlevel.remove_instrument(steps)
        assert steps.steps == 1
        pids = [(r.log_record.attributes or {})["process.pid"] for r in memory.get_finished_logs()]
        assert pids == list(range(1, 101))
    provider.shutdown()
    status = exporter.status()
    assert (status.records_emitted, status.events_missed) == (100, 0)
