"""Containment by cgroup v2: find the hierarchy, make cgroups, place, stop, read.

Standalone building block for the session's containment strategy: a cgroup
holds every descendant whatever it does to its process group, session or
environment, ``cgroup.kill`` kills a subtree atomically (racing forks
included), and ``cgroup.events`` says ``populated 0`` when the last member
has gone.
"""

from __future__ import annotations

import errno
import os
import re
import select
import signal
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final, final

import trio

from ._procfs import read_children, read_stat

if TYPE_CHECKING:
    from .._limits import Limits

ADVICE: Final = (
    "run inside a cgroup v2 subtree delegated to this user, for example "
    "`systemd-run --user --scope -p Delegate=yes <command>`"
)
"""What makes cgroup containment available to an unprivileged user."""

NAME_PREFIX: Final = "trio-observer-"
SELF_LEAF: Final = "trio-observer-self"
"""The leaf this process moves itself into when allowed to (``move_self_to_leaf``),
so that its own cgroup holds no processes and may enable controllers."""
PROBE_PREFIX: Final = "trio-observer-probe-"
"""A probe's trial cgroup, followed by the prober's pid."""


class CgroupUnavailableError(RuntimeError):
    """This process may not contain its children in a cgroup v2 here."""


class CgroupBusyError(CgroupUnavailableError):
    """Controllers cannot be enabled for a cgroup's children: it holds processes.

    The kernel's "no internal processes" rule: a non-root cgroup that holds
    processes itself may not hand controllers to its children.
    """

    def __init__(self, group: Cgroup, controllers: frozenset[str], holders: list[int]) -> None:
        super().__init__(
            f"cannot enable {', '.join(sorted(controllers))} in {group.path}/"
            f"cgroup.subtree_control: the cgroup holds processes ({describe_pids(holders)}), and "
            "the kernel enables controllers only for the children of a cgroup that holds "
            'none (its "no internal processes" rule)'
        )
        self.holders = holders
        """The processes in the cgroup itself, when the kernel refused."""


def describe_pids(pids: list[int]) -> str:
    """``pid 12 (this process), 40``: the first few, for an error message."""
    me = os.getpid()
    named = [f"{p} (this process)" if p == me else str(p) for p in pids[:5]]
    return "pid " + ", ".join(named) + (f" and {len(pids) - 5} more" if len(pids) > 5 else "")


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def find_hierarchy(mountinfo: str | None = None) -> tuple[Path, str] | None:
    """Where the cgroup v2 hierarchy is mounted, and the mount's root.

    Args:
        mountinfo: The content of ``/proc/self/mountinfo`` (read if ``None``).

    Returns:
        ``(mount point, root inside the hierarchy)``, or ``None`` if no
        ``cgroup2`` file system is mounted.
    """
    if mountinfo is None:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        if right.split()[:1] != ["cgroup2"]:
            continue
        fields = left.split()
        return Path(_unescape(fields[4])), _unescape(fields[3])
    return None


def v1_mount(controller: str, mountinfo: str | None = None) -> Path | None:
    """Where ``controller`` is bound to a cgroup v1 hierarchy, if it is."""
    if mountinfo is None:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fs = right.split()
        # v1 mounts name their controllers in the super options.
        if sep and fs[:1] == ["cgroup"] and len(fs) >= 3 and controller in fs[2].split(","):
            return Path(_unescape(left.split()[4]))
    return None


def unavailable_reason(controller: str, group: Cgroup, mountinfo: str | None = None) -> str:
    """Why ``group`` cannot hand ``controller`` to its children, and what would."""
    listed = ", ".join(sorted(group.controllers())) or "none"
    text = (
        f"the {controller} controller is not available in {group.path} "
        f"(its cgroup.controllers lists: {listed})"
    )
    bound = v1_mount(controller, mountinfo)
    if bound is not None:
        return (
            f"{text}: it is bound to cgroup v1 (mounted at {bound}), and a controller "
            "serves one hierarchy at a time; cgroup v2 gets it once that hierarchy is "
            f"unmounted with no cgroups left in it, or at boot with cgroup_no_v1={controller}"
        )
    if group.is_root():
        return f"{text}: this kernel does not offer it"
    return (
        f"{text}: the parent must enable it (+{controller} in "
        f"{group.path.parent}/cgroup.subtree_control), or {ADVICE}"
    )


def own_cgroup(cgroup_file: str | None = None) -> str | None:
    """This process's cgroup v2 path (``0::/...``), or ``None`` if it has none."""
    if cgroup_file is None:
        cgroup_file = Path("/proc/self/cgroup").read_text()
    for line in cgroup_file.splitlines():
        if line.startswith("0::"):
            return line[3:]
    return None


@final
@dataclass(frozen=True, slots=True)
class CgroupSupport:
    """Whether sessions can make cgroups here, and which controllers they get."""

    available: bool
    """Whether a session cgroup can be created below ours."""
    reason: str
    """Why not (empty when available)."""
    parent: Path | None
    """This process's cgroup directory, below which sessions go."""
    controllers: frozenset[str]
    """Controllers this process's cgroup offers its children (for limits)."""
    kill: bool
    """Whether ``cgroup.kill`` exists (Linux 5.14)."""


_probed: tuple[int, CgroupSupport] | None = None
"""The last successful probe of this process's own files, with the pid it
was made in (a forked child probes again)."""


def probe(mountinfo: str | None = None, cgroup_file: str | None = None) -> CgroupSupport:
    """Find out, by trying, whether a session cgroup can be made below ours.

    Called without arguments (this process's own ``/proc`` files), a success
    is kept: every session open would otherwise parse ``mountinfo`` and make
    and remove a trial cgroup again, more than half of what opening a session
    costs. Only ``cgroup.controllers`` is read again, since a parent may
    change it. A failure is never kept, and a session whose cgroup then
    cannot be made calls :func:`forget_probe` and probes again.
    """
    global _probed
    own_files = mountinfo is None and cgroup_file is None
    if own_files and _probed is not None and _probed[0] == os.getpid():
        kept = _probed[1]
        assert kept.parent is not None
        try:
            controllers = frozenset((kept.parent / "cgroup.controllers").read_text().split())
        except OSError:
            _probed = None
        else:
            if controllers != kept.controllers:
                kept = CgroupSupport(True, "", kept.parent, controllers, kept.kill)
                _probed = (_probed[0], kept)
            return kept
    support = _probe(mountinfo, cgroup_file)
    if own_files and support.available:
        _probed = (os.getpid(), support)
    return support


def forget_probe() -> None:
    """Drop the kept probe result: the next :func:`probe` tries again."""
    global _probed
    _probed = None


def _probe(mountinfo: str | None, cgroup_file: str | None) -> CgroupSupport:
    found = find_hierarchy(mountinfo)
    if found is None:
        return CgroupSupport(False, "no cgroup v2 hierarchy is mounted", None, frozenset(), False)
    mount, root = found
    own = own_cgroup(cgroup_file)
    if own is None:
        return CgroupSupport(False, "this process has no cgroup v2 entry", None, frozenset(), False)
    if root != "/" and own.startswith(root):
        own = own[len(root) :]
    parent = mount / own.lstrip("/")
    if parent.name == SELF_LEAF:
        # Moved there to free our cgroup for controllers: sessions go beside it.
        parent = parent.parent
    try:
        controllers = frozenset((parent / "cgroup.controllers").read_text().split())
    except OSError as exc:
        return CgroupSupport(
            False, f"cannot read {parent}/cgroup.controllers: {exc}", parent, frozenset(), False
        )
    if not os.access(parent / "cgroup.procs", os.W_OK):
        return CgroupSupport(
            False,
            f"{parent}/cgroup.procs is not writable by this user; {ADVICE}",
            parent,
            controllers,
            False,
        )
    trial = parent / f"{PROBE_PREFIX}{os.getpid()}"
    try:
        trial.mkdir()
    except OSError as exc:
        return CgroupSupport(
            False,
            f"cannot create a cgroup in {parent}: {exc}; {ADVICE}",
            parent,
            controllers,
            False,
        )
    kill = (trial / "cgroup.kill").exists()
    try:
        trial.rmdir()
    except FileNotFoundError:
        # Taken for a dead probe's by a sweep in another pid namespace,
        # where our pid names nobody.
        pass
    return CgroupSupport(True, "", parent, controllers, kill)


_own_start: tuple[int, int] | None = None
"""This process's pid and start time, read once (each session's name has them)."""


def own_start_time() -> tuple[int, int]:
    """This process's pid and start time (field 22 of its ``stat``), read once per pid."""
    global _own_start
    pid = os.getpid()
    if _own_start is None or _own_start[0] != pid:
        stat = read_stat("/proc", pid)
        _own_start = (pid, stat.starttime if stat is not None else 0)
    return _own_start


# KI-protected: called from the user's own code too (Process.resources),
# where a Ctrl-C between the open and the try that closes would leak the fd.
@trio.lowlevel.enable_ki_protection
def read_file(path: str) -> str | None:
    """A kernfs file's content, ``None`` if it does not exist.

    ``os.open`` and ``os.read`` rather than ``pathlib``: on the reap path
    of every process the text layer costs more than the kernel's read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks).decode()
    finally:
        os.close(fd)


@trio.lowlevel.enable_ki_protection
def write_file(path: str, value: str) -> None:
    """Write ``value`` to a kernfs file in one ``write`` (the kernel wants one)."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def move_tree(procs_fd: int, pid: int) -> list[int]:
    """Move ``pid`` and the children it already has through ``procs_fd``.

    ``procs_fd`` is an open ``cgroup.procs``. Once a process is inside,
    everything it forks is born inside, so walking the children after the
    move catches the ones forked before it. Returns the pids moved.
    """
    moved: list[int] = []
    todo = [pid]
    while todo:
        current = todo.pop()
        try:
            os.write(procs_fd, b"%d" % current)
        except ProcessLookupError:
            continue
        except OSError as exc:
            if exc.errno == errno.ESRCH:
                continue
            raise
        moved.append(current)
        todo.extend(_children(current))
    return moved


def _children(pid: int) -> list[int]:
    # The usual case in one read: a process just past execve has one
    # thread, which the task directory's link count says (2 + threads)
    # without listing it; with more, every thread's file is read.
    try:
        single = os.stat(f"/proc/{pid}/task").st_nlink == 3
    except OSError:
        return []  # gone (or no procfs): nothing left to move
    if single:
        try:
            text = read_file(f"/proc/{pid}/task/{pid}/children")
        except OSError:
            return []  # torn down mid-read
        if text is not None:
            return [int(word) for word in text.split()]
        # No file: the thread went, or the kernel has no children files.
    return read_children("/proc", pid) or []


@final
class Cgroup:
    """One cgroup v2 directory: place processes, stop them, read their cost."""

    def __init__(self, path: Path, parent: Cgroup | None = None) -> None:
        self.path = path
        # The parent, when it keeps its subtree_control (a session's leaf):
        # the files of controllers it does not enable here are not looked
        # for, three failed opens fewer on the reap of every process.
        self._parent = parent
        # This cgroup's own subtree_control, once read: only
        # enable_controllers changes it (see subtree_control).
        self._subtree: frozenset[str] | None = None

    def __repr__(self) -> str:
        return f"Cgroup({str(self.path)!r})"

    @classmethod
    def create_session(cls, parent: Path, session_id: str) -> Cgroup:
        """Make a session cgroup below ``parent``, named so a leftover is known.

        The name carries this process's pid and start time: a later session
        that finds it with the owner gone (or the pid reused) cleans it up.
        """
        pid, start = own_start_time()
        tag = "".join(c for c in session_id.lower() if c in "0123456789abcdef")[:12] or "0"
        path = parent / f"{NAME_PREFIX}{pid}.{start}-{tag}"
        path.mkdir()
        return cls(path)

    def leaf(self, name: str) -> Cgroup:
        """Make (or reuse) a child cgroup, for one process."""
        path = self.path / name
        path.mkdir(exist_ok=True)
        return Cgroup(path)

    def _write(self, name: str, value: str) -> None:
        write_file(f"{self.path}/{name}", value)

    def read(self, name: str) -> str | None:
        """A control file's content, ``None`` if it does not exist."""
        return read_file(f"{self.path}/{name}")

    def place(self, pid: int) -> list[int]:
        """Move ``pid`` and the children it already has into this cgroup.

        Once a process is inside, everything it forks is born inside, so
        walking the children after the move catches the ones forked before
        it. Returns the pids moved.
        """
        fd = os.open(f"{self.path}/cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)
        try:
            return move_tree(fd, pid)
        finally:
            os.close(fd)

    def cgroups(self) -> list[Cgroup]:
        """This cgroup and all below it, deepest first (the order to remove)."""
        found: list[Cgroup] = []
        for dirpath, dirnames, _ in os.walk(self.path, topdown=False):
            del dirnames
            found.append(Cgroup(Path(dirpath)))
        return found

    def members(self) -> list[int]:
        """Every process in this cgroup or below."""
        pids: list[int] = []
        for group in self.cgroups():
            text = group.read("cgroup.procs") or ""
            pids.extend(int(p) for p in text.split())
        return pids

    def populated(self) -> bool:
        """Whether any process is in this cgroup or below."""
        return _events(self.read("cgroup.events") or "").get("populated") == "1"

    def freeze(self) -> None:
        """Stop every member from running (and forking); see :meth:`thaw`."""
        self._write("cgroup.freeze", "1")

    def thaw(self) -> None:
        """Let frozen members run again."""
        self._write("cgroup.freeze", "0")

    def signal_all(self, sig: int) -> int:
        """Send ``sig`` to every member; returns how many were signalled."""
        count = 0
        for pid in self.members():
            try:
                os.kill(pid, sig)
                count += 1
            except ProcessLookupError:
                pass
        return count

    def kill(self) -> None:
        """SIGKILL every member atomically (``cgroup.kill``, Linux 5.14).

        Before 5.14 the members are frozen so they cannot fork, killed one
        by one, and thawed so the kill is delivered.
        """
        if (self.path / "cgroup.kill").exists():
            self._write("cgroup.kill", "1")
            return
        self.freeze()
        try:
            self.signal_all(signal.SIGKILL)
        finally:
            self.thaw()

    async def wait_empty(self) -> None:
        """Block until ``populated 0``: no member is left in the subtree.

        ``cgroup.events`` is always "readable" to epoll (a regular file), so
        trio's ``wait_readable`` on it would spin; the kernel flags a change
        with ``EPOLLPRI``. A private epoll set watches for that alone, and
        trio waits for the epoll fd itself to become readable.
        """
        # kernfs files do not block: os.open keeps this off a worker thread.
        fd = os.open(self.path / "cgroup.events", os.O_RDONLY | os.O_CLOEXEC)
        watcher = select.epoll()
        try:
            watcher.register(fd, select.EPOLLPRI)
            while True:
                # Reading after registering re-arms the flag, so a change
                # after this read always wakes the wait below.
                if _events(os.pread(fd, 4096, 0).decode()).get("populated") == "0":
                    return
                await trio.lowlevel.wait_readable(watcher.fileno())
                watcher.poll(0)
        finally:
            watcher.close()
            os.close(fd)

    def cpu_seconds(self) -> tuple[float, float]:
        """``(user, system)`` CPU seconds of every member, living and dead."""
        stat = _events(self.read("cpu.stat") or "")
        return int(stat.get("user_usec", 0)) / 1e6, int(stat.get("system_usec", 0)) / 1e6

    def _read_of(self, controller: str, name: str) -> str | None:
        if self._parent is not None and controller not in self._parent.subtree_control():
            return None
        return self.read(name)

    def memory_peak(self) -> int | None:
        """Peak memory in bytes (``memory.peak``), ``None`` without the controller."""
        text = self._read_of("memory", "memory.peak")
        return int(text) if text else None

    def pids_peak(self) -> int | None:
        """Peak number of processes (``pids.peak``), ``None`` without the controller."""
        text = self._read_of("pids", "pids.peak")
        return int(text) if text else None

    def oom_kills(self) -> int | None:
        """Processes of the subtree the OOM killer killed (``oom_kill`` of
        ``memory.events``), ``None`` without the memory controller."""
        text = self._read_of("memory", "memory.events")
        return int(_events(text).get("oom_kill", 0)) if text is not None else None

    def controllers(self) -> frozenset[str]:
        """The controllers this cgroup may enable for its children (``cgroup.controllers``)."""
        return frozenset((self.read("cgroup.controllers") or "").split())

    def procs(self) -> list[int]:
        """The processes in this cgroup itself, not below it (``cgroup.procs``)."""
        return [int(p) for p in (self.read("cgroup.procs") or "").split()]

    def is_root(self) -> bool:
        """Whether this is the hierarchy's root (exempt from "no internal processes")."""
        # Every cgroup but the root has a cgroup.type.
        return not (self.path / "cgroup.type").exists()

    def set_limits(self, limits: Limits) -> None:
        """Write ``limits`` (``memory.max``, ``pids.max``, ``cpu.max``) here.

        Each controller must be on in the parent's ``cgroup.subtree_control``
        (see :meth:`enable_controllers`).

        Raises:
            CgroupUnavailableError: A controller is not enabled for this
                cgroup; the message says what the parent offers and why.
        """
        offered = self.controllers()
        for name, value in limits.files().items():
            controller = name.split(".", 1)[0]
            if controller not in offered:
                parent = Cgroup(self.path.parent)
                why = (
                    f"; {unavailable_reason(controller, parent)}"
                    if controller not in parent.controllers()
                    else ""
                )
                raise CgroupUnavailableError(
                    f"cannot set {name} on {self.path}: the {controller} controller is not "
                    f"enabled in {parent.path}/cgroup.subtree_control{why}"
                )
            self._write(name, value)

    def enable_controllers(self, names: frozenset[str]) -> None:
        """Enable controllers for this cgroup's children (``subtree_control``).

        Nothing is written when they are on already (so no write access is
        needed then).

        Raises:
            CgroupUnavailableError: Some are not offered here (the message
                says why for each, for example bound to a cgroup v1 hierarchy).
            CgroupBusyError: This cgroup holds processes itself, so the
                kernel refuses (its "no internal processes" rule).
        """
        enabled = frozenset((self.read("cgroup.subtree_control") or "").split())
        self._subtree = enabled
        wanted = names - enabled
        if not wanted:
            return
        missing = sorted(wanted - self.controllers())
        if missing:
            raise CgroupUnavailableError("; ".join(unavailable_reason(n, self) for n in missing))
        try:
            self._write("cgroup.subtree_control", " ".join(f"+{n}" for n in sorted(wanted)))
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise CgroupBusyError(self, wanted, self.procs()) from exc
            raise
        finally:
            # Read again, written or not: what the kernel took is what counts.
            self._subtree = None

    def subtree_control(self) -> frozenset[str]:
        """The controllers enabled for this cgroup's children (``cgroup.subtree_control``).

        Read once and kept: meant for a cgroup only this process changes
        (a session's), where :meth:`enable_controllers` is the one writer.
        """
        if self._subtree is None:
            self._subtree = frozenset((self.read("cgroup.subtree_control") or "").split())
        return self._subtree

    def remove(self, children: Collection[str] = ()) -> None:
        """Remove this cgroup and every cgroup below it; they must be empty.

        ``children`` names the ones the caller made (a session's leaves):
        each is one ``rmdir`` by name, and the directories are walked only
        when this cgroup's own ``rmdir`` says something else is left below.
        """
        if children:
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except FileNotFoundError:
                return
            try:
                for name in children:
                    try:
                        os.rmdir(name, dir_fd=fd)
                    except OSError:
                        pass  # gone already, or not empty: the walk below decides
            finally:
                os.close(fd)
        try:
            self.path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            pass  # something is left below
        for group in self.cgroups():
            try:
                group.path.rmdir()
            except FileNotFoundError:
                pass


def _events(text: str) -> dict[str, str]:
    pairs = (line.split(None, 1) for line in text.splitlines() if line.strip())
    return {p[0]: p[1].strip() for p in pairs if len(p) == 2}
