"""Every request handler, fuzzed against real sessions, processes and subscriptions.

Params are drawn from the names that exist in the daemon (a session with
a sleeping process on a pipe, one on a PTY, one that has exited, a
subscription) as well as random values, so that the handlers' paths past
the lookups run too. After each example the daemon still answers, and
whatever the example did not legitimately stop is still there; what it
stopped is started again for the next example.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import trio_observer
from trio_observer._daemon._handlers import METHODS

from .conftest import PY
from .test_daemon import DaemonProcess, start_daemon

SLEEP = shutil.which("sleep") or "/bin/sleep"
TRUE = shutil.which("true") or "/bin/true"
# Every method but shutdown, which has a test of its own below.
FUZZED = sorted(set(METHODS) - {"shutdown"})
SESSION = "fz"
# name -> the start params that make it (the protected processes).
PROTECTED: dict[str, dict[str, Any]] = {
    "piped": {"argv": [SLEEP, "600"], "stdin": "pipe"},
    "tty": {"argv": [SLEEP, "600"], "pty": True},
}
SUBSCRIPTION = "@subscription"  # replaced by the live id when sent
# What start may run: nothing else, whatever the fuzz draws.
SAFE_ARGV = [[PY, "-c", "pass"], [TRUE]]

values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-5, 70000)
    | st.floats(allow_nan=True)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


def runnable(value: object) -> bool:
    """Whether the daemon would try to execute ``value`` as an argv."""
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(a, str) and a and "\0" not in a for a in value)
    )


REAL: dict[str, st.SearchStrategy[object]] = {
    "session": st.sampled_from([SESSION, "default", "nope"]),
    "process": st.sampled_from([*PROTECTED, "done", "missing"]),
    "subscription": st.just(SUBSCRIPTION),
    "stream": st.sampled_from(["stdout", "stderr", "pty"]),
    "argv": st.sampled_from(SAFE_ARGV),
    # Harmless to a sleeper: continue, window change, urgent data.
    "signal": st.sampled_from([18, 28, 23]),
    "offset": st.integers(0, 5),
    "from_seq": st.integers(0, 3),
    "categories": st.sampled_from([["lifecycle"], ["lifecycle", "process"], ["file"]]),
    "backpressure": st.sampled_from(["drop-oldest", "block"]),
    "containment": st.sampled_from(["auto", "cgroup", "process-group"]),
    "stdin": st.sampled_from(["null", "pipe"]),
    "data": st.sampled_from(["aGk=", "", "!!"]),
    "grace_period": st.sampled_from([0, 0.1]),
    "name": st.text("abcxyz", min_size=1, max_size=3),
    "capacity": st.integers(1, 8),
    "resend": st.integers(1, 4),
    "detach_timeout": st.sampled_from([0.2, 30]),
    "rows": st.integers(1, 100),
    "cols": st.integers(1, 100),
    "request": st.integers(0, 4),
    "cwd": st.just("/"),
    "env": st.just({"FUZZ": "1"}),
    "backlog_bytes": st.integers(1, 4096),
    **{flag: st.booleans() for flag in ("follow", "tree", "write", "exist_ok", "pty", "eof")},
    "track_descendants": st.booleans(),
}
NAMES = sorted(REAL)


# Named by most requests: present in most examples, so that the handlers
# get past their lookups.
TARGETS = ("session", "process", "subscription")


@st.composite
def request_params(draw: st.DrawFn) -> dict[str, object]:
    names = draw(st.lists(st.sampled_from(NAMES), max_size=5, unique=True))
    names += [t for t in TARGETS if t not in names and draw(st.integers(0, 5)) > 0]
    params: dict[str, object] = {}
    # Half the examples hold real, well-typed values only (they reach what
    # the handlers do); the others mix in anything at all.
    anything = draw(st.booleans())
    for name in names:
        real = REAL[name]
        value = draw(values if anything and draw(st.booleans()) else real)
        if name == "argv" and runnable(value) and value not in SAFE_ARGV:
            value = SAFE_ARGV[0]  # never run a program the fuzz made up
        params[name] = value
    return params


class Fixture:
    """The daemon, and what is in it that examples must leave alone."""

    def __init__(self, running: DaemonProcess) -> None:
        self.running = running
        self.pids: dict[str, int] = {}
        self.subscription = ""

    async def ensure(self, client: trio_observer.DaemonClient) -> None:
        """(Re)create the session, the protected processes and the subscription."""
        await client.create_session(SESSION, grace_period=0.5, exist_ok=True)
        await client.create_session("default", grace_period=0.5, exist_ok=True)
        listed = await self.processes(client)
        for name, start in PROTECTED.items():
            found = listed.get(name)
            if found is not None and found["state"] == "running":
                self.pids[name] = found["pid"]
                continue
            if found is not None:
                await client.remove(name, session=SESSION)
            started = await client.request("start", session=SESSION, name=name, **start)
            self.pids[name] = started["pid"]
        if "done" not in listed:
            await client.start([TRUE], session=SESSION, name="done")
            await client.wait("done", session=SESSION)
        subscriptions = await client.request("subscriptions")
        if not any(s["id"] == self.subscription for s in subscriptions["subscriptions"]):
            stream = await client.subscribe(session=SESSION, capacity=4)
            self.subscription = stream.result["id"]
            await stream.aclose()

    async def processes(self, client: trio_observer.DaemonClient) -> dict[str, dict[str, Any]]:
        for session in await client.sessions():
            if session["name"] == SESSION:
                return {p["name"]: p for p in session["processes"]}
        return {}


@pytest.fixture(scope="module")
def fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fixture]:
    running = start_daemon(tmp_path_factory.mktemp("fuzz") / "d" / "daemon.sock")
    yield Fixture(running)
    running.process.terminate()
    running.process.communicate(timeout=60)


def spared(method: str, params: dict[str, object]) -> set[str]:
    """The protected processes this request may legitimately stop."""
    session = params.get("session", "default")
    if session is None:
        session = "default"
    if session != SESSION:
        return set()
    if method == "close_session":
        return set(PROTECTED)
    process = params.get("process")
    if method in ("terminate", "signal") and isinstance(process, str) and process in PROTECTED:
        return {process}
    return set()


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.sampled_from(FUZZED), request_params())
def test_request_handlers_survive_any_params(
    fixture: Fixture, method: str, params: dict[str, object]
) -> None:
    async def exchange() -> None:
        with trio.fail_after(60):
            async with trio_observer.connect(fixture.running.path, autostart=False) as client:
                await fixture.ensure(client)
                sent = {
                    k: fixture.subscription if v == SUBSCRIPTION else v for k, v in params.items()
                }
                # A wait (or a graceful stop) of a sleeper answers only when
                # it ends: leaving the request behind is what a client does.
                with trio.move_on_after(1 if method in ("wait", "terminate") else 30) as scope:
                    try:
                        stream = await client.stream(method, **sent)
                    except trio_observer.DaemonError as exc:
                        assert exc.code != "internal-error", exc  # noqa: PT017
                        event(f"{method}: {exc.code}")
                    else:
                        event(f"{method}: answered")
                        await stream.aclose()
                assert not scope.cancelled_caught or method in ("wait", "terminate")
            async with trio_observer.connect(fixture.running.path, autostart=False) as client:
                assert "pid" in await client.status()
                listed = await fixture.processes(client)
                for name in set(PROTECTED) - spared(method, params):
                    assert listed[name]["pid"] == fixture.pids[name], (name, listed)
                    assert listed[name]["state"] == "running", (name, listed)

    trio.run(exchange)
    assert fixture.running.process.poll() is None


@settings(max_examples=15, deadline=None)
# Not None: the Python client leaves None params out, as "not given".
@given(
    st.dictionaries(
        st.sampled_from(NAMES), values.filter(lambda v: v is not None), min_size=1, max_size=4
    )
)
def test_shutdown_refuses_params_then_stops_everything(
    shutdown_daemon: Fixture, params: dict[str, object]
) -> None:
    async def exchange() -> None:
        with trio.fail_after(60):
            async with trio_observer.connect(
                shutdown_daemon.running.path, autostart=False
            ) as client:
                await shutdown_daemon.ensure(client)
                with pytest.raises(trio_observer.DaemonError, match="bad-params") as caught:
                    await client.request("shutdown", **params)
                assert "shutdown takes no params" in str(caught.value)
                assert "pid" in await client.status()
                listed = await shutdown_daemon.processes(client)
                assert {listed[n]["pid"] for n in PROTECTED} == {
                    shutdown_daemon.pids[n] for n in PROTECTED
                }

    trio.run(exchange)


@pytest.fixture(scope="module")
def shutdown_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fixture]:
    """A daemon of its own, shut down (by a request without params) at the end."""
    running = start_daemon(tmp_path_factory.mktemp("shutdown") / "d" / "daemon.sock")
    fixture = Fixture(running)
    yield fixture

    async def stop() -> None:
        async with trio_observer.connect(running.path, autostart=False) as client:
            await client.shutdown()
            await client.wait_closed()

    trio.run(stop)
    running.process.communicate(timeout=60)
    assert running.process.returncode == 0
    # Every process it ran is gone: shutdown stopped and reaped them all.
    assert [pid for pid in fixture.pids.values() if os.path.exists(f"/proc/{pid}")] == []
