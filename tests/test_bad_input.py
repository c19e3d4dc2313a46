"""Bad arguments to the public entry points: TypeError/ValueError naming them."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trio_observer import CAPTURE, open_session


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
