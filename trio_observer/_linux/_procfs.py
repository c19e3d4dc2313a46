"""Readers for the per-process files of ``/proc``.

Every reader takes ``proc_root`` so tests can point it at a fake tree written
into a temporary directory. A process can exit (and its ``/proc`` directory
vanish) between any two reads, and processes of other users can refuse access:
those are races and limits of the platform, not errors, so the readers return
``None`` for them instead of raising.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Final, final

import trio

# A process vanishing between listdir() and open() shows up as any of these;
# ProcessLookupError appears on some /proc files (e.g. reading a dead task's
# fd directory), PermissionError for other users' processes.
_RACES: Final = (FileNotFoundError, ProcessLookupError, PermissionError, NotADirectoryError)

# Field numbers as in proc(5), 1-based; they count from the pid (field 1).
_FIELD_STATE: Final = 3
_FIELD_PPID: Final = 4
_FIELD_PGRP: Final = 5
_FIELD_SESSION: Final = 6
_FIELD_THREADS: Final = 20
_FIELD_STARTTIME: Final = 22
_FIELD_EXIT_CODE: Final = 52

DEAD_STATES: Final = frozenset({"Z", "X", "x"})
"""States of a process that has exited (zombie or dead) but may still have a
``/proc`` entry until its parent reaps it."""


@final
@dataclass(frozen=True, slots=True)
class ProcStat:
    """The fields of ``/proc/<pid>/stat`` the observer needs."""

    pid: int
    """The process id (the thread-group id)."""
    comm: str
    """The command name, at most 15 bytes, as the kernel stores it."""
    state: str
    """One letter: ``R``, ``S``, ``D``, ``Z`` (zombie), ..."""
    ppid: int
    """The parent's pid (after any reparenting to a subreaper or init)."""
    starttime: int
    """Clock ticks after boot when the process started. With the pid it
    identifies a process: a reused pid has a different start time."""
    exit_code: int | None
    """For a zombie: its wait status (field 52, Linux >= 3.5). ``None`` when
    the kernel does not show the field."""
    pgid: int = 0
    """The process group."""
    sid: int = 0
    """The session id."""
    threads: int = 1
    """How many threads the process has, counting an exited main thread
    until the whole process is reaped."""

    @property
    def identity(self) -> tuple[int, int]:
        """``(pid, starttime)``: unique for the lifetime of the system."""
        return (self.pid, self.starttime)

    @property
    def is_dead(self) -> bool:
        """Whether the process has exited and only waits to be reaped.

        ``state`` is that of the main thread: after ``pthread_exit`` in
        ``main`` (or while another thread's ``execve`` replaces it) the main
        thread is a zombie while the process runs on in its other threads.
        Exited threads other than the main one leave the count before their
        exit is announced, so a dead main thread alone in the count means
        the whole process has ended.
        """
        return self.state in DEAD_STATES and self.threads <= 1

    @property
    def main_thread_exited(self) -> bool:
        """Whether the main thread has exited while other threads run on."""
        return self.state in DEAD_STATES and self.threads > 1


def parse_stat(text: str) -> ProcStat:
    """Parse the content of ``/proc/<pid>/stat``.

    Args:
        text: The file's content.

    Returns:
        The parsed fields.

    Raises:
        ValueError: If ``text`` is not in the format of proc(5).
    """
    # comm is in parentheses and may itself contain spaces and ')' (a program
    # can name itself "a) b"), so the fields after it start after the LAST ')'.
    open_paren = text.find("(")
    close_paren = text.rfind(")")
    if open_paren < 0 or close_paren < open_paren:
        raise ValueError(f"not a /proc/<pid>/stat line: {text[:80]!r}")
    pid = int(text[:open_paren])
    comm = text[open_paren + 1 : close_paren]
    rest = text[close_paren + 1 :].split()
    # rest[0] is field 3 (state).
    if len(rest) < _FIELD_STARTTIME - 2:
        raise ValueError(f"truncated /proc/<pid>/stat line: {text[:80]!r}")

    def field(number: int) -> str:
        return rest[number - _FIELD_STATE]

    exit_code = (
        int(field(_FIELD_EXIT_CODE)) if len(rest) > _FIELD_EXIT_CODE - _FIELD_STATE else None
    )
    return ProcStat(
        pid=pid,
        comm=comm,
        state=field(_FIELD_STATE),
        ppid=int(field(_FIELD_PPID)),
        starttime=int(field(_FIELD_STARTTIME)),
        exit_code=exit_code,
        pgid=int(field(_FIELD_PGRP)),
        sid=int(field(_FIELD_SESSION)),
        threads=int(field(_FIELD_THREADS)),
    )


_READ_SIZE: Final = 16384


# KI-protected: called from the user's own code too (Process.resources),
# where a Ctrl-C between the open and the try that closes would leak the fd.
@trio.lowlevel.enable_ki_protection
def _read_bytes(path: str, *, one_record: bool = False) -> bytes | None:
    # os.open and os.read rather than open(): a buffered file object costs
    # an fstat and the object itself, on a path taken for every process a
    # scan looks at. Read to the empty read: a seq_file (the socket tables,
    # children) hands out about a page per read, so a short read is not the
    # end. One record (stat) is made whole at the first read, and is never
    # near the size asked.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        # Gone, another user's, or ESRCH and friends from a task that is
        # being torn down.
        return None
    try:
        data = os.read(fd, _READ_SIZE)
        if one_record or not data:
            return data
        chunks = [data]
        while data:
            data = os.read(fd, _READ_SIZE)
            chunks.append(data)
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)


def _read_text(path: str, *, one_record: bool = False) -> str | None:
    data = _read_bytes(path, one_record=one_record)
    return None if data is None else data.decode("utf-8", "surrogateescape")


def read_stat(proc_root: str, pid: int) -> ProcStat | None:
    """Read ``/proc/<pid>/stat``.

    Args:
        proc_root: Where ``/proc`` is mounted (or a fake tree).
        pid: The process.

    Returns:
        The parsed stat, or ``None`` if the process is gone or unreadable.
    """
    text = _read_text(f"{proc_root}/{pid}/stat", one_record=True)
    if not text:
        return None
    try:
        return parse_stat(text)
    except ValueError:
        return None


def list_pids(proc_root: str) -> list[int]:
    """List the processes (thread-group leaders) in ``proc_root``.

    Args:
        proc_root: Where ``/proc`` is mounted (or a fake tree).

    Returns:
        Every numeric entry; threads other than leaders are not listed by
        the kernel.
    """
    try:
        names = os.listdir(proc_root)
    except _RACES:
        return []
    return [int(name) for name in names if name.isdigit()]


def scan_all(proc_root: str) -> dict[int, ProcStat]:
    """Read the stat of every process: the fallback to build the process tree.

    Args:
        proc_root: Where ``/proc`` is mounted (or a fake tree).

    Returns:
        The stat of every process that was still there when it was read.
    """
    out: dict[int, ProcStat] = {}
    for pid in list_pids(proc_root):
        stat = read_stat(proc_root, pid)
        if stat is not None:
            out[pid] = stat
    return out


def read_children(proc_root: str, pid: int) -> list[int] | None:
    """Read the children of ``pid`` from ``/proc/<pid>/task/*/children``.

    The kernel lists children per thread (the thread that forked them), so
    every thread's file is read.

    Args:
        proc_root: Where ``/proc`` is mounted (or a fake tree).
        pid: The parent.

    Returns:
        The children's pids (empty when the process is gone), or ``None`` when
        the kernel has no ``children`` files (``CONFIG_PROC_CHILDREN`` off).
    """
    task_dir = f"{proc_root}/{pid}/task"
    try:
        tids = os.listdir(task_dir)
    except _RACES:
        return []
    children: list[int] = []
    saw_file = False
    for tid in tids:
        text = _read_text(f"{task_dir}/{tid}/children")
        if text is None:
            continue
        saw_file = True
        children.extend(int(word) for word in text.split())
    # No file read: either the kernel has no children files, or every thread
    # died mid-read. Only the first means "not supported".
    if (
        not saw_file
        and os.path.exists(f"{proc_root}/{pid}/stat")
        and not any(os.path.exists(f"{task_dir}/{tid}/children") for tid in tids)
    ):
        return None
    return children


def has_children_files(proc_root: str, pid: int) -> bool | None:
    """Tell whether the kernel has ``/proc/<pid>/task/<tid>/children`` files.

    Args:
        proc_root: Where ``/proc`` is mounted (or a fake tree).
        pid: Any live process to look at.

    Returns:
        ``True`` or ``False``; ``None`` if ``pid`` is gone, so the answer is
        unknown (try another process).
    """
    task_dir = f"{proc_root}/{pid}/task"
    try:
        tids = os.listdir(task_dir)
    except _RACES:
        return None
    for tid in tids:
        if os.path.exists(f"{task_dir}/{tid}/children"):
            return True
        if os.path.isdir(f"{task_dir}/{tid}"):
            return False
    return None


def read_cmdline(proc_root: str, pid: int) -> tuple[str, ...] | None:
    """Read the command line of ``pid``.

    Args:
        proc_root: Where ``/proc`` is mounted (or a fake tree).
        pid: The process.

    Returns:
        The arguments, or ``None`` when the process is gone, is a zombie or a
        kernel thread (empty command line), or is unreadable.
    """
    text = _read_text(f"{proc_root}/{pid}/cmdline")
    if not text:
        return None
    return tuple(text.rstrip("\0").split("\0"))


def read_fds(proc_root: str, pid: int) -> dict[int, str] | None:
    """Read where each open descriptor of ``pid`` points.

    Args:
        proc_root: Where ``/proc`` is mounted (or a fake tree).
        pid: The process.

    Returns:
        ``{fd: readlink target}`` (``"/path"``, ``"socket:[inode]"``,
        ``"pipe:[inode]"``, ``"anon_inode:[eventfd]"``, ...), or ``None`` when
        the process is gone or its descriptors are not readable by us.
    """
    fd_dir = f"{proc_root}/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except _RACES:
        return None
    except OSError:
        return None
    out: dict[int, str] = {}
    for name in names:
        try:
            out[int(name)] = os.readlink(f"{fd_dir}/{name}")
        except _RACES:
            # The descriptor was closed between listdir and readlink.
            continue
        except (OSError, ValueError):
            continue
    return out


def read_net_namespace(proc_root: str, pid: int) -> str | None:
    """Return an id of the network namespace of ``pid`` (``"net:[inode]"``).

    Args:
        proc_root: Where ``/proc`` is mounted (or a fake tree).
        pid: The process.

    Returns:
        The namespace link, or ``None`` if unreadable (then callers fall back
        to reading the tables through ``/proc/<pid>/net`` without caching).
    """
    try:
        return os.readlink(f"{proc_root}/{pid}/ns/net")
    except OSError:
        return None


INITIAL_NAMESPACES: Final = {"pid": "pid:[4026531836]", "user": "user:[4026531837]"}
"""The links of the initial pid and user namespaces: the kernel gives them
fixed inode numbers (``PROC_PID_INIT_INO``, ``PROC_USER_INIT_INO``)."""


def foreign_namespaces(proc_root: str = "/proc") -> list[str]:
    """Return which of this process's pid and user namespaces are not the initial ones.

    Args:
        proc_root: Where ``/proc`` is mounted.

    Returns:
        ``"pid"`` and/or ``"user"``, each with the link read (``"pid:[...]"``);
        empty when both are the initial ones or cannot be read.
    """
    out = []
    for kind, initial in INITIAL_NAMESPACES.items():
        try:
            link = os.readlink(f"{proc_root}/self/ns/{kind}")
        except OSError:
            continue
        if link != initial:
            out.append(link)
    return out


def environ_has(proc_root: str, pid: int, entry: bytes) -> bool:
    """Tell whether the initial environment of ``pid`` holds ``entry`` exactly.

    Args:
        proc_root: Where ``/proc`` is mounted (or a fake tree).
        pid: The process.
        entry: A whole ``NAME=value`` entry.

    Returns:
        ``False`` also when the environment is unreadable, or empty (a
        zombie's memory is gone).
    """
    data = _read_bytes(f"{proc_root}/{pid}/environ")
    return data is not None and entry in data.split(b"\0")


def read_cgroup_path(proc_root: str, pid: int) -> str | None:
    """Return the cgroup v2 path of ``pid`` (the ``0::`` line of ``/proc/<pid>/cgroup``).

    Args:
        proc_root: Where ``/proc`` is mounted (or a fake tree).
        pid: The process.

    Returns:
        The path below the v2 hierarchy's root (``"/a/b"``), or ``None``
        when the process is gone or has no v2 line.
    """
    text = _read_text(f"{proc_root}/{pid}/cgroup")
    for line in (text or "").splitlines():
        if line.startswith("0::"):
            return line[3:]
    return None


def read_proc_file(path: str) -> str | None:
    """Read a text file under ``/proc``, ``None`` if it is gone or unreadable.

    Args:
        path: The file.

    Returns:
        Its content.
    """
    return _read_text(path)


def read_thread_ids(proc_root: str, pid: int) -> list[int] | None:
    """List the threads of ``pid`` (``/proc/<pid>/task``).

    Args:
        proc_root: Where ``/proc`` is mounted (or a fake tree).
        pid: The process.

    Returns:
        The thread ids, or ``None`` when the process is gone or unreadable.
    """
    try:
        names = os.listdir(f"{proc_root}/{pid}/task")
    except OSError:
        return None
    return [int(name) for name in names if name.isdigit()]


def run_counters_path(proc_root: str, pid: int, tid: int) -> str:
    """Return the ``schedstat`` file of thread ``tid`` of ``pid`` (see :func:`parse_run_counters`).

    Args:
        proc_root: Where ``/proc`` is mounted (or a fake tree).
        pid: The process.
        tid: One of its threads.

    Returns:
        ``<proc_root>/<pid>/schedstat`` for the main thread (the shorter
        path, the same file), else ``<proc_root>/<pid>/task/<tid>/schedstat``.
    """
    if tid == pid:
        return f"{proc_root}/{pid}/schedstat"
    return f"{proc_root}/{pid}/task/{tid}/schedstat"


def parse_run_counters(data: bytes) -> tuple[int, int] | None:
    """Parse how long and how often a thread has run, from its ``schedstat`` file.

    ``/proc/<pid>/task/<tid>/schedstat`` (``CONFIG_SCHED_INFO``) holds the
    nanoseconds spent on a CPU (``se.sum_exec_runtime``, brought up to date
    whenever the thread leaves the CPU and at every scheduler tick while it
    runs), the time spent waiting for one, and the number of times it was
    put on a CPU (``pcount``, counted at every switch-in). A thread whose
    counters are unchanged between two reads was not switched in between
    them.

    Args:
        data: The file's bytes; empty when read through a descriptor kept
            open past the thread's end.

    Returns:
        ``(runtime_ns, times_scheduled)``, or ``None`` for zeros (no
        accounting in this kernel, which would make every thread look idle
        forever), an empty read or anything malformed.
    """
    fields = data.split()
    if len(fields) < 3:
        return None
    try:
        runtime, scheduled = int(fields[0]), int(fields[2])
    except ValueError:
        return None
    if scheduled == 0:
        # Zeros: no CONFIG_SCHED_INFO accounting, or a thread that has never
        # run yet. Neither proves anything.
        return None
    return runtime, scheduled


def unusable_reason(proc_root: str) -> str | None:
    """Tell whether ``proc_root`` is a ``/proc`` the observer can use.

    Args:
        proc_root: Where ``/proc`` is mounted (or a fake tree).

    Returns:
        ``None`` if it lists at least one process whose ``stat`` parses,
        else why not, in a sentence for the capability report.
    """
    try:
        names = os.listdir(proc_root)
    except OSError as exc:
        return f"no readable /proc at {proc_root!r} ({exc.strerror or exc})"
    for name in names:
        if name.isdigit() and read_stat(proc_root, int(name)) is not None:
            return None
    return f"{proc_root!r} lists no readable processes"


def net_tables_readable(proc_root: str) -> bool:
    """Tell whether some socket table under ``<proc_root>/net`` is readable.

    Args:
        proc_root: Where ``/proc`` is mounted (or a fake tree).

    Returns:
        Whether ``tcp``, ``tcp6`` or ``unix`` can be read.
    """
    return any(os.access(f"{proc_root}/net/{t}", os.R_OK) for t in ("tcp", "tcp6", "unix"))


def others_fds_readable(proc_root: str) -> bool:
    """Tell whether the descriptors of another user's process can be listed.

    Args:
        proc_root: Where ``/proc`` is mounted (or a fake tree).

    Returns:
        Whether ``<proc_root>/1/fd`` can be listed.
    """
    # It needs ptrace access (CAP_SYS_PTRACE); init is such a process for
    # everyone but root, so try it rather than guess from the uid.
    try:
        os.listdir(f"{proc_root}/1/fd")
    except OSError:
        return False
    return True
