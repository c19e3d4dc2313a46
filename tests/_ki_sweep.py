"""The child side of tests/test_session_interrupt.py (run as a script).

``python tests/_ki_sweep.py SCENARIO CONTAINMENT TARGETS FRAMES WORKDIR``
runs SCENARIO once per target n in TARGETS (``0`` counts the
instructions: no Ctrl-C), each in a fresh ``trio.run``, with a real SIGINT
raised at the n-th bytecode instruction executed in the chosen frames:
FRAMES ``package`` for every frame of the library (and of the
``asynccontextmanager`` wrappers around its context managers), or a comma
list of ``co_qualname`` for those functions' frames only. After each run
it checks against the kernel's records, not the library's: every pid the
children wrote down is gone, no child of this process is left (zombie or
not), this process holds no fd it did not hold before, no session cgroup
is left, this process is no longer a child subreaper, and the
KeyboardInterrupt surfaced if it was raised. One JSON line per target; a
run that hangs prints where every task waits and ends the process with
status 3.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

import trio

import trio_observer
from trio_observer import CAPTURE, open_session
from trio_observer._linux import _cgroup, is_subreaper
from trio_observer._linux._process_tree import _PR_SET_CHILD_SUBREAPER, _prctl, subreaper

_PACKAGE = os.path.dirname(trio_observer.__file__) + os.sep
# Already swept by tests/test_registry_interrupt.py, and every emit of the
# session goes through them: sweeping them again here would only make the
# sweep longer.
_SKIP = frozenset(
    os.path.join(_PACKAGE, name) for name in ("_registry.py", "_sink.py", "_subscription.py")
)
_CONTEXTLIB = contextlib.__file__
_SUPPORT = _cgroup.probe()


def _in_package(code: CodeType) -> bool:
    filename = code.co_filename
    if filename == _CONTEXTLIB:
        # The enter and exit of the library's asynccontextmanager-made
        # context managers run here (the scenarios use no other).
        return code.co_qualname.startswith("_AsyncGeneratorContextManager.")
    return filename.startswith(_PACKAGE) and filename not in _SKIP


def frame_filter(frames: str) -> Callable[[CodeType], bool]:
    """Which code objects the tracer counts in (see the module docstring)."""
    if frames == "package":
        return _in_package
    names = frozenset(frames.split(","))
    return lambda code: (
        code.co_qualname in names
        and (code.co_filename.startswith(_PACKAGE) or code.co_filename == _CONTEXTLIB)
    )


class CtrlCAt:
    """A tracer that raises SIGINT at the n-th instruction of our frames."""

    def __init__(self, target: int, counted: Callable[[CodeType], bool]) -> None:
        self.target = target
        self.counted = counted
        self.seen = 0
        self.where = ""

    def __call__(self, frame: FrameType, event: str, arg: Any) -> Any:
        if event != "call" or not self.counted(frame.f_code):
            return None
        frame.f_trace_lines = False
        frame.f_trace_opcodes = True
        return self._local

    def _local(self, frame: FrameType, event: str, arg: Any) -> Any:
        if event != "opcode":
            return self._local
        self.seen += 1
        if self.seen == self.target:
            code = frame.f_code
            self.where = (
                f"{os.path.basename(code.co_filename)}:{frame.f_lineno} "
                f"{code.co_qualname} @{frame.f_lasti}"
            )
            # Past the target nothing more is counted: stop tracing, so the
            # rest of the run goes at full speed.
            sys.settrace(None)
            frame.f_trace_opcodes = False
            # trio's handler runs now, in this frame: unprotected code gets
            # KeyboardInterrupt here, protected code at its next checkpoint.
            signal.raise_signal(signal.SIGINT)
            return None
        return self._local


def _recorded(pid_file: Path) -> list[int]:
    try:
        return [int(word) for word in pid_file.read_text().split()]
    except FileNotFoundError:
        return []


async def _wait_recorded(pid_file: Path, count: int) -> None:
    # A real condition with a deadline: the children have written down
    # their pids (the file is read between checkpoints).
    with trio.fail_after(20):
        # Polled: another process writes it, nothing here to wait on.
        while len(_recorded(pid_file)) < count:  # noqa: ASYNC110
            await trio.sleep(0.001)


def _tree_script(pid_file: Path) -> str:
    # The shell and a grandchild in its group write down their own pids.
    return f"sleep 60 & echo $! >> {pid_file}; echo $$ >> {pid_file}; wait"


async def _tree(containment: str, pid_file: Path) -> None:
    # A tree that runs until the session is cancelled.
    async with open_session(containment=containment, grace_period=10) as session:
        await session.start_process(["sh", "-c", _tree_script(pid_file)])
        await _wait_recorded(pid_file, 2)
        session.cancel_scope.cancel()


async def _run(containment: str, pid_file: Path) -> None:
    # run_process with both streams captured; it leaves a grandchild (not
    # holding the pipes) for the final sweep.
    script = (
        f"sleep 60 </dev/null >/dev/null 2>&1 & echo $! >> {pid_file}; "
        f"echo $$ >> {pid_file}; echo out; echo err >&2"
    )
    async with open_session(containment=containment, grace_period=10) as session:
        result = await session.run_process(
            ["sh", "-c", script], capture_stdout=True, capture_stderr=True
        )
        assert result.stdout == b"out\n", result
        assert result.stderr == b"err\n", result


async def _pty(containment: str, pid_file: Path) -> None:
    # A tree on a terminal, its output captured, until the session is cancelled.
    async with open_session(containment=containment, grace_period=10) as session:
        await session.start_process(["sh", "-c", _tree_script(pid_file)], pty=True)
        await _wait_recorded(pid_file, 2)
        session.cancel_scope.cancel()


async def _capture(containment: str, pid_file: Path) -> None:
    # start_process with CAPTURE and a pipe: two readers and a stdin stream.
    script = f"echo $$ >> {pid_file}; echo out; echo err >&2; exec cat"
    async with open_session(containment=containment, grace_period=10) as session:
        process = await session.start_process(
            ["sh", "-c", script], stdin=subprocess.PIPE, stdout=CAPTURE, stderr=CAPTURE
        )
        await _wait_recorded(pid_file, 1)
        assert process.stdin is not None
        await process.stdin.aclose()
        await process.wait()


_caught: list[KeyboardInterrupt] = []


async def _start_caught(containment: str, pid_file: Path) -> None:
    # A program that catches the KeyboardInterrupt of a start and goes on:
    # the block then ends normally, and the session must not wait for a
    # process whose handle the start never returned.
    async with open_session(containment=containment, grace_period=10) as session:
        try:
            await session.start_process(["sh", "-c", _tree_script(pid_file)])
        except KeyboardInterrupt as exc:
            _caught.append(exc)
            return
        await _wait_recorded(pid_file, 2)
        session.cancel_scope.cancel()


async def _resources(containment: str, pid_file: Path) -> None:
    # The user's block reads a running process's usage (its /proc files and,
    # with a cgroup, its leaf's), which is the user's unprotected code.
    async with open_session(containment=containment, grace_period=10) as session:
        process = await session.start_process(["sh", "-c", _tree_script(pid_file)])
        await _wait_recorded(pid_file, 2)
        process.resources()
        session.cancel_scope.cancel()


SCENARIOS = {
    "tree": _tree,
    "run": _run,
    "pty": _pty,
    "capture": _capture,
    "start-caught": _start_caught,
    "resources": _resources,
}


def _fds() -> set[str]:
    return {
        f"{fd} -> {os.readlink(f'/proc/self/fd/{fd}')}"
        for fd in os.listdir("/proc/self/fd")
        if _still_open(fd)
    }


def _still_open(fd: str) -> bool:
    # listdir's own directory fd is gone by the time it is looked at.
    try:
        os.readlink(f"/proc/self/fd/{fd}")
    except FileNotFoundError:
        return False
    return True


def _stat(pid: int) -> tuple[str, int] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[1])


def _children() -> dict[int, str]:
    me = os.getpid()
    found = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            stat = _stat(int(name))
            if stat is not None and stat[1] == me:
                found[int(name)] = stat[0]
    return found


def _session_cgroups() -> list[Path]:
    if not _SUPPORT.available or _SUPPORT.parent is None:
        return []
    mine = f"{_cgroup.NAME_PREFIX}{os.getpid()}."
    return [p for p in _SUPPORT.parent.iterdir() if p.name.startswith(mine)]


def _clean_up(pids: list[int], fds: list[str]) -> None:
    # So that what one run left does not count against the next: their
    # owners (a trio FdStream) close them when collected, the rest here.
    gc.collect()
    for fd in set(fds) & _fds():
        with contextlib.suppress(OSError):
            os.close(int(fd.split()[0]))
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for pid in _children():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
    if is_subreaper():
        # Left set by an interrupted session: cleared, and the count of
        # open sessions with it, or every later run would report it.
        subreaper._holders = 0
        subreaper._set_by_us = False
        _prctl(_PR_SET_CHILD_SUBREAPER, 0)
    for group in _session_cgroups():
        with contextlib.suppress(OSError):
            (group / "cgroup.kill").write_text("1")
        for leaf in group.iterdir():
            if leaf.is_dir():
                with contextlib.suppress(OSError):
                    leaf.rmdir()
        with contextlib.suppress(OSError):
            group.rmdir()


def _outcome(error: BaseException | None) -> str:
    if error is None:
        return "none"
    if isinstance(error, KeyboardInterrupt):
        return "KeyboardInterrupt"
    if isinstance(error, BaseExceptionGroup):
        rest = error.split(KeyboardInterrupt)[1]
        if rest is None:
            return "KeyboardInterrupt"
        return f"group with {rest!r}"
    return repr(error)


_HANG_SECONDS = 20.0


async def _watchdog(tracer: CtrlCAt, pid_file: Path) -> None:
    # A run that does not end in time is a hang: say where every task
    # waits, and end this process (the parent reports the timeout).
    await trio.sleep(_HANG_SECONDS)
    target = tracer.target
    lines = [f"target {target} ({tracer.where}): hung; the tasks wait at:"]
    todo = [trio.lowlevel.current_root_task()]
    while todo:
        task = todo.pop()
        if task is None:
            continue
        lines.append(f"  task {task.name}")
        lines.extend(
            f"    {frame.f_code.co_filename}:{lineno} {frame.f_code.co_qualname}"
            for frame, lineno in task.iter_await_frames()
        )
        todo.extend(child for nursery in task.child_nurseries for child in nursery.child_tasks)
    print(json.dumps({"target": target, "hang": lines}), flush=True)
    _clean_up(_recorded(pid_file), [])
    os._exit(3)


def one_run(
    scenario: str, containment: str, target: int, frames: str, workdir: Path
) -> dict[str, Any]:
    pid_file = workdir / f"pids-{target}"
    pid_file.unlink(missing_ok=True)
    before = _fds()
    tracer = CtrlCAt(target, frame_filter(frames))
    main = SCENARIOS[scenario]

    async def traced() -> None:
        trio.lowlevel.spawn_system_task(_watchdog, tracer, pid_file)
        sys.settrace(tracer)
        try:
            await main(containment, pid_file)
        finally:
            sys.settrace(None)

    error: BaseException | None = None
    try:
        trio.run(traced)
    except BaseException as exc:
        error = exc
    finally:
        sys.settrace(None)
    fired = tracer.seen >= target > 0
    outcome = _outcome(error)
    if _caught:
        outcome = "KeyboardInterrupt"
        _caught.clear()
    problems = []
    if fired and outcome != "KeyboardInterrupt":
        problems.append(f"Ctrl-C raised, and the run ended with {outcome}")
        if os.environ.get("KI_SWEEP_TRACEBACKS"):
            import traceback

            traceback.print_exception(error)
    # Whatever the exception's frames hold stays open while it lives.
    del error
    if not fired and outcome != "none":
        problems.append(f"no Ctrl-C, and the run ended with {outcome}")
    pids = _recorded(pid_file)
    alive = {pid: stat[0] for pid in pids if (stat := _stat(pid)) is not None}
    # Recorded pids that still exist: a zombie child of ours shows below;
    # a zombie of init's is dead and gone.
    escaped = {pid: state for pid, state in alive.items() if state not in ("Z", "X")}
    if escaped:
        problems.append(f"recorded pids still running: {escaped}")
    children = _children()
    if children:
        problems.append(f"children of this process left: {children}")
    leaked = sorted(_fds() - before)
    if leaked:
        problems.append(f"fds left open: {leaked}")
    groups = _session_cgroups()
    if groups:
        problems.append(f"session cgroups left: {[g.name for g in groups]}")
    if is_subreaper():
        problems.append("still a child subreaper")
    if problems:
        _clean_up(pids, leaked)
    return {
        "target": target,
        "seen": tracer.seen,
        "fired": fired,
        "where": tracer.where,
        "pids": len(pids),
        "problems": problems,
    }


def main() -> None:
    scenario, containment, targets, frames, workdir = sys.argv[1:6]
    if containment == "auto" and not _SUPPORT.available:
        print(json.dumps({"skip": f"no cgroup here: {_SUPPORT.reason}"}), flush=True)
        return
    # A warm-up run, so that what the first run opens for good (caches,
    # probes) is not taken for a leak.
    one_run(scenario, containment, 0, frames, Path(workdir))
    for word in targets.split(","):
        first, _, last = word.partition("-")
        for target in range(int(first), int(last or first) + 1):
            result = one_run(scenario, containment, target, frames, Path(workdir))
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
