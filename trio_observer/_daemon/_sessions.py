"""The daemon's named sessions, their processes and their remote subscriptions.

Each daemon session is an ordinary :func:`open_session`, run in a task of
the daemon; the daemon adds names and bookkeeping, not semantics. A remote
subscription is an ordinary subscription of the session's registry
(``report_missed=True``), held open by the daemon rather than by a client,
so that its sink outlives every connection.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

import trio

from .._events import EventCategory, ObserverEvent
from .._linux import CONTAINMENTS, probe_cgroup
from .._open_session import open_session
from .._output import OutputLog
from .._process import CAPTURE, Process
from .._pty import PtySize
from .._session import Session
from .._sink import ObserverBackpressure, ObserverSinkStatus
from .._subscription import MissedEvents, Subscription
from ._protocol import MAX_FRAME_BYTES, ProtocolError, encode

if TYPE_CHECKING:
    from .._otel import OTelExporter

logger = logging.getLogger("trio_observer.daemon")


class RequestError(Exception):
    """A request the daemon cannot carry out; becomes an error frame."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class ProcessRecord:
    """A process the daemon started, kept until a client removes it."""

    def __init__(self, name: str, process: Process, *, pty: bool) -> None:
        self.name = name
        self.process = process
        self.pty = pty
        self.started_at = time.time()
        self.exited_at: float | None = None
        # The connection allowed to type into the terminal (one at a time).
        self.writer: object | None = None
        # Held for the whole of one input request, so that the data of two
        # clients writing to one stdin pipe never interleave.
        self.input_lock = trio.Lock()

    def log(self, stream: str) -> OutputLog:
        """The log of ``stream`` ("stdout", "stderr" or "pty")."""
        process = self.process
        found = {
            "stdout": process.stdout_log,
            "stderr": process.stderr_log,
            "pty": process.pty.log if process.pty is not None else None,
        }.get(stream)
        if found is None:
            raise RequestError(
                "no-such-stream",
                f"process {self.name!r} has no captured {stream!r} stream "
                f"(it has: {', '.join(self.streams())})",
            )
        return found

    def streams(self) -> list[str]:
        """The names of the captured streams."""
        if self.pty:
            return ["pty"]
        return ["stdout", "stderr"]

    def describe(self) -> dict[str, Any]:
        """The process as the ``ps`` reply shows it."""
        process = self.process
        termination = process.termination
        return {
            "name": self.name,
            "pid": process.pid,
            "argv": list(process.argv),
            "state": "running" if process.returncode is None else "exited",
            "exit_code": process.returncode,
            "termination": termination.value if termination is not None else None,
            "started_at": self.started_at,
            "exited_at": self.exited_at,
            "pty": self.pty,
            "stdin": "pty" if self.pty else "pipe" if process.stdin is not None else "null",
            "streams": {name: _log_counts(self.log(name)) for name in self.streams()},
        }


def _log_counts(log: OutputLog) -> dict[str, int]:
    return {"total_bytes": log.total_bytes, "dropped_bytes": log.dropped_bytes}


class StreamOwner:
    """One streaming request of one connection: where a subscription's frames go.

    The request, not the connection, owns the stream: a connection may
    resume a subscription again while its older stream of it still runs.
    """

    __slots__ = ("connection", "scope")

    def __init__(self, connection: Any, scope: trio.CancelScope) -> None:
        self.connection = connection
        self.scope = scope

    def stop(self, new_owner: StreamOwner) -> None:
        """Make this stream let go, for ``new_owner`` to take over."""
        if self.connection is new_owner.connection:
            # The same client resumed again: its older stream ends with a
            # "cancelled" end frame, and the connection goes on.
            self.scope.cancel()
        else:
            # Usually a connection that is dying: its frames are in the
            # resend buffer once it has let go.
            self.connection.close()


RESEND_DEFAULT: Final = 256
REMOVED_KEPT: Final = 16
"""Removed subscriptions a session keeps listed (and resumable) at most."""


class RemoteSubscription:
    """A sink of a session's registry whose events go to whichever client resumes it.

    Every matching event has a number: how many matching events came before
    it (the registry's own sequence). Frames carry it as ``seq``. The last
    ``resend`` items handed to a client are kept, so that a client that
    resumes from the ``seq`` it has gets again whatever a dying connection
    lost; what is older than that is counted in a marker. So every event is
    received or counted, however often the client goes away.
    """

    def __init__(
        self,
        session: DaemonSession,
        categories: frozenset[EventCategory],
        capacity: int,
        backpressure: ObserverBackpressure,
        detach_timeout: float,
        resend: int,
    ) -> None:
        self.session = session
        self.categories = categories
        self.capacity = capacity
        self.backpressure = backpressure
        self.detach_timeout = detach_timeout
        self.subscription: Subscription[ObserverEvent | MissedEvents] | None = None
        self.id = ""
        # (seq, frame) of items handed out: an event frame's seq is its
        # number; a marker's covers the numbers [seq - missed, seq).
        self.sent: deque[tuple[int, dict[str, Any]]] = deque(maxlen=max(resend, 1))
        self.next_seq = 0
        self.sent_frames = 0
        self.events_framed = 0
        self.missed_in_resend = 0
        self.too_large_events = 0
        self._resend_counted_to = 0
        self.ended = False
        self.removed_reason: str | None = None
        self.attached: StreamOwner | None = None
        self._attach_changed = trio.Event()
        self._remove = trio.Event()
        self._finished = trio.Event()

    async def hold(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Keep the sink registered until it is removed or the session ends."""
        registry = self.session.session.observers
        try:
            async with registry.subscribe(
                self.categories,
                capacity=self.capacity,
                backpressure=self.backpressure,
                report_missed=True,
            ) as subscription:
                self.subscription = subscription
                self.id = subscription.id.as_str()
                task_status.started()
                await self._wait_for_removal()
        finally:
            self._finished.set()
        # Unregistered now; what the channel holds can still be resumed.
        self.session.note_removed(self)

    async def _wait_for_removal(self) -> None:
        while not self._remove.is_set():
            changed = self._attach_changed
            if (
                self.attached is None
                and self.backpressure is ObserverBackpressure.BLOCK
                and not self.ended
                and math.isfinite(self.detach_timeout)
            ):
                # A BLOCK sink nobody reads holds the session's emitters: a
                # crashed client may hold them only this long.
                with trio.move_on_after(self.detach_timeout) as scope:
                    await _first(changed, self._remove)
                if scope.cancelled_caught and self.attached is None:
                    self.removed_reason = (
                        f"detach timeout: no client for {self.detach_timeout} s (BLOCK)"
                    )
                    return
            else:
                await _first(changed, self._remove)

    async def take_over(self, owner: StreamOwner) -> None:
        """Make ``owner`` (a request of a connection) the one that receives the stream.

        A stream of it on another connection is closed with its connection
        (it is usually one that is dying), an older one on the same
        connection is cancelled; this waits until it has let go, so that the
        frames it took are in the resend buffer. A removed subscription can
        still be resumed: it hands out what its channel buffered, then ends.
        """
        while self.attached is not None and self.attached is not owner:
            self.attached.stop(owner)
            await self._attach_changed.wait()
        self.attached = owner
        self._signal()

    def release(self, owner: StreamOwner) -> None:
        """Forget ``owner`` if it is still the receiving stream."""
        if self.attached is owner:
            self.attached = None
            self._signal()

    def remove(self, reason: str) -> None:
        """Unregister the sink (the stream ends after what is buffered)."""
        if self.removed_reason is None:
            self.removed_reason = reason
        self._remove.set()

    def _signal(self) -> None:
        self._attach_changed.set()
        self._attach_changed = trio.Event()

    def replay(self, from_seq: int) -> list[dict[str, Any]]:
        """Frames a client that has every number below ``from_seq`` lacks, from the resend buffer.

        Raises:
          RequestError: ``from_seq`` is beyond what was handed out.
        """
        if not 0 <= from_seq <= self.next_seq:
            raise RequestError(
                "bad-params",
                f"from_seq must be between 0 and {self.next_seq} for subscription {self.id}, "
                f"not {from_seq}",
            )
        frames: list[dict[str, Any]] = []
        covered = from_seq
        for seq, frame in self.sent:
            missed = frame.get("missed")
            low, high = (seq - missed, seq) if missed is not None else (seq, seq + 1)
            if high <= covered:
                continue
            if low > covered:
                frames.append(self._resend_marker(covered, low))
            if missed is not None and low < covered:
                frame = {**frame, "missed": high - covered}
            frames.append(frame)
            covered = high
        if covered < self.next_seq:
            frames.append(self._resend_marker(covered, self.next_seq))
        return frames

    def _resend_marker(self, low: int, high: int) -> dict[str, Any]:
        # Numbers [low, high) were handed to a connection that died, and
        # the resend buffer no longer holds them. Counted once, however
        # often a client resumes from before them.
        if high > self._resend_counted_to:
            self.missed_in_resend += high - max(low, self._resend_counted_to)
            self._resend_counted_to = high
        return {"type": "stream", "seq": high, "missed": high - low, "lost_in": "connection"}

    async def next_frame(self) -> dict[str, Any] | None:
        """Take the next item from the sink as a frame; None at the end of the stream."""
        subscription = self.subscription
        assert subscription is not None
        try:
            item = await subscription.receive()
        except trio.EndOfChannel:
            self.ended = True
            return None
        return self._frame(item)

    def ready_frames(self, limit: int) -> list[dict[str, Any]]:
        """Up to ``limit`` frames the sink already holds, without waiting.

        The end of the stream is left for :meth:`next_frame` to report.
        """
        subscription = self.subscription
        assert subscription is not None
        frames: list[dict[str, Any]] = []
        while len(frames) < limit:
            try:
                item = subscription.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            frames.append(self._frame(item))
        return frames

    def _frame(self, item: ObserverEvent | MissedEvents) -> dict[str, Any]:
        frame: dict[str, Any]
        if isinstance(item, MissedEvents):
            self.next_seq += item.count
            frame = {
                "type": "stream",
                "seq": self.next_seq,
                "missed": item.count,
                "lost_in": "sink",
            }
        else:
            frame = {"type": "stream", "seq": self.next_seq, "event": item.to_dict()}
            if _too_large(frame):
                # No frame can carry it: counted in its place, so that the
                # stream (and every resume of it) goes on past it.
                self.too_large_events += 1
                logger.warning(
                    "session %r: subscription %s: event %d (%s of pid %s) is too large "
                    "for a frame; sent as a too-large marker",
                    self.session.name,
                    self.id,
                    self.next_seq,
                    item.kind.value,
                    item.pid,
                )
                frame = {
                    "type": "stream",
                    "seq": self.next_seq + 1,
                    "missed": 1,
                    "lost_in": "too-large",
                }
            self.next_seq += 1
            self.events_framed += 1
        self.sent.append((int(frame["seq"]), frame))
        self.sent_frames += 1
        return frame

    def unread(self) -> int:
        """Events the sink took that no client has been handed yet."""
        if self.subscription is None:
            return 0
        return self.subscription.status().delivered_events - self.events_framed

    def status(self) -> dict[str, Any]:
        """The counters a client sees."""
        sink: ObserverSinkStatus | None = (
            self.subscription.status() if self.subscription is not None else None
        )
        return {
            "id": self.id,
            "session": self.session.name,
            "categories": sorted(c.value for c in self.categories),
            "capacity": self.capacity,
            "backpressure": self.backpressure.value,
            "delivered_events": sink.delivered_events if sink else 0,
            "missed_events": sink.missed_events if sink else 0,
            "disconnected": sink.disconnected if sink else False,
            "attached": self.attached is not None,
            "next_seq": self.next_seq,
            "sent_frames": self.sent_frames,
            "missed_in_resend": self.missed_in_resend,
            "too_large_events": self.too_large_events,
            "ended": self.ended,
            "removed": self.removed_reason,
        }


# Room left in a frame for what the event does not hold (the request id).
_FRAME_MARGIN: Final = 64
# A character takes at most this many bytes in a frame (a \u00XX escape).
_MAX_BYTES_PER_CHAR: Final = 6


def _too_large(frame: dict[str, Any]) -> bool:
    """Whether ``frame`` (an event's) encodes to more than a frame may hold.

    Only a command line can be that long (a path is at most PATH_MAX); the
    frame is encoded to check only when its argv might be, so that the
    ordinary event costs a sum, not a second encoding.
    """
    argv = frame["event"].get("argv")
    if not argv or sum(map(len, argv)) * _MAX_BYTES_PER_CHAR < MAX_FRAME_BYTES // 2:
        return False
    try:
        return len(encode(frame)) > MAX_FRAME_BYTES - _FRAME_MARGIN
    except ProtocolError:
        return True


async def _first(*events: trio.Event) -> None:
    async with trio.open_nursery() as nursery:
        for event in events:

            async def wait(event: trio.Event = event) -> None:
                await event.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(wait)


def resolve_containment(requested: str) -> str:
    """What ``requested`` (one of ``CONTAINMENTS``) gives here: ``"cgroup"`` or ``"process-group"``.

    Resolved by the daemon rather than left to ``open_session``, so that
    the session list says which one each session holds.

    Raises:
      RequestError: ``requested`` is not a containment, or is ``"cgroup"``
        where no cgroup can be made (the message says why).
    """
    if requested not in CONTAINMENTS:
        raise RequestError(
            "bad-params",
            f"param 'containment' must be one of {', '.join(map(repr, CONTAINMENTS))}, "
            f"not {requested!r:.40}",
        )
    if requested == "process-group":
        return requested
    support = probe_cgroup()
    if support.available:
        return "cgroup"
    if requested == "cgroup":
        raise RequestError(
            "containment-unavailable", f"containment 'cgroup' is not available: {support.reason}"
        )
    return "process-group"


class DaemonSession:
    """One named :func:`open_session` run by the daemon."""

    def __init__(
        self,
        name: str,
        *,
        grace_period: float,
        track_descendants: bool,
        containment: str,
        exporter: OTelExporter | None = None,
    ) -> None:
        self.name = name
        # Where the session's lifecycle events also go (``daemon --otlp``).
        self._exporter = exporter
        self.grace_period = grace_period
        self.track_descendants = track_descendants
        # Resolved already: "cgroup" or "process-group" (resolve_containment).
        self.containment = containment
        self.created_at = time.time()
        self.processes: dict[str, ProcessRecord] = {}
        self.subscriptions: dict[str, RemoteSubscription] = {}
        # Ids of removed subscriptions still listed, oldest removal first.
        self._removed: deque[str] = deque()
        self.forgotten_subscriptions = 0
        self.forgotten_events = 0
        self._session: Session | None = None
        self._nursery: trio.Nursery | None = None
        self._counter = 0
        self.closing = False
        self.closed = trio.Event()

    @property
    def session(self) -> Session:
        assert self._session is not None
        return self._session

    async def run(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Run the session until :meth:`close`; leaving stops and reaps everything."""
        try:
            # The exporter runs outside the session's block, so that the
            # session's cancellation does not end it before the teardown's
            # events (it ends when the session closes its sinks).
            async with (
                trio.open_nursery() as outside,
                open_session(
                    grace_period=self.grace_period,
                    track_descendants=self.track_descendants,
                    containment=self.containment,
                ) as session,
            ):
                self._session = session
                if self.closing:
                    # close() came while the session was opening.
                    session.cancel_scope.cancel()
                if self._exporter is not None:
                    await outside.start(self._exporter.export_session, session)
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    task_status.started()
                    await trio.sleep_forever()
        finally:
            self.closing = True
            self.closed.set()

    def close(self) -> None:
        """Stop every process tree (SIGTERM, the grace period, SIGKILL) and end."""
        self.closing = True
        if self._session is not None:
            self._session.cancel_scope.cancel()

    def hurry(self) -> None:
        """End the grace period of the teardown: SIGKILL now to what still runs."""
        if self._session is not None:
            self._session._hurry_teardown()

    async def start(
        self,
        argv: Sequence[str],
        *,
        name: str | None,
        cwd: str | None,
        env: Mapping[str, str] | None,
        pty: PtySize | None,
        backlog_bytes: int,
        stdin_pipe: bool = False,
    ) -> ProcessRecord:
        """Start a process in the session under a unique name.

        Without a PTY, stdin is ``/dev/null``, or with ``stdin_pipe`` a pipe
        that ``input`` requests write to.
        """
        if self.closing:
            raise RequestError("session-closed", f"session {self.name!r} is closing")
        if name is None:
            self._counter += 1
            name = f"{os.path.basename(argv[0])}-{self._counter}"
            while name in self.processes:
                self._counter += 1
                name = f"{os.path.basename(argv[0])}-{self._counter}"
        elif name in self.processes:
            raise RequestError(
                "name-taken", f"session {self.name!r} already has a process named {name!r}"
            )
        try:
            if pty is not None:
                process = await self.session.start_process(
                    argv, cwd=cwd, env=env, pty=pty, backlog_bytes=backlog_bytes
                )
            else:
                process = await self.session.start_process(
                    argv,
                    stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
                    stdout=CAPTURE,
                    stderr=CAPTURE,
                    cwd=cwd,
                    env=env,
                    backlog_bytes=backlog_bytes,
                )
        except (FileNotFoundError, PermissionError, NotADirectoryError) as exc:
            raise RequestError("spawn-failed", f"cannot start {argv[0]!r}: {exc}") from None
        record = ProcessRecord(name, process, pty=pty is not None)
        self.processes[name] = record
        assert self._nursery is not None
        self._nursery.start_soon(self._note_exit, record)
        return record

    async def _note_exit(self, record: ProcessRecord) -> None:
        await record.process.wait()
        record.exited_at = time.time()

    def get(self, name: str) -> ProcessRecord:
        """The process called ``name``."""
        try:
            return self.processes[name]
        except KeyError:
            raise RequestError(
                "no-such-process", f"session {self.name!r} has no process named {name!r}"
            ) from None

    async def subscribe(
        self,
        categories: frozenset[EventCategory],
        *,
        capacity: int,
        backpressure: ObserverBackpressure,
        detach_timeout: float,
        resend: int,
    ) -> RemoteSubscription:
        """Register a remote subscription held by the daemon."""
        if self.closing or self._nursery is None:
            raise RequestError("session-closed", f"session {self.name!r} is closing")
        remote = RemoteSubscription(
            self, categories, capacity, backpressure, detach_timeout, resend
        )
        await self._nursery.start(remote.hold)
        self.subscriptions[remote.id] = remote
        return remote

    def note_removed(self, remote: RemoteSubscription) -> None:
        """Keep ``remote`` listed (resumable) among the last ``REMOVED_KEPT`` removed.

        Beyond that many, the oldest removed subscription no client is
        streaming is forgotten; the events it still held are counted in
        ``forgotten_events`` and logged, so that they are not lost uncounted.
        """
        if self.closing or remote.id not in self.subscriptions:
            return
        self._removed.append(remote.id)
        excess = len(self._removed) - REMOVED_KEPT
        if excess <= 0:
            return
        for old_id in [i for i in self._removed if not self.subscriptions[i].attached][:excess]:
            old = self.subscriptions[old_id]
            unread = old.unread()
            self.forget(old)
            self.forgotten_subscriptions += 1
            self.forgotten_events += unread
            logger.warning(
                "session %r: forgot removed subscription %s (%s) with %d unread event(s)",
                self.name,
                old_id,
                old.removed_reason,
                unread,
            )

    def forget(self, remote: RemoteSubscription) -> None:
        """Drop ``remote`` from the list (unsubscribed, or drained after its removal)."""
        if self.subscriptions.pop(remote.id, None) is not None and remote.id in self._removed:
            self._removed.remove(remote.id)

    def describe(self) -> dict[str, Any]:
        """The session as ``sessions`` lists it."""
        return {
            "name": self.name,
            "id": self._session.id if self._session is not None else None,
            "grace_period": self.grace_period,
            "track_descendants": self.track_descendants,
            "containment": self.containment,
            "created_at": self.created_at,
            "closing": self.closing,
            "processes": [record.describe() for record in self.processes.values()],
            "subscriptions": sorted(self.subscriptions),
            "forgotten_subscriptions": self.forgotten_subscriptions,
            "forgotten_events": self.forgotten_events,
        }
