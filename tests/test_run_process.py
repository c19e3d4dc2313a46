"""Session.run_process keeps trio.run_process's contract: the same cases through both."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing

from trio_observer import CAPTURE, Process, open_session

PY = sys.executable

Runner = Callable[..., Awaitable[subprocess.CompletedProcess[bytes]]]


async def _both(case: Callable[[Runner], Awaitable[Any]]) -> tuple[Any, Any]:
    """Run ``case`` with trio.run_process, then with session.run_process."""
    theirs = await case(trio.run_process)
    async with open_session() as session:
        ours = await case(session.run_process)
    return theirs, ours


async def test_returns_a_completed_process() -> None:
    async def case(run: Runner) -> tuple[object, ...]:
        done = await run([PY, "-c", "import sys; sys.exit(0)"])
        assert isinstance(done, subprocess.CompletedProcess)
        return (done.args, done.returncode, done.stdout, done.stderr)

    theirs, ours = await _both(case)
    assert ours == theirs == ([PY, "-c", "import sys; sys.exit(0)"], 0, None, None)


async def test_check_raises_with_the_captured_output() -> None:
    script = "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"

    async def case(run: Runner) -> tuple[object, ...]:
        with pytest.raises(subprocess.CalledProcessError) as info:
            await run([PY, "-c", script], capture_stdout=True, capture_stderr=True)
        e = info.value
        return (e.returncode, e.cmd, e.stdout, e.stderr)

    theirs, ours = await _both(case)
    assert ours == theirs == (3, [PY, "-c", script], b"out\n", b"err\n")


async def test_check_false_returns_the_exit_code() -> None:
    async def case(run: Runner) -> int:
        return (await run([PY, "-c", "raise SystemExit(1)"], check=False)).returncode

    assert await _both(case) == (1, 1)


async def test_input_is_fed_then_closed() -> None:
    script = "import sys; sys.stdout.write(sys.stdin.read().upper())"

    async def case(run: Runner) -> bytes:
        done = await run([PY, "-c", script], stdin=b"hello", capture_stdout=True)
        assert done.stdout is not None
        return done.stdout

    assert await _both(case) == (b"HELLO", b"HELLO")
    async with open_session() as session:
        done = await session.run_process([PY, "-c", script], input=b"abc", capture_stdout=True)
    assert done.stdout == b"ABC"


async def test_default_stdin_is_empty() -> None:
    async def case(run: Runner) -> bytes | None:
        done = await run(
            [PY, "-c", "import sys; print(repr(sys.stdin.read()))"], capture_stdout=True
        )
        return done.stdout

    assert await _both(case) == (b"''\n", b"''\n")


async def test_captured_output_is_kept_whole() -> None:
    # Far beyond an OutputLog's default 1 MiB backlog: the result never drops.
    size = 3 << 20
    script = f"import sys; sys.stdout.buffer.write(b'x' * {size})"

    async def case(run: Runner) -> int:
        done = await run([PY, "-c", script], capture_stdout=True)
        assert done.stdout is not None
        return len(done.stdout)

    assert await _both(case) == (size, size)


async def test_returns_only_when_the_output_is_read() -> None:
    # The child exits while a grandchild still writes to the shared pipe:
    # the result must hold the grandchild's line too.
    script = (
        "import subprocess, sys; "
        "subprocess.Popen([sys.executable, '-c', "
        "'import time, sys; time.sleep(0.3); print(\"late\"); sys.stdout.flush()'])"
    )

    async def case(run: Runner) -> bytes | None:
        return (await run([PY, "-c", script], capture_stdout=True)).stdout

    assert await _both(case) == (b"late\n", b"late\n")


async def test_argument_errors_match_trio() -> None:
    async def case(run: Runner) -> list[type[BaseException]]:
        raised: list[type[BaseException]] = []
        for kwargs in (
            {"stdin": subprocess.PIPE},
            {"stdout": subprocess.PIPE},
            {"capture_stdout": True, "stdout": subprocess.DEVNULL},
        ):
            with pytest.raises((ValueError, TypeError)) as info:
                await run([PY, "-c", "pass"], **kwargs)
            raised.append(info.type)
        return raised

    theirs, ours = await _both(case)
    assert ours == theirs == [ValueError, ValueError, ValueError]
    async with open_session() as session:
        with pytest.raises(TypeError, match="not str"):
            await session.run_process([PY, "-c", "pass"], stdin="text")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="either stdin= or input="):
            await session.run_process([PY, "-c", "pass"], stdin=b"a", input=b"b")


async def test_under_nursery_start_hands_back_the_process() -> None:
    script = "import sys; sys.stdout.write(sys.stdin.readline())"
    async with open_session() as session, trio.open_nursery() as nursery:
        process = await nursery.start(
            partial(session.run_process, [PY, "-c", script], stdin=subprocess.PIPE)
        )
        assert isinstance(process, Process)
        assert process.stdin is not None
        await process.stdin.send_all(b"x\n")
        await process.stdin.aclose()
        assert await process.wait() == 0


async def test_cancellation_stops_the_tree() -> None:
    # The child starts a grandchild and reports its pid; cancelling the call
    # must stop both before Cancelled propagates (trio.run_process leaves
    # the grandchild behind; the session's run_process does not).
    script = (
        "import subprocess, sys, time; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        "print(p.pid, flush=True); time.sleep(60)"
    )
    async with open_session(grace_period=5) as session:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                process = await nursery.start(
                    partial(session.run_process, [PY, "-c", script], stdout=CAPTURE)
                )
                assert process.stdout_log is not None
                match = await process.stdout_log.expect(b"\n", timeout=20)
                grandchild = int(match.before)
                nursery.cancel_scope.cancel()
            assert process.returncode is not None
            assert process.returncode < 0
            # The grandchild was in the group: it dies of the same signal
            # (gone, or a zombie until the session or init reaps it).
            while _alive(grandchild):  # noqa: ASYNC110  # a real process has no trio event
                await trio.sleep(0.01)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def test_poll_and_wait_output() -> None:
    async with open_session() as session:
        process = await session.start_process(
            [PY, "-c", "import sys; sys.stdin.read(); print('done')"],
            stdin=subprocess.PIPE,
            stdout=CAPTURE,
        )
        assert process.poll() is None
        assert process.stdin is not None
        await process.stdin.aclose()
        await process.wait()
        assert process.poll() == process.returncode == 0
        await process.wait_output()
        assert process.stdout_log is not None
        assert process.stdout_log.closed
        assert process.stdout_log.snapshot() == b"done\n"
