"""Parsers for the socket tables of ``/proc/<pid>/net``.

The tables are the only unprivileged way to go from a socket inode (what
``/proc/<pid>/fd/N`` points at: ``socket:[INODE]``) to its protocol, state
and addresses. They describe the network namespace of the process whose
``/proc/<pid>/net`` is read, which is why the observer reads them per
namespace rather than once from ``/proc/net``.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Final, Literal, final

from ._procfs import read_proc_file

SocketRole = Literal["listen", "connect"]

# include/net/tcp_states.h
_TCP_LISTEN: Final = 0x0A
_TCP_CLOSE: Final = 0x07
# Every state in which a connection exists or is being set up. SYN_SENT is
# included: the process did call connect(), even if nobody answered yet.
_TCP_CONNECTED: Final = frozenset({0x01, 0x02, 0x03, 0x04, 0x05, 0x08, 0x09, 0x0B})
# include/linux/net.h: SS_CONNECTED; include/net/sock.h: __SO_ACCEPTCON.
_UNIX_SS_CONNECTED: Final = 3
_UNIX_ACCEPTCON: Final = 0x10000

INET_PROTOCOLS: Final = ("tcp", "tcp6", "udp", "udp6")
"""The table names read for Internet sockets, also the ``protocol`` values."""


@final
@dataclass(frozen=True, slots=True)
class SocketEntry:
    """One socket as the net tables describe it."""

    inode: int
    """The socket inode, as in ``socket:[INODE]``."""
    protocol: str
    """``"tcp"``, ``"tcp6"``, ``"udp"``, ``"udp6"`` or ``"unix"``."""
    role: SocketRole | None
    """``"listen"``, ``"connect"`` or ``None`` when there is nothing to report
    yet (not bound, not connected, or an unnamed Unix socket)."""
    local_address: str | None
    """``host:port``, ``[host]:port`` or a Unix path (``@name`` when
    abstract)."""
    remote_address: str | None
    """The peer for connected Internet sockets; ``None`` otherwise."""


def decode_address(text: str) -> tuple[str, int]:
    """Decode an address of ``/proc/net/tcp`` and friends.

    The kernel prints the address as the 32-bit words of the network-order
    address, each read as a *native* integer and printed in hex, so on a
    little-endian machine ``127.0.0.1`` is ``0100007F``; the port is printed
    as a plain number in hex.

    Args:
        text: ``"HEXADDR:HEXPORT"``, 8 hex digits for IPv4, 32 for IPv6.

    Returns:
        ``(host, port)`` with the host in its usual text form; an
        IPv4-mapped IPv6 address as ``::ffff:127.0.0.1``.

    Raises:
        ValueError: If ``text`` is not in that form.
    """
    hex_host, sep, hex_port = text.partition(":")
    if not sep or len(hex_host) not in (8, 32):
        raise ValueError(f"not a /proc/net address: {text!r}")
    raw = b"".join(
        struct.pack("=I", int(hex_host[i : i + 8], 16)) for i in range(0, len(hex_host), 8)
    )
    port = int(hex_port, 16)
    if len(raw) == 4:
        return str(ipaddress.IPv4Address(raw)), port
    host = ipaddress.IPv6Address(raw)
    if host.ipv4_mapped is not None:
        # An IPv4 peer of a dual-stack socket: written as getsockname() and
        # Python >= 3.13 write it, not as two hex groups (::ffff:7f00:1).
        return f"::ffff:{host.ipv4_mapped}", port
    return str(host), port


def format_address(host: str, port: int) -> str:
    """Format ``host`` and ``port`` as ``host:port``, IPv6 as ``[host]:port``.

    Args:
        host: An IPv4 or IPv6 address in text form.
        port: The port.

    Returns:
        The formatted address.
    """
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def parse_inet_table(text: str, protocol: str) -> dict[int, SocketEntry]:
    """Parse ``/proc/net/{tcp,tcp6,udp,udp6}``.

    Args:
        text: The table, header line included.
        protocol: Which table it is; becomes :attr:`SocketEntry.protocol`.

    Returns:
        ``{inode: entry}``. Sockets with inode 0 (TIME_WAIT remnants that no
        process owns any more) are left out.
    """
    out: dict[int, SocketEntry] = {}
    is_tcp = protocol.startswith("tcp")
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10:
            continue
        try:
            local_host, local_port = decode_address(fields[1])
            remote_host, remote_port = decode_address(fields[2])
            state = int(fields[3], 16)
            inode = int(fields[9])
        except ValueError:
            continue
        if inode == 0:
            continue
        local = format_address(local_host, local_port)
        remote = format_address(remote_host, remote_port)
        role: SocketRole | None = None
        if is_tcp:
            if state == _TCP_LISTEN:
                role = "listen"
            elif state in _TCP_CONNECTED:
                role = "connect"
        elif remote_port != 0:
            # A connected UDP socket has a fixed peer.
            role = "connect"
        elif state == _TCP_CLOSE and local_port != 0:
            # A bound, unconnected UDP socket receives datagrams sent to its
            # port: the datagram equivalent of listening.
            role = "listen"
        out[inode] = SocketEntry(
            inode=inode,
            protocol=protocol,
            role=role,
            local_address=local if role is not None or local_port else None,
            remote_address=remote if role == "connect" else None,
        )
    return out


def parse_unix_table(text: str) -> dict[int, SocketEntry]:
    """Parse ``/proc/net/unix``.

    Only named sockets get a role: a listening socket is ``"listen"`` and an
    accepted connection on a named socket is ``"connect"``. Unnamed sockets
    (socketpairs, the client end of a connection) have no role, because the
    table does not say who the peer is.

    Args:
        text: The table, header line included.

    Returns:
        ``{inode: entry}``.
    """
    out: dict[int, SocketEntry] = {}
    for line in text.splitlines()[1:]:
        # "Num RefCount Protocol Flags Type St Inode [Path]"; the path may
        # contain spaces, so split at most 7 times.
        fields = line.split(maxsplit=7)
        if len(fields) < 7:
            continue
        try:
            flags = int(fields[3], 16)
            state = int(fields[5], 16)
            inode = int(fields[6])
        except ValueError:
            continue
        path = fields[7] if len(fields) > 7 else None
        role: SocketRole | None = None
        if path is not None:
            if flags & _UNIX_ACCEPTCON:
                role = "listen"
            elif state == _UNIX_SS_CONNECTED:
                role = "connect"
        out[inode] = SocketEntry(
            inode=inode, protocol="unix", role=role, local_address=path, remote_address=None
        )
    return out


def read_socket_tables(proc_root: str, pid: int) -> dict[int, SocketEntry]:
    """Read every socket table of the network namespace of ``pid``.

    Args:
        proc_root: Where ``/proc`` is mounted (or a fake tree).
        pid: Any process of the namespace.

    Returns:
        ``{inode: entry}`` over TCP, UDP (v4 and v6) and Unix sockets; empty
        when the process is gone or the tables are unreadable.
    """
    out: dict[int, SocketEntry] = {}
    for protocol in INET_PROTOCOLS:
        text = read_proc_file(f"{proc_root}/{pid}/net/{protocol}")
        if text:
            out.update(parse_inet_table(text, protocol))
    text = read_proc_file(f"{proc_root}/{pid}/net/unix")
    if text:
        out.update(parse_unix_table(text))
    return out


def socket_inode(target: str) -> int | None:
    """Return INODE for a descriptor target ``socket:[INODE]``, else ``None``.

    Args:
        target: What ``readlink(/proc/<pid>/fd/N)`` returned.

    Returns:
        The inode of the socket, or ``None`` if the target is not a socket.
    """
    if target.startswith("socket:[") and target.endswith("]"):
        try:
            return int(target[8:-1])
        except ValueError:
            return None
    return None
