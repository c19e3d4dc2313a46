"""``trio-observer daemon --otlp``: the daemon's sessions exported to a real OTLP receiver."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import trio

pytest.importorskip(
    "opentelemetry.sdk", reason="daemon --otlp needs the otel-cli extra (opentelemetry-sdk)"
)
pytest.importorskip(
    "opentelemetry.exporter.otlp.proto.http",
    reason="daemon --otlp needs the otel-cli extra (the OTLP/HTTP exporter)",
)

import trio_observer

from .conftest import PY
from .test_daemon import start_daemon
from .test_otel import Receiver, cli_env, receiver  # noqa: F401


async def test_daemon_otlp_exports_every_session_to_the_receiver(
    tmp_path: Path,
    receiver: Receiver,  # noqa: F811
) -> None:
    path = tmp_path / "d" / "daemon.sock"
    running = start_daemon(path, "--otlp", receiver.endpoint, env=cli_env())
    try:
        with trio.fail_after(60):
            async with trio_observer.connect(path, autostart=False) as client:
                await client.create_session("other", containment="process-group")
                quick = await client.start([PY, "-c", "exit(4)"], name="quick")
                assert (await client.wait("quick"))["exit_code"] == 4
                sleeper = await client.start(
                    [PY, "-c", "import time; time.sleep(600)"], session="other", name="sleeper"
                )
                sessions = {s["name"]: s["id"] for s in await client.sessions()}
    finally:
        # Stopping the daemon stops the sleeper (its exit is exported too),
        # then flushes the pipeline.
        running.process.send_signal(signal.SIGTERM)
        _, log = running.process.communicate(timeout=60)
    assert running.process.returncode == 0, log
    by_pid: dict[int, list[str]] = {}
    for record in receiver.records:
        by_pid.setdefault(record.attributes["process.pid"], []).append(
            record.event_name.rsplit(".", 1)[1]
        )
    assert sorted(by_pid[quick["pid"]]) == ["exited", "started"]
    assert sorted(by_pid[sleeper["pid"]]) == ["exited", "started"]
    session_of = {
        r.attributes["process.pid"]: r.attributes["trio_observer.session.id"]
        for r in receiver.records
    }
    assert session_of[quick["pid"]] == sessions["default"]
    assert session_of[sleeper["pid"]] == sessions["other"]
    exited = next(
        r
        for r in receiver.records
        if r.attributes["process.pid"] == sleeper["pid"] and r.event_name.endswith("exited")
    )
    assert exited.attributes["trio_observer.termination"] == "soft-exit"
    assert receiver.sum("trio_observer.processes.started") == 2
    # Nothing was lost, so the daemon reports nothing.
    assert b"otlp:" not in log, log


def test_daemon_otlp_is_refused_for_stop_and_status(tmp_path: Path) -> None:
    import subprocess

    result = subprocess.run(
        [PY, "-m", "trio_observer", "daemon", "status", "--otlp", "http://127.0.0.1:1"],
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert b"--otlp is for the daemon itself" in result.stderr
