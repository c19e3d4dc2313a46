"""What this machine can observe, and how well.

Observation depends on the platform and on privileges: the exact process
connector needs ``CAP_NET_ADMIN``, file and socket snapshots need a readable
``/proc``, and another user's descriptors need ``CAP_SYS_PTRACE``.
:func:`negotiate_capabilities` finds out once, honestly, so a session can
refuse a subscription it cannot serve instead of yielding nothing.
"""

from __future__ import annotations

import enum
import os
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final, final

from ._events import EventCategory


class TraceScope(enum.Enum):
    """Which processes an observation is about."""

    LAUNCHED_PROCESS_TREE = "launched-process-tree"
    """The processes a session launched and their descendants."""
    SYSTEM_WIDE = "system-wide"
    """Every process of the machine, whoever runs it."""


class CapabilitySupport(enum.Enum):
    """How well a category can be observed."""

    SUPPORTED = "supported"
    """Every event of the category is seen, as it happens."""
    PARTIAL = "partial"
    """Events are inferred from snapshots (or cover only some processes);
    the reason says what can be missed."""
    UNAVAILABLE = "unavailable"
    """Nothing of the category can be observed here; the reason says why."""


class UnsupportedCategoryError(RuntimeError):
    """A category was asked for that this machine cannot observe at all.

    Args:
        category: The category.
        reason: Why it cannot be observed.
    """

    def __init__(self, category: EventCategory, reason: str) -> None:
        super().__init__(f"cannot observe {category.value!r} events here: {reason}")
        self.category = category
        """The category that was refused."""
        self.reason = reason
        """Why it was refused."""


@final
@dataclass(frozen=True, slots=True)
class CategoryCapability:
    """How one category can be observed on this machine."""

    category: EventCategory
    """The category."""
    support: CapabilitySupport
    """How well."""
    backend: str | None
    """What observes it (``"proc-connector"``, ``"proc-poll"``, ...), or
    ``None`` when unavailable."""
    reason: str
    """Why the support is what it is, in a sentence a user can act on."""


@final
@dataclass(frozen=True, slots=True)
class ContainmentCapability:
    """How a session can keep its process trees from escaping it.

    The best strategy this machine allows: what
    ``open_session(containment="auto")`` uses (the default,
    ``"process-group"``, always has the escape of the process-group row).
    """

    name: str
    """The strategy (``"cgroup"`` or ``"process-groups+marker"``)."""
    support: CapabilitySupport
    """How well it contains: ``SUPPORTED`` (exact) for a cgroup."""
    reason: str
    """What can escape it, or why nothing can, in a sentence; for process
    groups also what would make cgroup containment possible."""
    path: str | None = None
    """For ``"cgroup"``: the cgroup directory below which sessions go."""
    controllers: tuple[str, ...] = ()
    """The cgroup controllers that cgroup offers its children, sorted."""
    limits: str = "limits need cgroup containment"
    """Which limits (``memory.max``, ``pids.max``, ``cpu.max``) a session
    could set (``available: ...``), and for each one it could not, why: the
    checks ``limits=`` makes, without writing. On a hybrid machine, for
    example, a controller bound to cgroup v1 is named with its v1 mount."""


PROCESS_GROUP_CONTAINMENT: Final = ContainmentCapability(
    "process-groups+marker",
    CapabilitySupport.PARTIAL,
    "a descendant that calls setsid and clears its environment (env -i) escapes once "
    "its parent is gone, unless the tree observer saw it (a PROCESS sink or "
    "track_descendants=True; when polling, only if it lived through a scan)",
)


@final
@dataclass(frozen=True, slots=True)
class CapabilityReport(Mapping[EventCategory, CategoryCapability]):
    """What this machine can observe, per category; a read-only mapping.

    Returned by :func:`negotiate_capabilities`; not meant to be built by
    users.
    """

    scope: TraceScope
    """The scope the report is for."""
    categories: Mapping[EventCategory, CategoryCapability]
    """Every :class:`EventCategory`, each with its capability."""
    containment: ContainmentCapability = PROCESS_GROUP_CONTAINMENT
    """How sessions stop what their processes leave behind, and what escapes."""

    def __getitem__(self, category: EventCategory) -> CategoryCapability:
        return self.categories[category]

    def __iter__(self) -> Iterator[EventCategory]:
        return iter(self.categories)

    def __len__(self) -> int:
        return len(self.categories)

    def require(self, category: EventCategory) -> CategoryCapability:
        """Return the capability of ``category``, refusing an unavailable one.

        Args:
            category: The category a sink wants.

        Returns:
            Its capability (``SUPPORTED`` or ``PARTIAL``).

        Raises:
            UnsupportedCategoryError: If the category is ``UNAVAILABLE``.
        """
        capability = self.categories[category]
        if capability.support is CapabilitySupport.UNAVAILABLE:
            raise UnsupportedCategoryError(category, capability.reason)
        return capability

    def render_summary(self) -> str:
        """Return a readable table: one line per category.

        Returns:
            The table, without a trailing newline.
        """
        rows = [("category", "support", "backend", "reason")]
        rows.extend(
            (c.category.value, c.support.value, c.backend or "-", c.reason)
            for c in self.categories.values()
        )
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        lines = [f"scope: {self.scope.value}"]
        for row in rows:
            cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
            lines.append("  ".join([*cells, row[3]]))
        held = self.containment
        where = f" at {held.path}" if held.path else ""
        lines.append(f"containment: {held.name} ({held.support.value}){where}: {held.reason}")
        lines.append(f"limits: {held.limits}")
        return "\n".join(lines)


def _connector_reason(proc_root: str) -> str | None:
    if not sys.platform.startswith("linux"):
        return "the process connector is Linux-only"
    if proc_root != "/proc":
        # The connector reports the real system's pids, which a substitute
        # /proc does not describe.
        return f"the process connector does not describe {proc_root!r}"
    from ._linux import probe_connector

    return probe_connector()


def _limits_line(reasons: Mapping[str, str | None]) -> str:
    from ._linux import LIMIT_FILES

    usable = [f"{name} ({LIMIT_FILES[name]})" for name, why in reasons.items() if why is None]
    refused = [f"{LIMIT_FILES[name]}: {why}" for name, why in reasons.items() if why is not None]
    if not usable:
        return "none: " + "; ".join(refused)
    return "available: " + ", ".join(usable) + "".join(f"; not {r}" for r in refused)


def _containment() -> ContainmentCapability:
    if not sys.platform.startswith("linux"):
        return PROCESS_GROUP_CONTAINMENT
    from ._linux import limit_support, probe_cgroup

    support = probe_cgroup()
    if not support.available:
        return ContainmentCapability(
            PROCESS_GROUP_CONTAINMENT.name,
            PROCESS_GROUP_CONTAINMENT.support,
            f"{PROCESS_GROUP_CONTAINMENT.reason}; no cgroup containment: {support.reason}",
            limits=f"limits need cgroup containment, which is not available: {support.reason}",
        )
    kill = "cgroup.kill" if support.kill else "SIGKILL to every member while frozen"
    return ContainmentCapability(
        "cgroup",
        CapabilitySupport.SUPPORTED,
        "every descendant stays in the session's cgroup whatever it does to its group, "
        f"session or environment; stopped by freeze, SIGTERM, then {kill}",
        path=str(support.parent),
        controllers=tuple(sorted(support.controllers)),
        limits=_limits_line(limit_support(support)),
    )


def negotiate_capabilities(
    scope: TraceScope = TraceScope.LAUNCHED_PROCESS_TREE, *, proc_root: str = "/proc"
) -> CapabilityReport:
    """Find out what this machine can observe, and how well.

    Probes the platform: whether ``proc_root`` is readable, whether the
    netlink process connector accepts a subscription (it opens and closes a
    socket), whether a cgroup can be made below this process's own (it
    makes and removes one), and for :attr:`TraceScope.SYSTEM_WIDE` whether other users'
    descriptors are readable. Call it once and keep the report.

    Args:
        scope: Which processes the observation is about.
        proc_root: Where ``/proc`` is mounted. Anything but ``"/proc"`` rules
            out the connector.

    Returns:
        A report with an entry for every :class:`EventCategory`.

    Raises:
        TypeError: ``scope`` is not a :class:`TraceScope`, or ``proc_root``
            not a str.
    """
    if not isinstance(scope, TraceScope):
        raise TypeError(f"scope must be a TraceScope, not {scope!r}")
    if not isinstance(proc_root, str):
        raise TypeError(f"proc_root must be a str, not {type(proc_root).__name__}")
    caps: dict[EventCategory, CategoryCapability] = {}

    def put(
        category: EventCategory, support: CapabilitySupport, backend: str | None, why: str
    ) -> None:
        caps[category] = CategoryCapability(category, support, backend, why)

    if os.name == "posix":
        put(
            EventCategory.LIFECYCLE,
            CapabilitySupport.SUPPORTED,
            "spawn-and-reap",
            "the session spawns and reaps its processes itself",
        )
    else:
        put(
            EventCategory.LIFECYCLE,
            CapabilitySupport.UNAVAILABLE,
            None,
            "process supervision needs a POSIX system",
        )

    # Pure Python, importable anywhere; /proc itself is read only there.
    from ._linux import net_tables_readable, others_fds_readable, unusable_reason

    no_proc = unusable_reason(proc_root)
    if no_proc is not None:
        for category in (EventCategory.PROCESS, EventCategory.FILE, EventCategory.NETWORK):
            put(category, CapabilitySupport.UNAVAILABLE, None, no_proc)
        return CapabilityReport(scope, MappingProxyType(caps), _containment())

    refused = _connector_reason(proc_root)
    if refused is None:
        put(
            EventCategory.PROCESS,
            CapabilitySupport.SUPPORTED,
            "proc-connector",
            "exact fork and exit notifications (with exit codes) from the kernel",
        )
    else:
        put(
            EventCategory.PROCESS,
            CapabilitySupport.PARTIAL,
            "proc-poll",
            "polling /proc misses descendants that start and exit between two scans "
            f"(connector: {refused})",
        )

    others = scope is TraceScope.SYSTEM_WIDE and not others_fds_readable(proc_root)
    only_ours = (
        "; only this user's processes: other users' /proc/<pid>/fd needs CAP_SYS_PTRACE"
        if others
        else ""
    )
    put(
        EventCategory.FILE,
        CapabilitySupport.PARTIAL,
        "proc-fd-snapshot",
        "snapshots of /proc/<pid>/fd miss files opened and closed between two scans" + only_ours,
    )
    if net_tables_readable(proc_root):
        put(
            EventCategory.NETWORK,
            CapabilitySupport.PARTIAL,
            "proc-net-snapshot",
            "snapshots of descriptors and /proc/<pid>/net tables miss short-lived "
            "connections and unnamed Unix sockets" + only_ours,
        )
    else:
        put(
            EventCategory.NETWORK,
            CapabilitySupport.UNAVAILABLE,
            None,
            f"no readable socket tables under {proc_root!r}/net",
        )
    return CapabilityReport(scope, MappingProxyType(caps), _containment())
