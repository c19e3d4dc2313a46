"""The event value: categories, kinds, grades and the JSON form."""

from __future__ import annotations

import enum
import json
import time
from dataclasses import dataclass, field, fields
from typing import Any, Final, final

import trio


class EventCategory(enum.Enum):
    """What an event is about; a sink subscribes to a set of these."""

    LIFECYCLE = "lifecycle"
    """A process the session started was spawned or reaped."""
    PROCESS = "process"
    """A descendant of a session's process appeared or went away."""
    FILE = "file"
    """A process of the tree opened or closed a file."""
    NETWORK = "network"
    """A process of the tree listened on, connected or closed a socket."""

    # Members are singletons, so identity hashing is exact; Enum's own
    # __hash__ is a Python-level call, and emit() looks a category up in a
    # dict for every event.
    __hash__ = object.__hash__


class ObserverEventKind(enum.Enum):
    """What happened. The string values are stable: they are the JSON form."""

    STARTED = "started"
    EXITED = "exited"
    DESCENDANT_STARTED = "descendant-started"
    DESCENDANT_EXITED = "descendant-exited"
    DESCENDANT_EXEC = "descendant-exec"
    """A descendant called ``execve()``: ``argv`` is its new command line
    (``DESCENDANT_STARTED`` is seen at the fork, so it carries the parent's
    command line, or none)."""
    FILE_OPEN = "file-open"
    FILE_CLOSE = "file-close"
    SOCKET_LISTEN = "socket-listen"
    SOCKET_CONNECT = "socket-connect"
    SOCKET_CLOSE = "socket-close"
    OBSERVATION_LOST = "observation-lost"
    """The observer itself lost information (for example a kernel buffer
    overran); ``count`` says how many records were lost when that is known."""


class EventGrade(enum.Enum):
    """How an event was obtained, so a reader knows how far to trust it."""

    EXACT = "exact"
    """Seen as it happened: the session's own spawn and reap, or a kernel
    notification."""
    INFERRED = "inferred"
    """Inferred from the difference between two snapshots: the time is when
    the difference was noticed, and anything that came and went between two
    snapshots was not seen at all."""


class TerminationOutcome(enum.Enum):
    """How a supervised process came to an end."""

    NATURAL_EXIT = "natural-exit"
    """It exited (or was killed) without the session asking it to stop."""
    SOFT_EXIT = "soft-exit"
    """It exited within the grace period after the session sent SIGTERM."""
    HARD_KILLED = "hard-killed"
    """The grace period ran out and the session sent SIGKILL."""


_CORE_KEYS: Final = (
    "category",
    "kind",
    "pid",
    "ppid",
    "timestamp_ms",
    "wall_time_ms",
    "exit_code",
    "grade",
)
_OPTIONAL_KEYS: Final = (
    "root_pid",
    "argv",
    "termination",
    "path",
    "fd",
    "protocol",
    "local_address",
    "remote_address",
    "count",
    "resources",
)


def _wall_time_ms() -> float:
    return time.time() * 1000.0


def trio_time_ms() -> float:
    """The trio clock in milliseconds: what ``timestamp_ms`` holds."""
    return trio.current_time() * 1000.0


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class ResourceUsage:
    """What a process (or a session) cost, as far as the kernel says.

    Every field is ``None`` where the kernel does not give it here: the
    ``cgroup_*`` fields need cgroup containment, ``memory_peak_bytes``,
    ``oom_kills`` and ``pids_peak`` also the memory and pids controllers.
    """

    user_seconds: float | None = None
    """CPU seconds in user mode: after the exit from ``wait4`` (the process
    and the children it reaped), while running from ``/proc/<pid>/stat``."""
    system_seconds: float | None = None
    """CPU seconds in the kernel, from the same source."""
    max_rss_bytes: int | None = None
    """Peak resident set size of the process itself (``ru_maxrss``, or
    ``VmHWM`` while running)."""
    cgroup_user_seconds: float | None = None
    """User CPU seconds of the whole tree, living and dead (``cpu.stat``)."""
    cgroup_system_seconds: float | None = None
    """System CPU seconds of the whole tree (``cpu.stat``)."""
    memory_peak_bytes: int | None = None
    """Peak memory of the tree (``memory.peak``)."""
    pids_peak: int | None = None
    """Peak number of processes in the tree (``pids.peak``)."""
    oom_kills: int | None = None
    """Processes of the tree the kernel's OOM killer killed (``oom_kill`` of
    ``memory.events``), for example above a ``Limits.memory_max``; when the
    process's own exit code is also ``-9`` (SIGKILL), it was most likely one."""

    def to_dict(self) -> dict[str, float | int]:
        """Return the fields that have a value: the JSON form of ``resources``."""
        return {f.name: value for f in fields(self) if (value := getattr(self, f.name)) is not None}


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class ObserverEvent:
    """One thing that happened to a process the session watches.

    Events are immutable and hashable. Two events compare equal when every
    field but ``wall_time_ms`` is equal.

    ``timestamp_ms`` is read from the trio clock (``trio.current_time()`` in
    milliseconds), so a ``MockClock`` controls it in tests; it is only
    meaningful relative to other timestamps of the same run. ``wall_time_ms``
    is the Unix time in milliseconds, for logs.
    """

    category: EventCategory
    """Which category the event belongs to; sinks filter on it."""
    kind: ObserverEventKind
    """What happened."""
    pid: int
    """The process the event is about."""
    timestamp_ms: float
    """The trio clock, in milliseconds, when the event was observed."""
    ppid: int | None = None
    """The parent of ``pid``, where the observer knows it."""
    exit_code: int | None = None
    """For ``EXITED``/``DESCENDANT_EXITED``: the exit status, or minus the
    signal number when a signal ended the process. ``None`` when unknown."""
    grade: EventGrade = EventGrade.EXACT
    """How the event was obtained."""
    wall_time_ms: float = field(default_factory=_wall_time_ms, compare=False)
    """Unix time in milliseconds when the event was built, for logs."""
    root_pid: int | None = None
    """For tree events: the session process whose tree ``pid`` belongs to."""
    argv: tuple[str, ...] | None = None
    """For ``STARTED``: the command line; for ``DESCENDANT_EXEC``, the new one;
    for ``DESCENDANT_STARTED``, the one it had when seen, where readable."""
    termination: TerminationOutcome | None = None
    """For ``EXITED``: whether the session had to stop the process."""
    path: str | None = None
    """For file events: the path the descriptor refers to."""
    fd: int | None = None
    """For file and socket events: the descriptor number in ``pid``."""
    protocol: str | None = None
    """For socket events: ``"tcp"``, ``"tcp6"``, ``"udp"``, ``"udp6"`` or
    ``"unix"``."""
    local_address: str | None = None
    """For socket events: ``host:port`` (IPv6 as ``[host]:port``) or the
    Unix socket path."""
    remote_address: str | None = None
    """For connected sockets: the peer, in the same form."""
    count: int | None = None
    """For ``OBSERVATION_LOST``: how many records were lost, if known."""
    resources: ResourceUsage | None = None
    """For ``EXITED``: what the process cost, where the kernel says."""

    def to_dict(self) -> dict[str, Any]:
        """Return the event as a JSON-ready dict with stable keys.

        The keys ``category``, ``kind``, ``pid``, ``ppid``, ``timestamp_ms``,
        ``wall_time_ms``, ``exit_code`` and ``grade`` are always present
        (``null`` when unknown); the kind-specific keys (``path``,
        ``local_address``, ...) appear only when they have a value. Enums
        become their string values.
        """
        out: dict[str, Any] = {}
        for key in _CORE_KEYS:
            out[key] = _plain(getattr(self, key))
        for key in _OPTIONAL_KEYS:
            value = getattr(self, key)
            if value is not None:
                out[key] = _plain(value)
        return out

    def to_json(self) -> str:
        """Return :meth:`to_dict` as one line of JSON (no newline)."""
        return json.dumps(self.to_dict(), separators=(",", ":"))


def _plain(value: object) -> object:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, ResourceUsage):
        return value.to_dict()
    return value


_LIFECYCLE_KINDS: Final = {
    ObserverEventKind.STARTED: EventCategory.LIFECYCLE,
    ObserverEventKind.EXITED: EventCategory.LIFECYCLE,
    ObserverEventKind.DESCENDANT_STARTED: EventCategory.PROCESS,
    ObserverEventKind.DESCENDANT_EXITED: EventCategory.PROCESS,
    ObserverEventKind.DESCENDANT_EXEC: EventCategory.PROCESS,
}


# The slot setters of ObserverEvent in field order: lifecycle_event()
# fills a new event through them, positionally. The generated __init__
# parses 18 keyword arguments and calls the frozen class's __setattr__
# bypass for each, and a session builds two events per process (timeit of
# lifecycle_event: 2.3 us through __init__, 1.9 us this way). The result is
# the same object (a test compares the two for every lifecycle kind).
_EVENT_SLOTS: Final = tuple(getattr(ObserverEvent, f.name).__set__ for f in fields(ObserverEvent))
_new_event: Final = object.__new__


def lifecycle_event(
    kind: ObserverEventKind,
    pid: int,
    *,
    ppid: int | None,
    timestamp_ms: float | None = None,
    grade: EventGrade = EventGrade.EXACT,
    root_pid: int | None = None,
    argv: tuple[str, ...] | None = None,
    exit_code: int | None = None,
    termination: TerminationOutcome | None = None,
    resources: ResourceUsage | None = None,
) -> ObserverEvent:
    """Build the start, exec or exit event of a process: the one place that does.

    The category follows from ``kind`` (``STARTED``/``EXITED`` are
    LIFECYCLE, the descendant kinds PROCESS); ``timestamp_ms`` defaults to
    the trio clock now.
    """
    category = _LIFECYCLE_KINDS.get(kind)
    if category is None:
        allowed = ", ".join(f"ObserverEventKind.{k.name}" for k in _LIFECYCLE_KINDS)
        raise ValueError(f"kind must be one of {allowed}, not {kind!r}")
    event: ObserverEvent = _new_event(ObserverEvent)
    # In the order of the fields (category, kind, pid, timestamp_ms, ppid,
    # exit_code, grade, wall_time_ms, root_pid, argv, termination, path,
    # fd, protocol, local_address, remote_address, count, resources).
    values = (
        category,
        kind,
        pid,
        trio_time_ms() if timestamp_ms is None else timestamp_ms,
        ppid,
        exit_code,
        grade,
        _wall_time_ms(),
        root_pid,
        argv,
        termination,
        None,
        None,
        None,
        None,
        None,
        None,
        resources,
    )
    for set_slot, value in zip(_EVENT_SLOTS, values, strict=True):
        set_slot(event, value)
    return event
