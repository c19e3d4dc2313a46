"""Bad arguments to the public entry points: TypeError/ValueError naming them."""

from __future__ import annotations

import inspect
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trio_observer import (
    CAPTURE,
    EventCategory,
    ObserverBackpressure,
    ObserverEvent,
    ObserverEventKind,
    ObserverRegistry,
    OTelExporter,
    OutputLog,
    connect,
    negotiate_capabilities,
    open_session,
    remote_item,
)
from trio_observer.pytest_plugin import start_service


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        # Passed the check once, then the teardown raised OverflowError.
        ({"grace_period": 10**400}, ValueError, "grace_period"),
        ({"grace_period": math.nan}, ValueError, "grace_period"),
        ({"grace_period": "5"}, TypeError, "grace_period"),
        # Raised an ExceptionGroup from the tree observer at open.
        ({"poll_interval": math.inf}, ValueError, "poll_interval"),
        ({"poll_interval": 10**400}, ValueError, "poll_interval"),
        ({"poll_interval": 0}, ValueError, "poll_interval"),
        # Was accepted as one second.
        ({"poll_interval": True}, TypeError, "poll_interval"),
        ({"track_descendants": "yes"}, TypeError, "track_descendants"),
    ],
)
async def test_open_session_refuses_bad_numbers(
    kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        async with open_session(**kwargs):  # type: ignore[arg-type]
            pass


_NOT_OPEN_FD = 1 << 20  # above any RLIMIT_NOFILE, so never open
_BAD_STREAM = [
    "PIPE",
    1.5,
    object(),
    True,
    -7,
    _NOT_OPEN_FD,
    b"out",
]
_BAD: dict[str, list[object]] = {
    "argv": [
        "ls -l",
        b"ls",
        object(),
        3,
        None,
        [],
        [1],
        [b"python"],
        [sys.executable, "a\0b"],
        ["\0"],
    ],
    "stdin": [*_BAD_STREAM, CAPTURE, subprocess.STDOUT],
    "stdout": [*_BAD_STREAM, subprocess.STDOUT],
    "stderr": _BAD_STREAM,
    "cwd": [object(), 3, b"/tmp", "/tmp\0x"],
    "env": [
        "A=1",
        [("A", "1")],
        {1: "a"},
        {"A": 1},
        {"A": None},
        {"A=B": "c"},
        {"": "x"},
        {"A": "b\0c"},
        {"A\0": "b"},
    ],
    "pty": ["yes", 1, 0, 1.5, object(), None],
    "backlog_bytes": [0, -1, 1.5, "1", True, None],
}
# Which name the message must contain, per argument.
_NAMED = {"argv": "argv", "env": "env"}


@st.composite
def _bad_call(draw: st.DrawFn) -> tuple[str, dict[str, object]]:
    name = draw(st.sampled_from(sorted(_BAD)))
    value = draw(st.sampled_from(_BAD[name]))
    if name == "argv" and draw(st.booleans()):
        text = draw(st.text(min_size=0, max_size=5))
        value = [sys.executable, f"{text}\0{text}"]
    kwargs: dict[str, object] = {"argv": [sys.executable, "-c", "pass"], name: value}
    # The same checker for both paths: argv, cwd, env and backlog_bytes
    # are refused on a terminal too.
    if name in ("argv", "cwd", "env", "backlog_bytes") and draw(st.booleans()):
        kwargs["pty"] = True
    return name, kwargs


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(calls=st.lists(_bad_call(), min_size=1, max_size=12))
def test_every_bad_argument_is_refused_by_name(calls: list[tuple[str, dict[str, object]]]) -> None:
    async def main() -> None:
        with trio.fail_after(60):
            async with open_session() as session:
                other = await session.start_process(
                    [sys.executable, "-c", "import sys; sys.stdin.read()"],
                    stdin=subprocess.PIPE,
                )
                for name, kwargs in calls:
                    argv = kwargs.pop("argv")
                    with pytest.raises((TypeError, ValueError)) as info:
                        await session.start_process(argv, **kwargs)  # type: ignore[arg-type]
                    assert _NAMED.get(name, name) in str(info.value), (name, kwargs)
                    assert session.processes == (other,)
                # The session and its other process went on.
                assert other.returncode is None
                assert other.stdin is not None
                await other.stdin.aclose()
                assert await other.wait() == 0

    trio.run(main)


async def test_a_pty_with_a_stream_is_refused() -> None:
    async with open_session() as session:
        with pytest.raises(ValueError, match="pty"):
            await session.start_process(
                [sys.executable, "-c", "pass"], pty=True, stdout=subprocess.PIPE
            )


# -- the methods of what a session hands out ----------------------------------

_LOG_CALLS: list[tuple[str, Callable[[OutputLog], object], type[Exception], str]] = [
    # Fed three NUL bytes into the log.
    ("feed_nowait(3)", lambda log: log.feed_nowait(3), TypeError, "data"),  # type: ignore[arg-type]
    ("feed_nowait(str)", lambda log: log.feed_nowait("hi"), TypeError, "data"),  # type: ignore[arg-type]
    ("feed(3)", lambda log: log.feed(3), TypeError, "data"),  # type: ignore[arg-type]
    # Waited True seconds, i.e. one.
    ("expect timeout=True", lambda log: log.expect(b"zz", timeout=True), TypeError, "timeout"),
    ("expect timeout='1'", lambda log: log.expect(b"zz", timeout="1"), TypeError, "timeout"),  # type: ignore[arg-type]
    (
        "expect timeout=10**400",
        lambda log: log.expect(b"zz", timeout=10**400),
        ValueError,
        "timeout",
    ),
    ("wait_for_idle(True)", lambda log: log.wait_for_idle(True, timeout=1), TypeError, "quiet"),
    ("wait_for_idle('1')", lambda log: log.wait_for_idle("1"), TypeError, "quiet"),  # type: ignore[arg-type]
    (
        "wait_for_idle timeout=True",
        lambda log: log.wait_for_idle(5, timeout=True),
        TypeError,
        "timeout",
    ),
    # Accepted: any truthy value kept the line endings.
    (
        "lines(keepends='yes')",
        lambda log: log.cursor().lines(keepends="yes"),  # type: ignore[arg-type]
        TypeError,
        "keepends",
    ),
    (
        "line_batches(keepends=1)",
        lambda log: log.cursor().line_batches(keepends=1),  # type: ignore[arg-type]
        TypeError,
        "keepends",
    ),
]


@pytest.mark.parametrize(
    ("label", "call", "error", "name"), _LOG_CALLS, ids=[c[0] for c in _LOG_CALLS]
)
async def test_bad_arguments_to_an_output_log_are_refused_by_name(
    label: str, call: Callable[[OutputLog], object], error: type[Exception], name: str
) -> None:
    log = OutputLog()
    log.feed_nowait(b"hello\n")

    async def attempt() -> None:
        result = call(log)
        if inspect.isawaitable(result):
            await result

    with pytest.raises(error, match=name):
        await attempt()
    # Nothing was fed, and the log goes on.
    assert log.total_bytes == 6
    log.feed_nowait(b"more\n")
    assert (await log.expect(b"more", timeout=1)).end == 10


async def test_bad_arguments_to_the_registry_are_refused_by_name() -> None:
    registry = ObserverRegistry()
    sink_id, _ = registry.add_channel([EventCategory.LIFECYCLE], 4, ObserverBackpressure.BLOCK)
    # A KeyError from a dict lookup.
    with pytest.raises(TypeError, match="category"):
        registry.wants("lifecycle")  # type: ignore[arg-type]
    # False and None: the string form of an id (as_str()) looked unknown.
    with pytest.raises(TypeError, match="sink_id"):
        registry.remove(sink_id.as_str())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="sink_id"):
        registry.status(sink_id.as_str())  # type: ignore[arg-type]
    # Accepted: any truthy value tagged the sink.
    with pytest.raises(TypeError, match="report_missed"):
        async with registry.subscribe([EventCategory.LIFECYCLE], report_missed="yes"):  # type: ignore[call-overload]
            pass
    assert registry.wants(EventCategory.LIFECYCLE)
    assert len(registry) == 1
    assert registry.remove(sink_id)


async def test_bad_signals_and_terminal_input_are_refused_by_name() -> None:
    async with open_session() as session:
        process = await session.start_process(["sleep", "30"])
        for sig, error in (
            ("TERM", TypeError),
            (True, TypeError),
            (1.5, TypeError),
            (-1, ValueError),
            (99999, ValueError),
        ):
            # OSError (EINVAL) from the kernel, or (True) a SIGHUP sent.
            with pytest.raises(error, match="sig"):
                process.send_signal(sig)  # type: ignore[arg-type]
            with pytest.raises(error, match="sig"):
                process.signal_tree(sig)  # type: ignore[arg-type]
        assert process.poll() is None
        typist = await session.start_process(["cat"], pty=True)
        assert typist.pty is not None
        # Typed three NUL bytes and Enter.
        with pytest.raises(TypeError, match="text"):
            await typist.pty.sendline(3)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="data"):
            await typist.pty.write(3)  # type: ignore[arg-type]
        await typist.pty.sendline("ok")
        await typist.pty.log.expect("ok\r\nok\r\n", timeout=10)
        assert b"\0" not in typist.pty.log.snapshot()
        # Accepted: any truthy value meant True.
        for flag in ("check", "capture_stdout", "capture_stderr"):
            with pytest.raises(TypeError, match=flag):
                await session.run_process(["true"], **{flag: "yes"})  # type: ignore[arg-type]
        assert process.poll() is None
        process.kill()
        typist.kill()


def test_capabilities_remote_frames_and_the_exporter_refuse_bad_arguments_by_name() -> None:
    # Each was accepted (a report for scope 'x', the exporter's record of
    # session 3) or raised KeyError/AttributeError.
    with pytest.raises(TypeError, match="scope"):
        negotiate_capabilities("launched-process-tree")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="proc_root"):
        negotiate_capabilities(proc_root=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="frame"):
        remote_item({"type": "event"})
    with pytest.raises(TypeError, match="frame"):
        remote_item("frame")  # type: ignore[arg-type]
    exporter = OTelExporter()
    with pytest.raises(TypeError, match="event"):
        exporter.emit("started")  # type: ignore[arg-type]
    event = ObserverEvent(
        category=EventCategory.LIFECYCLE,
        kind=ObserverEventKind.STARTED,
        pid=1,
        timestamp_ms=0.0,
    )
    with pytest.raises(TypeError, match="session_id"):
        exporter.emit(event, session_id=3)  # type: ignore[arg-type]
    assert exporter.status().records_emitted == 0
    exporter.emit(event)
    assert exporter.status().records_emitted == 1


async def test_connect_refuses_a_non_bool_autostart(tmp_path: Path) -> None:
    # "no" is truthy: it started a daemon.
    with pytest.raises(TypeError, match="autostart"):
        async with connect(tmp_path / "daemon.sock", autostart="no"):  # type: ignore[arg-type]
            pass
    assert not (tmp_path / "daemon.sock").exists()


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        # The service was started, then expect() refused the pattern.
        ({"ready_output": 3}, TypeError, "pattern"),
        ({"ready_output": []}, ValueError, "pattern"),
        # A timeout of True seconds.
        ({"ready_output": b"up", "timeout": True}, TypeError, "timeout"),
        ({"ready_output": b"up", "timeout": "30"}, TypeError, "timeout"),
        ({"ready_port": 80, "host": 3}, TypeError, "host"),
        ({"ready_port": 0}, ValueError, "ready_port"),
        ({}, ValueError, "ready_output"),
    ],
)
async def test_start_service_refuses_bad_arguments_before_starting_anything(
    kwargs: dict[str, object], error: type[Exception], name: str
) -> None:
    async with open_session() as session:
        with pytest.raises(error, match=name):
            await start_service(session, [sys.executable, "-c", "print('up')"], **kwargs)  # type: ignore[arg-type]
        assert session.processes == ()
