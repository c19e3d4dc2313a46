"""What each request does. One function a method, found in ``METHODS``.

Every handler checks its params first (a ``bad-params`` error names the
param and what it accepts), then replies exactly once; a streaming
handler then sends ``stream`` frames with the request's id and one
``end`` frame.
"""

from __future__ import annotations

import base64
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final, TypeVar

import trio

from .._events import EventCategory
from .._pty import PtySize
from .._sink import ObserverBackpressure
from ._protocol import MAX_FRAME_BYTES, OUTPUT_CHUNK_BYTES, ProtocolError, error
from ._sessions import (
    DaemonSession,
    ProcessRecord,
    RemoteSubscription,
    RequestError,
    StreamOwner,
)

logger = logging.getLogger("trio_observer.daemon")

if TYPE_CHECKING:
    from ._server import Connection

DEFAULT_SESSION: Final = "default"
T = TypeVar("T")
_MISSING: Any = object()


def param(
    params: dict[str, Any], name: str, kind: type[T] | tuple[type, ...], default: Any = _MISSING
) -> T:
    """``params[name]`` if it has type ``kind``; the default if absent and allowed."""
    if name not in params or (params[name] is None and default is not _MISSING):
        if default is _MISSING:
            raise RequestError("bad-params", f"missing param {name!r}")
        return default  # type: ignore[no-any-return]
    value = params[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if not ok:
        names = " or ".join(k.__name__ for k in kinds)
        raise RequestError("bad-params", f"param {name!r} must be {names}, not {value!r:.80}")
    return value  # type: ignore[no-any-return]


def _int(params: dict[str, Any], name: str, default: Any = _MISSING, *, minimum: int = 0) -> int:
    value: int = param(params, name, int, default)
    if value is not None and value < minimum:
        raise RequestError("bad-params", f"param {name!r} must be >= {minimum}, not {value}")
    return value


def _seconds(params: dict[str, Any], name: str, default: float) -> float:
    value = float(param(params, name, (int, float), default))
    if not value >= 0:
        raise RequestError("bad-params", f"param {name!r} must be >= 0 seconds, not {value}")
    return value


def _session(connection: Connection, params: dict[str, Any]) -> DaemonSession:
    name = param(params, "session", str, DEFAULT_SESSION)
    found = connection.daemon.sessions.get(name)
    if found is None:
        raise RequestError("no-such-session", f"no session named {name!r}")
    return found


def _process(connection: Connection, params: dict[str, Any]) -> ProcessRecord:
    return _session(connection, params).get(param(params, "process", str))


def _subscription(connection: Connection, params: dict[str, Any]) -> RemoteSubscription:
    subscription_id = param(params, "subscription", str)
    remote = connection.daemon.find_subscription(subscription_id)
    if remote is None:
        raise RequestError("no-such-subscription", f"no subscription with id {subscription_id!r}")
    assert isinstance(remote, RemoteSubscription)
    return remote


Reply = Callable[[dict[str, Any]], Awaitable[None]]


# -- daemon and sessions ------------------------------------------------


async def _status(connection: Connection, params: dict[str, Any], reply: Reply, rid: int) -> None:
    daemon = connection.daemon
    await reply(
        {
            "pid": os.getpid(),
            "socket": os.fspath(daemon.socket_path),
            "sessions": len(daemon.sessions),
            "processes": sum(len(s.processes) for s in daemon.sessions.values()),
            "subscriptions": sum(len(s.subscriptions) for s in daemon.sessions.values()),
        }
    )


async def _shutdown(connection: Connection, params: dict[str, Any], reply: Reply, rid: int) -> None:
    if params:
        # Stopping every session cannot be undone: a request that says
        # more than "shutdown" (a newer client's option, a mistake) is
        # refused rather than taken as a plain shutdown.
        raise RequestError(
            "bad-params", f"shutdown takes no params, got {', '.join(map(repr, params))[:80]}"
        )
    await reply({"stopping": True})
    connection.daemon.stop_requested.set()


async def _create_session(
    connection: Connection, params: dict[str, Any], reply: Reply, rid: int
) -> None:
    name = param(params, "name", str)
    if not name:
        raise RequestError("bad-params", "param 'name' must not be empty")
    grace = _seconds(params, "grace_period", 5.0)
    track = param(params, "track_descendants", bool, False)
    containment = param(params, "containment", str, "auto")
    exist_ok = param(params, "exist_ok", bool, False)
    daemon = connection.daemon
    existing = daemon.sessions.get(name)
    if existing is not None:
        if not exist_ok:
            raise RequestError("session-exists", f"a session named {name!r} exists already")
        await reply(existing.describe())
        return
    created = await daemon.create_session(
        name, grace_period=grace, track_descendants=track, containment=containment
    )
    await reply(created.describe())


async def _sessions(connection: Connection, params: dict[str, Any], reply: Reply, rid: int) -> None:
    await reply({"sessions": [s.describe() for s in connection.daemon.sessions.values()]})


async def _close_session(
    connection: Connection, params: dict[str, Any], reply: Reply, rid: int
) -> None:
    daemon_session = _session(connection, params)
    processes = list(daemon_session.processes.values())
    await connection.daemon.close_session(daemon_session)
    await reply({"closed": daemon_session.name, "processes": [p.describe() for p in processes]})


# -- processes ----------------------------------------------------------


async def _start(connection: Connection, params: dict[str, Any], reply: Reply, rid: int) -> None:
    argv = param(params, "argv", list)
    if not argv or not all(isinstance(a, str) and a and "\0" not in a for a in argv):
        raise RequestError(
            "bad-params", "param 'argv' must be a non-empty list of non-empty strings"
        )
    name = param(params, "name", str, None)
    cwd = param(params, "cwd", str, None)
    env = param(params, "env", dict, None)
    if env is not None and not all(
        isinstance(k, str) and isinstance(v, str) and k and "=" not in k and "\0" not in k + v
        for k, v in env.items()
    ):
        raise RequestError("bad-params", "param 'env' must map variable names to strings")
    pty_param: bool | dict[str, Any] = param(params, "pty", (bool, dict), False)
    pty: PtySize | None = None
    if pty_param is True:
        pty = PtySize()
    elif isinstance(pty_param, dict):
        rows = _int(pty_param, "rows", 24, minimum=1)
        cols = _int(pty_param, "cols", 80, minimum=1)
        if rows > 65535 or cols > 65535:
            raise RequestError("bad-params", "pty rows and cols must be 1..65535")
        pty = PtySize(rows=rows, cols=cols)
    backlog = _int(params, "backlog_bytes", 1 << 20, minimum=1)
    stdin = param(params, "stdin", str, "null")
    if stdin not in ("null", "pipe"):
        raise RequestError(
            "bad-params", f"param 'stdin' must be 'null' or 'pipe', not {stdin!r:.40}"
        )
    if stdin == "pipe" and pty is not None:
        raise RequestError("bad-params", "param 'stdin': a PTY process reads its terminal")
    session_name = param(params, "session", str, DEFAULT_SESSION)
    daemon = connection.daemon
    daemon_session = daemon.sessions.get(session_name)
    if daemon_session is None:
        if session_name != DEFAULT_SESSION:
            raise RequestError("no-such-session", f"no session named {session_name!r}")
        daemon_session = await daemon.create_session(DEFAULT_SESSION)
    record = await daemon_session.start(
        argv,
        name=name,
        cwd=cwd,
        env=env,
        pty=pty,
        backlog_bytes=backlog,
        stdin_pipe=stdin == "pipe",
    )
    await reply({"session": daemon_session.name, **record.describe()})


async def _signal(connection: Connection, params: dict[str, Any], reply: Reply, rid: int) -> None:
    record = _process(connection, params)
    number = _int(params, "signal", int(signal.SIGTERM), minimum=1)
    if number not in set(signal.valid_signals()):
        raise RequestError("bad-params", f"param 'signal' {number} is not a signal number")
    if param(params, "tree", bool, False):
        record.process.signal_tree(number)
    else:
        record.process.send_signal(number)
    await reply(record.describe())


async def _terminate(
    connection: Connection, params: dict[str, Any], reply: Reply, rid: int
) -> None:
    daemon_session = _session(connection, params)
    record = daemon_session.get(param(params, "process", str))
    grace = _seconds(params, "grace_period", daemon_session.grace_period)
    await record.process.terminate_gracefully(grace_period=grace)
    await reply(record.describe())


async def _wait(connection: Connection, params: dict[str, Any], reply: Reply, rid: int) -> None:
    record = _process(connection, params)
    await record.process.wait()
    await reply(record.describe())


async def _remove(connection: Connection, params: dict[str, Any], reply: Reply, rid: int) -> None:
    daemon_session = _session(connection, params)
    record = daemon_session.get(param(params, "process", str))
    if record.process.returncode is None:
        raise RequestError(
            "still-running", f"process {record.name!r} is still running; stop it first"
        )
    del daemon_session.processes[record.name]
    await reply(record.describe())


# -- output and terminals -----------------------------------------------


async def _output(connection: Connection, params: dict[str, Any], reply: Reply, rid: int) -> None:
    record = _process(connection, params)
    stream = param(params, "stream", str, "pty" if record.pty else "stdout")
    log = record.log(stream)
    offset = param(params, "offset", int, None)
    follow = param(params, "follow", bool, False)
    try:
        cursor = log.cursor("oldest" if offset is None else offset)
    except ValueError as exc:
        raise RequestError("bad-params", f"param 'offset': {exc}") from None
    await reply(
        {
            "offset": cursor.position,
            "total_bytes": log.total_bytes,
            "dropped_bytes": log.dropped_bytes,
        }
    )
    await _stream_output(connection, rid, cursor, follow=follow)


async def _stream_output(connection: Connection, rid: int, cursor: Any, *, follow: bool) -> None:
    try:
        while True:
            position = cursor.position
            try:
                item = await cursor.receive() if follow else cursor.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            if isinstance(item, bytes):
                for start in range(0, len(item), OUTPUT_CHUNK_BYTES):
                    chunk = item[start : start + OUTPUT_CHUNK_BYTES]
                    data = base64.b64encode(chunk).decode("ascii")
                    await connection.send(
                        {"type": "stream", "id": rid, "offset": position + start, "data": data}
                    )
            else:
                missed = item.missed_bytes
                await connection.send(
                    {"type": "stream", "id": rid, "offset": position, "missed_bytes": missed}
                )
        await connection.send({"type": "end", "id": rid, "offset": cursor.position})
    finally:
        cursor.close()


async def _attach(connection: Connection, params: dict[str, Any], reply: Reply, rid: int) -> None:
    record = _process(connection, params)
    if not record.pty:
        raise RequestError("no-terminal", f"process {record.name!r} was not started on a PTY")
    want_write = param(params, "write", bool, True)
    offset = param(params, "offset", int, None)
    log = record.log("pty")
    try:
        cursor = log.cursor("oldest" if offset is None else offset)
    except ValueError as exc:
        raise RequestError("bad-params", f"param 'offset': {exc}") from None
    writer = want_write and (record.writer is None or getattr(record.writer, "closed", True))
    if writer:
        record.writer = connection
    try:
        await reply({"writer": writer, "offset": cursor.position, "size": _size(record)})
        await _stream_output(connection, rid, cursor, follow=True)
    finally:
        if record.writer is connection:
            record.writer = None


def _size(record: ProcessRecord) -> dict[str, int] | None:
    pty = record.process.pty
    if pty is None:
        return None
    try:
        size = pty.size
    except (trio.ClosedResourceError, OSError):
        return None
    return {"rows": size.rows, "cols": size.cols}


def _terminal(connection: Connection, params: dict[str, Any]) -> tuple[ProcessRecord, Any]:
    record = _process(connection, params)
    pty = record.process.pty
    if pty is None:
        raise RequestError("no-terminal", f"process {record.name!r} was not started on a PTY")
    if record.writer is not connection:
        raise RequestError(
            "not-writer",
            f"another client is typing into {record.name!r}; attach with write once it detaches",
        )
    return record, pty


async def _input(connection: Connection, params: dict[str, Any], reply: Reply, rid: int) -> None:
    try:
        data = base64.b64decode(param(params, "data", str, ""), validate=True)
    except ValueError:  # binascii.Error, or a str that is not ASCII
        raise RequestError("bad-params", "param 'data' must be base64") from None
    eof = param(params, "eof", bool, False)
    record = _process(connection, params)
    if record.pty:
        if eof:
            raise RequestError("bad-params", "param 'eof': a terminal has no end of input")
        _, pty = _terminal(connection, params)
        try:
            await pty.write(data)
        except (trio.ClosedResourceError, trio.BrokenResourceError, OSError) as exc:
            raise RequestError("terminal-closed", f"the terminal is closed: {exc}") from None
        await reply({"written": len(data)})
        return
    await _pipe_input(record, data, eof=eof)
    await reply({"written": len(data), "closed": eof})


async def _pipe_input(record: ProcessRecord, data: bytes, *, eof: bool) -> None:
    stdin = record.process.stdin
    if stdin is None:
        raise RequestError(
            "no-stdin",
            f"process {record.name!r} reads /dev/null; start it with stdin 'pipe' to write to it",
        )
    # Any client may write to a pipe (there is no attach to hold it); the
    # lock keeps each request's data whole.
    async with record.input_lock:
        try:
            if data:
                await stdin.send_all(data)
            if eof:
                await stdin.aclose()
        except (trio.ClosedResourceError, trio.BrokenResourceError, OSError) as exc:
            raise RequestError(
                "stdin-closed", f"the stdin of {record.name!r} is closed: {exc}"
            ) from None


async def _resize(connection: Connection, params: dict[str, Any], reply: Reply, rid: int) -> None:
    rows = _int(params, "rows", minimum=1)
    cols = _int(params, "cols", minimum=1)
    if rows > 65535 or cols > 65535:
        raise RequestError("bad-params", "params 'rows' and 'cols' must be 1..65535")
    _, pty = _terminal(connection, params)
    try:
        pty.resize(rows, cols)
    except (trio.ClosedResourceError, OSError) as exc:
        raise RequestError("terminal-closed", f"the terminal is closed: {exc}") from None
    await reply({"rows": rows, "cols": cols})


# -- observers ----------------------------------------------------------


def _categories(params: dict[str, Any]) -> frozenset[EventCategory]:
    names = param(params, "categories", list, ["lifecycle"])
    allowed = ", ".join(c.value for c in EventCategory)
    chosen = set()
    for name in names:
        try:
            chosen.add(EventCategory(name))
        except (ValueError, TypeError):
            raise RequestError(
                "bad-params", f"param 'categories': {name!r:.40} is not one of {allowed}"
            ) from None
    return frozenset(chosen)


async def _subscribe(
    connection: Connection, params: dict[str, Any], reply: Reply, rid: int
) -> None:
    daemon_session = _session(connection, params)
    categories = _categories(params)
    capacity = _int(params, "capacity", 256, minimum=1)
    backpressure_name = param(params, "backpressure", str, "drop-oldest")
    try:
        backpressure = ObserverBackpressure(backpressure_name)
    except ValueError:
        raise RequestError(
            "bad-params", "param 'backpressure' must be 'drop-oldest' or 'block'"
        ) from None
    detach_timeout = _seconds(params, "detach_timeout", 30.0)
    resend = _int(params, "resend", capacity, minimum=1)
    try:
        remote = await daemon_session.subscribe(
            categories,
            capacity=capacity,
            backpressure=backpressure,
            detach_timeout=detach_timeout,
            resend=resend,
        )
    except Exception as exc:  # an unavailable category, a closed registry
        raise RequestError("subscribe-failed", str(exc)) from None
    await _pump(connection, remote, rid, reply, 0)


async def _resume(connection: Connection, params: dict[str, Any], reply: Reply, rid: int) -> None:
    remote = _subscription(connection, params)
    from_seq = _int(params, "from_seq", 0)
    remote.replay(from_seq)  # checks from_seq before taking over
    await _pump(connection, remote, rid, reply, from_seq)


# Frames per send_all while streaming a subscription: large enough to
# amortise the syscall, small enough to keep one write's memory bounded.
_BATCH: Final = 64


async def _pump(
    connection: Connection, remote: RemoteSubscription, rid: int, reply: Reply, from_seq: int
) -> None:
    # One request streams a subscription at a time: a resume takes it over
    # from a connection that may be dying (or from an older request of this
    # one), after which the frames the old one took are in the resend buffer.
    owner = StreamOwner(connection, connection.requests[rid])
    await remote.take_over(owner)
    try:
        await reply(remote.status())
        replayed = [{**frame, "id": rid} for frame in remote.replay(from_seq)]
        for start in range(0, len(replayed), _BATCH):
            await connection.send_many(replayed[start : start + _BATCH])
        while (live := await remote.next_frame()) is not None:
            # Whatever else the sink holds goes out in the same send_all:
            # one syscall and one lock round per batch, not per event.
            batch = [live, *remote.ready_frames(_BATCH - 1)]
            await connection.send_many([{**frame, "id": rid} for frame in batch])
        await connection.send({"type": "end", "id": rid, "status": remote.status()})
        if remote.removed_reason is not None:
            # Removed and drained: this client has had everything, and the
            # end frame's status says why it ended.
            remote.session.forget(remote)
    finally:
        remote.release(owner)


async def _subscriptions(
    connection: Connection, params: dict[str, Any], reply: Reply, rid: int
) -> None:
    sessions = connection.daemon.sessions.values()
    await reply({"subscriptions": [r.status() for s in sessions for r in s.subscriptions.values()]})


async def _subscription_status(
    connection: Connection, params: dict[str, Any], reply: Reply, rid: int
) -> None:
    await reply(_subscription(connection, params).status())


async def _unsubscribe(
    connection: Connection, params: dict[str, Any], reply: Reply, rid: int
) -> None:
    remote = _subscription(connection, params)
    remote.remove("unsubscribed")
    remote.session.forget(remote)
    await reply(remote.status())


async def _cancel(connection: Connection, params: dict[str, Any], reply: Reply, rid: int) -> None:
    target = _int(params, "request", 0)
    scope = connection.requests.get(target)
    if scope is not None and target != rid:
        scope.cancel()
    await reply({"cancelled": scope is not None})


Handler = Callable[["Connection", dict[str, Any], Reply, int], Awaitable[None]]

METHODS: Final[dict[str, Handler]] = {
    "status": _status,
    "shutdown": _shutdown,
    "create_session": _create_session,
    "sessions": _sessions,
    "close_session": _close_session,
    "start": _start,
    "signal": _signal,
    "terminate": _terminate,
    "remove": _remove,
    "wait": _wait,
    "output": _output,
    "attach": _attach,
    "input": _input,
    "resize": _resize,
    "subscribe": _subscribe,
    "resume": _resume,
    "subscriptions": _subscriptions,
    "subscription_status": _subscription_status,
    "unsubscribe": _unsubscribe,
    "cancel": _cancel,
}


MAX_MESSAGE_CHARS: Final = 2000
"""The longest error message sent; a longer one is cut (and says so)."""


def _bounded(text: str) -> str:
    # A message names what the client sent (a process name, a path), and a
    # frame holding it must still encode: unbounded, a long enough name
    # made the error frame too large, and that error ended the daemon.
    if len(text) <= MAX_MESSAGE_CHARS:
        return text
    return f"{text[:MAX_MESSAGE_CHARS]}... (cut from {len(text)} characters)"


async def handle(connection: Connection, message: dict[str, Any], scope: trio.CancelScope) -> None:
    """Run one request to its end; errors become error frames, the connection goes on."""
    rid: int = message["id"]
    replied = False

    async def reply(result: dict[str, Any]) -> None:
        nonlocal replied
        try:
            await connection.send({"type": "reply", "id": rid, "result": result})
        except ProtocolError:
            # Refused by the encoder, before a byte was written: the client
            # gets an error in place of the reply, not an end frame for a
            # stream it never had.
            raise RequestError(
                "reply-too-large",
                f"the reply to {message['method']!r:.60} would be larger than a frame may be "
                f"({MAX_FRAME_BYTES} bytes)",
            ) from None
        replied = True

    try:
        with scope:
            handler = METHODS.get(message["method"])
            try:
                if handler is None:
                    raise RequestError(
                        "unknown-method",
                        f"unknown method {message['method']!r:.60} "
                        f"(known: {', '.join(sorted(METHODS))})",
                    )
                await handler(connection, message["params"], reply, rid)
            except Exception as exc:
                if not isinstance(exc, RequestError):
                    if isinstance(exc, (trio.BrokenResourceError, trio.ClosedResourceError)):
                        raise
                    # A bug in a handler must not take the daemon, its
                    # sessions or its other clients down with it.
                    logger.exception("request %.80r failed", message["method"])
                    exc = RequestError("internal-error", f"{type(exc).__name__}: {exc}")
                refusal = error(rid, exc.code, _bounded(str(exc)))
                await connection.send({**refusal, "type": "end"} if replied else refusal)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        connection.requests.pop(rid, None)
    if scope.cancelled_caught and not connection.closed:
        # Cancelled by the client: the stream ends in an orderly way.
        try:
            await connection.send({"type": "end", "id": rid, "cancelled": True})
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
