"""stdin for spawned processes: a pipe that any client of the user can write to."""

from __future__ import annotations

import pytest
import trio

import trio_observer
from trio_observer._daemon._client import DaemonError

from .conftest import PY
from .test_daemon import DaemonProcess, daemon  # noqa: F401  (the fixture)

# Echoes each line it reads, upper-cased; at end of file prints how many.
ECHO = (
    "import sys\n"
    "n = 0\n"
    "for line in sys.stdin:\n"
    "    n += 1\n"
    "    sys.stdout.write(line.upper()); sys.stdout.flush()\n"
    "print('lines', n)\n"
)


async def test_two_clients_write_a_pipe_process_stdin_then_end_it(
    daemon: DaemonProcess,  # noqa: F811
) -> None:
    with trio.fail_after(60):
        async with trio_observer.connect(daemon.path, autostart=False) as first:
            started = await first.start([PY, "-c", ECHO], name="echo", stdin="pipe")
            assert started["stdin"] == "pipe"
            await first.send_input("echo", b"one\n")
        # The writer went away; the process still reads, and another client
        # (of the same user) goes on writing, then ends its input.
        async with trio_observer.connect(daemon.path, autostart=False) as second:
            await second.send_input("echo", b"two\nthree\n", eof=True)
            exited = await second.wait("echo")
            assert exited["exit_code"] == 0
            output = b"".join(
                [c async for c in await second.output("echo") if isinstance(c, bytes)]
            )
            assert output == b"ONE\nTWO\nTHREE\nlines 3\n"
            with pytest.raises(DaemonError, match="stdin-closed"):
                await second.send_input("echo", b"late\n")


async def test_stdin_defaults_to_dev_null_and_is_checked(
    daemon: DaemonProcess,  # noqa: F811
) -> None:
    with trio.fail_after(60):
        async with trio_observer.connect(daemon.path, autostart=False) as client:
            started = await client.start(
                [PY, "-c", "import sys; print(repr(sys.stdin.read()))"], name="null"
            )
            assert started["stdin"] == "null"
            assert (await client.wait("null"))["exit_code"] == 0
            out = b"".join([c async for c in await client.output("null") if isinstance(c, bytes)])
            assert out == b"''\n"
            with pytest.raises(DaemonError, match="no-stdin"):
                await client.send_input("null", b"x")
            for bad in ("file", 1, True):
                with pytest.raises(DaemonError, match=r"bad-params.*stdin"):
                    await client.request("start", argv=[PY, "-c", "pass"], stdin=bad)
            with pytest.raises(DaemonError, match=r"bad-params.*stdin"):
                await client.request("start", argv=[PY, "-c", "pass"], stdin="pipe", pty=True)


async def test_input_that_is_not_base64_is_bad_params(
    daemon: DaemonProcess,  # noqa: F811
) -> None:
    # Found by the handler fuzz: a non-ASCII str makes b64decode raise a
    # plain ValueError (not binascii.Error), which became an internal error.
    with trio.fail_after(60):
        async with trio_observer.connect(daemon.path, autostart=False) as client:
            await client.start([PY, "-c", ECHO], name="bad-input", stdin="pipe")
            for bad in ("\x80", "not base64!", "abc"):
                with pytest.raises(DaemonError, match=r"bad-params.*base64"):
                    await client.request("input", process="bad-input", data=bad)
            await client.send_input("bad-input", b"ok\n", eof=True)
            assert (await client.wait("bad-input"))["exit_code"] == 0
