"""Resuming a subscription: who streams it, and that every number is received or counted."""

from __future__ import annotations

import socket
from typing import Any

import trio

import trio_observer
from trio_observer._daemon._client import RemoteEvent, remote_item
from trio_observer._daemon._protocol import FrameDecoder, encode, hello
from trio_observer._daemon._server import MAX_OPEN_REQUESTS

from .conftest import PY
from .test_daemon import DaemonProcess, daemon, run_batch, wait_exited  # noqa: F401  (the fixture)


async def test_a_second_resume_on_one_connection_ends_the_first_stream(
    daemon: DaemonProcess,  # noqa: F811
) -> None:
    """Found by a ground-truth audit: two resumes of one subscription on one
    connection both streamed it, taking turns at the sink, so each stream
    had holes (seq 0, 2, 4, ... and 1, 3, 5, ...) that no marker counted;
    and the first to end released the subscription under the other. The
    older stream now ends (cancelled) and the newer one has every number."""
    with trio.fail_after(60):
        async with trio_observer.connect(daemon.path, autostart=False) as client:
            await client.create_session("default")
            first = await client.subscribe(capacity=64)
            sub_id = first.result["id"]
            second = await client.resume(sub_id, from_seq=0)
            await run_batch(client, 5)
            await wait_exited(client)
            # The second resumed from 0: every number, in order, no hole.
            seqs: list[int] = []
            while len(seqs) < 10:
                item = remote_item(await second.__anext__())
                assert isinstance(item, RemoteEvent)
                assert item.seq == len(seqs), seqs
                seqs.append(item.seq)
            # The first stream was ended when the second took over; it
            # holds whatever it had been handed before, in order.
            early = [remote_item(frame).seq async for frame in first]
            assert first.end is not None
            assert first.end.get("cancelled") is True
            assert early == list(range(len(early)))
            status = await client.subscription_status(sub_id)
            assert status["attached"] is True
            assert status["next_seq"] == 10
            await second.aclose()


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
