"""OpenTelemetry export: each event a log record, and metrics, through the API only.

opentelemetry is imported when an :class:`OTelExporter` is made, never when
``trio_observer`` is: the core keeps trio as its one runtime dependency.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Generic, TypeVar, final

import trio

from ._events import EventCategory, ObserverEvent, ObserverEventKind, TerminationOutcome
from ._otel_records import (
    EVENT_NAMES,
    EXITS,
    STARTS,
    event_attributes,
    exit_class,
    record_body,
    warns,
)
from ._output import OutputLog
from ._session import Session
from ._sink import ObserverBackpressure
from ._subscription import MissedEvents, Subscription

if TYPE_CHECKING:
    from opentelemetry._logs import Logger, LoggerProvider
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.sdk._logs.export import LogRecordExporter

_log = logging.getLogger("trio_observer.otel")
KeyT = TypeVar("KeyT", bound=Hashable)

SCOPE_NAME: Final = "trio_observer"
# Shared, never changed: handed to the SDK with every measurement.
_CATEGORY_ATTRIBUTES: Final = {c: {"trio_observer.category": c.value} for c in EventCategory}


def _exit_attributes(key: tuple[EventCategory, str, TerminationOutcome | None]) -> dict[str, str]:
    category, exit_kind, termination = key
    out = {**_CATEGORY_ATTRIBUTES[category], "trio_observer.exit.class": exit_kind}
    if termination is not None:
        out["trio_observer.termination"] = termination.value
    return out


@final
class _Sums(Generic[KeyT]):
    """Sums by attribute set, for an observable counter.

    Added to on the trio thread, read by the SDK's collecting thread (its
    metric reader's), hence the lock; ``attributes`` makes a key's attribute
    set the first time the key is seen.
    """

    def __init__(self, observation: Any, attributes: Callable[[KeyT], dict[str, str]]) -> None:
        self._observation = observation
        self._attributes = attributes
        self._lock = threading.Lock()
        self._sums: dict[KeyT, list[Any]] = {}  # key -> [sum, attributes]

    def add(self, key: KeyT, amount: int = 1) -> None:
        with self._lock:
            entry = self._sums.get(key)
            if entry is None:
                entry = self._sums[key] = [0, self._attributes(key)]
            entry[0] += amount

    def observe(self, options: Any) -> list[Any]:
        """The SDK's callback: one observation per attribute set."""
        with self._lock:
            return [
                self._observation(total, attributes) for total, attributes in self._sums.values()
            ]


@final
class _ProcessCounts:
    """The running, started and exited counts, as observable instruments.

    Kept here and read by the SDK when it collects, exported as the same
    Sums as a counter's: a dict update per event instead of an SDK
    measurement, which cleans and hashes its attributes each time (most of
    the export's cost in the profile of a build). One per meter provider,
    shared by its exporters: the SDK keeps one instrument per name, and
    would ignore the callbacks of a second exporter's.
    """

    def __init__(self, meter: Any, observation: Any) -> None:
        self.running = _Sums(observation, _CATEGORY_ATTRIBUTES.__getitem__)
        self.started = _Sums(observation, _CATEGORY_ATTRIBUTES.__getitem__)
        self.exited = _Sums(observation, _exit_attributes)
        meter.create_observable_up_down_counter(
            "trio_observer.processes.running",
            [self.running.observe],
            unit="{process}",
            description="Processes started and not yet exited",
        )
        meter.create_observable_counter(
            "trio_observer.processes.started",
            [self.started.observe],
            unit="{process}",
            description="Processes started",
        )
        meter.create_observable_counter(
            "trio_observer.processes.exited",
            [self.exited.observe],
            unit="{process}",
            description="Processes exited",
        )


_counts_lock = threading.Lock()
# Each meter provider's counts, and those of the global provider: the
# global one, set or not yet (a proxy that forwards to the provider set
# later), is one provider for all its exporters.
_counts: weakref.WeakKeyDictionary[Any, _ProcessCounts] = weakref.WeakKeyDictionary()


class _GlobalProvider:
    """The key of the global meter provider's counts."""


_GLOBAL: Final = _GlobalProvider()


def _process_counts(meter_provider: Any, meter: Any, observation: Any) -> _ProcessCounts:
    key = _GLOBAL if meter_provider is None else meter_provider
    with _counts_lock:
        try:
            counts = _counts.get(key)
        except TypeError:  # a provider that cannot be weakly referenced
            return _ProcessCounts(meter, observation)
        if counts is None:
            counts = _counts[key] = _ProcessCounts(meter, observation)
        return counts


def _import_api() -> Any:
    try:
        from opentelemetry import _logs, metrics
    except ImportError as exc:
        raise ImportError(
            "OpenTelemetry export needs the opentelemetry-api package: "
            "pip install 'trio-observer[otel]'"
        ) from exc
    return _logs, metrics


@final
@dataclass(frozen=True, slots=True)
class OTelExportStatus:
    """What an :class:`OTelExporter` has done so far."""

    records_emitted: int
    """Log records handed to the logger (one per event received)."""
    events_missed: int
    """Events the exporter's own subscription lost because the exporter
    fell behind (its sink was full): never seen, so never exported."""
    emit_errors: int
    """Records the logger refused with an exception; counted, never raised."""
    records_exported: int
    """Records an exporter wrapped with :meth:`OTelExporter.count_exports`
    sent successfully (0 if none was wrapped)."""
    export_failures: int
    """Records in batches that exporter failed to send (the receiver
    refused them or could not be reached)."""
    first_export_error: str | None
    """What went wrong with the first failed batch, for the report."""
    starts_forgotten: int = 0
    """Starts no exit was paired with: the exporter remembers at most
    ``max_tracked`` running processes, and a start beyond that forgets the
    oldest (its exit was most likely missed), as does a start whose pid the
    exporter still remembers (the pid was reused). Each is taken off
    ``trio_observer.processes.running`` when forgotten, so that count is
    exactly the starts seen minus the exits paired minus this; a forgotten
    process's exit, if it comes, is counted in ``processes.exited`` only."""


@final
class OTelExporter:
    """Turn a session's events into OpenTelemetry log records and metrics.

    Only the OpenTelemetry *API* is used: records and measurements go to the
    providers you pass (or the global ones your application installed with
    ``opentelemetry._logs.set_logger_provider`` and
    ``opentelemetry.metrics.set_meter_provider``), and your SDK's processors
    and exporters decide where they go. ``docs/otel.md`` lists each record's
    attributes and each metric.

    ::

        exporter = OTelExporter()
        async with trio.open_nursery() as nursery, open_session() as session:
            await nursery.start(exporter.export_session, session)
            await session.run_process(["make"])

    Args:
      logger_provider: Where log records go (default: the global provider).
      meter_provider: Where metrics go (default: the global provider).
      command_args: Also record ``process.command_args``, the full command
        line. Off by default, as the process semantic conventions ask:
        command lines often carry secrets.
      max_tracked: How many started, not yet exited processes the exporter
        remembers, to pair each exit with its start (for the running count
        and the duration). A process whose exit the exporter missed (its
        sink was full) would otherwise be remembered for ever; beyond this
        many, the oldest is forgotten and counted in ``starts_forgotten``.

    Raises:
      ImportError: opentelemetry-api is not installed; the message names the
        ``otel`` extra.
      TypeError, ValueError: ``command_args`` is not a bool, or
        ``max_tracked`` is not an int >= 1.
    """

    def __init__(
        self,
        *,
        logger_provider: LoggerProvider | None = None,
        meter_provider: MeterProvider | None = None,
        command_args: bool = False,
        max_tracked: int = 65536,
    ) -> None:
        if not isinstance(command_args, bool):
            raise TypeError(f"command_args must be a bool, not {command_args!r}")
        if not isinstance(max_tracked, int) or isinstance(max_tracked, bool):
            raise TypeError(f"max_tracked must be an int, not {max_tracked!r}")
        if max_tracked < 1:
            raise ValueError(f"max_tracked must be >= 1, not {max_tracked}")
        logs_api, metrics_api = _import_api()
        # Absolute, and here: the package is fully imported by now.
        from trio_observer import __version__

        self._logger: Logger = (
            logger_provider.get_logger(SCOPE_NAME, __version__)
            if logger_provider is not None
            else logs_api.get_logger(SCOPE_NAME, __version__)
        )
        meter = (
            meter_provider.get_meter(SCOPE_NAME, __version__)
            if meter_provider is not None
            else metrics_api.get_meter(SCOPE_NAME, __version__)
        )
        self._warn = (logs_api.SeverityNumber.WARN, "WARN")
        self._info = (logs_api.SeverityNumber.INFO, "INFO")
        self._command_args = command_args
        counts = _process_counts(meter_provider, meter, metrics_api.Observation)
        self._running, self._started, self._exited = counts.running, counts.started, counts.exited
        self._duration = meter.create_histogram(
            "trio_observer.process.duration",
            unit="s",
            description="Time from a process's start to its exit, as observed",
        )
        self._missed = meter.create_counter(
            "trio_observer.events.missed",
            unit="{event}",
            description="Events a sink did not receive because it was full",
        )
        self._lost = meter.create_counter(
            "trio_observer.observation.lost",
            unit="{record}",
            description="Records the observer itself lost (OBSERVATION_LOST events)",
        )
        self._dropped = meter.create_counter(
            "trio_observer.output.dropped",
            unit="By",
            description="Captured output bytes evicted before any reader took them",
        )
        self.export_lost = meter.create_counter(
            "trio_observer.export.lost",
            unit="{record}",
            description="Log records that could not be exported",
        )
        """Counter of records not exported, by ``reason``; the CLI's SDK
        pipeline adds what its exporter and batch queue lost."""
        self._emitted = 0
        self._events_missed = 0
        self._emit_errors = 0
        # Written by the SDK's export thread, read by status().
        self._export_lock = threading.Lock()
        self._exported = 0
        self._export_failures = 0
        self._first_export_error: str | None = None
        # pid -> start time of the processes seen starting and not exiting,
        # oldest first (dicts keep insertion order): bounded, see _forget.
        self._start_ms: dict[int, tuple[float, EventCategory]] = {}
        self._max_tracked = max_tracked
        self._starts_forgotten = 0
        self._logs: dict[OutputLog, tuple[str, int]] = {}

    def status(self) -> OTelExportStatus:
        """The exporter's counters."""
        with self._export_lock:
            return OTelExportStatus(
                self._emitted,
                self._events_missed,
                self._emit_errors,
                self._exported,
                self._export_failures,
                self._first_export_error,
                self._starts_forgotten,
            )

    def count_exports(self, log_exporter: LogRecordExporter) -> LogRecordExporter:
        """Wrap an SDK log exporter so that every record it fails to send is counted.

        Hand the result to your ``BatchLogRecordProcessor``. Failed batches
        (an error status from the receiver, a receiver that cannot be
        reached, an exception) are added to ``export_failures`` and to the
        ``trio_observer.export.lost`` metric with ``reason="export-failed"``,
        and the first is logged once on the ``trio_observer.otel`` logger.
        The batch processor drops records silently when its queue is full;
        after the provider's ``shutdown()``, ``records_emitted -
        records_exported - export_failures`` is that number.

        Args:
          log_exporter: An ``opentelemetry.sdk._logs.export.LogRecordExporter``
            such as ``OTLPLogExporter()``.

        Raises:
          ImportError: the SDK is not installed (it is what calls exporters).
        """
        try:
            from opentelemetry.sdk._logs import export as sdk_export
        except ImportError as exc:
            raise ImportError(
                "count_exports() wraps an OpenTelemetry SDK exporter: "
                "pip install 'trio-observer[otel-cli]'"
            ) from exc
        # LogRecordExportResult since SDK 1.40; LogExportResult (deprecated
        # since) before it. Both have SUCCESS and FAILURE.
        result_type: Any = getattr(sdk_export, "LogRecordExportResult", None)
        if result_type is None:
            result_type = sdk_export.LogExportResult
        failure = result_type.FAILURE
        owner = self

        class CountingExporter(sdk_export.LogRecordExporter):
            def export(self, batch: Any) -> Any:
                # The processor calling us reads a result, never None: an
                # exception (the receiver unreachable, a bug) is a FAILURE,
                # counted like one the exporter returned.
                try:
                    result = log_exporter.export(batch)
                    name = getattr(result, "name", None)
                    error = None if name == "SUCCESS" else f"export returned {name or repr(result)}"
                except Exception as exc:
                    result, error = failure, repr(exc)
                if error is not None and getattr(result, "name", None) != "FAILURE":
                    result = failure
                owner._count_export(len(batch), error)
                return result

            def shutdown(self) -> None:
                # Untyped in the SDK's stubs.
                log_exporter.shutdown()  # type: ignore[no-untyped-call]

            def force_flush(self, timeout_millis: int = 30_000) -> bool:
                return bool(log_exporter.force_flush(timeout_millis))

        return CountingExporter()

    def _count_export(self, records: int, error: str | None) -> None:
        with self._export_lock:
            if error is None:
                self._exported += records
                return
            self._export_failures += records
            first = self._first_export_error is None
            if first:
                self._first_export_error = error
        self.export_lost.add(records, {"reason": "export-failed"})
        if first:
            _log.warning("OpenTelemetry export failed (counted from now on): %s", error)

    async def export_session(
        self,
        session: Session,
        *,
        categories: Iterable[EventCategory] = (EventCategory.LIFECYCLE,),
        capacity: int = 1024,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Export ``session``'s events until the session ends.

        Subscribes with ``DROP_OLDEST``, so that a slow exporter never slows
        the session; what it misses is counted in ``events_missed`` and the
        ``trio_observer.events.missed`` metric. Run it with
        ``nursery.start``: the subscription is in place when that returns.
        Also reports the captured output bytes the session's logs dropped.

        Args:
          session: The session to export.
          categories: Which event categories to export (default lifecycle).
          capacity: The subscription's channel size.
        """
        async with session.observers.subscribe(
            categories,
            capacity=capacity,
            backpressure=ObserverBackpressure.DROP_OLDEST,
            report_missed=True,
        ) as subscription:
            task_status.started()
            await self._consume(subscription, session.id, session)
        self._count_dropped_output()

    async def export(
        self,
        subscription: Subscription[ObserverEvent] | Subscription[ObserverEvent | MissedEvents],
        *,
        session_id: str | None = None,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Export the events of a subscription you opened, until it ends.

        Open it with ``report_missed=True`` so that its losses are counted.

        Args:
          subscription: From ``session.observers.subscribe(...)``.
          session_id: Recorded as ``trio_observer.session.id`` when given.
        """
        task_status.started()
        await self._consume(subscription, session_id, None)

    async def _consume(
        self,
        subscription: Subscription[ObserverEvent] | Subscription[ObserverEvent | MissedEvents],
        session_id: str | None,
        session: Session | None,
    ) -> None:
        sink = {"trio_observer.sink.id": subscription.id.as_str()}
        ended = False
        while not ended:
            try:
                batch = [await subscription.receive()]
            except trio.EndOfChannel:
                return
            # Then everything already buffered: one wakeup for the lot, not
            # a schedule point per event. Bounded by the channel's size, as
            # nothing is emitted while this runs.
            while True:
                try:
                    batch.append(subscription.receive_nowait())
                except trio.WouldBlock:
                    break
                except trio.EndOfChannel:
                    ended = True
                    break
            self._export_batch(batch, session_id, session, sink)

    def _export_batch(
        self,
        batch: list[ObserverEvent] | list[ObserverEvent | MissedEvents],
        session_id: str | None,
        session: Session | None,
        sink: dict[str, str],
    ) -> None:
        started: set[int] = set()
        exited = False
        for item in batch:
            if isinstance(item, MissedEvents):
                self._events_missed += item.count
                self._missed.add(item.count, sink)
                continue
            self.emit(item, session_id=session_id)
            if item.kind is ObserverEventKind.STARTED:
                started.add(item.pid)
            elif item.kind is ObserverEventKind.EXITED:
                exited = True
        if session is not None:
            if started:
                self._watch_output(session, started)
            if exited:
                self._count_dropped_output()

    def emit(self, event: ObserverEvent, *, session_id: str | None = None) -> None:
        """Export one event now: a log record, and the metrics it moves.

        Never raises for the logger's sake: an exception from the SDK is
        counted (``emit_errors``, ``trio_observer.export.lost`` with reason
        ``emit-error``) and reported once in this module's ``logging``
        logger, ``trio_observer.otel``.

        Raises:
          TypeError: ``event`` is not an :class:`ObserverEvent`, or
            ``session_id`` neither a str nor None (nothing is exported).
        """
        if not isinstance(event, ObserverEvent):
            raise TypeError(f"event must be an ObserverEvent, not {event!r}")
        if session_id is not None and not isinstance(session_id, str):
            raise TypeError(f"session_id must be a str or None, not {session_id!r}")
        attributes = event_attributes(event, session_id=session_id, command_args=self._command_args)
        severity_number, severity_text = self._warn if warns(event) else self._info
        try:
            self._logger.emit(
                timestamp=int(event.wall_time_ms * 1_000_000),
                severity_number=severity_number,
                severity_text=severity_text,
                body=record_body(event),
                attributes=attributes,
                event_name=EVENT_NAMES[event.kind],
            )
            self._emitted += 1
        except Exception as exc:
            self._emit_errors += 1
            self.export_lost.add(1, {"reason": "emit-error"})
            if self._emit_errors == 1:
                _log.warning("OpenTelemetry logger refused a record (counted from now on): %r", exc)
        self._measure(event)

    def _measure(self, event: ObserverEvent) -> None:
        kind, category = event.kind, event.category
        if kind in STARTS:
            self._running.add(category)
            self._started.add(category)
            if event.pid in self._start_ms:
                # The pid was reused: the exit of the process that had it
                # was missed.
                self._forget(event.pid)
            elif len(self._start_ms) >= self._max_tracked:
                self._forget(next(iter(self._start_ms)))
            self._start_ms[event.pid] = (event.timestamp_ms, category)
        elif kind in EXITS:
            self._exited.add((category, exit_class(event.exit_code), event.termination))
            started = self._start_ms.pop(event.pid, None)
            if started is not None:
                # Only a start this exporter saw: an exit whose start was
                # missed would take the running count below zero.
                self._running.add(started[1], -1)
                self._duration.record(
                    max(0.0, event.timestamp_ms - started[0]) / 1000.0,
                    _CATEGORY_ATTRIBUTES[category],
                )
        elif kind is ObserverEventKind.OBSERVATION_LOST and event.count:
            self._lost.add(event.count, _CATEGORY_ATTRIBUTES[category])

    def _forget(self, pid: int) -> None:
        _, category = self._start_ms.pop(pid)
        self._running.add(category, -1)
        self._starts_forgotten += 1

    def _watch_output(self, session: Session, pids: set[int]) -> None:
        for process in session.processes:
            if process.pid in pids:
                for stream, log in (("stdout", process.stdout_log), ("stderr", process.stderr_log)):
                    if log is not None:
                        self._logs[log] = (stream, 0)
                if process.pty is not None:
                    self._logs[process.pty.log] = ("pty", 0)

    def _count_dropped_output(self) -> None:
        for log, (stream, reported) in list(self._logs.items()):
            dropped = log.dropped_bytes
            if dropped > reported:
                self._dropped.add(dropped - reported, {"trio_observer.stream": stream})
            if log.closed:
                del self._logs[log]
            else:
                self._logs[log] = (stream, dropped)
