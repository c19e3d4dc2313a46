"""Limits on a session's cgroups: which controllers to enable where, and the rule.

A limit on the session's cgroup needs its controller in the
``subtree_control`` of this process's own cgroup (the session's parent); a
limit on a process's leaf needs it in the session cgroup's too. The session
cgroup never holds processes itself, but this process's own cgroup does
(this process), and the kernel's "no internal processes" rule refuses
controllers there. So either the cgroup is the root (exempt), or this
process moves itself into a leaf of its own, :data:`~._cgroup.SELF_LEAF`,
when the user allowed it, or the error says what to do. Nothing is moved
silently.
"""

from __future__ import annotations

import os

from .._limits import Limits
from ._cgroup import (
    SELF_LEAF,
    Cgroup,
    CgroupBusyError,
    CgroupSupport,
    CgroupUnavailableError,
    describe_pids,
    unavailable_reason,
)
from ._cgroup_containment import CgroupContainment, choose_containment


def enable_below_self(own: Cgroup, names: frozenset[str], *, move_self_to_leaf: bool) -> None:
    """Enable ``names`` in this process's cgroup ``own``, for session cgroups below it.

    Raises:
        CgroupUnavailableError: A controller is not offered (the message
            says why), or ``own`` holds processes and this process may not
            (or cannot alone) leave it; the message says what to do.
    """
    me = os.getpid()
    try:
        own.enable_controllers(names)
        return
    except CgroupBusyError as exc:
        if not (move_self_to_leaf and exc.holders == [me]):
            raise CgroupUnavailableError(f"{exc}; {_advice(own, exc.holders)}") from None
    except CgroupUnavailableError as exc:
        # Not offered: moving would not help, so nothing moves; but say
        # now if the cgroup's processes would be the next obstacle.
        busy = _busy_note(own)
        if busy:
            raise CgroupUnavailableError(f"{exc}; and once it is offered: {busy}") from None
        raise
    # Not Cgroup.place: that would also take this process's children,
    # which live in session leaves of their own.
    leaf = own.leaf(SELF_LEAF)
    (leaf.path / "cgroup.procs").write_text(str(me))
    own.enable_controllers(names)


def _busy_note(own: Cgroup) -> str | None:
    """What the no-internal-processes rule would refuse in ``own``, if anything."""
    holders = own.procs()
    if not holders or own.is_root():
        return None
    return f"{own.path} holds processes ({describe_pids(holders)}); {_advice(own, holders)}"


def _advice(own: Cgroup, holders: list[int]) -> str:
    me = os.getpid()
    if holders == [me]:
        return (
            "move this process into a leaf cgroup of its own first (mkdir "
            f"{own.path}/leaf; echo {me} > {own.path}/leaf/cgroup.procs), or let the session "
            "do it: open_session(..., move_self_to_leaf=True) "
            "(trio-observer run --move-self-to-leaf)"
        )
    return (
        "other processes live in it too: run this program in a cgroup of its own, "
        "for example with `systemd-run --scope -p Delegate=yes <command>`, or move "
        "them into a leaf cgroup first"
    )


def prepare(group: Cgroup, limits: Limits, *, move_self_to_leaf: bool) -> None:
    """Make ``limits`` possible on the leaves of the session cgroup ``group``.

    Enables the controllers in this process's cgroup (the parent) and in
    ``group``, so that each leaf also reports its own figures (``memory.peak``,
    ``pids.peak``, OOM kills). Called before a limited process is spawned,
    so that writing its leaf's limits cannot fail for want of a controller.

    Raises:
        CgroupUnavailableError: As :func:`enable_below_self`.
    """
    names = limits.controllers()
    try:
        enable_below_self(Cgroup(group.path.parent), names, move_self_to_leaf=move_self_to_leaf)
        group.enable_controllers(names)
    except CgroupUnavailableError as exc:
        asked = ", ".join(f"{name} to {value}" for name, value in limits.files().items())
        raise CgroupUnavailableError(f"cannot set {asked}: {exc}") from None


def limit_session(group: Cgroup, limits: Limits, *, move_self_to_leaf: bool) -> None:
    """Write ``limits`` on the session cgroup ``group``: all its processes together.

    Raises:
        CgroupUnavailableError: As :func:`enable_below_self`.
    """
    prepare(group, limits, move_self_to_leaf=move_self_to_leaf)
    group.set_limits(limits)


async def choose_limited_containment(
    mode: str, session_id: str, limits: Limits | None, *, move_self_to_leaf: bool
) -> CgroupContainment | None:
    """:func:`choose_containment`, with the session's ``limits`` kept or refused.

    With limits, ``"auto"`` no longer falls back to process groups: a limit
    that cannot be kept must not be ignored.

    Raises:
        CgroupUnavailableError: No cgroup can be made, or a limit's
            controller cannot be enabled; the message says why.
    """
    if limits is None:
        return await choose_containment(mode, session_id)
    try:
        chosen = await choose_containment("cgroup", session_id)
    except CgroupUnavailableError as exc:
        raise CgroupUnavailableError(f"limits need cgroup containment: {exc}") from None
    assert chosen is not None
    try:
        limit_session(chosen.group, limits, move_self_to_leaf=move_self_to_leaf)
    except BaseException:
        chosen.close()
        raise
    return chosen


LIMIT_FILES = {"memory": "memory.max", "pids": "pids.max", "cpu": "cpu.max"}
"""The controllers limits use, and the file each writes."""


def limit_support(support: CgroupSupport) -> dict[str, str | None]:
    """Per limit controller, ``None`` if a session could set its limit, else why not.

    The same checks as :func:`enable_below_self`, without writing: a
    controller that needs this process moved into a leaf first is reported
    as such (``move_self_to_leaf=True`` would make it work).
    """
    if not support.available or support.parent is None:
        reason = f"limits need cgroup containment, which is not available: {support.reason}"
        return dict.fromkeys(LIMIT_FILES, reason)
    own = Cgroup(support.parent)
    enabled = frozenset((own.read("cgroup.subtree_control") or "").split())
    offered = own.controllers()
    busy = _busy_note(own)
    out: dict[str, str | None] = {}
    for name in LIMIT_FILES:
        if name in enabled:
            out[name] = None
        elif name not in offered:
            missing = unavailable_reason(name, own)
            out[name] = f"{missing}; and once it is offered: {busy}" if busy else missing
        else:
            out[name] = busy
    return out
