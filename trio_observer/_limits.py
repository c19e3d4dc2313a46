"""Resource limits for a session or one process: what, not how.

A :class:`Limits` is a plain value, checked when it is built; the cgroup
files it turns into (``memory.max``, ``pids.max``, ``cpu.max``) are written
by the platform seam, which also says why a limit cannot be kept here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final, final

from ._checks import check_int

CPU_PERIOD_USEC: Final = 100_000
"""The ``cpu.max`` period written with every CPU limit: the kernel's default."""
_MIN_QUOTA_USEC: Final = 1_000
"""The smallest ``cpu.max`` quota the kernel accepts (1 ms)."""
_MAX_CPUS: Final = 1_000_000
_MAX_PIDS: Final = 4_194_304
"""``PID_MAX_LIMIT`` on 64-bit Linux: ``pids.max`` refuses more."""
_MAX_BYTES: Final = 2**63 - 1


@final
@dataclass(frozen=True, slots=True)
class Limits:
    """What a session's processes, or one process's tree, may use at most.

    Pass it as ``open_session(limits=...)`` (the session's cgroup: all its
    processes together) or ``session.start_process(..., limits=...)`` (that
    process's leaf: it and its descendants). Limits need cgroup containment
    and the cgroup v2 controller of each limit (see
    ``docs/containment.md``); where one cannot be kept, the call raises
    rather than run without it. A field left at ``None`` sets nothing, so
    ``Limits()`` asks for nothing and is accepted everywhere.

    Args:
        memory_max: Bytes of memory (``memory.max``); above it the kernel
            reclaims, then OOM-kills a process of the tree (reported in
            ``ResourceUsage.oom_kills``).
        pids_max: Processes and threads at once (``pids.max``); a fork
            beyond it fails with ``EAGAIN``. At most 4194304.
        cpu_max: CPUs' worth of time (``cpu.max``): ``0.5`` is half a CPU,
            ``2`` two CPUs, written as a quota per 100 ms period
            (``"50000 100000"`` for 0.5). From 0.01 (the kernel's smallest
            quota, 1 ms) to 1000000.

    Raises:
        TypeError: A field is not an int (``memory_max``, ``pids_max``; a
            bool is not one) or a number (``cpu_max``).
        ValueError: A field is out of its range (the message names it).
    """

    memory_max: int | None = None
    """Bytes of memory the tree may use (``memory.max``)."""
    pids_max: int | None = None
    """Processes (and threads) the tree may hold at once (``pids.max``)."""
    cpu_max: float | None = None
    """CPUs' worth of time per period the tree may use (``cpu.max``)."""

    def __post_init__(self) -> None:
        if self.memory_max is not None:
            _check_bounded("memory_max", self.memory_max, _MAX_BYTES, "bytes")
        if self.pids_max is not None:
            _check_bounded("pids_max", self.pids_max, _MAX_PIDS, "processes")
        if self.cpu_max is not None:
            _check_cpus(self.cpu_max)

    def __bool__(self) -> bool:
        """Whether any limit is set."""
        return any(v is not None for v in (self.memory_max, self.pids_max, self.cpu_max))

    def files(self) -> dict[str, str]:
        """The cgroup v2 control files to write, and what, for the limits set.

        Returns:
            A mapping such as ``{"memory.max": "104857600"}``, in the order
            memory, pids, cpu.
        """
        out: dict[str, str] = {}
        if self.memory_max is not None:
            out["memory.max"] = str(self.memory_max)
        if self.pids_max is not None:
            out["pids.max"] = str(self.pids_max)
        if self.cpu_max is not None:
            quota = max(_MIN_QUOTA_USEC, round(self.cpu_max * CPU_PERIOD_USEC))
            out["cpu.max"] = f"{quota} {CPU_PERIOD_USEC}"
        return out

    def controllers(self) -> frozenset[str]:
        """The cgroup v2 controllers the limits set need (``memory``, ...)."""
        return frozenset(name.split(".", 1)[0] for name in self.files())


def _check_bounded(name: str, value: int, maximum: int, unit: str) -> None:
    check_int(name, value, minimum=1)
    if value > maximum:
        raise ValueError(f"{name} must be at most {maximum} {unit}, got {value}")


def _check_cpus(value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"cpu_max must be a number of CPUs, not {type(value).__name__}")
    try:
        cpus = float(value)
    except OverflowError:
        cpus = math.inf
    # NaN fails both comparisons, so it is refused too.
    if not 0.01 <= cpus <= _MAX_CPUS:
        raise ValueError(
            f"cpu_max must be a number of CPUs from 0.01 to {_MAX_CPUS}, got {value!r}"
        )


def check_limits(limits: object) -> Limits | None:
    """``limits`` if it is a :class:`Limits` that sets something, else ``None``.

    Raises:
        TypeError: ``limits`` is neither ``None`` nor a :class:`Limits`.
    """
    if limits is None:
        return None
    if not isinstance(limits, Limits):
        raise TypeError(
            f"limits must be a trio_observer.Limits or None, not {type(limits).__name__}"
        )
    return limits if limits else None
