"""``run --otlp``: the command line's own OpenTelemetry SDK pipeline, to OTLP/HTTP.

The SDK is imported only when ``--otlp`` is given, so that its import time
is not paid by every run.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Literal, final

import trio

from .._events import EventCategory
from .._session import Session
from ._prog import PROG

if TYPE_CHECKING:
    # Imported where the pipeline is built: a run without --otlp skips it.
    from .._otel import OTelExporter as OTelExporter


def _endpoint(text: str) -> str:
    if text and not text.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"{text!r} is not an http:// or https:// URL")
    return text


def add_arguments(run: argparse.ArgumentParser) -> None:
    """Add ``--otlp [ENDPOINT]`` and ``--otlp-command-args`` to ``run``."""
    run.add_argument(
        "--otlp",
        nargs="?",
        const="",
        type=_endpoint,
        metavar="ENDPOINT",
        help=(
            "also send events and metrics to an OpenTelemetry Collector over OTLP/HTTP at "
            "ENDPOINT (default: OTEL_EXPORTER_OTLP_ENDPOINT, else http://localhost:4318); "
            "needs the otel-cli extra"
        ),
    )
    run.add_argument(
        "--otlp-command-args",
        action="store_true",
        help="with --otlp, include full command lines (process.command_args)",
    )


def passed_on(args: argparse.Namespace) -> list[str]:
    """The ``--otlp`` options of ``args`` as words, for a daemon started in the background."""
    if args.otlp is None:
        return []
    words = ["--otlp", args.otlp] if args.otlp else ["--otlp"]
    return [*words, "--otlp-command-args"] if args.otlp_command_args else words


def open_from_args(
    args: argparse.Namespace, stack: contextlib.ExitStack
) -> OTelExporter | Literal[False] | None:
    """The exporter for ``--otlp``, its pipeline shut down when ``stack`` closes.

    None without ``--otlp``; False (after saying why) when the SDK is missing.
    """
    if args.otlp is None:
        return None
    try:
        otlp = stack.enter_context(pipeline(args.otlp or None, command_args=args.otlp_command_args))
    except ImportError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return False
    return otlp.exporter


async def export(
    exporter: OTelExporter,
    session: Session,
    categories: list[EventCategory],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Export ``session``'s events of ``categories`` (what ``--category`` chose)."""
    await exporter.export_session(session, categories=categories, task_status=task_status)


def _import_sdk() -> Any:
    try:
        from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.sdk._logs import LoggerProvider
        from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
        from opentelemetry.sdk.resources import Resource
    except ImportError as exc:
        raise ImportError(
            "--otlp needs the OpenTelemetry SDK and its OTLP/HTTP exporter: "
            "pip install 'trio-observer[otel-cli]'"
        ) from exc
    return (
        OTLPLogExporter,
        OTLPMetricExporter,
        LoggerProvider,
        BatchLogRecordProcessor,
        MeterProvider,
        PeriodicExportingMetricReader,
        Resource,
    )


@final
class OtlpPipeline:
    """The SDK providers behind ``--otlp`` and the exporter that feeds them."""

    def __init__(self, endpoint: str | None, command_args: bool) -> None:
        (
            log_exporter_type,
            metric_exporter_type,
            logger_provider_type,
            batch_type,
            meter_provider_type,
            reader_type,
            resource_type,
        ) = _import_sdk()
        from .._otel import OTelExporter

        # The SDK reports each failed batch through logging, which would land
        # on the terminal (or in the events stream); the pipeline counts the
        # losses and reports them once instead.
        logging.getLogger("opentelemetry").setLevel(logging.CRITICAL)
        logging.getLogger("trio_observer.otel").setLevel(logging.CRITICAL)
        attributes = {}
        # Keys, not a substring: service.namespace is not service.name.
        keys = {
            item.partition("=")[0].strip()
            for item in os.environ.get("OTEL_RESOURCE_ATTRIBUTES", "").split(",")
        }
        if "OTEL_SERVICE_NAME" not in os.environ and "service.name" not in keys:
            attributes["service.name"] = "trio-observer"
        resource = resource_type.create(attributes)
        # Without an endpoint the exporters read OTEL_EXPORTER_OTLP_ENDPOINT
        # (and the per-signal variables, headers, timeout) themselves.
        base = endpoint.rstrip("/") if endpoint else None
        metric_exporter = metric_exporter_type(endpoint=f"{base}/v1/metrics" if base else None)
        self.meter_provider = meter_provider_type(
            resource=resource, metric_readers=[reader_type(metric_exporter)]
        )
        self.logger_provider = logger_provider_type(resource=resource)
        self.exporter = OTelExporter(
            logger_provider=self.logger_provider,
            meter_provider=self.meter_provider,
            command_args=command_args,
        )
        log_exporter = log_exporter_type(endpoint=f"{base}/v1/logs" if base else None)
        self.logger_provider.add_log_record_processor(
            batch_type(self.exporter.count_exports(log_exporter))
        )

    def shutdown(self) -> str | None:
        """Flush and stop both providers; return the loss report, if any."""
        # Logs first, so that the final metrics include what they lost.
        self.logger_provider.shutdown()
        status = self.exporter.status()
        # Emitted but never handed to the exporter: the SDK's batch queue was
        # full (it drops without telling), or shutdown ran out of time.
        queue_dropped = max(
            0, status.records_emitted - status.records_exported - status.export_failures
        )
        if queue_dropped:
            self.exporter.export_lost.add(queue_dropped, {"reason": "queue-full"})
        self.meter_provider.shutdown()
        not_exported = status.export_failures + queue_dropped + status.emit_errors
        if not (not_exported or status.events_missed):
            return None
        parts = [f"{not_exported} of {status.records_emitted} log records not exported"]
        if status.export_failures:
            parts.append(
                f"{status.export_failures} in failed exports, first: {status.first_export_error}"
            )
        if queue_dropped:
            parts.append(f"{queue_dropped} dropped from the full batch queue")
        if status.emit_errors:
            parts.append(f"{status.emit_errors} refused by the logger")
        if status.events_missed:
            parts.append(f"{status.events_missed} events missed by the exporter's sink")
        return "; ".join(parts)


@contextlib.contextmanager
def pipeline(endpoint: str | None, *, command_args: bool = False) -> Iterator[OtlpPipeline]:
    """The ``--otlp`` pipeline for the length of the block; reports losses once at the end."""
    otlp = OtlpPipeline(endpoint, command_args)
    try:
        yield otlp
    finally:
        report = otlp.shutdown()
        if report is not None:
            print(f"{PROG}: otlp: {report}", file=sys.stderr)
