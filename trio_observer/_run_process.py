"""``Session.run_process``: trio's ``run_process`` contract on a session's process.

Kept apart from ``_session`` so that the session module stays about
starting, reaping and tearing down; this one is about one call's input,
output and result.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import trio

from ._checks import check_bool
from ._process import Process, StdioArg

if TYPE_CHECKING:
    from ._limits import Limits
    from ._session import Session

_BYTES = (bytes, bytearray, memoryview)


@trio.lowlevel.enable_ki_protection
async def run_process(
    session: Session,
    argv: Sequence[str | os.PathLike[str]],
    *,
    stdin: bytes | bytearray | memoryview | StdioArg,
    input: bytes | bytearray | memoryview | None,
    capture_stdout: bool,
    capture_stderr: bool,
    check: bool,
    stdout: StdioArg,
    stderr: StdioArg,
    cwd: str | os.PathLike[str] | None,
    env: Mapping[str, str] | None,
    limits: Limits | None,
    task_status: trio.TaskStatus[Process],
) -> subprocess.CompletedProcess[bytes]:
    """See :meth:`Session.run_process`."""
    if isinstance(stdin, str) or isinstance(input, str):
        raise TypeError("stdin/input: process input must be bytes, not str (encode it first)")
    if input is not None:
        if not isinstance(input, _BYTES):
            raise TypeError(f"input must be bytes or None, not {type(input).__name__}")
        if stdin is not None and not (isinstance(stdin, _BYTES) and not stdin):
            raise ValueError("input: give either stdin= or input=, not both")
        stdin = input
    if task_status is trio.TASK_STATUS_IGNORED:
        for name, value in (("stdin", stdin), ("stdout", stdout), ("stderr", stderr)):
            if value is subprocess.PIPE:
                raise ValueError(
                    f"{name}=subprocess.PIPE is only valid with nursery.start, since "
                    "that is the only way to reach the pipe"
                )
    for flag, value in (
        ("check", check),
        ("capture_stdout", capture_stdout),
        ("capture_stderr", capture_stderr),
    ):
        check_bool(flag, value)
    if capture_stdout and stdout is not None:
        raise ValueError("capture_stdout: cannot be combined with stdout=")
    if capture_stderr and stderr is not None:
        raise ValueError("capture_stderr: cannot be combined with stderr=")
    data: bytes | None = None
    if isinstance(stdin, _BYTES):
        data = bytes(stdin)
        stdin = subprocess.PIPE
    process = await session.start_process(
        argv,
        stdin=stdin,
        stdout=subprocess.PIPE if capture_stdout else stdout,
        stderr=subprocess.PIPE if capture_stderr else stderr,
        cwd=cwd,
        env=env,
        limits=limits,
    )
    # Captured output is the caller's result, so it is kept whole (a list of
    # chunks, as trio does), never in a bounded OutputLog.
    out: list[bytes] = []
    err: list[bytes] = []

    # Each a task of its own, protected as the session's tasks are (trio
    # then delivers Ctrl-C to the main task): a KeyboardInterrupt raised in
    # one before its ``async with`` left its pipe open for good, since the
    # process no longer holds it for the session to close.
    @trio.lowlevel.enable_ki_protection
    async def feed(stream: trio.abc.SendStream, data: bytes) -> None:
        async with stream:
            try:
                await stream.send_all(data)
            except trio.BrokenResourceError:
                # The child closed its stdin early: as in trio, not an error.
                pass

    @trio.lowlevel.enable_ki_protection
    async def read(stream: trio.abc.ReceiveStream, chunks: list[bytes]) -> None:
        async with stream:
            async for chunk in stream:
                chunks.append(bytes(chunk))

    async with trio.open_nursery() as nursery:
        try:
            if data is not None:
                assert process.stdin is not None
                nursery.start_soon(feed, process.stdin, data)
                process.stdin = None
            if capture_stdout:
                assert process.stdout is not None
                nursery.start_soon(read, process.stdout, out)
                process.stdout = None
            if capture_stderr:
                assert process.stderr is not None
                nursery.start_soon(read, process.stderr, err)
                process.stderr = None
            task_status.started(process)
            await process.wait()
        except BaseException:
            # Cancelled (or failed) while the command runs: stop its whole
            # tree the way the session does, then let the readers finish.
            with trio.CancelScope(shield=True):
                await process.terminate_gracefully(grace_period=session.grace_period)
            raise
    returncode = process.returncode
    assert returncode is not None
    stdout_bytes = b"".join(out) if capture_stdout else None
    stderr_bytes = b"".join(err) if capture_stderr else None
    if returncode and check:
        raise subprocess.CalledProcessError(
            returncode, list(process.argv), output=stdout_bytes, stderr=stderr_bytes
        )
    return subprocess.CompletedProcess(list(process.argv), returncode, stdout_bytes, stderr_bytes)
