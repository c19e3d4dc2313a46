"""The platform seam: everything Linux-specific that the portable code uses.

Portable modules import from here only, never from ``._linux._something``
(tests/test_layers.py checks), the way trio keeps its
``_subprocess_platform``: tree observation (the netlink process connector
or /proc polling), the final sweep of leftovers, the child subreaper,
spawning (glibc ``posix_spawn``), cgroup v2 containment and
the probes behind the capability report. Nothing outside this package reads
``/proc`` or ``/sys``, opens netlink sockets or calls libc through ctypes.
"""

from ._cgroup import Cgroup, CgroupUnavailableError
from ._cgroup import probe as probe_cgroup
from ._cgroup_containment import CONTAINMENTS, CgroupContainment, choose_containment
from ._cgroup_leftovers import clean_leftovers, leftover_sessions
from ._cgroup_limits import LIMIT_FILES, choose_limited_containment, limit_support
from ._cgroup_limits import prepare as prepare_limits
from ._cgroup_usage import group_usage, reap_usage, running_usage, with_cgroup
from ._cgroup_usage import total as total_usage
from ._pipes import grow_pipe, release_pipe
from ._process_tree import PROC, is_subreaper, stop_leftovers, subreaper
from ._procfs import (
    net_tables_readable,
    others_fds_readable,
    read_cmdline,
    read_stat,
    scan_all,
    unusable_reason,
)
from ._spawn import spawn_on_pty, spawn_with_stdio, stdio_spawn_supported
from ._tree import OBSERVABLE_CATEGORIES, TreeObserver

__all__ = [
    "CONTAINMENTS",
    "LIMIT_FILES",
    "OBSERVABLE_CATEGORIES",
    "PROC",
    "Cgroup",
    "CgroupContainment",
    "CgroupUnavailableError",
    "TreeObserver",
    "choose_containment",
    "choose_limited_containment",
    "clean_leftovers",
    "group_usage",
    "grow_pipe",
    "is_subreaper",
    "leftover_sessions",
    "limit_support",
    "net_tables_readable",
    "others_fds_readable",
    "prepare_limits",
    "probe_cgroup",
    "probe_connector",
    "read_cmdline",
    "read_stat",
    "reap_usage",
    "release_pipe",
    "running_usage",
    "scan_all",
    "spawn_on_pty",
    "spawn_with_stdio",
    "stdio_spawn_supported",
    "stop_leftovers",
    "subreaper",
    "total_usage",
    "unusable_reason",
    "with_cgroup",
]


def probe_connector() -> str | None:
    """Check whether the process connector can be used (``None``), or say why not.

    Imported on call: a session that observes no tree never loads the
    connector (the CLI's start-up time depends on it).
    """
    from ._connector import probe_connector as probe

    return probe()
