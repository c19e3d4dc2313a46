"""OpenTelemetry export, end to end: the real SDK and OTLP/HTTP exporter send to
a receiver on 127.0.0.1 that decodes each request with opentelemetry-proto."""

from __future__ import annotations

import dataclasses
import http.server
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
    OTLPMetricExporter,
)
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

from tests.conftest import PY
from trio_observer import (
    CAPTURE,
    EventCategory,
    EventGrade,
    ObserverBackpressure,
    ObserverEvent,
    ObserverEventKind,
    OTelExporter,
    UnsupportedCategoryError,
    negotiate_capabilities,
    open_session,
)
from trio_observer._otel_records import event_attributes, event_name

CLI = [sys.executable, "-m", "trio_observer"]


def plain(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [plain(item) for item in value.array_value.values]
    return getattr(value, kind) if kind else None


@dataclass
class Record:
    event_name: str
    time_unix_nano: int
    severity_text: str
    body: str
    attributes: dict[str, Any]
    resource: dict[str, Any]


@dataclass
class Receiver:
    """An OTLP/HTTP receiver: what it decoded, and what it answers."""

    port: int
    status: int = 200
    # The paths answered with ``status``; the others get 200.
    refuse: frozenset[str] = frozenset({"/v1/logs", "/v1/metrics"})
    records: list[Record] = field(default_factory=list)
    # (metric name, attributes as a sorted tuple) -> the last value sent;
    # the SDK sends cumulative sums, so the last one is the total.
    sums: dict[tuple[str, tuple[tuple[str, Any], ...]], float] = field(default_factory=dict)
    histograms: dict[str, int] = field(default_factory=dict)
    requests: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def sum(self, name: str, **attributes: Any) -> float:
        """The sum of ``name`` over the points whose attributes include these."""
        want = {k.replace("__", "."): v for k, v in attributes.items()}
        return sum(
            value
            for (metric, attrs), value in self.sums.items()
            if metric == name and want.items() <= dict(attrs).items()
        )

    def take(self, path: str, body: bytes) -> tuple[int, bytes]:
        with self.lock:
            self.requests[path] = self.requests.get(path, 0) + 1
            if path in self.refuse and self.status != 200:
                return self.status, b""
            return 200, self._decode(path, body)

    def _decode(self, path: str, body: bytes) -> bytes:
        if path == "/v1/logs":
            logs = ExportLogsServiceRequest.FromString(body)
            for resource_logs in logs.resource_logs:
                resource = {a.key: plain(a.value) for a in resource_logs.resource.attributes}
                for scope in resource_logs.scope_logs:
                    for r in scope.log_records:
                        self.records.append(
                            Record(
                                r.event_name,
                                r.time_unix_nano,
                                r.severity_text,
                                plain(r.body),
                                {a.key: plain(a.value) for a in r.attributes},
                                resource,
                            )
                        )
            return bytes(ExportLogsServiceResponse().SerializeToString())
        metrics = ExportMetricsServiceRequest.FromString(body)
        for resource_metrics in metrics.resource_metrics:
            for scope in resource_metrics.scope_metrics:
                for metric in scope.metrics:
                    if metric.HasField("histogram"):
                        points = metric.histogram.data_points
                        self.histograms[metric.name] = sum(p.count for p in points)
                        continue
                    for point in metric.sum.data_points:
                        attrs = tuple(sorted((a.key, plain(a.value)) for a in point.attributes))
                        value = point.as_int if point.HasField("as_int") else point.as_double
                        self.sums[(metric.name, attrs)] = value
        return bytes(ExportMetricsServiceResponse().SerializeToString())


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state: list[Receiver] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            status, answer = state[0].take(self.path, body)
            self.send_response(status)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.append(Receiver(port=server.server_address[1]))
    # A short poll, so that shutdown() at teardown returns at once.
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield state[0]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@dataclass
class Pipeline:
    logger_provider: LoggerProvider
    meter_provider: MeterProvider
    endpoint: str

    def exporter(self, **options: Any) -> OTelExporter:
        """An exporter on this pipeline, its OTLP log exporter's losses counted."""
        exporter = OTelExporter(
            logger_provider=self.logger_provider, meter_provider=self.meter_provider, **options
        )
        log_exporter = OTLPLogExporter(endpoint=f"{self.endpoint}/v1/logs", timeout=5)
        self.logger_provider.add_log_record_processor(
            BatchLogRecordProcessor(exporter.count_exports(log_exporter))
        )
        return exporter

    def shutdown(self) -> None:
        self.logger_provider.shutdown()
        self.meter_provider.shutdown()


def sdk_pipeline(endpoint: str) -> Pipeline:
    """What an application would set up: batch processor, OTLP/HTTP exporters."""
    logger_provider = LoggerProvider()
    # Exported at shutdown only: the test reads the final, cumulative values.
    reader = PeriodicExportingMetricReader(
        OTLPMetricExporter(endpoint=f"{endpoint}/v1/metrics", timeout=5),
        export_interval_millis=3_600_000,
    )
    return Pipeline(logger_provider, MeterProvider(metric_readers=[reader]), endpoint)


# The session's process starts a child that inherits its stdin and exits 3
# after one line; the parent then exits 0. The child's exit is a descendant's.
TREE = (
    "import subprocess, sys; "
    "child = subprocess.Popen([sys.executable, '-c', "
    "'import sys; sys.stdin.readline(); sys.exit(3)']); "
    "sys.exit(0 if child.wait() == 3 else 1)"
)


async def run_tree(exporter: OTelExporter) -> tuple[int, int]:
    """Run TREE under a session exported by ``exporter``; return (pid, child pid)."""
    categories = [EventCategory.LIFECYCLE, EventCategory.PROCESS]
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery, open_session() as session:
            await nursery.start(partial(exporter.export_session, categories=categories), session)
            async with session.observers.subscribe(
                [EventCategory.PROCESS], backpressure=ObserverBackpressure.BLOCK
            ) as watch:
                process = await session.start_process(
                    [PY, "-c", TREE], stdin=subprocess.PIPE, stdout=CAPTURE
                )
                async for event in watch:
                    if event.kind is ObserverEventKind.DESCENDANT_STARTED:
                        child = event.pid
                        break
                assert process.stdin is not None
                await process.stdin.send_all(b"go\n")
                assert await process.wait() == 0
    return process.pid, child


def exit_codes_of_descendants_known() -> bool:
    """The proc connector (root) reports descendants' exit codes; polling cannot."""
    try:
        backend = negotiate_capabilities().require(EventCategory.PROCESS).backend
    except UnsupportedCategoryError:
        pytest.skip("this machine cannot observe descendants at all")
    return backend == "proc-connector"


async def test_every_event_of_a_real_tree_arrives_with_its_attributes(
    receiver: Receiver,
) -> None:
    exact = exit_codes_of_descendants_known()
    pipeline = sdk_pipeline(receiver.endpoint)
    exporter = pipeline.exporter()
    pid, child = await run_tree(exporter)
    await trio.to_thread.run_sync(pipeline.shutdown)

    by_name = {(r.event_name, r.attributes["process.pid"]): r for r in receiver.records}
    started = by_name["trio_observer.process.started", pid]
    assert started.attributes["process.executable.name"] == os.path.basename(PY)
    assert started.attributes["process.parent_pid"] == os.getpid()
    assert started.attributes["trio_observer.category"] == "lifecycle"
    assert started.attributes["trio_observer.grade"] == "exact"
    assert "process.command_args" not in started.attributes
    assert started.severity_text == "INFO"
    exited = by_name["trio_observer.process.exited", pid]
    assert exited.attributes["process.exit.code"] == 0
    assert exited.attributes["trio_observer.termination"] == "natural-exit"
    assert exited.attributes["trio_observer.exit.class"] == "success"
    assert exited.severity_text == "INFO"
    assert exited.time_unix_nano >= started.time_unix_nano > 0
    descendant = by_name["trio_observer.process.descendant_started", child]
    assert descendant.attributes["process.parent_pid"] == pid
    assert descendant.attributes["trio_observer.root_pid"] == pid
    gone = by_name["trio_observer.process.descendant_exited", child]
    if exact:
        assert gone.attributes["process.exit.code"] == 3
        assert gone.severity_text == "WARN"
        assert gone.body == f"process {child} descendant exited with code 3"
    else:  # polling: the exit is seen, its code is not
        assert "process.exit.code" not in gone.attributes
        assert gone.attributes["trio_observer.exit.class"] == "unknown"
        assert gone.severity_text == "INFO"
    assert exporter.status().records_emitted == len(receiver.records)
    session_ids = {r.attributes["trio_observer.session.id"] for r in receiver.records}
    assert len(session_ids) == 1
    assert exporter.status().events_missed == 0

    lifecycle = {"trio_observer__category": "lifecycle"}
    process = {"trio_observer__category": "process"}
    assert receiver.sum("trio_observer.processes.started", **lifecycle) == 1
    assert receiver.sum("trio_observer.processes.started", **process) == 1
    assert receiver.sum("trio_observer.processes.running") == 0
    assert (
        receiver.sum(
            "trio_observer.processes.exited",
            trio_observer__exit__class="success",
            trio_observer__termination="natural-exit",
        )
        == 1
    )
    descendant_class = "failure" if exact else "unknown"
    assert (
        receiver.sum("trio_observer.processes.exited", trio_observer__exit__class=descendant_class)
        == 1
    )
    assert receiver.histograms["trio_observer.process.duration"] == 2
    assert receiver.sum("trio_observer.events.missed") == 0


async def test_command_args_are_exported_only_when_asked_for(receiver: Receiver) -> None:
    pipeline = sdk_pipeline(receiver.endpoint)
    exporter = pipeline.exporter(command_args=True)
    async with trio.open_nursery() as nursery, open_session() as session:
        await nursery.start(exporter.export_session, session)
        await session.run_process([PY, "-c", "pass"])
    await trio.to_thread.run_sync(pipeline.shutdown)
    (started,) = [r for r in receiver.records if r.event_name.endswith(".started")]
    assert started.attributes["process.command_args"] == [PY, "-c", "pass"]


async def test_receiver_answering_500_does_not_disturb_the_session(
    receiver: Receiver, tmp_path: Path
) -> None:
    receiver.status = 500
    pipeline = sdk_pipeline(receiver.endpoint)
    exporter = pipeline.exporter()
    async with trio.open_nursery() as nursery, open_session() as session:
        await nursery.start(exporter.export_session, session)
        results = [
            await session.run_process([PY, "-c", f"exit({i})"], check=False) for i in range(5)
        ]
    assert [result.returncode for result in results] == list(range(5))
    await trio.to_thread.run_sync(pipeline.shutdown)
    assert receiver.requests["/v1/logs"] >= 1
    assert receiver.records == []
    status = exporter.status()
    assert status.records_emitted == 10
    assert status.export_failures == 10
    assert status.records_exported == 0
    assert status.first_export_error == "export returned FAILURE"


async def test_refused_logs_are_counted_in_the_lost_metric(receiver: Receiver) -> None:
    receiver.status = 500
    receiver.refuse = frozenset({"/v1/logs"})
    pipeline = sdk_pipeline(receiver.endpoint)
    exporter = pipeline.exporter()
    async with trio.open_nursery() as nursery, open_session() as session:
        await nursery.start(exporter.export_session, session)
        for _ in range(3):
            await session.run_process([PY, "-c", "pass"])
    await trio.to_thread.run_sync(pipeline.shutdown)
    assert receiver.records == []
    assert receiver.sum("trio_observer.export.lost", reason="export-failed") == 6
    assert receiver.sum("trio_observer.processes.started") == 3


async def test_a_slow_exporter_misses_events_and_counts_them(receiver: Receiver) -> None:
    """The exporter's own sink is DROP_OLDEST: it never holds the session up,
    and what it missed is counted in its status and in the metric."""
    pipeline = sdk_pipeline(receiver.endpoint)
    exporter = pipeline.exporter()
    async with trio.open_nursery() as nursery, open_session() as session:
        await nursery.start(partial(exporter.export_session, capacity=4), session)
        # The exporter waits in receive(), so the first event goes straight
        # to it; emit_nowait never yields, so it cannot take more while the
        # rest go in: a capacity of 4 holds 4 more, and 5 are missed.
        await trio.testing.wait_all_tasks_blocked()
        for pid in range(1, 11):
            session.observers.emit_nowait(
                ObserverEvent(
                    category=EventCategory.LIFECYCLE,
                    kind=ObserverEventKind.STARTED,
                    pid=pid,
                    timestamp_ms=0.0,
                )
            )
    await trio.to_thread.run_sync(pipeline.shutdown)
    assert exporter.status().events_missed == 5
    assert exporter.status().records_emitted == 5
    assert len(receiver.records) == 5
    assert receiver.sum("trio_observer.events.missed") == 5


async def test_a_logger_that_raises_is_counted_not_raised() -> None:
    class Broken:
        def get_logger(self, *args: Any, **kwargs: Any) -> Any:
            return self

        def emit(self, *args: Any, **kwargs: Any) -> None:
            raise RuntimeError("exporter is broken")

    exporter = OTelExporter(logger_provider=Broken())  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery, open_session() as session:
        await nursery.start(exporter.export_session, session)
        assert (await session.run_process([PY, "-c", "exit(2)"], check=False)).returncode == 2
    assert exporter.status().emit_errors == 2
    assert exporter.status().records_emitted == 0


async def test_output_bytes_dropped_are_counted(receiver: Receiver) -> None:
    pipeline = sdk_pipeline(receiver.endpoint)
    exporter = OTelExporter(meter_provider=pipeline.meter_provider)
    async with trio.open_nursery() as nursery, open_session() as session:
        await nursery.start(exporter.export_session, session)
        process = await session.start_process(
            [PY, "-c", "import sys; sys.stdout.write('x' * 100_000)"],
            stdout=CAPTURE,
            backlog_bytes=1000,
        )
        assert process.stdout_log is not None
        assert await process.wait() == 0
    await trio.to_thread.run_sync(pipeline.shutdown)
    dropped = process.stdout_log.dropped_bytes
    # Nothing read the log, so all but the last 1000 bytes were evicted.
    assert dropped == 99_000
    assert receiver.sum("trio_observer.output.dropped", trio_observer__stream="stdout") == dropped


def test_event_names_come_from_the_kind_so_new_kinds_need_no_code() -> None:
    assert {event_name(kind) for kind in ObserverEventKind} >= {
        "trio_observer.process.started",
        "trio_observer.process.exited",
        "trio_observer.process.descendant_started",
        "trio_observer.process.file_open",
        "trio_observer.process.observation_lost",
    }


def test_socket_and_loss_events_map_to_semantic_attributes() -> None:
    connect = ObserverEvent(
        category=EventCategory.NETWORK,
        kind=ObserverEventKind.SOCKET_CONNECT,
        pid=7,
        timestamp_ms=0.0,
        grade=EventGrade.INFERRED,
        fd=3,
        protocol="tcp6",
        local_address="[::1]:5000",
        remote_address="[::ffff:127.0.0.1]:80",
    )
    attributes = event_attributes(connect, session_id=None, command_args=False)
    assert attributes["network.transport"] == "tcp"
    assert attributes["network.type"] == "ipv6"
    assert attributes["network.local.address"] == "::1"
    assert attributes["network.local.port"] == 5000
    assert attributes["network.peer.address"] == "::ffff:127.0.0.1"
    assert attributes["network.peer.port"] == 80
    assert attributes["trio_observer.grade"] == "inferred"
    unix = ObserverEvent(
        category=EventCategory.NETWORK,
        kind=ObserverEventKind.SOCKET_LISTEN,
        pid=7,
        timestamp_ms=0.0,
        protocol="unix",
        local_address="/run/x.sock",
    )
    attributes = event_attributes(unix, session_id=None, command_args=False)
    assert attributes["network.local.address"] == "/run/x.sock"
    assert "network.local.port" not in attributes
    assert "network.type" not in attributes


@dataclasses.dataclass(frozen=True)
class Usage:
    user_s: float
    max_rss_kb: int


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class EventWithUsage(ObserverEvent):  # type: ignore[misc]
    """An event with a field this module was not written for (as rusage will be)."""

    rusage: Usage | None = None
    signals: tuple[str, ...] = ()


def test_an_exit_whose_code_is_unknown_says_so() -> None:
    """What polling reports for a descendant (the branch the tree test takes
    on a machine without the proc connector)."""
    gone = ObserverEvent(
        category=EventCategory.PROCESS,
        kind=ObserverEventKind.DESCENDANT_EXITED,
        pid=7,
        timestamp_ms=0.0,
        grade=EventGrade.INFERRED,
    )
    attributes = event_attributes(gone, session_id=None, command_args=False)
    assert attributes["trio_observer.exit.class"] == "unknown"
    assert "process.exit.code" not in attributes


def test_fields_added_to_events_later_are_mapped_without_code() -> None:
    event = EventWithUsage(
        category=EventCategory.LIFECYCLE,
        kind=ObserverEventKind.EXITED,
        pid=7,
        timestamp_ms=0.0,
        exit_code=-9,
        rusage=Usage(0.5, 2048),
        signals=("TERM", "KILL"),
    )
    attributes = event_attributes(event, session_id="s", command_args=False)
    assert attributes["trio_observer.rusage.user_s"] == 0.5
    assert attributes["trio_observer.rusage.max_rss_kb"] == 2048
    assert attributes["trio_observer.signals"] == ["TERM", "KILL"]
    assert attributes["trio_observer.signal"] == 9
    assert attributes["trio_observer.exit.class"] == "signal"
    assert "process.exit.code" not in attributes


def test_a_missing_api_names_the_extra() -> None:
    """Without opentelemetry-api, ``import trio_observer`` still works and the
    exporter says which extra to install."""
    script = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'opentelemetry':\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import trio_observer\n"
        "try:\n"
        "    trio_observer.OTelExporter()\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run([PY, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "pip install 'trio-observer[otel]'" in result.stdout


def test_cli_without_the_sdk_names_the_extra() -> None:
    script = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.startswith('opentelemetry.sdk'):\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from trio_observer._cli import main\n"
        "sys.exit(main(['run', '--otlp', '--', sys.executable, '-c', 'pass']))\n"
    )
    result = subprocess.run([PY, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "pip install 'trio-observer[otel-cli]'" in result.stderr


def test_cli_plain_run_does_not_import_opentelemetry() -> None:
    script = (
        "import sys\n"
        "from trio_observer._cli import main\n"
        "status = main(['run', '--', sys.executable, '-c', 'pass'])\n"
        "assert not [m for m in sys.modules if m.startswith('opentelemetry')]\n"
        "sys.exit(status)\n"
    )
    result = subprocess.run([PY, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(extra)
    return env


def test_cli_otlp_sends_every_process_to_the_receiver(receiver: Receiver) -> None:
    result = subprocess.run(
        [*CLI, "run", "--otlp", receiver.endpoint, "--", PY, "-c", "exit(5)"],
        capture_output=True,
        timeout=60,
        env=cli_env(),
    )
    assert result.returncode == 5
    kinds = sorted(r.event_name for r in receiver.records)
    assert kinds == ["trio_observer.process.exited", "trio_observer.process.started"]
    exited = next(r for r in receiver.records if r.event_name.endswith("exited"))
    assert exited.attributes["process.exit.code"] == 5
    assert exited.severity_text == "WARN"
    assert exited.resource["service.name"] == "trio-observer"
    assert receiver.sum("trio_observer.processes.exited", trio_observer__exit__class="failure") == 1
    assert b"otlp" not in result.stderr


def test_cli_otlp_reads_the_standard_environment(receiver: Receiver) -> None:
    result = subprocess.run(
        [*CLI, "run", "--otlp", "--otlp-command-args", "--", PY, "-c", "pass"],
        capture_output=True,
        timeout=60,
        env=cli_env(
            OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
            OTEL_SERVICE_NAME="ci-runner-7",
        ),
    )
    assert result.returncode == 0, result.stderr
    started = next(r for r in receiver.records if r.event_name.endswith("started"))
    assert started.resource["service.name"] == "ci-runner-7"
    assert started.attributes["process.command_args"] == [PY, "-c", "pass"]


def test_cli_otlp_names_the_service_when_the_environment_sets_only_other_keys(
    receiver: Receiver,
) -> None:
    # service.namespace (a standard resource attribute) is not service.name:
    # the run must still be named, not left "unknown_service".
    result = subprocess.run(
        [*CLI, "run", "--otlp", receiver.endpoint, "--", PY, "-c", "pass"],
        capture_output=True,
        timeout=60,
        env=cli_env(OTEL_RESOURCE_ATTRIBUTES="service.namespace=ci,host.name=runner-7"),
    )
    assert result.returncode == 0, result.stderr
    started = next(r for r in receiver.records if r.event_name.endswith("started"))
    assert started.resource["service.name"] == "trio-observer"
    assert started.resource["service.namespace"] == "ci"


def test_cli_otlp_receiver_500_is_counted_and_reported_once(receiver: Receiver) -> None:
    receiver.status = 500
    result = subprocess.run(
        [*CLI, "run", "--otlp", receiver.endpoint, "--", PY, "-c", "exit(3)"],
        capture_output=True,
        timeout=60,
        env=cli_env(),
    )
    assert result.returncode == 3
    lines = [line for line in result.stderr.decode().splitlines() if "otlp" in line]
    assert lines == [
        "trio-observer: otlp: 2 of 2 log records not exported; 2 in failed exports, "
        "first: export returned FAILURE"
    ]


def test_cli_otlp_receiver_down_does_not_change_the_run(tmp_path: Path) -> None:
    with trio_free_port() as port:
        pass  # closed again: nothing listens there
    events = tmp_path / "events.jsonl"
    result = subprocess.run(
        [
            *CLI,
            "run",
            "--events",
            str(events),
            "--otlp",
            f"http://127.0.0.1:{port}",
            "--",
            PY,
            "-c",
            "print('hi')",
        ],
        capture_output=True,
        timeout=120,
        env=cli_env(OTEL_EXPORTER_OTLP_TIMEOUT="0.5"),
    )
    assert result.returncode == 0
    assert result.stdout == b"hi\n"
    assert len(events.read_text().splitlines()) == 2
    # The SDK's own retry warnings are kept off the terminal: one line only.
    (report,) = result.stderr.decode().splitlines()
    assert report.startswith("trio-observer: otlp: 2 of 2 log records not exported")


class trio_free_port:
    """A port that was free a moment ago on 127.0.0.1."""

    def __enter__(self) -> int:
        import socket

        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        port: int = self._sock.getsockname()[1]
        return port

    def __exit__(self, *exc: object) -> None:
        self._sock.close()
