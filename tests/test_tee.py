"""Byte tees of an OutputLog: DROP_OLDEST loss accounting, BLOCK backpressure."""

from __future__ import annotations

import itertools

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from trio_observer import ObserverBackpressure
from trio_observer._output import OutputLog, pump_stream
from trio_observer._tee import ByteTee, MissedBytes

BLOCK = ObserverBackpressure.BLOCK
DROP_OLDEST = ObserverBackpressure.DROP_OLDEST


def drain(tee: ByteTee) -> list[bytes | MissedBytes]:
    items: list[bytes | MissedBytes] = []
    while True:
        try:
            items.append(tee.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel):
            return items


async def test_drop_oldest_reports_exact_missed_bytes_in_band() -> None:
    log = OutputLog()
    log.feed_nowait(b"before the tee")
    tee = log.open_tee(capacity=2, backpressure=DROP_OLDEST)
    log.feed_nowait(b"a")
    log.feed_nowait(b"bb")
    log.feed_nowait(b"ccc")  # full: dropped
    log.feed_nowait(b"dddd")  # still full: dropped
    assert await tee.receive() == b"a"
    log.feed_nowait(b"eeeee")  # room again: the marker goes before it
    assert drain(tee) == [b"bb", MissedBytes(7), b"eeeee"]
    status = tee.status()
    assert (status.delivered_bytes, status.missed_bytes, status.queued_chunks) == (8, 7, 0)
    assert status.backpressure is DROP_OLDEST
    assert not status.disconnected


async def test_loss_after_the_last_chunk_is_reported_at_the_end() -> None:
    log = OutputLog()
    tee = log.open_tee(capacity=1, backpressure=DROP_OLDEST)
    log.feed_nowait(b"kept")
    log.feed_nowait(b"lost")
    log.close()
    assert [item async for item in tee] == [b"kept", MissedBytes(4)]
    with pytest.raises(trio.EndOfChannel):
        await tee.receive()


async def test_a_block_tee_makes_the_writer_wait() -> None:
    log = OutputLog()
    tee = log.open_tee(capacity=1, backpressure=BLOCK)
    fed: list[bytes] = []

    async def writer() -> None:
        for chunk in [b"1", b"2", b"3"]:
            await log.feed(chunk)
            fed.append(chunk)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        await trio.testing.wait_all_tasks_blocked()
        # "1" filled the queue; the writer waits to feed "2".
        assert fed == [b"1"]
        assert log.total_bytes == 1
        assert await tee.receive() == b"1"
        await trio.testing.wait_all_tasks_blocked()
        assert fed == [b"1", b"2"]
        assert await tee.receive() == b"2"
        assert await tee.receive() == b"3"
    assert tee.status().missed_bytes == 0
    assert log.snapshot() == b"123"


async def test_a_block_tee_slows_the_pump_not_the_cursors() -> None:
    log = OutputLog()
    cursor = log.cursor()
    tee = log.open_tee(capacity=1, backpressure=BLOCK)
    send, receive = trio.testing.memory_stream_one_way_pair()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(pump_stream, receive, log)
        await send.send_all(b"first")
        await trio.testing.wait_all_tasks_blocked()
        await send.send_all(b"second")
        await trio.testing.wait_all_tasks_blocked()
        # The pump read "second" but holds it until the tee has room.
        assert log.total_bytes == 5
        assert await cursor.receive() == b"first"
        assert await tee.receive() == b"first"
        await trio.testing.wait_all_tasks_blocked()
        assert log.total_bytes == 11
        await send.aclose()
        assert [item async for item in tee] == [b"second"]
    assert [item async for item in cursor] == [b"second"]


async def test_cancelling_a_blocked_writer_still_records_the_bytes() -> None:
    log = OutputLog()
    tee = log.open_tee(capacity=1, backpressure=BLOCK)
    log.feed_nowait(b"full")
    with trio.move_on_after(0) as scope:
        await log.feed(b"late")
    assert scope.cancelled_caught
    assert log.snapshot() == b"fulllate"
    assert drain(tee) == [b"full", b"late"]


async def test_closing_a_tee_disconnects_it_and_releases_the_writer() -> None:
    log = OutputLog()
    cursor = log.cursor()
    tee = log.open_tee(capacity=1, backpressure=BLOCK)
    log.feed_nowait(b"x")

    async def writer() -> None:
        await log.feed(b"y")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        await trio.testing.wait_all_tasks_blocked()
        assert log.total_bytes == 1
        await tee.aclose()
    assert log.total_bytes == 2
    assert tee.status().disconnected
    log.feed_nowait(b"z")  # a disconnected tee never breaks the log
    assert tee.status().delivered_bytes == 1
    with pytest.raises(trio.ClosedResourceError):
        tee.receive_nowait()
    log.close()
    assert b"".join([item async for item in cursor]) == b"xyz"  # type: ignore[misc]
    tee.close()


async def test_closing_a_tee_wakes_its_receiver() -> None:
    log = OutputLog()
    tee = log.open_tee(backpressure=DROP_OLDEST)

    async def receiver() -> None:
        with pytest.raises(trio.ClosedResourceError):
            await tee.receive()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receiver)
        await trio.testing.wait_all_tasks_blocked()
        tee.close()


async def test_tee_as_context_manager_and_on_a_closed_log() -> None:
    log = OutputLog()
    async with log.open_tee(backpressure=DROP_OLDEST) as tee:
        log.feed_nowait(b"data")
    assert tee.status().disconnected
    log.feed_nowait(b"more")
    log.close()
    late = log.open_tee()
    with pytest.raises(trio.EndOfChannel):
        await late.receive()


def test_open_tee_checks_its_arguments() -> None:
    log = OutputLog()
    with pytest.raises(ValueError, match="capacity"):
        log.open_tee(capacity=0)
    with pytest.raises(TypeError, match="capacity"):
        log.open_tee(capacity=2.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="backpressure"):
        log.open_tee(backpressure="block")  # type: ignore[arg-type]


@given(
    sizes=st.lists(st.integers(min_value=1, max_value=50), max_size=60),
    reads=st.lists(st.booleans(), max_size=60),
    capacity=st.integers(min_value=1, max_value=5),
)
def test_drop_oldest_accounting_adds_up(sizes: list[int], reads: list[bool], capacity: int) -> None:
    async def main() -> None:
        log = OutputLog(max_bytes=10)
        tee = log.open_tee(capacity=capacity, backpressure=DROP_OLDEST)
        received: list[bytes | MissedBytes] = []
        for index, size in enumerate(sizes):
            log.feed_nowait(bytes([index % 256]) * size)
            if index < len(reads) and reads[index]:
                received.extend(drain(tee))
        status = tee.status()
        assert status.delivered_bytes + status.missed_bytes == sum(sizes)
        log.close()
        received.extend(drain(tee))
        chunks = [item for item in received if isinstance(item, bytes)]
        markers = [item.count for item in received if isinstance(item, MissedBytes)]
        assert sum(map(len, chunks)) == status.delivered_bytes
        assert sum(markers) == status.missed_bytes
        # Never two markers in a row: each one stands for one run of losses.
        for first, second in itertools.pairwise(received):
            assert not (isinstance(first, MissedBytes) and isinstance(second, MissedBytes))
        # Chunks arrive in feed order.
        firsts = [chunk[0] for chunk in chunks]
        assert firsts == sorted(set(firsts))

    trio.run(main)
