"""``trio-observer run --memory-max/--pids-max/--cpu-max``: checked, refused in one line, kept.

The happy paths skip where the controllers are missing, with the probe's
reason, as in tests/test_cgroup_limits.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trio_observer._cli._run import _size

from .test_cgroup_limits import (
    ALLOCATE,
    FORK_LOOP,
    REASONS,
    SUPPORT,
    needs_cgroup,
    needs_limit,
)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trio_observer", "run", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [("100", 100), ("4K", 4096), ("512M", 512 << 20), ("2g", 2 << 30), (" 1k ", 1024)],
)
def test_cli_sizes_take_k_m_g_suffixes(text: str, expected: int) -> None:
    assert _size(text) == expected


@pytest.mark.parametrize(
    ("option", "value", "words"),
    [
        ("--memory-max", "12X", "a size is a number of bytes with an optional K, M or G suffix"),
        ("--memory-max", "1.5G", "a size is a number of bytes"),
        ("--memory-max", "0", "memory_max must be >= 1, got 0"),
        ("--memory-max", "-1", "a size is a number of bytes"),
        ("--pids-max", "x", "N is a whole number of processes"),
        ("--pids-max", "0", "pids_max must be >= 1, got 0"),
        ("--pids-max", "99999999", "pids_max must be at most 4194304"),
        ("--cpu-max", "half", "CPUS is a number of CPUs"),
        ("--cpu-max", "0.001", "cpu_max must be a number of CPUs from 0.01"),
        ("--cpu-max", "nan", "got nan"),
    ],
)
def test_cli_bad_limit_is_an_argparse_error_naming_the_option(
    option: str, value: str, words: str, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    result = _cli(option, value, "--", sys.executable, "-c", f"open({str(marker)!r}, 'w')")
    assert result.returncode == 2
    assert f"argument {option}: " in result.stderr
    assert words in result.stderr
    assert not marker.exists()


def test_cli_limits_need_a_cgroup_not_process_groups(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    result = _cli("--containment", "process-group", "--pids-max", "5", "--", "touch", str(marker))
    assert result.returncode == 2
    assert "--pids-max and --cpu-max need --containment cgroup or auto" in result.stderr
    assert not marker.exists()


@pytest.mark.parametrize(
    ("option", "value", "controller"),
    [("--memory-max", "64M", "memory"), ("--pids-max", "20", "pids"), ("--cpu-max", "0.5", "cpu")],
)
def test_cli_limit_that_cannot_be_kept_stops_the_run_in_one_line(
    option: str, value: str, controller: str, tmp_path: Path
) -> None:
    if not SUPPORT.available or REASONS[controller] is None:
        pytest.skip(f"{controller} limits can be set here (or no cgroup): {SUPPORT.reason}")
    marker = tmp_path / "ran"
    result = _cli(option, value, "--", sys.executable, "-c", f"open({str(marker)!r}, 'w')")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"trio-observer: cannot set {controller}.max to ")
    reason = REASONS[controller]
    assert reason is not None
    assert reason in lines[0]
    assert not marker.exists(), "CMD ran although its limit could not be kept"


def _cli_without_a_cgroup(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # A /proc/self/cgroup-like file without a v2 entry, read for real by
    # the child through a sitecustomize that points probe() at it.
    (tmp_path / "sitecustomize.py").write_text(
        "from trio_observer._linux import _cgroup\n"
        "_probe = _cgroup.probe\n"
        "_cgroup.probe = lambda: _probe(cgroup_file='1:pids:/\\n')\n"
        "import trio_observer._linux\n"
        "trio_observer._linux.probe_cgroup = _cgroup.probe\n"
    )
    path = os.pathsep.join([str(tmp_path), *os.environ.get("PYTHONPATH", "").split(os.pathsep)])
    return subprocess.run(
        [sys.executable, "-m", "trio_observer", "run", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "PYTHONPATH": path},
    )


@pytest.mark.parametrize(
    ("containment", "words"),
    [
        ((), "limits need a cgroup, but it is not available: this process has no cgroup v2"),
        (("--containment", "auto"), "limits need cgroup containment: containment='cgroup' is"),
        (("--containment", "cgroup"), "--containment cgroup is not available: this process has"),
    ],
)
def test_cli_limits_without_a_cgroup_stop_the_run_in_one_line(
    tmp_path: Path, containment: tuple[str, ...], words: str
) -> None:
    marker = tmp_path / "ran"
    result = _cli_without_a_cgroup(
        tmp_path, *containment, "--pids-max", "5", "--", "touch", str(marker)
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert words in lines[0]
    assert not marker.exists()


def _exited_line(stderr: str) -> dict[str, object]:
    for line in stderr.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record["kind"] == "exited":
                assert isinstance(record, dict)
                return record
    raise AssertionError(f"no exited line in {stderr!r}")


@needs_cgroup
@needs_limit("pids")
def test_cli_pids_max_contains_a_fork_loop() -> None:
    result = _cli(
        "--pids-max",
        "20",
        "--grace-period",
        "1",
        "--",
        sys.executable,
        "-c",
        FORK_LOOP.replace("sys.stdin.readline()", "pass"),
    )
    assert result.returncode == 0, result.stderr
    assert "refused" in result.stdout
    resources = _exited_line(result.stderr)["resources"]
    assert isinstance(resources, dict)
    assert resources["pids_peak"] == 20


@needs_cgroup
@needs_limit("memory")
def test_cli_exited_line_reports_the_oom_kill() -> None:
    if Path("/proc/swaps").read_text().count("\n") > 1:
        # --memory-max is memory.max alone; above it the kernel swaps first.
        pytest.skip("swap is on here: the allocation would be swapped, not OOM-killed")
    result = _cli("--memory-max", "64M", "--", sys.executable, "-c", ALLOCATE)
    assert result.returncode == 128 + 9, result.stderr
    resources = _exited_line(result.stderr)["resources"]
    assert isinstance(resources, dict)
    assert isinstance(resources["oom_kills"], int)
    assert resources["oom_kills"] >= 1
