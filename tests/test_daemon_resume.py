"""Resuming a subscription: which request streams it; every number received or counted."""

from __future__ import annotations

import trio

import trio_observer
from trio_observer._daemon._client import RemoteEvent, remote_item

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
