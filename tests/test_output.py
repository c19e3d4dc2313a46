"""OutputLog: backlog, cursors, gaps, lines, expect and idle."""

from __future__ import annotations

import re
import tracemalloc

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from trio_observer._cursor import OutputCursor, OutputGap
from trio_observer._expect import ExpectEOF, ExpectTimeout
from trio_observer._output import OutputLog, pump_stream
from trio_observer._sink import ObserverBackpressure


def drain(cursor: OutputCursor) -> list[bytes | OutputGap]:
    """Everything a cursor can read without waiting."""
    items: list[bytes | OutputGap] = []
    while True:
        try:
            items.append(cursor.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel):
            return items


# -- backlog ---------------------------------------------------------------


async def test_backlog_keeps_the_newest_bytes_and_counts_exactly() -> None:
    log = OutputLog(max_bytes=10)
    assert (log.total_bytes, log.dropped_bytes, log.retained_bytes) == (0, 0, 0)
    assert log.snapshot() == b""
    log.feed_nowait(b"0123")
    log.feed_nowait(b"456")
    assert log.snapshot() == b"0123456"
    assert log.dropped_bytes == 0
    log.feed_nowait(b"789ab")  # 12 bytes: the oldest 2 go, from the middle of a chunk
    assert log.snapshot() == b"23456789ab"
    assert (log.total_bytes, log.dropped_bytes, log.start_offset) == (12, 2, 2)
    log.feed_nowait(b"cdefgh")  # evicts "23456" whole-chunk-and-a-bit
    assert log.snapshot() == b"89abcdefgh"
    assert (log.total_bytes, log.dropped_bytes, log.retained_bytes) == (18, 8, 10)


async def test_a_feed_larger_than_the_backlog_keeps_its_tail() -> None:
    log = OutputLog(max_bytes=4)
    log.feed_nowait(b"ab")
    log.feed_nowait(bytearray(b"0123456789"))
    assert log.snapshot() == b"6789"
    assert (log.total_bytes, log.dropped_bytes) == (12, 8)


async def test_eviction_compacts_without_losing_offsets() -> None:
    # Enough one-byte chunks to trigger several compactions of the chunk list.
    log = OutputLog(max_bytes=50)
    cursor = log.cursor()
    data = bytes(range(256)) * 4
    for i in range(len(data)):
        log.feed_nowait(data[i : i + 1])
    assert log.snapshot() == data[-50:]
    assert log.dropped_bytes == len(data) - 50
    items = drain(cursor)
    assert items[0] == OutputGap(len(data) - 50)
    assert b"".join(i for i in items[1:] if isinstance(i, bytes)) == data[-50:]
    middle = log.cursor(len(data) - 20)
    assert b"".join(drain(middle)) == data[-20:]  # type: ignore[arg-type]


async def test_small_reads_cost_about_their_size() -> None:
    # A slow interactive writer makes many tiny reads; keeping each as a
    # chunk of its own cost about 40 bytes of overhead per byte retained.
    log = OutputLog(max_bytes=1 << 16)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(100_000):
            log.feed_nowait(bytes((i & 0x7F, 10)))
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert log.retained_bytes == 1 << 16
    assert used < 2 * (1 << 16)
    expected = b"".join(bytes((i & 0x7F, 10)) for i in range(100_000))
    assert log.snapshot() == expected[-(1 << 16) :]


def test_max_bytes_is_checked() -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        OutputLog(max_bytes=0)
    with pytest.raises(TypeError, match="max_bytes"):
        OutputLog(max_bytes=1.5)  # type: ignore[arg-type]


async def test_close_is_idempotent_and_ends_feeding() -> None:
    log = OutputLog()
    log.feed_nowait(b"x")
    log.close()
    log.close()
    assert log.closed
    with pytest.raises(trio.ClosedResourceError):
        log.feed_nowait(b"y")
    with pytest.raises(trio.ClosedResourceError):
        await log.feed(b"y")
    assert log.snapshot() == b"x"


# -- cursors ---------------------------------------------------------------


async def test_cursor_from_oldest_now_and_offset() -> None:
    log = OutputLog(max_bytes=6)
    log.feed_nowait(b"abcdefgh")
    oldest = log.cursor()
    now = log.cursor("now")
    at = log.cursor(5)
    assert (oldest.position, now.position, at.position) == (2, 8, 5)
    log.feed_nowait(b"ij")
    assert drain(oldest) == [OutputGap(2), b"efgh", b"ij"]
    assert drain(now) == [b"ij"]
    assert drain(at) == [b"fgh", b"ij"]
    with pytest.raises(ValueError, match="start"):
        log.cursor(11)
    with pytest.raises(ValueError, match="start"):
        log.cursor("newest")  # type: ignore[arg-type]


async def test_gap_reports_exact_missed_bytes_once() -> None:
    log = OutputLog(max_bytes=5)
    cursor = log.cursor()
    log.feed_nowait(b"abc")
    assert cursor.receive_nowait() == b"abc"
    log.feed_nowait(b"defghijk")  # 11 fed, 5 kept: "def" went unread
    assert cursor.receive_nowait() == OutputGap(missed_bytes=3)
    assert cursor.receive_nowait() == b"ghijk"
    with pytest.raises(trio.WouldBlock):
        cursor.receive_nowait()
    assert cursor.position == log.total_bytes


async def test_cursors_are_independent() -> None:
    log = OutputLog()
    first, second = log.cursor(), log.cursor()
    log.feed_nowait(b"one")
    assert await first.receive() == b"one"
    log.feed_nowait(b"two")
    assert await first.receive() == b"two"
    # Small reads the second cursor had not taken yet come gathered.
    assert drain(second) == [b"onetwo"]
    assert log.snapshot() == b"onetwo"


async def test_receive_waits_for_data_then_sees_end() -> None:
    log = OutputLog()
    cursor = log.cursor()
    got: list[bytes | OutputGap] = []

    async def reader() -> None:
        async for item in cursor:
            got.append(item)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        assert got == []
        log.feed_nowait(b"hello")
        await trio.testing.wait_all_tasks_blocked()
        assert got == [b"hello"]
        log.close()
    assert got == [b"hello"]
    with pytest.raises(trio.EndOfChannel):
        await cursor.receive()


async def test_closing_a_cursor_wakes_its_reader() -> None:
    log = OutputLog()
    cursor = log.cursor()
    other = log.cursor()

    async def reader() -> None:
        with pytest.raises(trio.ClosedResourceError):
            await cursor.receive()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        await cursor.aclose()
        cursor.close()
    log.feed_nowait(b"still fine")
    assert drain(other) == [b"still fine"]


async def test_slow_cursor_never_blocks_the_writer() -> None:
    log = OutputLog(max_bytes=100)
    slow = log.cursor()
    send, receive = trio.testing.memory_stream_one_way_pair()
    payload = b"x" * 10_000

    async with trio.open_nursery() as nursery:
        nursery.start_soon(pump_stream, receive, log)
        for _ in range(10):
            await send.send_all(payload)
        await send.aclose()
    # The pump saw EOF and finished although the cursor never read a byte.
    assert log.closed
    assert log.total_bytes == 100_000
    assert drain(slow) == [OutputGap(99_900), b"x" * 100]


async def test_closing_a_pumped_log_discards_the_rest_of_the_stream() -> None:
    # A reader may close the log to stop waiting; the pump must neither
    # crash on the closed log nor stop reading (the writer would block).
    log = OutputLog()
    send, receive = trio.testing.lockstep_stream_one_way_pair()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump_stream, receive, log)
            await send.send_all(b"kept")
            await trio.testing.wait_all_tasks_blocked()
            log.close()
            # Lockstep: each send_all returns only once the pump took the bytes.
            for _ in range(3):
                await send.send_all(b"discarded")
            await send.aclose()
    assert log.snapshot() == b"kept"
    assert log.total_bytes == 4


async def test_closing_a_log_releases_a_pump_waiting_for_a_block_tee() -> None:
    log = OutputLog()
    tee = log.open_tee(capacity=1, backpressure=ObserverBackpressure.BLOCK)
    send, receive = trio.testing.lockstep_stream_one_way_pair()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump_stream, receive, log)
            await send.send_all(b"one")  # fills the tee
            await send.send_all(b"two")  # the pump now waits for room
            await trio.testing.wait_all_tasks_blocked()
            log.close()
            await send.send_all(b"three")  # read and discarded
            await send.aclose()
    assert log.snapshot() == b"one"
    assert [item async for item in tee] == [b"one"]


# -- expect ----------------------------------------------------------------


async def test_expect_literal_straddling_chunks() -> None:
    log = OutputLog()
    log.feed_nowait(b"old ready\n")

    async def feeder() -> None:
        for chunk in [b"Starting... re", b"a", b"dy", b"!\n"]:
            await trio.testing.wait_all_tasks_blocked()
            log.feed_nowait(chunk)

    with trio.fail_after(10):  # a missed straddle would wait for ever
        async with trio.open_nursery() as nursery:
            # pexpect's position: the first search finds the line printed
            # before the call, the second starts after it.
            assert (await log.expect("ready")).start == 4
            nursery.start_soon(feeder)
            match = await log.expect("ready")
    assert (match.start, match.end) == (10 + 12, 10 + 17)
    assert match.data == b"ready"
    assert match.before == b"\nStarting... "
    assert match.match is None
    assert log.snapshot()[match.start : match.end] == b"ready"


async def test_expect_takes_a_string_literally_and_a_compiled_regex_as_a_regex() -> None:
    # Unlike pexpect's expect(), which compiles a str: here "1+1" is text.
    log = OutputLog()
    log.feed_nowait(b"11 then 1+1=2\n")
    log.close()
    literals: list[str | bytes] = ["1+1", b"1+1"]
    for literal in literals:
        match = await log.expect(literal, since=0)
        assert (match.start, match.data, match.match) == (8, b"1+1", None)
    regex = await log.expect(re.compile(rb"1+"), since=0)
    assert (regex.start, regex.data) == (0, b"11")


async def test_expect_regex_and_chaining_with_since() -> None:
    log = OutputLog()
    log.feed_nowait(b"port=80")
    log.feed_nowait(b"81\nport=9")
    log.feed_nowait(b"0\n")
    first = await log.expect(re.compile(rb"port=(\d+)\n"), since=0)
    assert first.match is not None
    assert first.match.group(1) == b"8081"
    assert first.data == b"port=8081\n"
    second = await log.expect(re.compile(rb"port=(\d+)\n"), since=first.end)
    assert second.match is not None
    assert second.match.group(1) == b"90"
    assert second.before == b""
    assert second.start == first.end


async def test_expect_does_not_take_data_from_a_cursor() -> None:
    log = OutputLog()
    cursor = log.cursor()
    log.feed_nowait(b"prompt> ")
    match = await log.expect(b"> ", since=cursor)
    assert match.start == 6
    assert cursor.position == 0
    assert drain(cursor) == [b"prompt> "]


async def test_expect_since_cursor_position() -> None:
    log = OutputLog()
    log.feed_nowait(b"a=1;")
    cursor = log.cursor()
    drain(cursor)
    log.feed_nowait(b"a=2;")
    match = await log.expect(re.compile(rb"a=\d"), since=cursor)
    assert match.data == b"a=2"
    assert match.start == 4


async def test_expect_times_out_on_the_trio_clock(autojump_clock: trio.testing.MockClock) -> None:
    log = OutputLog()

    async def chatter() -> None:
        for _ in range(3):
            await trio.sleep(1)
            log.feed_nowait(b"tick ")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(chatter)
        start = trio.current_time()
        with pytest.raises(ExpectTimeout) as caught:
            await log.expect(b"boom", timeout=10)
    assert trio.current_time() - start == pytest.approx(10)
    assert isinstance(caught.value, TimeoutError)
    assert caught.value.seen == b"tick tick tick "
    assert caught.value.missed_bytes == 0


async def test_expect_raises_eof_with_what_it_saw() -> None:
    log = OutputLog()

    async def finish() -> None:
        await trio.testing.wait_all_tasks_blocked()
        log.feed_nowait(b"bye")
        log.close()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(finish)
        with pytest.raises(ExpectEOF) as caught:
            await log.expect(b"never")
    assert isinstance(caught.value, EOFError)
    assert caught.value.seen == b"bye"


async def test_expect_after_eviction_reports_missed_bytes() -> None:
    log = OutputLog(max_bytes=4)
    log.feed_nowait(b"abcdefgh")
    match = await log.expect(b"g", since=0)
    assert (match.start, match.missed_bytes, match.before) == (6, 4, b"ef")


async def test_expect_counts_only_unsearched_bytes_as_missed() -> None:
    # The search trims its own history to max_bytes; bytes it searched and
    # then let go are not missed, only bytes evicted before it looked.
    async def feed_all(log: OutputLog, *chunks: bytes) -> None:
        await trio.testing.wait_all_tasks_blocked()
        for chunk in chunks:
            log.feed_nowait(chunk)
            await trio.testing.wait_all_tasks_blocked()  # the search keeps up
        log.close()

    log = OutputLog(max_bytes=10)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(feed_all, log, b"0123456789", b"abcdef", b"END")
        match = await log.expect(b"END", since=0)
    assert (match.start, match.missed_bytes, match.before) == (16, 0, b"6789abcdef")

    log = OutputLog(max_bytes=10)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(feed_all, log, b"0123456789", b"abcdef")
        with pytest.raises(ExpectEOF) as caught:
            await log.expect(b"never")
    assert (caught.value.missed_bytes, caught.value.seen) == (0, b"6789abcdef")


async def test_expect_rejects_bad_arguments() -> None:
    log = OutputLog()
    other = OutputLog()
    with pytest.raises(ValueError, match="list of patterns is empty"):
        await log.expect([])
    with pytest.raises(TypeError, match="pattern"):
        await log.expect(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="since"):
        await log.expect(b"x", since=other.cursor())
    with pytest.raises(ValueError, match="since"):
        await log.expect(b"x", since=1)
    with pytest.raises(ValueError, match="timeout"):
        await log.expect(b"x", timeout=-1)


# -- idle ------------------------------------------------------------------


async def test_wait_for_idle_waits_out_the_last_burst(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log = OutputLog()

    async def bursts() -> None:
        for _ in range(4):
            await trio.sleep(0.5)
            log.feed_nowait(b".")

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(bursts)
        await log.wait_for_idle(1.0)
        # Last output at +2.0, then one quiet second.
        assert trio.current_time() - start == pytest.approx(3.0)


async def test_the_pump_dates_each_read_by_the_run_s_clock(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # pump_stream reads the clock through its own method (not through
    # feed_nowait): idle detection must still follow the run's MockClock.
    log = OutputLog()
    send, receive = trio.testing.lockstep_stream_one_way_pair()
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pump_stream, receive, log)
        await send.send_all(b"first")
        await trio.sleep(3)
        await send.send_all(b"second")  # lockstep: the pump has taken it
        await log.wait_for_idle(5.0)
        assert trio.current_time() - start == pytest.approx(8.0)
        await send.aclose()
    assert log.snapshot() == b"firstsecond"


async def test_wait_for_idle_returns_at_once_when_already_quiet(
    mock_clock: trio.testing.MockClock,
) -> None:
    log = OutputLog()
    log.feed_nowait(b"x")
    mock_clock.jump(5)
    start = trio.current_time()
    await log.wait_for_idle(2.0)
    assert trio.current_time() == start


async def test_wait_for_idle_times_out_while_output_continues(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log = OutputLog()

    async def chatter() -> None:
        while True:
            await trio.sleep(0.5)
            log.feed_nowait(b".")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(chatter)
        start = trio.current_time()
        with pytest.raises(TimeoutError):
            await log.wait_for_idle(1.0, timeout=4.0)
        assert trio.current_time() - start == pytest.approx(4.0)
        nursery.cancel_scope.cancel()


async def test_a_closed_stream_is_idle(mock_clock: trio.testing.MockClock) -> None:
    log = OutputLog()

    async def end_soon() -> None:
        await trio.testing.wait_all_tasks_blocked()
        log.feed_nowait(b"last")
        log.close()

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(end_soon)
        await log.wait_for_idle(60.0)
    assert trio.current_time() == start
    with pytest.raises(ValueError, match="quiet"):
        await log.wait_for_idle(-1.0)


# -- the property ----------------------------------------------------------


@given(
    chunks=st.lists(st.binary(min_size=0, max_size=40), max_size=40),
    max_bytes=st.integers(min_value=1, max_value=120),
)
def test_backlog_invariants(chunks: list[bytes], max_bytes: int) -> None:
    async def main() -> None:
        log = OutputLog(max_bytes=max_bytes)
        early = log.cursor()
        for chunk in chunks:
            log.feed_nowait(chunk)
        everything = b"".join(chunks)
        snapshot = log.snapshot()
        assert len(snapshot) == min(len(everything), max_bytes)
        assert snapshot == everything[len(everything) - len(snapshot) :]
        assert log.dropped_bytes + len(snapshot) == log.total_bytes == len(everything)
        items = drain(early)
        gaps = [item.missed_bytes for item in items if isinstance(item, OutputGap)]
        data = b"".join(item for item in items if isinstance(item, bytes))
        assert len(gaps) <= 1
        assert sum(gaps) == log.dropped_bytes
        assert sum(gaps) + len(data) == log.total_bytes
        assert data == snapshot

    trio.run(main)


_SIZES = st.one_of(st.integers(min_value=0, max_value=40), st.integers(4090, 4200))


@given(
    steps=st.lists(st.one_of(_SIZES, st.sampled_from(["read", "cursor"])), max_size=60),
    max_bytes=st.one_of(st.integers(min_value=1, max_value=120), st.integers(4000, 9000)),
)
def test_small_and_large_reads_interleaved_with_readers(
    steps: list[int | str], max_bytes: int
) -> None:
    # Small reads are gathered into a tail buffer and sealed into chunks;
    # whatever the mix, every reader sees the stream exactly once.
    async def main() -> None:
        log = OutputLog(max_bytes=max_bytes)
        stream = bytearray()
        readers: list[tuple[int, OutputCursor, list[bytes | OutputGap]]] = []
        for step in steps:
            if step == "cursor":
                readers.append((log.total_bytes, log.cursor("now"), []))
            elif step == "read":
                for _, cursor, items in readers:
                    items += drain(cursor)
            else:
                assert isinstance(step, int)
                data = bytes((len(stream) + i) % 251 for i in range(step))
                stream += data
                log.feed_nowait(data)
        log.close()
        assert log.snapshot() == bytes(stream[len(stream) - log.retained_bytes :])
        assert log.retained_bytes == min(len(stream), max_bytes)
        for position, cursor, items in readers:
            items += drain(cursor)
            for item in items:
                if isinstance(item, OutputGap):
                    assert item.missed_bytes > 0
                    position += item.missed_bytes
                else:
                    assert item == stream[position : position + len(item)]
                    position += len(item)
            assert position == len(stream)

    trio.run(main)


async def test_expect_position_is_pexpects() -> None:
    # A line printed before the call is found (the old default searched only
    # later output and timed out on it); nothing is matched twice.
    log = OutputLog()
    log.feed_nowait(b"Serving HTTP on 0.0.0.0 port 32911\nGET /\nGET /\n")
    assert log.expect_position == 0
    with trio.fail_after(10):
        served = await log.expect(re.compile(rb"port (\d+)"))
        assert served.match is not None
        assert served.match.group(1) == b"32911"
        assert log.expect_position == served.end
        first = await log.expect(b"GET /")
        second = await log.expect(b"GET /")
    assert first.start < second.start
    with pytest.raises(ExpectTimeout):
        await log.expect(b"GET /", timeout=0)
    # since= still starts where it is told, and moves the position on.
    again = await log.expect(b"GET /", since=0)
    assert again.start == first.start
    assert log.expect_position == first.end


async def test_expect_a_list_returns_the_index_of_the_earliest() -> None:
    log = OutputLog()
    log.feed_nowait(b"login: ")
    match = await log.expect([b"Password:", re.compile(rb"login: ?"), "$ "])
    assert (match.index, match.data) == (1, b"login: ")
    log.feed_nowait(b"x\n$ Password:")
    # Both are there: the earliest in the stream wins, not the first listed.
    match = await log.expect([b"Password:", "$ "])
    assert (match.index, match.data) == (1, b"$ ")
    single = await log.expect(b"Password:")
    assert single.index == 0


async def test_expect_str_regex_matches_decoded_text() -> None:
    log = OutputLog()
    # "é" is two bytes in UTF-8; a byte of garbage before it must not shift
    # the offsets of the match.
    log.feed_nowait(b"\xff caf\xc3\xa9 = 42\n")
    match = await log.expect(re.compile(r"café = (\d+)"))
    assert match.match is None
    assert match.text_match is not None
    assert match.text_match.group(1) == "42"
    assert match.data == "café = 42".encode()
    assert log.snapshot()[match.start : match.end] == match.data
    latin = OutputLog()
    latin.feed_nowait("naïve\n".encode("latin-1"))
    found = await latin.expect(re.compile(r"ï"), encoding="latin-1")
    assert (found.start, found.end) == (2, 3)
