"""Lines from a captured stream: ``cursor.lines()`` and ``cursor.line_batches()``."""

from __future__ import annotations

import gc
import itertools
import sys

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from trio_observer._cursor import OutputCursor, OutputGap
from trio_observer._output import OutputLog


async def collect_lines(cursor: OutputCursor, **kwargs: bool | str | int) -> list[str | OutputGap]:
    return [line async for line in cursor.lines(**kwargs)]  # type: ignore[arg-type]


async def collect_batches(
    cursor: OutputCursor, **kwargs: bool | str | int
) -> list[list[str] | OutputGap]:
    return [batch async for batch in cursor.line_batches(**kwargs)]  # type: ignore[arg-type]


# -- lines -----------------------------------------------------------------


async def test_lines_join_a_character_split_across_chunks() -> None:
    log = OutputLog()
    cursor = log.cursor()
    log.feed_nowait(b"caf\xc3")
    log.feed_nowait(b"\xa9\nna\xc3")
    log.feed_nowait(b"\xafve")
    log.close()
    assert await collect_lines(cursor) == ["café", "naïve"]


async def test_lines_strip_crlf_even_when_split() -> None:
    log = OutputLog()
    plain, kept = log.cursor(), log.cursor()
    for chunk in [b"one\r\ntwo\r", b"\nthree\rbar\n", b"four\n"]:
        log.feed_nowait(chunk)
    log.close()
    assert await collect_lines(plain) == ["one", "two", "three\rbar", "four"]
    assert await collect_lines(kept, keepends=True) == [
        "one\r\n",
        "two\r\n",
        "three\rbar\n",
        "four\n",
    ]


async def test_text_without_a_newline_comes_out_in_bounded_pieces() -> None:
    # A progress bar redrawn with "\r" never ends a line; the text held for
    # it must stay bounded (by max_bytes by default), not grow with the stream.
    log = OutputLog(max_bytes=64)
    batches = log.cursor().line_batches()
    splitter = batches._splitter  # type: ignore[attr-defined]
    bar = b"progress 42%\r" * 4  # 52 bytes, no "\n"
    got: list[list[str] | OutputGap] = []

    async def read() -> None:
        async for batch in batches:
            got.append(batch)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        for _ in range(20):
            log.feed_nowait(bar)
            await trio.testing.wait_all_tasks_blocked()
            assert splitter._size <= 64
        log.close()
    lines = [line for batch in got for line in batch]  # type: ignore[union-attr]
    assert "".join(lines) == (bar * 20).decode()
    assert [len(line) for line in lines] == [64] * 16 + [16]


async def test_max_line_chars_cuts_long_lines_the_same_however_chunked() -> None:
    log = OutputLog()
    cursors = [log.cursor() for _ in range(3)]
    for chunk in [b"abcdefg\nab", b"c\r", b"\nabcd\r\n", b"abcdefgh"]:
        log.feed_nowait(chunk)
    log.close()
    expected = ["abc", "def", "g", "abc", "abc", "d", "abc", "def", "gh"]
    assert await collect_lines(cursors[0], max_line_chars=3) == expected
    assert await collect_lines(cursors[1], max_line_chars=3, keepends=True) == [
        "abc",
        "def",
        "g\n",
        "abc",
        "\r\n",
        "abc",
        "d\r\n",
        "abc",
        "def",
        "gh",
    ]
    batches = await collect_batches(cursors[2], max_line_chars=3)
    assert [line for batch in batches for line in batch] == expected  # type: ignore[union-attr]


async def test_max_line_chars_is_checked() -> None:
    cursor = OutputLog().cursor()
    with pytest.raises(ValueError, match="max_line_chars"):
        cursor.lines(max_line_chars=0)
    with pytest.raises(TypeError, match="max_line_chars"):
        cursor.line_batches(max_line_chars=2.5)  # type: ignore[arg-type]


async def test_lines_yield_the_final_unterminated_line() -> None:
    log = OutputLog()
    cursor = log.cursor()
    log.feed_nowait(b"a\nb")
    log.feed_nowait(b"c")
    log.close()
    assert await collect_lines(cursor) == ["a", "bc"]


async def test_lines_replace_bad_bytes_and_truncated_characters() -> None:
    log = OutputLog()
    cursor = log.cursor()
    log.feed_nowait(b"\xff ok\n\xc3")
    log.close()
    assert await collect_lines(cursor) == ["\ufffd ok", "\ufffd"]


async def test_lines_report_a_gap_in_band() -> None:
    log = OutputLog(max_bytes=8)
    cursor = log.cursor()
    lines = cursor.lines()
    log.feed_nowait(b"ab\ncd")
    assert await lines.__anext__() == "ab"
    log.feed_nowait(b"efghijklm\nz\n")  # 17 fed, 8 kept: "efgh" went unread
    log.close()
    rest = [item async for item in lines]
    assert rest == ["cd", OutputGap(missed_bytes=4), "ijklm", "z"]


async def test_lines_check_the_encoding_at_once() -> None:
    log = OutputLog()
    with pytest.raises(LookupError):
        log.cursor().lines(encoding="no-such-codec")
    with pytest.raises(LookupError):
        log.cursor().lines(errors="no-such-handler")


async def test_a_lines_iterator_can_be_left_and_resumed() -> None:
    log = OutputLog()
    cursor = log.cursor()
    log.feed_nowait(b"first\nsecond\n")
    lines = cursor.lines()
    async for line in lines:
        assert line == "first"
        break
    log.feed_nowait(b"third")
    log.close()
    # The same iterator holds the text it already decoded.
    assert [line async for line in lines] == ["second", "third"]
    assert cursor.position == log.total_bytes


async def test_an_abandoned_lines_iterator_is_finalized_quietly() -> None:
    log = OutputLog()
    cursor = log.cursor()
    log.feed_nowait(b"a\nb\n")
    async for _ in cursor.lines():
        break
    gc.collect()
    await trio.testing.wait_all_tasks_blocked()


async def test_a_lines_loop_leaves_trio_s_async_generator_hooks_in_place() -> None:
    # Each loop steps its generator once with the hooks swapped out; they
    # must be trio's again right after, for every other async generator.
    hooks = sys.get_asyncgen_hooks()
    assert hooks.finalizer is not None  # trio's
    log = OutputLog()
    log.feed_nowait(b"a\n")
    lines = log.cursor().lines()
    loop = aiter(lines)
    assert sys.get_asyncgen_hooks() == hooks
    assert await anext(loop) == "a"
    assert sys.get_asyncgen_hooks() == hooks


async def test_a_lines_loop_cancelled_while_waiting_resumes_in_the_next_loop() -> None:
    log = OutputLog()
    lines = log.cursor().lines()
    got: list[str | OutputGap] = []
    log.feed_nowait(b"one\ntwo\npart")
    with trio.CancelScope() as scope:
        async for line in lines:
            got.append(line)
            if line == "two":
                # The next step has to wait for a chunk: it is cancelled there.
                scope.cancel()
    assert scope.cancelled_caught
    assert got == ["one", "two"]
    log.feed_nowait(b"ial\nthree\n")
    log.close()
    assert [line async for line in lines] == ["partial", "three"]


async def test_a_lines_loop_checkpoints_per_chunk_not_per_buffered_line() -> None:
    # The contract of test_lines_checkpoints_per_chunk_not_per_buffered_line,
    # through async for (which runs on a generator, not on __anext__).
    log = OutputLog()
    log.feed_nowait(b"one\ntwo\nthree\n")
    lines = log.cursor().lines()
    got: list[str | OutputGap] = []
    with trio.CancelScope() as scope:
        async for line in lines:
            got.append(line)
            if line == "one":
                log.feed_nowait(b"four\n")  # a chunk of its own
                scope.cancel()
    assert scope.cancelled_caught
    assert got == ["one", "two", "three"]
    log.close()
    assert [line async for line in lines] == ["four"]


async def test_a_lines_loop_lets_other_tasks_run_once_per_chunk_in_hand() -> None:
    # Every chunk is there already, so the loop never waits; reading each one
    # is still a schedule point, and serving its lines is none.
    log = OutputLog()
    chunks = 20
    for i in range(chunks):
        # 4 KiB or more: kept as a chunk of its own.
        log.feed_nowait(f"{i} a\n{i} b\n{i} ".encode().ljust(4096, b"c") + b"\n")
    log.close()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await trio.lowlevel.checkpoint()
            ticks += 1

    seen: dict[str, set[int]] = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        async for line in log.cursor().lines():
            assert isinstance(line, str)
            seen.setdefault(line.split()[0], set()).add(ticks)
        nursery.cancel_scope.cancel()
    assert len(seen) == chunks
    # No other task ran while a chunk's lines were served...
    assert all(len(at) == 1 for at in seen.values())
    # ...and both tasks were runnable in every scheduling round, so the
    # ticker ran about once per chunk read (half of that allows for the
    # order trio picks within a round).
    assert ticks >= chunks // 2


async def test_stepping_by_hand_and_looping_share_one_position() -> None:
    log = OutputLog()
    log.feed_nowait(b"a\nb\nc\n")
    log.feed_nowait(b"d\n" * 2048)  # another chunk (4 KiB: kept as its own)
    log.close()
    lines = log.cursor().lines()
    assert await lines.__anext__() == "a"
    async for line in lines:
        assert line == "b"
        break
    assert await lines.__anext__() == "c"
    assert [line async for line in lines] == ["d"] * 2048
    with pytest.raises(StopAsyncIteration):
        await lines.__anext__()


# -- line_batches ----------------------------------------------------------


async def test_batches_hold_the_lines_each_chunk_completes() -> None:
    log = OutputLog()
    batches = log.cursor().line_batches()
    got: list[list[str] | OutputGap] = []

    async def read() -> None:
        async for batch in batches:
            got.append(batch)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        # Fed one at a time, so that each is read as a chunk of its own
        # (small reads not yet read are gathered into one).
        for chunk in [b"one\ntwo\nthr", b"ee", b"\r\nfour\nfive"]:
            await trio.testing.wait_all_tasks_blocked()
            log.feed_nowait(chunk)
        await trio.testing.wait_all_tasks_blocked()
        log.close()
    # The chunk b"ee" completes no line, so it yields no (empty) batch.
    assert got == [["one", "two"], ["three", "four"], ["five"]]


async def test_batches_keep_ends_like_lines() -> None:
    log = OutputLog()
    cursor = log.cursor()
    log.feed_nowait(b"a\r\nb\rc\n")
    log.feed_nowait(b"d")
    log.close()
    assert await collect_batches(cursor, keepends=True) == [["a\r\n", "b\rc\n"], ["d"]]


async def test_batches_report_a_gap_after_the_partial_line() -> None:
    log = OutputLog(max_bytes=8)
    cursor = log.cursor()
    batches = cursor.line_batches()
    log.feed_nowait(b"ab\ncd")
    assert await batches.__anext__() == ["ab"]
    log.feed_nowait(b"efghijklm\nz\n")  # 17 fed, 8 kept: "efgh" went unread
    log.close()
    rest = [item async for item in batches]
    assert rest == [["cd"], OutputGap(missed_bytes=4), ["ijklm", "z"]]


async def test_a_gap_in_hand_needs_no_checkpoint_and_the_end_is_a_cancellation_point() -> None:
    # As docs/output.md says: the gap read with the partial line before it
    # is served as it stands; reading the end checks for cancellation.
    log = OutputLog(max_bytes=8)
    batches = log.cursor().line_batches()
    log.feed_nowait(b"ab\ncd")
    assert await batches.__anext__() == ["ab"]
    log.feed_nowait(b"efghijkl\n")  # 14 fed, 8 kept: "e" went unread
    log.close()
    assert await batches.__anext__() == ["cd"]
    with trio.CancelScope() as scope:
        scope.cancel()
        assert await batches.__anext__() == OutputGap(missed_bytes=1)
    assert await batches.__anext__() == ["fghijkl"]
    with trio.CancelScope() as scope:
        scope.cancel()
        await batches.__anext__()  # reads the end
    assert scope.cancelled_caught
    assert [item async for item in batches] == []


async def test_a_gap_with_no_partial_line_comes_alone() -> None:
    log = OutputLog(max_bytes=4)
    cursor = log.cursor()
    log.feed_nowait(b"ab\n")
    log.feed_nowait(b"cd\nef\n")  # 9 fed, 4 kept: "ab\ncd" (5 bytes) went unread
    log.close()
    assert await collect_batches(cursor) == [OutputGap(missed_bytes=5), ["", "ef"]]


async def test_a_waiting_batch_reader_wakes_only_for_a_whole_line() -> None:
    log = OutputLog()
    batches = log.cursor().line_batches()
    received: list[list[str] | OutputGap] = []

    async def reader() -> None:
        async for batch in batches:
            received.append(batch)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        log.feed_nowait(b"no newline yet")
        await trio.testing.wait_all_tasks_blocked()
        assert received == []
        log.feed_nowait(b"\nnext")
        await trio.testing.wait_all_tasks_blocked()
        assert received == [["no newline yet"]]
        log.close()
    assert received == [["no newline yet"], ["next"]]


async def test_cancelling_a_waiting_batch_reader_loses_nothing() -> None:
    log = OutputLog()
    cursor = log.cursor()
    batches = cursor.line_batches()
    log.feed_nowait(b"partial ")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(batches.__anext__)
        await trio.testing.wait_all_tasks_blocked()
        # The reader took b"partial " from the cursor and is parked for more.
        assert cursor.position == 8
        nursery.cancel_scope.cancel()
    log.feed_nowait(b"line\n")
    log.close()
    assert [item async for item in batches] == [["partial line"]]


async def test_batches_check_the_encoding_at_once() -> None:
    log = OutputLog()
    with pytest.raises(LookupError):
        log.cursor().line_batches(encoding="no-such-codec")
    with pytest.raises(LookupError):
        log.cursor().line_batches(errors="no-such-handler")


async def test_an_abandoned_batch_iterator_is_finalized_quietly() -> None:
    log = OutputLog()
    cursor = log.cursor()
    log.feed_nowait(b"a\nb\n")
    async for _ in cursor.line_batches():
        break
    gc.collect()
    await trio.testing.wait_all_tasks_blocked()


_TEXT = st.lists(st.sampled_from(["a", "é", "\n", "\r", "\r\n", "€", "xyz"]), max_size=40).map(
    "".join
)


def cut_whole_text(text: str, keepends: bool, limit: int) -> list[str]:
    """The lines of ``text`` split at once, each cut into pieces of ``limit``."""
    if not keepends:
        text = text.replace("\r\n", "\n")
    out: list[str] = []
    lines = text.split("\n")
    for index, line in enumerate(lines):
        ending = "\n" if keepends and index < len(lines) - 1 else ""
        pieces = [line[i : i + limit] for i in range(0, len(line), limit)] or [""]
        pieces[-1] += ending
        out += pieces
    return out if out[-1] else out[:-1]


@given(
    text=_TEXT,
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=8),
    limit=st.integers(min_value=1, max_value=300),
)
def test_lines_and_batches_agree_with_splitting_the_whole_text(
    text: str, cuts: list[int], limit: int
) -> None:
    data = text.encode("utf-8")
    bounds = sorted({min(cut, len(data)) for cut in cuts} | {0, len(data)})
    chunks = [data[a:b] for a, b in itertools.pairwise(bounds)]
    expected = cut_whole_text(text, False, limit)
    expected_kept = cut_whole_text(text, True, limit)

    async def main() -> None:
        log = OutputLog()
        cursors = [log.cursor() for _ in range(3)]
        for chunk in chunks:  # chunks split UTF-8 characters anywhere
            log.feed_nowait(chunk)
        log.close()
        lines = await collect_lines(cursors[0], max_line_chars=limit)
        batches = await collect_batches(cursors[1], max_line_chars=limit)
        kept_batches = await collect_batches(cursors[2], keepends=True, max_line_chars=limit)
        assert lines == expected
        assert all(isinstance(b, list) and b for b in batches)
        assert [line for b in batches for line in b] == expected  # type: ignore[union-attr]
        assert [line for b in kept_batches for line in b] == expected_kept  # type: ignore[union-attr]

    trio.run(main)


async def test_lines_checkpoints_per_chunk_not_per_buffered_line() -> None:
    # The documented contract (docs/output.md): a line already decoded is
    # served without a checkpoint; reading the next chunk is one (so a
    # cancelled loop stops there, and other tasks run once per chunk).
    log = OutputLog()
    log.feed_nowait(b"one\ntwo\nthree\n")
    lines = log.cursor().lines()
    with trio.CancelScope() as scope:
        assert await lines.__anext__() == "one"
        log.feed_nowait(b"four\n")  # a chunk of its own: the first was read
        scope.cancel()
        assert [await lines.__anext__(), await lines.__anext__()] == ["two", "three"]
        await lines.__anext__()
    assert scope.cancelled_caught
