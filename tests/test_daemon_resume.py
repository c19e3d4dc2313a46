"""Resuming a subscription: which request streams it; every number received or counted."""

from __future__ import annotations

import os
import shutil

import pytest
import trio
import trio.testing

import trio_observer
from trio_observer._daemon._client import (
    STREAM_BUFFER_FRAMES,
    RemoteEvent,
    RemoteMissed,
    remote_item,
)
from trio_observer._daemon._protocol import MAX_FRAME_BYTES, encode

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


async def test_a_command_line_that_is_not_utf8_is_streamed(
    daemon: DaemonProcess,  # noqa: F811
) -> None:
    """Found by the audit: a descendant whose command line held a byte that
    is not UTF-8 (read from /proc as a lone surrogate) made its event frame
    unencodable; the subscription's stream ended with internal-error, and
    each resume replayed the same frame and failed again, so no later event
    was ever received. Such strings now go out as \\udcXX escapes."""
    arg = os.fsdecode(b"caf\xe9")
    script = "import os, sys; sys.stdout.write(os.fsencode(sys.argv[1]).hex())"
    with trio.fail_after(60):
        async with trio_observer.connect(daemon.path, autostart=False) as client:
            await client.create_session("default")
            stream = await client.subscribe()
            await client.start([PY, "-c", script, arg], name="latin1")
            await client.wait("latin1")
            started, exited = [remote_item(await stream.__anext__()) for _ in range(2)]
            assert isinstance(started, RemoteEvent)
            assert isinstance(exited, RemoteEvent)
            assert started.event["kind"] == "started"
            assert started.event["argv"][-1] == arg
            assert exited.event["kind"] == "exited"
            # The child got the very bytes (its own record of them).
            output = [item async for item in await client.output("latin1")]
            assert output == [b"caf\xe9".hex().encode()]


async def test_an_event_too_large_for_a_frame_is_counted_in_its_place(
    daemon: DaemonProcess,  # noqa: F811
) -> None:
    """Found by the audit: an event whose frame would pass 1 MiB (a
    descendant's 1.2 MB command line, here a STARTED event whose argv just
    fits in the start request) could not be sent: the stream ended with
    internal-error and each resume replayed it and failed again, so the
    subscription never got past it. It now goes out as a "too-large"
    marker for its one number, and the stream goes on."""
    request = {"type": "request", "id": 1, "method": "start"}
    # Chunks under the kernel's limit for one argument (128 KiB).
    argv = [PY, "-c", "pass", *["x" * 100_000] * 10]
    params = {"argv": argv, "session": "default", "name": "huge"}
    spare = MAX_FRAME_BYTES + 4 - len(encode({**request, "params": params}))
    argv.append("y" * (spare - len(',""')))
    assert len(encode({**request, "params": params})) == MAX_FRAME_BYTES + 4
    with trio.fail_after(60):
        async with trio_observer.connect(daemon.path, autostart=False) as client:
            await client.create_session("default")
            stream = await client.subscribe()
            # The request fits; its reply, which says more, does not.
            with pytest.raises(trio_observer.DaemonError, match="reply-too-large"):
                await client.request("start", **params)
            # (Every reply that describes it is too large too: its exit
            # is known from the stream.)
            first = [remote_item(await stream.__anext__()) for _ in range(2)]
            assert first[0] == RemoteMissed(seq=1, count=1, lost_in="too-large")
            assert isinstance(first[1], RemoteEvent)
            assert (first[1].seq, first[1].event["kind"]) == (1, "exited")
            await client.start([PY, "-c", "pass"], name="small")
            await client.wait("small")
            then = [remote_item(await stream.__anext__()) for _ in range(2)]
            assert all(isinstance(i, RemoteEvent) for i in then)
            assert [(i.seq, i.event["kind"]) for i in then if isinstance(i, RemoteEvent)] == [
                (2, "started"),
                (3, "exited"),
            ]
            status = await client.subscription_status(stream.result["id"])
            assert status["too_large_events"] == 1


async def test_a_stream_nobody_reads_does_not_hold_up_other_answers(
    daemon: DaemonProcess,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found by the audit: the client's reader waited for room in a stream's
    buffer (256 frames), so a client that subscribed and made requests
    before reading the stream hung: the 130th start never returned, its
    reply stuck behind events nobody read. The stream is now cut once it
    has held up an answer for STREAM_CUT_SECONDS: its reader gets the 256
    frames held, then BrokenResourceError, and resumes from the last seq
    with nothing lost."""
    # Not 5 s of waiting for the cut in the suite.
    monkeypatch.setattr(trio_observer._daemon._client, "STREAM_CUT_SECONDS", 0.05, raising=False)
    count = 140  # 280 events
    true = shutil.which("true") or "/bin/true"
    with trio.fail_after(60):
        async with trio_observer.connect(daemon.path, autostart=False) as client:
            await client.create_session("default")
            stream = await client.subscribe(capacity=1024)
            for index in range(count):
                await client.start([true], name=f"t{index}")
            for index in range(count):
                await client.wait(f"t{index}")
            # The 256 frames held, then the cut.
            seqs: list[int] = []
            for _ in range(STREAM_BUFFER_FRAMES):
                item = remote_item(await stream.__anext__())
                assert isinstance(item, RemoteEvent)
                seqs.append(item.seq)
            with pytest.raises(trio.BrokenResourceError, match="frames behind"):
                await stream.__anext__()
            assert seqs == list(range(STREAM_BUFFER_FRAMES))
            resumed = await client.resume(stream.result["id"], from_seq=len(seqs))
            while len(seqs) < 2 * count:
                item = remote_item(await resumed.__anext__())
                assert isinstance(item, RemoteEvent)
                assert item.seq == len(seqs)
                seqs.append(item.seq)
            await resumed.aclose()


async def test_a_slow_reader_alone_on_its_connection_is_slowed_not_cut(
    daemon: DaemonProcess,  # noqa: F811
) -> None:
    # The other side of the test above: with nothing else waiting on the
    # connection, a stream 256 frames behind holds the daemon back (the
    # events wait in the sink), and every one arrives.
    count = 140
    true = shutil.which("true") or "/bin/true"
    with trio.fail_after(60):
        async with trio_observer.connect(daemon.path, autostart=False) as reader:
            await reader.create_session("default")
            stream = await reader.subscribe(capacity=1024)
            async with trio_observer.connect(daemon.path, autostart=False) as other:
                for index in range(count):
                    await other.start([true], name=f"t{index}")
                for index in range(count):
                    await other.wait(f"t{index}")
            for seq in range(2 * count):
                item = remote_item(await stream.__anext__())
                assert isinstance(item, RemoteEvent)
                assert item.seq == seq
            await stream.aclose()


async def test_closing_a_stream_its_reader_fell_behind_leaves_the_connection(
    daemon: DaemonProcess,  # noqa: F811
) -> None:
    """Found by the audit (an old bug): closing a stream whose 256 frames were unread
    closed the channel the client's reader task was waiting to hand the
    next frame to; the ClosedResourceError that woke it was taken for the
    connection's end, and every later request failed."""
    count = 140
    true = shutil.which("true") or "/bin/true"
    with trio.fail_after(60):
        async with trio_observer.connect(daemon.path, autostart=False) as reader:
            await reader.create_session("default")
            stream = await reader.subscribe(capacity=1024)
            async with trio_observer.connect(daemon.path, autostart=False) as other:
                for index in range(count):
                    await other.start([true], name=f"t{index}")
                for index in range(count):
                    await other.wait(f"t{index}")
                # The reader's buffer is full once the daemon has handed
                # out more than it holds.
                sub_id = stream.result["id"]
                while True:
                    status = await other.subscription_status(sub_id)
                    if status["sent_frames"] > STREAM_BUFFER_FRAMES:
                        break
                    await trio.sleep(0.01)
            # Those frames are in this side's socket: once every task here
            # waits, the client's reader waits for room in the stream.
            await trio.testing.wait_all_tasks_blocked()
            await stream.aclose()
            assert (await reader.status())["subscriptions"] == 1
