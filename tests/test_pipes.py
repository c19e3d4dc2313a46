"""Captured pipes: grown to 1 MiB within the user's pipe budget, read in bursts."""

from __future__ import annotations

import fcntl
import os
import subprocess
from collections.abc import Iterator

import pytest
import trio

from trio_observer import CAPTURE, open_session
from trio_observer._linux import _pipes
from trio_observer._output import BURST_SIZE, OutputLog, pump_stream

from .conftest import PY

pytestmark = pytest.mark.usefixtures("no_leaks")

_GROWN = _pipes.CAPTURE_PIPE_SIZE // os.sysconf("SC_PAGE_SIZE")


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    read_fd, write_fd = os.pipe()
    try:
        yield read_fd, write_fd
    finally:
        for fd in (read_fd, write_fd):
            try:
                os.close(fd)
            except OSError:
                pass


def _can_grow() -> bool:
    read_fd, write_fd = os.pipe()
    try:
        fcntl.fcntl(read_fd, fcntl.F_SETPIPE_SZ, _pipes.CAPTURE_PIPE_SIZE)
        return True
    except OSError:
        return False
    finally:
        os.close(read_fd)
        os.close(write_fd)


needs_growth = pytest.mark.skipif(
    not _can_grow(), reason="this user may not grow a pipe to 1 MiB (fs.pipe-max-size)"
)


@pytest.fixture
def budget(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # Room for one grown pipe and a bit: what an unprivileged user near its
    # limit would get.
    monkeypatch.setattr(_pipes, "pipe_budget", lambda: _GROWN + _GROWN // 2)
    before = _pipes.grown_pages()
    yield
    assert _pipes.grown_pages() == before


@needs_growth
@pytest.mark.usefixtures("budget")
def test_pipes_grow_only_within_the_budget() -> None:
    pipes = [os.pipe() for _ in range(3)]
    try:
        first = _pipes.grow_pipe(pipes[0][0])
        assert first == _GROWN
        assert fcntl.fcntl(pipes[0][0], fcntl.F_GETPIPE_SZ) == _pipes.CAPTURE_PIPE_SIZE
        # Over the budget: left at its default, nothing counted.
        default = fcntl.fcntl(pipes[1][0], fcntl.F_GETPIPE_SZ)
        assert _pipes.grow_pipe(pipes[1][0]) == 0
        assert fcntl.fcntl(pipes[1][0], fcntl.F_GETPIPE_SZ) == default
        # A released share can be taken again.
        _pipes.release_pipe(first)
        third = _pipes.grow_pipe(pipes[2][0])
        assert third == _GROWN
        _pipes.release_pipe(third)
    finally:
        for read_fd, write_fd in pipes:
            os.close(read_fd)
            os.close(write_fd)


def test_what_is_not_a_pipe_is_left_alone() -> None:
    before = _pipes.grown_pages()
    with open(os.devnull, "rb") as f:
        assert _pipes.grow_pipe(f.fileno()) == 0
    assert _pipes.grown_pages() == before


def test_exemption_from_the_pipe_limits_is_read_from_the_capabilities(
    tmp_path: os.PathLike[str],
) -> None:
    status = os.path.join(tmp_path, "status")

    def exempt(capabilities: int) -> bool:
        with open(status, "w") as f:
            f.write(f"Name:\tpython\nCapEff:\t{capabilities:016x}\n")
        return _pipes._exempt_from_limits(status)

    assert exempt(1 << 24)  # CAP_SYS_RESOURCE
    assert exempt(1 << 21)  # CAP_SYS_ADMIN
    # Root in a container with neither is limited like any user.
    assert not exempt(0x1FFFEFFFFFF & ~(1 << 21))
    assert not exempt(0)


class _Recording(trio.abc.ReceiveStream):
    """A real pipe's stream, noting what each read asked for."""

    def __init__(self, stream: trio.lowlevel.FdStream) -> None:
        self.stream = stream
        self.asked: list[int | None] = []

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        self.asked.append(max_bytes)
        return await self.stream.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.stream.aclose()


@needs_growth
async def test_the_pump_reads_in_bursts_while_the_pipe_is_full(pipe: tuple[int, int]) -> None:
    read_fd, write_fd = pipe
    fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, _pipes.CAPTURE_PIPE_SIZE)
    # All in the pipe before the first read, so each read's size is known:
    # a full 64 KiB, a full burst, then the 1,000 bytes left.
    payload = bytes(range(256)) * ((65536 + BURST_SIZE) // 256) + b"e" * 1000
    os.write(write_fd, payload)
    os.close(write_fd)
    stream = _Recording(trio.lowlevel.FdStream(os.dup(read_fd)))
    log = OutputLog()
    async with stream:
        await pump_stream(stream, log, burst_size=BURST_SIZE)
    # Up after a full read, down after a short one.
    assert stream.asked == [65536, BURST_SIZE, BURST_SIZE, 65536]
    assert log.total_bytes == len(payload)
    assert log.snapshot() == payload
    assert log.closed


async def test_without_a_burst_size_every_read_asks_for_the_chunk_size(
    pipe: tuple[int, int],
) -> None:
    read_fd, write_fd = pipe
    os.write(write_fd, b"x" * 65536)
    os.close(write_fd)
    stream = _Recording(trio.lowlevel.FdStream(os.dup(read_fd)))
    log = OutputLog()
    async with stream:
        await pump_stream(stream, log)
    assert stream.asked == [65536, 65536]
    assert log.total_bytes == 65536


@needs_growth
async def test_a_session_grows_its_captured_pipes_and_gives_the_share_back() -> None:
    # The child looks at its pipes once told to: by then start_process has
    # returned, and the readers are set up.
    script = (
        "import fcntl, sys\n"
        "sys.stdin.read()\n"
        "print(fcntl.fcntl(1, fcntl.F_GETPIPE_SZ), fcntl.fcntl(2, fcntl.F_GETPIPE_SZ))\n"
    )
    before = _pipes.grown_pages()
    with trio.fail_after(20):
        async with open_session() as session:
            process = await session.start_process(
                [PY, "-c", script], stdin=subprocess.PIPE, stdout=CAPTURE, stderr=CAPTURE
            )
            assert _pipes.grown_pages() == before + 2 * _GROWN
            assert process.stdin is not None
            await process.stdin.aclose()
            assert await process.wait() == 0
    assert process.stdout_log is not None
    assert process.stdout_log.snapshot() == b"%d %d\n" % ((_pipes.CAPTURE_PIPE_SIZE,) * 2)
    assert _pipes.grown_pages() == before


@pytest.mark.usefixtures("budget")
async def test_a_session_over_the_budget_captures_on_default_pipes() -> None:
    script = "import fcntl; print(fcntl.fcntl(1, fcntl.F_GETPIPE_SZ)); print('x' * 200000)"
    with trio.fail_after(20):
        async with open_session() as session:
            # The first holds the budget's one pipe (if this user may grow
            # pipes at all) until its stdin is closed; the second gets the
            # default size.
            first = await session.start_process(
                [PY, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE, stdout=CAPTURE
            )
            second = await session.start_process([PY, "-c", script], stdout=CAPTURE)
            assert await second.wait() == 0
            assert first.stdin is not None
            await first.stdin.aclose()
            assert await first.wait() == 0
    assert second.stdout_log is not None
    size, rest = second.stdout_log.snapshot().split(b"\n", 1)
    assert int(size) < _pipes.CAPTURE_PIPE_SIZE
    assert rest == b"x" * 200000 + b"\n"
