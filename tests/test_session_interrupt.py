"""A Ctrl-C at any instruction of a session's process paths leaves nothing behind.

trio raises KeyboardInterrupt at whatever bytecode is running when SIGINT
arrives, unless the code is KI-protected (then at its next checkpoint).
The child script ``tests/_ki_sweep.py`` raises a real SIGINT at the n-th
instruction executed in the library's frames, one fresh ``trio.run`` per n,
and checks the kernel's records afterwards: the pids the children wrote
down are gone, no child or zombie of the process is left, no fd, no
session cgroup, no subreaper flag, and the KeyboardInterrupt surfaced.
It runs in a subprocess, so a hang or a leak cannot hurt the test runner.

The full sweep (every n; about 45,000 runs over the scenarios, 20 to 30
minutes) is run by hand::

    TRIO_OBSERVER_KI_SWEEP=full .venv/bin/python -m pytest tests/test_session_interrupt.py

CI runs a deterministic sample of every scenario (see ``_sample``), and the
targeted sweeps below, which go through every instruction of the
functions where a window was found.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from trio_observer._linux import _cgroup

PY = sys.executable
HARNESS = Path(__file__).with_name("_ki_sweep.py")
FULL = os.environ.get("TRIO_OBSERVER_KI_SWEEP") == "full"


def _ranges(targets: list[int]) -> str:
    """``1,2,3,7`` as ``1-3,7``, to keep the child's argv short."""
    parts: list[str] = []
    start = prev = targets[0]
    for target in [*targets[1:], None]:
        if target is not None and target == prev + 1:
            prev = target
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if target is not None:
            start = prev = target
    return ",".join(parts)


def sweep(
    scenario: str, containment: str, targets: list[int], frames: str, workdir: Path
) -> list[dict[str, Any]]:
    """Run the child on ``targets``; one result per target.

    A hang (the child says where every task waits and exits) is a result
    too, and the sweep goes on with the next target in a new child.
    """
    results: list[dict[str, Any]] = []
    remaining = sorted(targets)
    while remaining:
        child = subprocess.run(
            [PY, str(HARNESS), scenario, containment, _ranges(remaining), frames, str(workdir)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            # Each run has its own 20 s watchdog; this only bounds a child
            # that cannot even report.
            timeout=60 + 2 * len(remaining),
        )
        lines = [json.loads(line) for line in child.stdout.splitlines() if line.startswith(b"{")]
        if lines and "skip" in lines[0]:
            pytest.skip(lines[0]["skip"])
        results.extend(lines)
        done = {line["target"] for line in lines}
        if child.returncode == 0 and done >= set(remaining):
            break
        if not lines:
            raise AssertionError(f"the sweep child failed: {child.stderr.decode()[-3000:]}")
        last = lines[-1]["target"]
        remaining = [target for target in remaining if target > last]
    return results


def count(scenario: str, containment: str, frames: str, workdir: Path) -> int:
    """How many instructions a run executes in ``frames`` (no Ctrl-C)."""
    (result,) = sweep(scenario, containment, [0], frames, workdir)
    assert result["problems"] == [], result
    return int(result["seen"])


def failures(results: list[dict[str, Any]]) -> list[str]:
    found = []
    for result in results:
        if "hang" in result:
            found.append("\n".join(result["hang"]))
        elif result["problems"]:
            found.append(f"Ctrl-C at {result['target']} ({result['where']}): {result['problems']}")
    return found


def _sample(total: int) -> list[int]:
    """Every instruction in a full sweep; else a spread of about 16.

    The sample is fixed (the same every run), with the ends of the run
    (opening and closing the session) taken more densely.
    """
    if FULL:
        return list(range(1, total + 1))
    ends = list(range(1, 4)) + list(range(max(total - 2, 1), total + 1))
    spread = list(range(7, total, max(total // 10, 1)))
    return sorted(set(ends + spread))


# Every scenario runs both ways in a full sweep; CI runs each once, the
# pipes without a cgroup and the terminal and the tree with one.
_PAIRS = [
    ("tree", "auto"),
    ("pty", "auto"),
    ("run", "process-group"),
    ("capture", "process-group"),
    ("start-caught", "auto"),
]
if FULL:
    _PAIRS = [(s, c) for s, _ in _PAIRS for c in ("auto", "process-group")]


@pytest.mark.parametrize(("scenario", "containment"), _PAIRS)
def test_ctrl_c_at_any_instruction_of_a_session_leaves_nothing(
    tmp_path: Path, scenario: str, containment: str
) -> None:
    if containment == "auto" and not _cgroup.probe().available:
        containment = "process-group"
    total = count(scenario, containment, "package", tmp_path)
    # The sweep does reach into the session, the spawn and the teardown.
    assert total > 2000
    results = sweep(scenario, containment, _sample(total), "package", tmp_path)
    assert failures(results) == []
    # At least the early ones were interrupted (the run is long enough).
    assert sum(result["fired"] for result in results) >= 5


def _every_instruction(
    scenario: str, containment: str, frames: list[str], workdir: Path, *, ci_stride: int = 1
) -> int:
    """Sweep the instructions of ``frames``; return how many there were.

    Every one in a full sweep; in CI every ``ci_stride``-th (each window
    found spans more than one instruction), a fixed sample, so that a
    failure reproduces.
    """
    joined = ",".join(frames)
    total = count(scenario, containment, joined, workdir)
    stride = 1 if FULL else ci_stride
    results = sweep(scenario, containment, list(range(1, total + 1, stride)), joined, workdir)
    assert failures(results) == []
    return total


# The frames of opening and closing a session: open_session's own, the
# contextlib frames that enter and exit it, and the cgroup and subreaper
# set-up and clean-up in between. Unprotected, a Ctrl-C there left the
# session's cgroup (and its lock fd), left this process a child subreaper,
# or, between the block's end and the nursery's exit, left the nursery
# open: TrioInternalError, with the tree still running.
_OPEN_AND_CLOSE = [
    "open_session",
    "_AsyncGeneratorContextManager.__aenter__",
    "_AsyncGeneratorContextManager.__aexit__",
    "_ProtectedContext.__aenter__",
    "_ProtectedContext.__aexit__",
    "choose_containment",
    "Cgroup.create_session",
    "CgroupContainment.__init__",
    "lock_session",
    "CgroupContainment.close",
    "Cgroup.remove",
    "_Subreaper.acquire",
    "_Subreaper.release",
    "own_start_time",
    "_read_bytes",
]


def test_ctrl_c_anywhere_in_opening_or_closing_a_session(tmp_path: Path) -> None:
    # With a cgroup: its frames hold the process-group path's and more.
    containment = "auto" if _cgroup.probe().available else "process-group"
    assert _every_instruction("tree", containment, _OPEN_AND_CLOSE, tmp_path, ci_stride=2) > 150


def test_ctrl_c_anywhere_in_the_tree_observer_does_not_hang_the_teardown(
    tmp_path: Path,
) -> None:
    # Raised in the observer's task between run() marking itself running
    # and its finally, it left finish() waiting for ever.
    frames = ["TreeObserver.run", "Session._run_tree_observer"]
    assert _every_instruction("tree", "process-group", frames, tmp_path) > 50


def test_ctrl_c_caught_around_start_process_leaves_nothing_to_wait_for(
    tmp_path: Path,
) -> None:
    # The program catches the KeyboardInterrupt of start_process and ends
    # the block normally. Raised after the spawn but before the start's
    # try, it left a process nobody held, and the block waited for it.
    frames = ["Session.start_process", "Session._launch", "Session._abandon"]
    assert _every_instruction("start-caught", "process-group", frames, tmp_path) > 100


def test_ctrl_c_anywhere_in_run_process_leaves_no_pipe(tmp_path: Path) -> None:
    # Raised in a reader task of run_process before its `async with`, the
    # pipe stayed open: the process no longer held it for the session.
    frames = [
        "Session.run_process",
        "run_process",
        "run_process.<locals>.read",
        "run_process.<locals>.feed",
    ]
    assert _every_instruction("run", "process-group", frames, tmp_path, ci_stride=2) > 100


def test_ctrl_c_anywhere_in_reading_a_processs_usage_leaves_no_fd(tmp_path: Path) -> None:
    # Process.resources() is called from the user's own, unprotected code;
    # a Ctrl-C between the os.open of a /proc or cgroup file and the try
    # that closes it left the fd open for good.
    containment = "auto" if _cgroup.probe().available else "process-group"
    frames = [
        "Process.resources",
        "with_cgroup",
        "running_usage",
        "Cgroup.cpu_seconds",
        "Cgroup.read",
        "Cgroup._read_of",
        "Cgroup.memory_peak",
        "Cgroup.pids_peak",
        "Cgroup.oom_kills",
        "Cgroup.subtree_control",
        "read_file",
    ]
    assert _every_instruction("resources", containment, frames, tmp_path) > 30
