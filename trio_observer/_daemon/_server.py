"""The daemon's listener, its connections, and shutdown.

One task reads each connection and starts a task per request, so that a
long request (a follow, an attach, a graceful stop) never holds up the
others; writes go through one lock per connection, so frames never
interleave. What a request does is in ``_handlers.py``.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket as stdlib_socket
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import trio

from .._linux import clean_leftovers, leftover_sessions, probe_cgroup
from . import _protocol
from ._paths import peer_uid, prepare_directory
from ._sessions import DaemonSession, RequestError, resolve_containment

if TYPE_CHECKING:
    from .._otel import OTelExporter

logger = logging.getLogger("trio_observer.daemon")


class DaemonAlreadyRunning(RuntimeError):
    """Another daemon already answers on the socket."""


FINISH_WRITE_SECONDS: Final = 5.0
"""How long a cancelled write may take to finish the frames it started."""
ACCEPT_RETRY_SECONDS: Final = 0.1
"""How long the listener waits when accept() fails for want of fds or memory."""
_ACCEPT_CAPACITY_ERRNOS: Final = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
)
# A client that went away between connect() and accept().
_ACCEPT_IGNORABLE_ERRNOS: Final = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM})
MAX_OPEN_REQUESTS: Final = 1024
"""Requests one connection may have open at once; more are refused with
``too-many-requests``. Each open request is a task, so without a bound a
client that sends without reading the replies grows the daemon without
end; with one, the refusals it does not read stop the daemon reading it."""


class Connection:
    """One client connection: its writer lock and its running requests."""

    def __init__(self, daemon: Daemon, stream: trio.SocketStream, peer_pid: int) -> None:
        self.daemon = daemon
        self.stream = stream
        self.peer_pid = peer_pid
        self.closed = False
        self._lock = trio.Lock()
        self.requests: dict[int, trio.CancelScope] = {}

    async def send(self, message: dict[str, Any]) -> None:
        """Write one frame.

        Raises:
          trio.BrokenResourceError: the connection is gone, or an earlier
            write was interrupted half-way (the stream is then out of step
            and was closed).
        """
        await self.send_many([message])

    async def send_many(self, messages: list[dict[str, Any]]) -> None:
        """Write several frames with one write loop (a stream's batch).

        A cancellation (the client cancelled the request) that comes once
        part of the frames is out does not cut a frame in two: the rest is
        written, shielded, if the client takes it within
        ``FINISH_WRITE_SECONDS``; only a client that does not read then
        loses its connection (the stream would be out of step).

        Raises:
          trio.BrokenResourceError: as :meth:`send`.
        """
        data = memoryview(b"".join(map(_protocol.encode, messages)))
        async with self._lock:
            if self.closed:
                raise trio.BrokenResourceError("the client's connection is closed")
            sent = 0
            try:
                while sent < len(data):
                    sent += await self._send_some(data[sent:])
            except trio.Cancelled:
                # With nothing out yet the stream is still in step; with
                # part out, the rest must follow or the connection go.
                if sent and not await self._finish(data[sent:]):
                    self.close()
                raise
            except BaseException:
                self.close()
                raise

    async def _finish(self, rest: memoryview) -> bool:
        """Write ``rest`` of a cancelled write, shielded but bounded; say whether it went."""
        with trio.CancelScope(shield=True, deadline=trio.current_time() + FINISH_WRITE_SECONDS):
            try:
                while rest:
                    rest = rest[await self._send_some(rest) :]
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return False
        return not rest

    async def _send_some(self, data: memoryview) -> int:
        try:
            return await self.stream.socket.send(data)
        except OSError as exc:
            raise trio.BrokenResourceError(f"the client's connection broke: {exc}") from exc

    def close(self) -> None:
        """Close the socket; the tasks using it fail and end."""
        if not self.closed:
            self.closed = True
            self.stream.socket.close()


class Daemon:
    """Named sessions and the connections that use them."""

    def __init__(self, socket_path: Path, exporter: OTelExporter | None = None) -> None:
        self.socket_path = socket_path
        self.exporter = exporter
        self.sessions: dict[str, DaemonSession] = {}
        self.stop_requested = trio.Event()
        self.started_at = trio.current_time()
        self._session_nursery: trio.Nursery | None = None

    async def create_session(
        self,
        name: str,
        *,
        grace_period: float = 5.0,
        track_descendants: bool = False,
        containment: str = "auto",
    ) -> DaemonSession:
        """Open the session called ``name`` and run it until closed.

        Raises:
          RequestError: ``containment`` is unknown, or ``"cgroup"`` where
            none can be made; or the daemon is stopping.
        """
        assert self._session_nursery is not None
        if self.stop_requested.is_set():
            # Made after the shutdown listed the sessions to close, it
            # would never be closed, and the daemon would wait for it.
            raise RequestError("daemon-stopping", "the daemon is stopping: no new session")
        daemon_session = DaemonSession(
            name,
            grace_period=grace_period,
            track_descendants=track_descendants,
            containment=resolve_containment(containment),
            exporter=self.exporter,
        )
        self.sessions[name] = daemon_session
        try:
            await self._session_nursery.start(daemon_session.run)
        except BaseException:
            del self.sessions[name]
            raise
        return daemon_session

    def find_subscription(self, subscription_id: str) -> Any:
        """The remote subscription with this id, in whichever session."""
        for daemon_session in self.sessions.values():
            remote = daemon_session.subscriptions.get(subscription_id)
            if remote is not None:
                return remote
        return None

    async def close_session(self, daemon_session: DaemonSession) -> None:
        """Stop the session's processes with its grace period, reap them, forget it."""
        daemon_session.close()
        await daemon_session.closed.wait()
        if self.sessions.get(daemon_session.name) is daemon_session:
            del self.sessions[daemon_session.name]

    async def run(self, *, handle_signals: bool, task_status: trio.TaskStatus[Daemon]) -> None:
        listener = await _listen(self.socket_path)
        try:
            # Before the first client: what a killed daemon left running is
            # stopped before this one answers (see docs/daemon.md).
            await _stop_leftovers()
            async with trio.open_nursery() as sessions:
                self._session_nursery = sessions
                async with trio.open_nursery() as connections:
                    connections.start_soon(self._accept, listener, connections)
                    if handle_signals:
                        connections.start_soon(self._stop_on_signal)
                    logger.info("listening on %s", self.socket_path)
                    task_status.started(self)
                    await self.stop_requested.wait()
                    logger.info("stopping: closing %d session(s)", len(self.sessions))
                    # Sessions first, while clients can still watch them end.
                    # All at once: one after another, the last tree would
                    # get its SIGTERM only after every grace period before.
                    closing = list(self.sessions.values())
                    for daemon_session in closing:
                        daemon_session.close()
                    with trio.CancelScope(shield=True):
                        for daemon_session in closing:
                            await self.close_session(daemon_session)
                    connections.cancel_scope.cancel()
        finally:
            listener.close()
            _unlink(self.socket_path)

    async def _stop_on_signal(self) -> None:
        # Kept until the daemon ends, not left at the first signal: the
        # default handlers would be back, and a second SIGTERM would kill
        # the daemon while its sessions wait out their grace periods, so a
        # tree that ignores SIGTERM outlived it. A later signal (or the
        # first, after a shutdown request) ends the grace periods instead:
        # SIGKILL now, as a second Ctrl-C does for a session.
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for sig in signals:
                logger.info("received %s", signal.Signals(sig).name)
                if not self.stop_requested.is_set():
                    self.stop_requested.set()
                    continue
                logger.info("ending the grace periods: SIGKILL to what still runs")
                for daemon_session in self.sessions.values():
                    daemon_session.hurry()

    async def _accept(self, listener: trio.socket.SocketType, nursery: trio.Nursery) -> None:
        out_of_capacity = False
        while True:
            try:
                sock, _ = await listener.accept()
            except OSError as exc:
                if exc.errno in _ACCEPT_IGNORABLE_ERRNOS:
                    continue  # that client is gone already
                if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                    raise
                # Out of fds (or memory), perhaps because of one client's
                # many connections: the daemon, its sessions and their
                # processes must not end for it. The next clients wait in
                # the backlog until connections or processes that end free
                # some (as in trio.serve_listeners).
                if not out_of_capacity:
                    logger.error(
                        "cannot accept connections (%s); retrying every %.1f s",
                        os.strerror(exc.errno),
                        ACCEPT_RETRY_SECONDS,
                    )
                    out_of_capacity = True
                await trio.sleep(ACCEPT_RETRY_SECONDS)
                continue
            if out_of_capacity:
                logger.info("accepting connections again")
                out_of_capacity = False
            nursery.start_soon(self._serve, sock)

    async def _serve(self, sock: trio.socket.SocketType) -> None:
        from ._handlers import handle

        stream = trio.SocketStream(sock)
        pid, uid = peer_uid(sock)
        connection = Connection(self, stream, pid)
        try:
            if uid != os.getuid():
                # The file modes keep others out; this holds even if they
                # were loosened by hand.
                logger.warning("refused a connection from uid %d (pid %d)", uid, pid)
                await connection.send(
                    _protocol.error(
                        None,
                        "permission-denied",
                        f"uid {uid} may not use the daemon of uid {os.getuid()}",
                    )
                )
                return
            await _run_connection(connection, handle)
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            # The client went away, perhaps while one of its requests was
            # answering (that error comes out of the requests' nursery):
            # only this connection ends, never the daemon.
            pass
        except* Exception:
            # A bug that escaped the request handlers: it ends this
            # connection, never the daemon with every session it holds.
            logger.exception("closing a connection (pid %d) after an internal error", pid)
        finally:
            connection.close()


async def _run_connection(connection: Connection, handle: Any) -> None:
    decoder = _protocol.FrameDecoder()
    greeted = False
    async with trio.open_nursery() as requests:
        try:
            while True:
                try:
                    data = await connection.stream.receive_some(65536)
                except trio.BrokenResourceError:
                    # Reset by the peer (a client killed mid-request): the
                    # same as an orderly end of the connection.
                    break
                if not data:
                    break
                for message in decoder.iter_feed(data):
                    if not greeted:
                        _protocol.check_hello(message)
                        greeted = True
                        await connection.send(_protocol.hello(server_pid=os.getpid()))
                        continue
                    if message["type"] != "request":
                        raise _protocol.ProtocolError(
                            "unknown-frame",
                            f"a client sends 'request' frames, not {message['type']!r}",
                        )
                    request_id = message["id"]
                    if request_id in connection.requests:
                        raise _protocol.ProtocolError(
                            "malformed-frame", f"request id {request_id} is already in use"
                        )
                    if len(connection.requests) >= MAX_OPEN_REQUESTS:
                        # Answered by this task: a client that does not read
                        # its answers stops being read, instead of piling up
                        # tasks in the daemon.
                        await connection.send(
                            _protocol.error(
                                request_id,
                                "too-many-requests",
                                f"this connection has {MAX_OPEN_REQUESTS} requests open; "
                                "wait for one to end first",
                            )
                        )
                        continue
                    scope = connection.requests[request_id] = trio.CancelScope()
                    requests.start_soon(handle, connection, message, scope)
        except _protocol.ProtocolError as exc:
            logger.info("closing a connection (pid %d): %s", connection.peer_pid, exc)
            await connection.send(_protocol.error(None, exc.code, str(exc)))
        finally:
            # The client is gone (or out of step): its requests end; what
            # they started in sessions goes on.
            requests.cancel_scope.cancel()
            connection.close()


async def _stop_leftovers() -> None:
    """Kill the processes of session cgroups whose owner died, and remove the cgroups.

    The same sweep any session with cgroup containment makes when it opens,
    run at start so that a daemon killed with SIGKILL is cleaned up after
    by the next one even before it opens a session. Process-group sessions
    leave nothing to find: their processes survive a SIGKILLed daemon.
    """
    support = probe_cgroup()
    if not support.available or support.parent is None:
        logger.info("no cgroup containment here (%s): no leftovers to look for", support.reason)
        return
    try:
        for group in leftover_sessions(support.parent):
            logger.warning(
                "stopping %s, left by a session whose owner is gone: pids %s",
                group.path,
                " ".join(map(str, group.members())) or "(none)",
            )
        for path in await clean_leftovers(support.parent):
            logger.warning("removed %s", path)
    except OSError as exc:
        # Serving matters more: the next session's own sweep tries again.
        logger.error("could not stop the leftovers below %s: %s", support.parent, exc)


async def _listen(path: Path) -> trio.socket.SocketType:
    prepare_directory(path.parent)
    if _exists(path):
        if await _answers(path):
            raise DaemonAlreadyRunning(f"a daemon is already listening on {path}")
        os.unlink(path)  # left behind by a daemon that was killed
    sock = trio.socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        await sock.bind(os.fspath(path))
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    sock.listen(64)
    return sock


def _exists(path: Path) -> bool:
    return os.path.lexists(path)


async def _answers(path: Path) -> bool:
    probe = trio.socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
    with probe:
        try:
            await probe.connect(os.fspath(path))
        except OSError as exc:
            if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
                return False
            raise
    return True


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


async def serve(
    socket_path: Path,
    *,
    handle_signals: bool = True,
    exporter: OTelExporter | None = None,
    task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a daemon on ``socket_path`` until it is told to stop.

    A ``shutdown`` request, or SIGTERM/SIGINT when ``handle_signals``,
    stops it: every session is closed with its grace period, all at once,
    and everything is reaped before this returns; a second signal ends the
    grace periods (SIGKILL now). With ``exporter``, every session's
    lifecycle events are also exported to OpenTelemetry.
    """
    daemon = Daemon(socket_path, exporter)
    await daemon.run(handle_signals=handle_signals, task_status=task_status)
