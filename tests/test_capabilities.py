"""negotiate_capabilities: honest reports, and refusals that name the reason."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests._fakeproc import TCP_HEADER, FakeProc
from trio_observer._capabilities import (
    CapabilitySupport,
    TraceScope,
    UnsupportedCategoryError,
    negotiate_capabilities,
)
from trio_observer._events import EventCategory

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc")
TREE = (EventCategory.PROCESS, EventCategory.FILE, EventCategory.NETWORK)


@pytest.mark.parametrize("scope", list(TraceScope))
def test_no_proc_means_unavailable_with_a_reason(tmp_path: Path, scope: TraceScope) -> None:
    missing = str(tmp_path / "no-proc-here")
    report = negotiate_capabilities(scope, proc_root=missing)
    assert report.scope is scope
    assert set(report) == set(EventCategory)
    assert report[EventCategory.LIFECYCLE].support is CapabilitySupport.SUPPORTED
    for category in TREE:
        capability = report[category]
        assert capability.support is CapabilitySupport.UNAVAILABLE
        assert capability.backend is None
        assert missing in capability.reason
        with pytest.raises(UnsupportedCategoryError, match=category.value) as info:
            report.require(category)
        assert info.value.category is category
        assert info.value.reason == capability.reason
    assert report.require(EventCategory.LIFECYCLE).backend == "spawn-and-reap"


def test_a_proc_without_processes_is_not_a_proc(tmp_path: Path) -> None:
    report = negotiate_capabilities(proc_root=str(tmp_path))
    assert report[EventCategory.PROCESS].support is CapabilitySupport.UNAVAILABLE
    assert "no readable processes" in report[EventCategory.PROCESS].reason


def test_a_substitute_proc_is_polled_never_connected(tmp_path: Path) -> None:
    fake = FakeProc(tmp_path)
    fake.add(1, 0)
    report = negotiate_capabilities(proc_root=fake.path)
    process = report[EventCategory.PROCESS]
    assert process.support is CapabilitySupport.PARTIAL
    assert process.backend == "proc-poll"
    assert "does not describe" in process.reason
    assert report[EventCategory.FILE].support is CapabilitySupport.PARTIAL
    # No net tables in this fake tree.
    assert report[EventCategory.NETWORK].support is CapabilitySupport.UNAVAILABLE
    (tmp_path / "net").mkdir()
    (tmp_path / "net" / "tcp").write_text(TCP_HEADER)
    report = negotiate_capabilities(proc_root=fake.path)
    assert report[EventCategory.NETWORK].support is CapabilitySupport.PARTIAL


@linux_only
def test_the_real_machine() -> None:
    report = negotiate_capabilities()
    process = report[EventCategory.PROCESS]
    if os.geteuid() == 0:
        # CI and this machine run as root in the initial namespaces.
        assert process.support is CapabilitySupport.SUPPORTED
        assert process.backend == "proc-connector"
    else:
        assert process.support in (CapabilitySupport.SUPPORTED, CapabilitySupport.PARTIAL)
    for category in (EventCategory.FILE, EventCategory.NETWORK):
        assert report.require(category).support is CapabilitySupport.PARTIAL


@linux_only
def test_system_wide_says_whether_other_users_are_visible() -> None:
    report = negotiate_capabilities(TraceScope.SYSTEM_WIDE)
    try:
        os.listdir("/proc/1/fd")
        readable = True
    except OSError:
        readable = False
    assert ("CAP_SYS_PTRACE" in report[EventCategory.FILE].reason) is not readable


def test_render_summary_is_a_table(tmp_path: Path) -> None:
    report = negotiate_capabilities(proc_root=str(tmp_path / "missing"))
    lines = report.render_summary().splitlines()
    assert lines[0] == "scope: launched-process-tree"
    assert lines[1].split()[:3] == ["category", "support", "backend"]
    assert [line.split()[0] for line in lines[2:-2]] == [c.value for c in EventCategory]
    assert lines[-2].startswith("containment: ")
    assert lines[-1].startswith("limits: ")
    # The support column starts at the same offset on every row.
    offsets = {
        line.index(word)
        for line, word in zip(
            lines[1:-2], ["support"] + ["supported"] + ["unavailable"] * 3, strict=True
        )
    }
    assert len(offsets) == 1
