"""A fake /proc tree in a temporary directory, and socket-table lines for it."""

from __future__ import annotations

import os
import socket
import struct
from pathlib import Path


class FakeProc:
    """A fake /proc tree in a temporary directory, for deterministic tests.

    Writes ``<pid>/stat``, ``<pid>/cmdline``, ``<pid>/fd/<n>`` symlinks and,
    when ``children_files`` is true, ``<pid>/task/<pid>/children``.
    """

    def __init__(self, root: Path, *, children_files: bool = True) -> None:
        self.root = root
        self.children_files = children_files
        self.ppids: dict[int, int] = {}
        root.mkdir(parents=True, exist_ok=True)

    @property
    def path(self) -> str:
        return str(self.root)

    def add(
        self,
        pid: int,
        ppid: int,
        *,
        starttime: int = 1000,
        state: str = "S",
        comm: str = "fake",
        exit_status: int = 0,
        argv: tuple[str, ...] = ("fake",),
        threads: int = 1,
    ) -> None:
        """Create or replace process ``pid``."""
        directory = self.root / str(pid)
        (directory / "fd").mkdir(parents=True, exist_ok=True)
        (directory / "task" / str(pid)).mkdir(parents=True, exist_ok=True)
        # Fields 3..52; field 22 is starttime, field 52 the exit status.
        fields = ["0"] * 50
        fields[0] = state
        fields[1] = str(ppid)
        fields[20 - 3] = str(threads)
        fields[22 - 3] = str(starttime)
        fields[52 - 3] = str(exit_status)
        (directory / "stat").write_text(f"{pid} ({comm}) {' '.join(fields)}\n")
        (directory / "cmdline").write_bytes(b"".join(a.encode() + b"\0" for a in argv))
        self.ppids[pid] = ppid
        self._write_children()

    def remove(self, pid: int) -> None:
        """Make ``pid`` vanish (exited and reaped)."""
        directory = self.root / str(pid)
        for path in sorted(directory.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if path.is_symlink() or path.is_file():
                path.unlink()
            else:
                path.rmdir()
        directory.rmdir()
        del self.ppids[pid]
        self._write_children()

    def set_fd(self, pid: int, fd: int, target: str) -> None:
        """Point descriptor ``fd`` of ``pid`` at ``target`` (a dangling link)."""
        link = self.root / str(pid) / "fd" / str(fd)
        if link.is_symlink():
            link.unlink()
        os.symlink(target, link)

    def close_fd(self, pid: int, fd: int) -> None:
        """Close descriptor ``fd`` of ``pid``."""
        (self.root / str(pid) / "fd" / str(fd)).unlink()

    def set_net(self, pid: int, table: str, text: str, *, namespace: str = "net:[1]") -> None:
        """Write ``<pid>/net/<table>`` and the namespace link."""
        (self.root / str(pid) / "net").mkdir(exist_ok=True)
        (self.root / str(pid) / "net" / table).write_text(text)
        ns = self.root / str(pid) / "ns"
        ns.mkdir(exist_ok=True)
        if not (ns / "net").is_symlink():
            os.symlink(namespace, ns / "net")

    def _write_children(self) -> None:
        if not self.children_files:
            return
        for pid in self.ppids:
            kids = sorted(p for p, parent in self.ppids.items() if parent == pid)
            path = self.root / str(pid) / "task" / str(pid) / "children"
            path.write_text("".join(f"{k} " for k in kids))


def inet_hex(host: str, port: int) -> str:
    """Encode an address the way the kernel prints it in /proc/net/tcp."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    raw = socket.inet_pton(family, host)
    words = struct.unpack(f"={len(raw) // 4}I", raw)
    return "".join(f"{w:08X}" for w in words) + f":{port:04X}"


TCP_HEADER = (
    "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt"
    "   uid  timeout inode\n"
)


def tcp_line(slot: int, local: str, remote: str, state: int, inode: int) -> str:
    return (
        f"  {slot}: {local} {remote} {state:02X} 00000000:00000000 00:00000000 00000000"
        f"     0        0 {inode} 1 0000000000000000 100 0 0 10 0\n"
    )


# ------------------------------------------------------------------ stat


def set_schedstat(fake: FakeProc, pid: int, runtime: int, scheduled: int) -> None:
    """Write the run counters the kernel keeps in ``<pid>/schedstat``."""
    (fake.root / str(pid) / "schedstat").write_text(f"{runtime} 0 {scheduled}\n")
