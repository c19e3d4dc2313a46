"""The Python client: ``async with trio_observer.connect() as client``."""

from __future__ import annotations

import base64
import os
import socket as stdlib_socket
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, final

import trio

from .._checks import check_bool
from .._cursor import OutputGap
from . import _protocol
from ._paths import resolve_socket_path

STREAM_BUFFER_FRAMES: Final = 256
"""Frames of one stream the client holds for a reader that has not taken them."""
STREAM_CUT_SECONDS: Final = 5.0
"""How long a full stream may hold up an answer another task waits for."""


class DaemonError(Exception):
    """The daemon refused a request; ``code`` is the error code of docs/protocol.md.

    A refused parameter (code ``bad-params``) is also a :class:`ValueError`,
    as the same argument refused in-process would be.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class _BadParams(DaemonError, ValueError):
    """A ``bad-params`` refusal: catchable as DaemonError or ValueError."""


def _refusal(frame: dict[str, Any]) -> DaemonError:
    code, message = frame["code"], frame["message"]
    return _BadParams(code, message) if code == "bad-params" else DaemonError(code, message)


def _strings(name: str, value: Sequence[str]) -> list[str]:
    # A str is a sequence of its letters: "ls" would go out as ["l", "s"].
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be a sequence of str, not a single {type(value).__name__}")
    return list(value)


@final
@dataclass(frozen=True, slots=True)
class RemoteMissed:
    """In-band notice that ``count`` events numbered below ``seq`` were lost.

    ``lost_in`` is ``"sink"`` when the session's sink had no room for them
    (as :class:`MissedEvents`), ``"connection"`` when they were sent to a
    connection that died and the resend buffer no longer held them, and
    ``"too-large"`` for one event too large for any frame (a command line
    of about a million characters).
    """

    seq: int
    """The number of the next event; the lost ones are ``seq - count .. seq - 1``."""
    count: int
    """How many events were lost here."""
    lost_in: str
    """``"sink"``, ``"connection"`` or ``"too-large"``."""


@final
@dataclass(frozen=True, slots=True)
class RemoteEvent:
    """One event of a remote subscription, with its number in the stream."""

    seq: int
    """How many matching events came before this one in the subscription."""
    event: dict[str, Any]
    """The event as :meth:`ObserverEvent.to_dict` writes it."""


@final
class RemoteStream:
    """The frames of one streaming request, as an async iterator.

    Obtained from a :class:`DaemonClient` method; ``result`` is the
    daemon's first reply. Breaking out of the loop leaves the rest unread;
    :meth:`aclose` asks the daemon to stop sending.

    A reader that falls behind slows the daemon down (backpressure): the
    client holds up to ``STREAM_BUFFER_FRAMES`` (256) of its frames, and
    while those are unread it reads nothing more from the connection. A
    stream nobody reads must not hold up the answers to the connection's
    other requests for good, though: once it has held an answer another
    task waits for for ``STREAM_CUT_SECONDS`` (5), it is cut (the daemon is
    asked to stop sending it), and reading it gives what was held, then
    ``trio.BrokenResourceError``. Resume it as after a lost connection: a
    subscription from one past the last ``seq`` you have, output from the
    offset you reached.
    """

    def __init__(self, client: DaemonClient, rid: int, result: dict[str, Any]) -> None:
        self._client = client
        self._rid = rid
        self.result = result
        """The reply that opened the stream."""
        self.end: dict[str, Any] | None = None
        """The ``end`` frame, once the stream has ended."""

    def __aiter__(self) -> RemoteStream:
        return self

    async def __anext__(self) -> dict[str, Any]:
        if self.end is not None:
            raise StopAsyncIteration
        frame = await self._client._next_frame(self._rid)
        if frame["type"] == "end":
            self.end = frame
            self._client._forget(self._rid)
            if "code" in frame:
                raise _refusal(frame)
            raise StopAsyncIteration
        return frame

    async def aclose(self) -> None:
        """Ask the daemon to end the stream (its ``end`` frame is discarded)."""
        if self.end is None:
            # Forgotten first: frames already on their way are dropped, not
            # queued for a reader that will never come.
            self._client._forget(self._rid)
            self.end = {"type": "end", "id": self._rid, "cancelled": True}
            await self._client.request("cancel", request=self._rid)


@final
class DaemonClient:
    """A connection to the daemon. Obtained from :func:`connect`."""

    def __init__(self, stream: trio.SocketStream, socket_path: Path) -> None:
        self._stream = stream
        self.socket_path = socket_path
        """The socket this client is connected to."""
        self._decoder = _protocol.FrameDecoder()
        self._pending: dict[
            int,
            tuple[
                trio.MemorySendChannel[dict[str, Any]], trio.MemoryReceiveChannel[dict[str, Any]]
            ],
        ] = {}
        self._next_id = 1
        self._lock = trio.Lock()
        self._broken: BaseException | None = None
        self._closed = trio.Event()
        # Streams cut because their reader fell STREAM_BUFFER_FRAMES behind.
        self._cut: set[int] = set()
        # Tasks waiting for a frame, by request id; and the stream the
        # reader waits to hand a frame to, with the scope that stops that.
        self._waiting: dict[int, int] = {}
        self._blocked: tuple[int, trio.CancelScope] | None = None
        self._nursery: trio.Nursery | None = None  # set by connect()

    async def _send(self, message: dict[str, Any]) -> None:
        async with self._lock:
            await self._stream.send_all(_protocol.encode(message))

    async def _read_frames(self) -> None:
        try:
            while True:
                data = await self._stream.receive_some(65536)
                if not data:
                    raise trio.BrokenResourceError("the daemon closed the connection")
                for frame in self._decoder.feed(data):
                    rid = frame.get("id")
                    channel = self._pending.get(rid) if isinstance(rid, int) else None
                    if channel is not None:
                        assert isinstance(rid, int)
                        if rid in self._cut:
                            continue
                        # Without a checkpoint: a yield per frame would cost
                        # a scheduling round each.
                        try:
                            channel[0].send_nowait(frame)
                        except trio.WouldBlock:
                            await self._hand_over_late(rid, channel[0], frame)
                    elif frame["type"] == "error":
                        raise _refusal(frame)
        except (
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            DaemonError,
            _protocol.ProtocolError,
        ) as exc:
            self._broken = exc
            for send, _ in self._pending.values():
                send.close()
        finally:
            self._closed.set()

    async def _hand_over_late(
        self, rid: int, send: trio.MemorySendChannel[dict[str, Any]], frame: dict[str, Any]
    ) -> None:
        # The stream's reader is STREAM_BUFFER_FRAMES behind. Waiting for it
        # slows the daemon down, which is right for a slow reader (a pipe, a
        # terminal). But while the reader task waits it reads nothing, and
        # if the stream's reader is not reading at all (it waits for another
        # answer: a request made before reading a subscription), that answer
        # never comes. So once another task waits, the wait is bounded by
        # STREAM_CUT_SECONDS, then the stream is cut.
        with trio.CancelScope() as scope:
            self._blocked = (rid, scope)
            if any(other != rid and self._starved(other) for other in self._waiting):
                self._bound_block()
            try:
                await send.send(frame)
            except trio.ClosedResourceError:
                return  # the stream was closed (aclose) meanwhile: not the connection
            finally:
                self._blocked = None
        if scope.cancelled_caught:
            self._cut_stream(rid)

    def _bound_block(self) -> None:
        if self._blocked is not None:
            scope = self._blocked[1]
            scope.deadline = min(scope.deadline, trio.current_time() + STREAM_CUT_SECONDS)

    def _starved(self, rid: int) -> bool:
        """Whether a task waiting for a frame of ``rid`` needs the reader for it."""
        channels = self._pending.get(rid)
        return channels is None or channels[1].statistics().current_buffer_used == 0

    def _cut_stream(self, rid: int) -> None:
        # Its reader gets what is held, then an error, and resumes.
        channels = self._pending.get(rid)
        if channels is None:
            return  # closed by its reader (aclose) meanwhile
        self._cut.add(rid)
        channels[0].close()
        assert self._nursery is not None
        self._nursery.start_soon(self._cancel_cut, rid)

    async def _cancel_cut(self, rid: int) -> None:
        # Not request(): its reply is not waited for (the reader task that
        # would deliver it may be the caller's own).
        cancel_id = self._next_id
        self._next_id += 1
        message = {"type": "request", "id": cancel_id, "method": "cancel"}
        try:
            await self._send({**message, "params": {"request": rid}})
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def wait_closed(self) -> None:
        """Wait until the daemon has closed this connection (after :meth:`shutdown`)."""
        await self._closed.wait()

    async def _next_frame(self, rid: int) -> dict[str, Any]:
        if self._blocked is not None and self._blocked[0] != rid and self._starved(rid):
            # The reader waits for another stream's reader: see _hand_over_late.
            self._bound_block()
        self._waiting[rid] = self._waiting.get(rid, 0) + 1
        try:
            return await self._pending[rid][1].receive()
        except (trio.EndOfChannel, KeyError):
            if rid in self._cut:
                self._forget(rid)
                raise trio.BrokenResourceError(
                    f"the stream fell {STREAM_BUFFER_FRAMES} frames behind its reader and was "
                    "cut; resume it from the last seq (or offset) you have"
                ) from None
            raise trio.BrokenResourceError(
                "the connection to the daemon was lost"
            ) from self._broken
        finally:
            left = self._waiting.pop(rid) - 1
            if left:
                self._waiting[rid] = left

    def _forget(self, rid: int) -> None:
        channels = self._pending.pop(rid, None)
        if channels is not None:
            channels[0].close()

    async def _open(self, method: str, params: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if self._broken is not None:
            raise trio.BrokenResourceError(
                "the connection to the daemon was lost"
            ) from self._broken
        rid = self._next_id
        self._next_id += 1
        self._pending[rid] = trio.open_memory_channel[dict[str, Any]](STREAM_BUFFER_FRAMES)
        await self._send({"type": "request", "id": rid, "method": method, "params": params})
        frame = await self._next_frame(rid)
        if frame["type"] == "error":
            self._forget(rid)
            raise _refusal(frame)
        return rid, frame["result"]

    async def request(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one request and return its result (docs/protocol.md lists the methods).

        Raises:
          DaemonError: the daemon refused it.
          trio.BrokenResourceError: the connection was lost.
        """
        rid, result = await self._open(method, {k: v for k, v in params.items() if v is not None})
        self._forget(rid)
        return result

    async def stream(self, method: str, **params: Any) -> RemoteStream:
        """Send a streaming request; iterate the returned :class:`RemoteStream`."""
        rid, result = await self._open(method, {k: v for k, v in params.items() if v is not None})
        return RemoteStream(self, rid, result)

    # -- the methods, typed -----------------------------------------------

    async def status(self) -> dict[str, Any]:
        """The daemon's pid, socket and counts."""
        return await self.request("status")

    async def shutdown(self) -> None:
        """Ask the daemon to stop every session (with its grace period) and exit."""
        await self.request("shutdown")

    async def create_session(
        self,
        name: str,
        *,
        grace_period: float = 5.0,
        track_descendants: bool = False,
        containment: str = "auto",
        exist_ok: bool = False,
    ) -> dict[str, Any]:
        """Open a named session in the daemon.

        ``containment`` is as for :func:`open_session`; the reply's
        ``containment`` says which one the session got (``"auto"`` becomes
        ``"cgroup"`` or ``"process-group"``). With ``"cgroup"``, the next
        daemon stops the session's processes if this one is killed.
        """
        return await self.request(
            "create_session",
            name=name,
            grace_period=grace_period,
            track_descendants=track_descendants,
            containment=containment,
            exist_ok=exist_ok,
        )

    async def sessions(self) -> list[dict[str, Any]]:
        """Every session with its processes (pid, argv, state, exit code, times)."""
        return list((await self.request("sessions"))["sessions"])

    async def close_session(self, session: str) -> dict[str, Any]:
        """Stop every process of ``session`` with its grace period, reap them, end it."""
        return await self.request("close_session", session=session)

    async def start(
        self,
        argv: Sequence[str],
        *,
        session: str = "default",
        name: str | None = None,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        pty: bool | tuple[int, int] = False,
        backlog_bytes: int | None = None,
        stdin: str = "null",
    ) -> dict[str, Any]:
        """Start ``argv`` in ``session`` (``"default"`` is created on first use).

        The process runs on when this client goes away. Without ``pty`` its
        stdout and stderr are captured, and its stdin is ``/dev/null``, or
        with ``stdin="pipe"`` a pipe that :meth:`send_input` writes to;
        with ``pty=True`` or ``(rows, cols)`` it runs on a terminal you can
        :meth:`attach` to.
        """
        pty_param: bool | dict[str, int] = (
            {"rows": pty[0], "cols": pty[1]} if isinstance(pty, tuple) else pty
        )
        return await self.request(
            "start",
            argv=_strings("argv", argv),
            session=session,
            name=name,
            cwd=cwd,
            env=env,
            pty=pty_param,
            backlog_bytes=backlog_bytes,
            stdin=None if stdin == "null" else stdin,
        )

    async def signal(
        self, name: str, sig: int, *, session: str = "default", tree: bool = False
    ) -> dict[str, Any]:
        """Send ``sig`` to the process (``tree=True``: its process group)."""
        return await self.request("signal", session=session, process=name, signal=sig, tree=tree)

    async def terminate(
        self, name: str, *, session: str = "default", grace_period: float | None = None
    ) -> dict[str, Any]:
        """SIGTERM the process tree, SIGKILL after the grace period; return the process."""
        return await self.request(
            "terminate", session=session, process=name, grace_period=grace_period
        )

    async def wait(self, name: str, *, session: str = "default") -> dict[str, Any]:
        """Wait until the process has been reaped; return it (exit code, termination)."""
        return await self.request("wait", session=session, process=name)

    async def remove(self, name: str, *, session: str = "default") -> dict[str, Any]:
        """Forget a process that has exited."""
        return await self.request("remove", session=session, process=name)

    async def output(
        self,
        name: str,
        *,
        session: str = "default",
        stream: str | None = None,
        offset: int | None = None,
        follow: bool = False,
    ) -> AsyncIterator[bytes | OutputGap]:
        """Read a process's output from ``offset`` (default: the oldest byte kept).

        Yields ``bytes`` and, where the backlog no longer holds what
        followed ``offset``, an :class:`OutputGap` with the exact number of
        bytes missed. With ``follow`` it goes on until the output ends.
        """
        remote = await self.stream(
            "output", session=session, process=name, stream=stream, offset=offset, follow=follow
        )
        return _output_items(remote)

    async def subscribe(
        self,
        *,
        session: str = "default",
        categories: Sequence[str] = ("lifecycle",),
        capacity: int = 256,
        backpressure: str = "drop-oldest",
        detach_timeout: float = 30.0,
        resend: int | None = None,
    ) -> RemoteStream:
        """Register a sink in ``session`` that outlives this client; ``result["id"]`` is its id.

        Iterate :func:`remote_items` over the returned stream, or the raw
        frames. Resume it later with :meth:`resume`.
        """
        return await self.stream(
            "subscribe",
            session=session,
            categories=_strings("categories", categories),
            capacity=capacity,
            backpressure=backpressure,
            detach_timeout=detach_timeout,
            resend=resend,
        )

    async def resume(self, subscription: str, *, from_seq: int = 0) -> RemoteStream:
        """Take up a subscription again, having every event numbered below ``from_seq``."""
        return await self.stream("resume", subscription=subscription, from_seq=from_seq)

    async def subscription_status(self, subscription: str) -> dict[str, Any]:
        """Counters of a subscription: delivered, missed, attached, removed, ..."""
        return await self.request("subscription_status", subscription=subscription)

    async def unsubscribe(self, subscription: str) -> dict[str, Any]:
        """Remove a subscription's sink."""
        return await self.request("unsubscribe", subscription=subscription)

    async def attach(
        self, name: str, *, session: str = "default", write: bool = True, offset: int | None = None
    ) -> RemoteStream:
        """Watch a PTY process: its backlog first, then live output frames.

        ``result["writer"]`` says whether this client may type
        (:meth:`send_input`); one client at a time may.
        """
        return await self.stream(
            "attach", session=session, process=name, write=write, offset=offset
        )

    async def send_input(
        self, name: str, data: bytes, *, session: str = "default", eof: bool = False
    ) -> None:
        """Write ``data`` to the process's input.

        A PTY process: type into its attached terminal (this client must be
        its writer). A process started with ``stdin="pipe"``: write to its
        stdin, from any client; each call's data arrives whole, and
        ``eof=True`` then closes the pipe (the program reads end of file).
        """
        await self.request(
            "input",
            session=session,
            process=name,
            data=base64.b64encode(data).decode(),
            eof=eof or None,
        )

    async def resize(self, name: str, rows: int, cols: int, *, session: str = "default") -> None:
        """Set the window size of an attached terminal."""
        await self.request("resize", session=session, process=name, rows=rows, cols=cols)


async def _output_items(remote: RemoteStream) -> AsyncIterator[bytes | OutputGap]:
    async for frame in remote:
        if "missed_bytes" in frame:
            yield OutputGap(frame["missed_bytes"])
        else:
            yield base64.b64decode(frame["data"])


def remote_item(frame: dict[str, Any]) -> RemoteEvent | RemoteMissed:
    """The event or loss marker a subscription's ``stream`` frame carries.

    Raises:
      TypeError: ``frame`` is not a dict.
      ValueError: ``frame`` lacks what a subscription's frame holds.
    """
    if not isinstance(frame, dict):
        raise TypeError(f"frame must be a dict (a decoded frame), not {type(frame).__name__}")
    missed = "missed" in frame
    keys = ("seq", "missed", "lost_in") if missed else ("seq", "event")
    absent = [key for key in keys if key not in frame]
    if absent:
        raise ValueError(f"frame is not a subscription's stream frame: no {', '.join(absent)}")
    if missed:
        return RemoteMissed(frame["seq"], frame["missed"], frame["lost_in"])
    return RemoteEvent(frame["seq"], frame["event"])


@asynccontextmanager
async def connect(
    socket: str | os.PathLike[str] | None = None, *, autostart: bool = True
) -> AsyncIterator[DaemonClient]:
    """Connect to the trio-observer daemon, starting it if needed.

    ::

        async with trio_observer.connect() as client:
            await client.start(["python", "-m", "http.server"], name="web")

    Args:
      socket: The daemon's socket; default ``$TRIO_OBSERVER_SOCKET``, else
        ``$XDG_RUNTIME_DIR/trio-observer/daemon.sock``, else
        ``/tmp/trio-observer-<uid>/daemon.sock``.
      autostart: Start a daemon in the background when none answers.

    Raises:
      ConnectionRefusedError, FileNotFoundError: no daemon answers and
        ``autostart`` is false.
      DaemonError: the daemon refused this connection (another user's).
    """
    check_bool("autostart", autostart)
    path = resolve_socket_path(socket)
    try:
        stream = await _connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        if not autostart:
            raise
        await start_daemon(path)
        stream = await _connect(path)
    async with stream:
        client = DaemonClient(stream, path)
        await stream.send_all(_protocol.encode(_protocol.hello()))
        first = await _first_frame(stream, client._decoder)
        if first["type"] == "error":
            raise _refusal(first)
        _protocol.check_hello(first)
        async with trio.open_nursery() as nursery:
            client._nursery = nursery
            nursery.start_soon(client._read_frames)
            try:
                yield client
            finally:
                nursery.cancel_scope.cancel()


async def _first_frame(
    stream: trio.SocketStream, decoder: _protocol.FrameDecoder
) -> dict[str, Any]:
    while True:
        data = await stream.receive_some(65536)
        if not data:
            raise trio.BrokenResourceError("the daemon closed the connection during the handshake")
        frames = decoder.feed(data)
        if frames:
            # The daemon sends nothing else before its hello.
            return frames[0]


async def _connect(path: Path) -> trio.SocketStream:
    sock = trio.socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
    try:
        await sock.connect(os.fspath(path))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


@trio.lowlevel.enable_ki_protection
async def start_daemon(path: Path, options: Sequence[str] = ()) -> None:
    """Start ``trio-observer daemon`` in the background and wait until it listens.

    ``options`` are more of the daemon's command-line options (``--otlp``).

    The daemon detaches (a new session, reparented away from us) and tells
    us through a pipe when its socket is ready, so nothing polls.

    Raises:
      RuntimeError: the daemon exited before it was ready.
    """
    read_fd, write_fd = os.pipe()
    # The read end is the stream's from here, so that it is closed however
    # the spawn ends (it used to be left open when the spawn failed).
    async with trio.lowlevel.FdStream(read_fd) as ready:
        try:
            process = await trio.lowlevel.open_process(
                [
                    sys.executable,
                    "-m",
                    "trio_observer",
                    "daemon",
                    "--socket",
                    os.fspath(path),
                    "--detach",
                    "--ready-fd",
                    str(write_fd),
                    *options,
                ],
                pass_fds=[write_fd],
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            os.close(write_fd)
        answer = b""
        while chunk := await ready.receive_some(64):
            answer += chunk
    # The first process only forks the daemon and exits: reap it.
    await process.wait()
    if not answer.startswith(b"ready"):
        raise RuntimeError(f"the daemon did not start on {path}: {answer.decode(errors='replace')}")
