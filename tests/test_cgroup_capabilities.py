"""The containment row of the capability report, and `trio-observer capabilities`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import trio_observer._linux
from trio_observer import CapabilitySupport, negotiate_capabilities
from trio_observer._linux import _cgroup, limit_support
from trio_observer._linux._procfs import read_stat

SUPPORT = _cgroup.probe()
needs_cgroup = pytest.mark.skipif(
    not SUPPORT.available, reason=f"cgroup v2 not writable here: {SUPPORT.reason}"
)


@needs_cgroup
def test_containment_row_is_cgroup_where_one_can_be_made() -> None:
    held = negotiate_capabilities().containment
    assert held.name == "cgroup"
    assert held.support is CapabilitySupport.SUPPORTED
    assert held.path == str(SUPPORT.parent)
    assert held.controllers == tuple(sorted(SUPPORT.controllers))
    # Each limit a session could set is listed, each other one with why not
    # (on the development machine: bound to cgroup v1, with its mount).
    reasons = limit_support(SUPPORT)
    usable = [name for name, why in reasons.items() if why is None]
    assert held.limits.startswith("available: " if usable else "none: ")
    for name, why in reasons.items():
        if why is None:
            assert f"{name} ({name}.max)" in held.limits
        else:
            assert f"{name}.max: {why}" in held.limits
            bound = _cgroup.v1_mount(name)
            if name not in SUPPORT.controllers and bound is not None:
                assert f"bound to cgroup v1 (mounted at {bound})" in why


def test_without_a_cgroup_the_row_says_what_would_make_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    probe = _cgroup.probe
    # A cgroup file without a v2 entry: probed for real, with that input.
    monkeypatch.setattr(
        trio_observer._linux, "probe_cgroup", lambda: probe(cgroup_file="1:pids:/\n")
    )
    held = negotiate_capabilities().containment
    assert held.name == "process-groups+marker"
    assert held.support is CapabilitySupport.PARTIAL
    assert "env -i" in held.reason
    assert "no cgroup containment: this process has no cgroup v2 entry" in held.reason
    assert held.path is None
    assert "limits need cgroup containment" in held.limits


def test_capabilities_command_prints_the_containment_row() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "trio_observer", "capabilities"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    rows = {line.split(":", 1)[0]: line for line in result.stdout.splitlines()}
    held = negotiate_capabilities().containment
    assert rows["containment"].startswith(f"containment: {held.name} ({held.support.value})")
    assert rows["limits"] == f"limits: {held.limits}"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trio_observer", "run", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


# Leaves an `env -i setsid` grandchild behind (own group and session, no
# marker) and writes its pid.
ESCAPE = (
    "import subprocess, sys\n"
    "p = subprocess.Popen(['env', '-i', 'setsid', 'sleep', '60'])\n"
    "open(sys.argv[1], 'w').write(str(p.pid))\n"
)


@needs_cgroup
def test_cli_containment_cgroup_stops_an_env_i_setsid_escape(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    result = _cli("--containment", "cgroup", "--", sys.executable, "-c", ESCAPE, str(pid_file))
    assert result.returncode == 0, result.stderr
    escaped = int(pid_file.read_text())
    stat = read_stat("/proc", escaped)
    assert stat is None or stat.state in ("Z", "X"), "the escaped grandchild survived the run"


def test_cli_containment_cgroup_refused_in_one_line_where_unavailable(tmp_path: Path) -> None:
    # A /proc/self/cgroup-like file without a v2 entry, read for real by
    # the child through a sitecustomize that points probe() at it.
    (tmp_path / "sitecustomize.py").write_text(
        "from trio_observer._linux import _cgroup\n"
        "_probe = _cgroup.probe\n"
        "_cgroup.probe = lambda: _probe(cgroup_file='1:pids:/\\n')\n"
        "import trio_observer._linux\n"
        "trio_observer._linux.probe_cgroup = _cgroup.probe\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "trio_observer", "run", "--containment", "cgroup", "--", "true"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                [str(tmp_path), *os.environ.get("PYTHONPATH", "").split(os.pathsep)]
            ),
        },
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "--containment cgroup is not available: this process has no cgroup v2 entry" in lines[0]


def test_cli_containment_must_be_a_known_value() -> None:
    result = _cli("--containment", "jail", "--", "true")
    assert result.returncode == 2
    assert "invalid choice: 'jail'" in result.stderr
