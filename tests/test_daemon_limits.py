"""What one client can do to the daemon: it stays up and bounded for the others."""

from __future__ import annotations

import resource
import signal
import socket
from pathlib import Path
from typing import Any

import pytest
import trio

import trio_observer
from trio_observer._daemon._handlers import MAX_MESSAGE_CHARS
from trio_observer._daemon._protocol import FrameDecoder, encode, hello
from trio_observer._daemon._server import MAX_OPEN_REQUESTS

from .conftest import PY
from .test_daemon import DaemonProcess, daemon, start_daemon  # noqa: F401  (the fixture)

HARD = resource.getrlimit(resource.RLIMIT_NOFILE)[1]


async def test_a_client_that_sends_without_reading_is_bounded(
    daemon: DaemonProcess,  # noqa: F811
) -> None:
    """Found by the audit: every request became a task at once, however many
    were open, so a client that sent requests and never read the replies
    grew the daemon without bound (256,000 requests in 20 s: 1.8 GB of RSS).
    Past MAX_OPEN_REQUESTS open on one connection, a request is refused;
    those that were open are answered as usual."""
    extra = 5
    with trio.fail_after(60):
        async with trio_observer.connect(daemon.path, autostart=False) as client:
            await client.start([PY, "-c", "import time; time.sleep(60)"], name="sleeper")
            sock = trio.socket.socket(socket.AF_UNIX)
            await sock.connect(str(daemon.path))
            stream = trio.SocketStream(sock)
            async with stream:
                count = MAX_OPEN_REQUESTS + extra
                waits = (
                    encode(
                        {
                            "type": "request",
                            "id": i,
                            "method": "wait",
                            "params": {"process": "sleeper"},
                        }
                    )
                    for i in range(count)
                )
                # Then a request that answers at once, to know when the
                # daemon has read them all.
                last = encode({"type": "request", "id": count, "method": "status"})
                await stream.send_all(encode(hello()) + b"".join(waits) + last)
                decoder = FrameDecoder()
                frames: list[dict[str, Any]] = []
                while not any(f.get("id") == count for f in frames):
                    frames.extend(decoder.feed(await stream.receive_some()))
                refused = [f for f in frames if f["type"] == "error"]
                assert [f["id"] for f in refused] == list(range(MAX_OPEN_REQUESTS, count + 1))
                assert {f["code"] for f in refused} == {"too-many-requests"}
                # The open ones go on: the sleeper's end answers each of them.
                await client.terminate("sleeper", grace_period=5)
                while len(frames) < 2 + count:
                    frames.extend(decoder.feed(await stream.receive_some()))
                replies = [f for f in frames if f["type"] == "reply"]
                assert sorted(f["id"] for f in replies) == list(range(MAX_OPEN_REQUESTS))


async def test_running_out_of_fds_does_not_end_the_daemon(tmp_path: Path) -> None:
    """Found by the audit: accept() failing with EMFILE (one client's many
    connections used up the daemon's fds) raised out of the listener task
    and ended the daemon, and with it every session and its processes.
    It now waits for fds to come free and serves on."""
    # A soft limit of 48 fds: a few dozen connections use them up.
    limit = f"import os, resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (48, {HARD}))"
    prefix = [PY, "-c", limit + "; os.execv(sys.argv[1], sys.argv[1:])"]
    running = start_daemon(tmp_path / "d" / "daemon.sock", prefix=prefix)
    assert running.process.stderr is not None
    socks: list[socket.socket] = []
    try:
        with trio.fail_after(60):
            async with trio_observer.connect(running.path, autostart=False) as client:
                await client.start([PY, "-c", "import time; time.sleep(60)"], name="sleeper")
            # Fewer than the listen backlog (64), so that no connect blocks:
            # those the daemon cannot accept wait in the backlog.
            for _ in range(60):
                sock = socket.socket(socket.AF_UNIX)
                sock.connect(str(running.path))
                socks.append(sock)
            while b"cannot accept connections" not in (
                line := await trio.to_thread.run_sync(running.process.stderr.readline)
            ):
                assert line, "the daemon ended"
            for sock in socks:
                sock.close()
            async with trio_observer.connect(running.path, autostart=False) as client:
                (session,) = await client.sessions()
                assert session["processes"][0]["state"] == "running"
                await client.terminate("sleeper", grace_period=5)
    finally:
        for sock in socks:
            sock.close()
        running.process.send_signal(signal.SIGTERM)
        running.process.communicate(timeout=60)
    assert running.process.returncode == 0


async def test_a_reply_larger_than_a_frame_is_refused_as_such(
    daemon: DaemonProcess,  # noqa: F811
) -> None:
    """Found by the audit: a reply the encoder refused (over 1 MiB, here the
    session list of processes with long command lines) counted as sent, so
    the daemon logged an internal error and sent an ``end`` frame in place
    of the reply, and the client failed with KeyError 'result'."""
    long_args = ["x" * 100_000] * 2
    with trio.fail_after(60):
        async with trio_observer.connect(daemon.path, autostart=False) as client:
            for index in range(6):
                await client.start([PY, "-c", "pass", *long_args], name=f"long{index}")
            with pytest.raises(trio_observer.DaemonError, match="reply-too-large") as caught:
                await client.sessions()
            assert caught.value.code == "reply-too-large"
            # The connection, and the daemon, go on.
            assert (await client.status())["processes"] == 6
            for index in range(6):
                await client.wait(f"long{index}")
                await client.remove(f"long{index}")
            (session,) = await client.sessions()
            assert session["processes"] == []


async def test_an_error_naming_a_long_argument_does_not_end_the_daemon(
    daemon: DaemonProcess,  # noqa: F811
) -> None:
    """Found by the audit: an error message quotes what the client sent, and
    the repr of 300,000 DEL characters (5 bytes each in the frame) made the
    no-such-process error frame 1.5 MB; the encoder's refusal escaped the
    request handler and ended the daemon, its sessions and their processes.
    Messages are now cut to MAX_MESSAGE_CHARS."""
    with trio.fail_after(60):
        async with trio_observer.connect(daemon.path, autostart=False) as client:
            started = await client.start([PY, "-c", "import time; time.sleep(60)"], name="keep")
            with pytest.raises(trio_observer.DaemonError, match="no-such-process") as caught:
                await client.wait("\x7f" * 300_000)
            assert len(str(caught.value)) < 2 * MAX_MESSAGE_CHARS
            (session,) = await client.sessions()
            assert session["processes"][0]["pid"] == started["pid"]
            assert session["processes"][0]["state"] == "running"
            await client.terminate("keep", grace_period=5)
    assert daemon.process.poll() is None
