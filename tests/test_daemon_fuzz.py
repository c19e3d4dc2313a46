"""Every request handler, fuzzed: any params give a reply or a named error."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import trio_observer
from trio_observer._daemon._handlers import METHODS

from .test_daemon import DaemonProcess, start_daemon

# Not fuzzed: shutdown ends the daemon (tested elsewhere); start with random
# argv could run a real program of this machine.
FUZZED = sorted(set(METHODS) - {"shutdown", "start"})

values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-5, 5)
    | st.floats(allow_nan=True)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
param_names = st.sampled_from(
    [
        "session",
        "process",
        "name",
        "stream",
        "offset",
        "follow",
        "signal",
        "tree",
        "grace_period",
        "categories",
        "capacity",
        "backpressure",
        "detach_timeout",
        "subscription",
        "from_seq",
        "data",
        "rows",
        "cols",
        "write",
        "request",
        "exist_ok",
    ]
)


@pytest.fixture(scope="module")
def shared_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    running = start_daemon(tmp_path_factory.mktemp("fuzz") / "d" / "daemon.sock")
    yield running
    running.process.terminate()
    running.process.communicate(timeout=60)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.sampled_from(FUZZED), st.dictionaries(param_names, values, max_size=5))
def test_request_handlers_survive_any_params(
    shared_daemon: DaemonProcess, method: str, params: dict[str, object]
) -> None:
    async def exchange() -> None:
        with trio.fail_after(30):
            async with trio_observer.connect(shared_daemon.path, autostart=False) as client:
                try:
                    stream = await client.stream(method, **params)
                except trio_observer.DaemonError as exc:
                    assert exc.code != "internal-error", exc  # noqa: PT017
                else:
                    await stream.aclose()
                assert "pid" in await client.status()

    trio.run(exchange)
    assert shared_daemon.process.poll() is None
