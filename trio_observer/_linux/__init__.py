"""The platform seam: everything Linux-specific that the portable code uses.

Portable modules import from here only, never from ``._linux._something``
(tests/test_layers.py checks), the way trio keeps its
``_subprocess_platform``: tree observation (the netlink process connector
or /proc polling), the final sweep of leftovers, the child subreaper,
spawning on a terminal (glibc ``posix_spawn``), cgroup v2 containment and
the probes behind the capability report. Nothing outside this package reads
``/proc`` or ``/sys``, opens netlink sockets or calls libc through ctypes.
"""

from ._cgroup_containment import CONTAINMENTS, CgroupContainment, choose_containment
from ._connector import probe_connector
from ._process_tree import PROC, is_subreaper, stop_leftovers, subreaper
from ._procfs import net_tables_readable, others_fds_readable, unusable_reason
from ._spawn import spawn_on_pty
from ._tree import OBSERVABLE_CATEGORIES, TreeObserver

__all__ = [
    "CONTAINMENTS",
    "OBSERVABLE_CATEGORIES",
    "PROC",
    "CgroupContainment",
    "TreeObserver",
    "choose_containment",
    "is_subreaper",
    "net_tables_readable",
    "others_fds_readable",
    "probe_connector",
    "spawn_on_pty",
    "stop_leftovers",
    "subreaper",
    "unusable_reason",
]
