"""The OTel exporter's own accounting: failed exports, and starts never paired with an exit."""

from __future__ import annotations

import io
from typing import Any

import pytest
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import (
    ConsoleLogRecordExporter,
    InMemoryLogRecordExporter,
    LogRecordExportResult,
    SimpleLogRecordProcessor,
)
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from trio_observer import EventCategory, ObserverEvent, ObserverEventKind, OTelExporter


def event(kind: ObserverEventKind, pid: int, at: float = 0.0) -> ObserverEvent:
    return ObserverEvent(
        category=EventCategory.LIFECYCLE, kind=kind, pid=pid, timestamp_ms=at, exit_code=0
    )


def metric_sum(reader: InMemoryMetricReader, name: str) -> float:
    data = reader.get_metrics_data()
    assert data is not None
    total = 0.0
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == name:
                    total += sum(getattr(p, "value", 0) for p in metric.data.data_points)
    return total


def real_records(count: int) -> Any:
    """Log records as the SDK hands them to an exporter."""
    provider = LoggerProvider()
    memory = InMemoryLogRecordExporter()  # type: ignore[no-untyped-call]
    provider.add_log_record_processor(SimpleLogRecordProcessor(memory))
    exporter = OTelExporter(logger_provider=provider)
    for pid in range(count):
        exporter.emit(event(ObserverEventKind.STARTED, pid + 1))
    provider.shutdown()
    return memory.get_finished_logs()


def test_an_exporter_that_raises_returns_failure_and_counts_the_batch() -> None:
    """The SDK's contract: export() returns a LogRecordExportResult, never None."""
    closed = io.StringIO()
    closed.close()  # writing raises ValueError: the exporter itself fails
    exporter = OTelExporter()
    counting = exporter.count_exports(ConsoleLogRecordExporter(out=closed))
    batch = real_records(3)
    assert len(batch) == 3
    assert counting.export(batch) is LogRecordExportResult.FAILURE
    status = exporter.status()
    assert status.export_failures == 3
    assert status.records_exported == 0
    assert status.first_export_error is not None
    assert "ValueError" in status.first_export_error
    # A working exporter's result is handed back as it was.
    memory = InMemoryLogRecordExporter()  # type: ignore[no-untyped-call]
    assert exporter.count_exports(memory).export(batch) is LogRecordExportResult.SUCCESS
    assert exporter.status().records_exported == 3


def test_a_reused_pid_whose_exit_was_missed_leaves_the_running_count_exact() -> None:
    reader = InMemoryMetricReader()
    exporter = OTelExporter(meter_provider=MeterProvider(metric_readers=[reader]))
    exporter.emit(event(ObserverEventKind.STARTED, 7))
    # Its exit was missed (a full sink); the pid comes back for a new process.
    exporter.emit(event(ObserverEventKind.STARTED, 7))
    exporter.emit(event(ObserverEventKind.EXITED, 7))
    assert metric_sum(reader, "trio_observer.processes.started") == 2
    assert metric_sum(reader, "trio_observer.processes.running") == 0
    assert exporter.status().starts_forgotten == 1


def test_starts_without_exits_are_bounded_and_counted() -> None:
    reader = InMemoryMetricReader()
    exporter = OTelExporter(meter_provider=MeterProvider(metric_readers=[reader]), max_tracked=50)
    for pid in range(1, 1001):
        exporter.emit(event(ObserverEventKind.STARTED, pid))
    status = exporter.status()
    assert status.starts_forgotten == 950
    # running == started - exits paired - forgotten, and only the 50
    # remembered are counted as running.
    assert metric_sum(reader, "trio_observer.processes.running") == 50
    # A remembered process's exit is paired (duration recorded); a
    # forgotten one's is counted as an exit only.
    exporter.emit(event(ObserverEventKind.EXITED, 1000, at=5.0))
    exporter.emit(event(ObserverEventKind.EXITED, 1, at=5.0))
    assert metric_sum(reader, "trio_observer.processes.exited") == 2
    assert metric_sum(reader, "trio_observer.processes.running") == 49
    assert exporter.status().starts_forgotten == 950


@pytest.mark.parametrize(("value", "error"), [(0, ValueError), (1.5, TypeError), (True, TypeError)])
def test_max_tracked_is_checked(value: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="max_tracked"):
        OTelExporter(max_tracked=value)  # type: ignore[arg-type]


def test_every_exporter_on_one_meter_provider_is_counted() -> None:
    """The SDK keeps one instrument per name: a second exporter's counts
    must add to the first's, not be dropped with its callbacks."""
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    first, second = (OTelExporter(meter_provider=provider) for _ in range(2))
    first.emit(event(ObserverEventKind.STARTED, 1))
    second.emit(event(ObserverEventKind.STARTED, 2))
    second.emit(event(ObserverEventKind.STARTED, 3))
    second.emit(event(ObserverEventKind.EXITED, 3))
    assert metric_sum(reader, "trio_observer.processes.started") == 3
    assert metric_sum(reader, "trio_observer.processes.exited") == 1
    assert metric_sum(reader, "trio_observer.processes.running") == 2
    # Another provider has counts of its own.
    other = InMemoryMetricReader()
    OTelExporter(meter_provider=MeterProvider(metric_readers=[other])).emit(
        event(ObserverEventKind.STARTED, 1)
    )
    assert metric_sum(other, "trio_observer.processes.started") == 1
    assert metric_sum(reader, "trio_observer.processes.started") == 3
