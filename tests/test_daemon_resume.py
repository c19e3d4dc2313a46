"""Resuming a subscription: which request streams it; every number received or counted."""

from __future__ import annotations

import os

import trio

import trio_observer
from trio_observer._daemon._client import RemoteEvent, remote_item

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
