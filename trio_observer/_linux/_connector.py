"""The netlink process connector: exact fork, exec and exit notifications.

The kernel multicasts one message per fork, exec and exit of every task of
the system to sockets subscribed to ``CN_IDX_PROC``. Subscribing needs
``CAP_NET_ADMIN`` in the initial user and pid namespaces; elsewhere the bind
fails with ``EPERM`` or the subscription is silently ignored (no
acknowledgement), and the observer falls back to polling ``/proc``. The
records carry the pids of the initial pid namespace, which a process in
another one cannot relate to its own: there the connector is not used at
all, whatever the kernel answers. Acknowledgements are multicast to every
listener, so ours is told from another process's by the ``ack`` number we
chose.

Messages are read from a non-blocking socket with
``trio.lowlevel.wait_readable``. When the process falls behind, the kernel
drops messages and the next ``recv`` fails with ``ENOBUFS``: the records are
lost, and :class:`ProcConnector` reports it so the observer can say so and
resynchronise.
"""

from __future__ import annotations

import errno
import os
import random
import select
import socket
import struct
import time
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Final, Protocol, final

import trio

from ._procfs import foreign_namespaces

NETLINK_CONNECTOR: Final = 11
CN_IDX_PROC: Final = 1
CN_VAL_PROC: Final = 1
PROC_CN_MCAST_LISTEN: Final = 1
PROC_CN_MCAST_IGNORE: Final = 2

PROC_EVENT_NONE: Final = 0x00000000
PROC_EVENT_FORK: Final = 0x00000001
PROC_EVENT_EXEC: Final = 0x00000002
PROC_EVENT_EXIT: Final = 0x80000000

_NLMSG_ERROR: Final = 2
_NLMSG_DONE: Final = 3

# struct nlmsghdr: len u32, type u16, flags u16, seq u32, pid u32.
_NLMSGHDR: Final = struct.Struct("=IHHII")
# struct cn_msg: idx u32, val u32, seq u32, ack u32, len u16, flags u16.
_CN_MSG: Final = struct.Struct("=IIIIHH")
# struct proc_event header: what u32, cpu u32, timestamp_ns u64 (aligned).
_PROC_EVENT: Final = struct.Struct("=IIQ")
_FORK: Final = struct.Struct("=IIII")
_EXEC: Final = struct.Struct("=II")
_EXIT: Final = struct.Struct("=IIII")
_ACK: Final = struct.Struct("=I")

_RECV_SIZE: Final = 65536
# Forks of a busy machine come in bursts; a larger buffer makes ENOBUFS rarer.
_RCVBUF_BYTES: Final = 4 * 1024 * 1024


def _nlmsg_align(length: int) -> int:
    return (length + 3) & ~3


def wait_status_to_exit_code(status: int) -> int:
    """Convert a wait status to an exit code, minus the signal number if killed.

    Unlike :func:`os.waitstatus_to_exitcode` this never raises: the connector
    reports whatever the task held when it died.

    Args:
        status: A status as ``waitpid()`` returns it.

    Returns:
        The exit status, or ``-signal`` when a signal ended the process.
    """
    signal_number = status & 0x7F
    if signal_number == 0:
        return (status >> 8) & 0xFF
    return -signal_number


@final
@dataclass(frozen=True, slots=True)
class ForkRecord:
    """A task was created. It is a new process when ``child_pid == child_tgid``."""

    timestamp_ns: int
    """``CLOCK_MONOTONIC`` when the kernel built the message."""
    parent_pid: int
    """The thread that forked."""
    parent_tgid: int
    """The process that forked."""
    child_pid: int
    """The new task."""
    child_tgid: int
    """The process of the new task (the parent's for a new thread)."""


@final
@dataclass(frozen=True, slots=True)
class ExecRecord:
    """A task called ``execve()``."""

    timestamp_ns: int
    """``CLOCK_MONOTONIC`` when the kernel built the message."""
    pid: int
    """The task."""
    tgid: int
    """Its process."""


@final
@dataclass(frozen=True, slots=True)
class ExitRecord:
    """A task exited. It is the process when ``pid == tgid``."""

    timestamp_ns: int
    """``CLOCK_MONOTONIC`` when the kernel built the message."""
    pid: int
    """The task."""
    tgid: int
    """Its process."""
    exit_code: int
    """Exit status, or minus the signal number (converted from the raw wait
    status)."""


ConnectorRecord = ForkRecord | ExecRecord | ExitRecord


def parse_messages(data: bytes) -> list[ConnectorRecord]:
    """Parse what one ``recv`` on a connector socket returned.

    Args:
        data: One datagram; it may hold several netlink messages.

    Returns:
        The fork, exec and exit records, in order. Acknowledgements, other
        event types, other connector channels and truncated messages are
        skipped.
    """
    records: list[ConnectorRecord] = []
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, msg_type, _flags, _seq, _port = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > len(data):
            break
        body = offset + _NLMSGHDR.size
        offset += _nlmsg_align(length)
        if msg_type != _NLMSG_DONE or body + _CN_MSG.size > len(data):
            continue
        idx, val, _cseq, _ack, payload_len, _cflags = _CN_MSG.unpack_from(data, body)
        event = body + _CN_MSG.size
        if idx != CN_IDX_PROC or val != CN_VAL_PROC or payload_len < _PROC_EVENT.size:
            continue
        if event + payload_len > len(data):
            continue
        what, _cpu, timestamp_ns = _PROC_EVENT.unpack_from(data, event)
        union = event + _PROC_EVENT.size
        room = payload_len - _PROC_EVENT.size
        if what == PROC_EVENT_FORK and room >= _FORK.size:
            ppid, ptgid, cpid, ctgid = _FORK.unpack_from(data, union)
            records.append(ForkRecord(timestamp_ns, ppid, ptgid, cpid, ctgid))
        elif what == PROC_EVENT_EXEC and room >= _EXEC.size:
            pid, tgid = _EXEC.unpack_from(data, union)
            records.append(ExecRecord(timestamp_ns, pid, tgid))
        elif what == PROC_EVENT_EXIT and room >= _EXIT.size:
            pid, tgid, status, _exit_signal = _EXIT.unpack_from(data, union)
            records.append(ExitRecord(timestamp_ns, pid, tgid, wait_status_to_exit_code(status)))
    return records


def build_control_message(op: int, *, ack: int = 0) -> bytes:
    """Build the netlink message that subscribes to (or leaves) proc events.

    Args:
        op: :data:`PROC_CN_MCAST_LISTEN` or :data:`PROC_CN_MCAST_IGNORE`.
        ack: The ``ack`` number of the request; the kernel's acknowledgement
            carries ``ack + 1``.

    Returns:
        The bytes to send on the connector socket.
    """
    payload = struct.pack("=I", op)
    cn_msg = _CN_MSG.pack(CN_IDX_PROC, CN_VAL_PROC, 0, ack, len(payload), 0) + payload
    header = _NLMSGHDR.pack(_NLMSGHDR.size + len(cn_msg), _NLMSG_DONE, 0, 0, 0)
    return header + cn_msg


def subscription_ack_error(data: bytes, ack: int) -> int | None:
    """Return the error of the acknowledgement of our request, else ``None``.

    Args:
        data: One datagram read from the connector socket.
        ack: The ``ack`` number our request carried.

    Returns:
        ``0`` for a subscription accepted, an ``errno`` for one refused,
        ``None`` for anything else: records, and the acknowledgements of
        other processes' requests, which the kernel multicasts to every
        listener (their ``ack`` is not ours plus one).
    """
    if len(data) < _NLMSGHDR.size + _CN_MSG.size + _PROC_EVENT.size + _ACK.size:
        return None
    _length, msg_type, *_ = _NLMSGHDR.unpack_from(data, 0)
    if msg_type == _NLMSG_ERROR:
        # Netlink's own errors are unicast to the sender: ours.
        (err,) = struct.unpack_from("=i", data, _NLMSGHDR.size)
        return -err if err else 0
    idx, val, _seq, their_ack, *_ = _CN_MSG.unpack_from(data, _NLMSGHDR.size)
    event = _NLMSGHDR.size + _CN_MSG.size
    what, _cpu, _ts = _PROC_EVENT.unpack_from(data, event)
    if idx != CN_IDX_PROC or val != CN_VAL_PROC or what != PROC_EVENT_NONE:
        return None
    if their_ack != (ack + 1) & 0xFFFFFFFF:
        return None
    (err,) = _ACK.unpack_from(data, event + _PROC_EVENT.size)
    return int(err)


class ConnectorSocket(Protocol):
    """What :class:`ProcConnector` needs of a socket; tests pass a fake."""

    def fileno(self) -> int:
        """The descriptor to wait on."""
        ...

    def recv(self, bufsize: int, /) -> bytes:
        """Receive one datagram without blocking."""
        ...

    def close(self) -> None:
        """Close the socket."""
        ...


class ConnectorUnavailableError(OSError):
    """The process connector cannot be used here; ``str()`` says why."""


def open_connector_socket(*, ack_timeout: float = 1.0) -> socket.socket:
    """Open a non-blocking socket subscribed to the process connector.

    The kernel acknowledges a subscription synchronously, so the wait for the
    acknowledgement only runs out where the kernel ignores the request (a
    process outside the initial pid or user namespace).

    Args:
        ack_timeout: Seconds to wait for the acknowledgement.

    Returns:
        The subscribed socket.

    Raises:
        ConnectorUnavailableError: If the platform or privileges refuse it.
    """
    if not hasattr(socket, "AF_NETLINK"):
        raise ConnectorUnavailableError("netlink sockets do not exist on this platform")
    foreign = foreign_namespaces()
    if foreign:
        raise ConnectorUnavailableError(
            f"this process is not in the initial namespaces ({', '.join(foreign)}): "
            "the process connector reports the initial pid namespace's pids, "
            "and the kernel ignores subscriptions from elsewhere"
        )
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_CONNECTOR)
    except OSError as exc:
        raise ConnectorUnavailableError(f"cannot create a connector socket: {exc}") from exc
    try:
        for option in (getattr(socket, "SO_RCVBUFFORCE", None), socket.SO_RCVBUF):
            if option is None:
                continue
            try:
                sock.setsockopt(socket.SOL_SOCKET, option, _RCVBUF_BYTES)
                break
            except OSError:
                continue
        # Port id 0: the kernel picks a unique one, so several observers in
        # one process do not collide on the pid.
        sock.bind((0, CN_IDX_PROC))
        ack = random.getrandbits(32)
        sock.send(build_control_message(PROC_CN_MCAST_LISTEN, ack=ack))
        sock.setblocking(False)
        _wait_for_ack(sock, ack_timeout, ack)
    except ConnectorUnavailableError:
        sock.close()
        raise
    except OSError as exc:
        sock.close()
        raise ConnectorUnavailableError(
            f"cannot subscribe to process events ({exc}); needs CAP_NET_ADMIN "
            "in the initial user and pid namespaces"
        ) from exc
    return sock


def _wait_for_ack(sock: socket.socket, timeout: float, ack: int) -> None:
    # The ack is queued before send() returns; a select with a timeout covers
    # kernels that answer a moment later, and bounds the wait where the
    # request is silently ignored. Events queued before the ack are dropped:
    # the observer resynchronises with a scan right after subscribing. The
    # deadline holds however many records and foreign acks arrive meanwhile.
    deadline = time.monotonic() + timeout
    while True:
        readable, _, _ = select.select([sock], [], [], max(0.0, deadline - time.monotonic()))
        if not readable:
            raise ConnectorUnavailableError(
                "the kernel did not acknowledge the subscription to process events "
                "(not in the initial pid/user namespace?)"
            )
        data = sock.recv(_RECV_SIZE)
        err = subscription_ack_error(data, ack)
        if err is None:
            continue
        if err:
            raise ConnectorUnavailableError(
                f"subscription to process events refused: {os.strerror(err)}"
            )
        return


def probe_connector() -> str | None:
    """Check whether the process connector can be used.

    Returns:
        ``None`` if it can, else the reason it cannot.
    """
    try:
        sock = open_connector_socket(ack_timeout=0.2)
    except ConnectorUnavailableError as exc:
        return str(exc)
    _unsubscribe_and_close(sock)
    return None


def _unsubscribe_and_close(sock: ConnectorSocket) -> None:
    # Closing alone also drops the subscription on current kernels, but older
    # ones only decrement their listener count (which makes every fork pay
    # for building the message) on an explicit IGNORE.
    if isinstance(sock, socket.socket):
        try:
            sock.send(build_control_message(PROC_CN_MCAST_IGNORE))
        except OSError:
            pass
    sock.close()


HELD_RECORDS: Final = 4096
"""At most about this many records are held by :meth:`ProcConnector.hold_queued`
before it asks for them to be handled: a bound on the memory of a quiet
spell on a machine that starts processes fast."""


@final
@dataclass(frozen=True, slots=True)
class ConnectorBatch:
    """What :meth:`ProcConnector.receive` got in one go."""

    records: list[ConnectorRecord]
    """The records, in the order the kernel queued them."""
    overruns: int
    """How many times ``recv`` failed with ``ENOBUFS`` while draining: each
    means an unknown number of records were dropped by the kernel."""


@final
class ProcConnector:
    """A subscribed process connector socket, read with trio.

    Args:
        sock: A subscribed, non-blocking socket (see
            :func:`open_connector_socket`), or a fake with the same methods.
    """

    def __init__(self, sock: ConnectorSocket) -> None:
        self._sock = sock
        self._closed = False
        # Read by hold_queued (the quiet watch's thread) and not yet handed
        # out: the next receive_nowait returns them first.
        self._held: list[ConnectorRecord] = []
        self._held_overruns = 0

    async def wait_readable(self) -> None:
        """Block until a record (or an overrun) is waiting.

        Raises:
            trio.ClosedResourceError: If the connector was closed.
        """
        if self._closed:
            raise trio.ClosedResourceError("the process connector was closed")
        await trio.lowlevel.wait_readable(self._sock)

    def receive_nowait(self) -> ConnectorBatch:
        """Drain everything queued on the socket without blocking.

        Returns:
            The records and the number of overruns seen while draining.

        Raises:
            trio.ClosedResourceError: If the connector was closed.
        """
        if self._closed:
            raise trio.ClosedResourceError("the process connector was closed")
        records, self._held = self._held, []
        overruns, self._held_overruns = self._held_overruns, 0
        overruns += self._drain(records)
        return ConnectorBatch(records, overruns)

    def fileno(self) -> int:
        """The socket's descriptor, to wait on."""
        return self._sock.fileno()

    def hold_queued(self, pids: AbstractSet[int]) -> bool:
        """Read everything queued on the socket and keep it for the next :meth:`receive_nowait`.

        For the quiet watch's thread, which reads the socket in the trio
        loop's place while the tree is quiet (see ``_quiet_watch``); never
        call it concurrently with :meth:`receive_nowait`.

        Args:
            pids: The processes of the tree (roots included).

        Returns:
            Whether the records should be handled now: one is about one of
            ``pids`` (a fork by it, its exec or exit), the kernel dropped
            some (an overrun), or :data:`HELD_RECORDS` are held.
        """
        held = self._held
        start = len(held)
        overruns = self._drain(held)
        self._held_overruns += overruns
        if overruns or len(held) >= HELD_RECORDS:
            return True
        for index in range(start, len(held)):
            record = held[index]
            tgid = record.parent_tgid if isinstance(record, ForkRecord) else record.tgid
            if tgid in pids:
                return True
        return False

    def _drain(self, records: list[ConnectorRecord]) -> int:
        # Appends what is queued to records; returns the overruns seen.
        overruns = 0
        while True:
            try:
                data = self._sock.recv(_RECV_SIZE)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    # The kernel dropped records; the socket stays usable and
                    # the next recv returns what was queued after the drop.
                    overruns += 1
                    continue
                raise
            if not data:
                break
            records.extend(parse_messages(data))
        return overruns

    def close(self) -> None:
        """Unsubscribe and close the socket. Idempotent."""
        if self._closed:
            return
        self._closed = True
        # Other tasks blocked in wait_readable must be woken before the fd
        # number can be reused.
        try:
            trio.lowlevel.notify_closing(self._sock)
        except RuntimeError:
            pass  # Closed outside of trio.run(): nobody can be waiting.
        _unsubscribe_and_close(self._sock)
