"""The command line, run as a real subprocess the way a user runs it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import PY

CLI = [sys.executable, "-m", "trio_observer"]


def run_cli(
    *args: str, timeout: float = 60, **kwargs: object
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*CLI, *args], capture_output=True, timeout=timeout, **kwargs)  # type: ignore[call-overload, no-any-return]


def read_events(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_run_passes_output_through_and_mirrors_the_exit_status(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    script = "import sys; print('out'); print('err', file=sys.stderr); sys.exit(4)"
    result = run_cli("run", "--events", str(events), "--", PY, "-c", script)
    assert result.returncode == 4
    assert result.stdout == b"out\n"
    assert result.stderr == b"err\n"
    started, exited = read_events(events)
    assert started["kind"] == "started"
    assert started["category"] == "lifecycle"
    assert started["argv"] == [PY, "-c", script]
    assert exited["kind"] == "exited"
    assert exited["exit_code"] == 4
    assert exited["pid"] == started["pid"]
    for event in (started, exited):
        assert {"category", "kind", "pid", "ppid", "timestamp_ms", "exit_code"} <= event.keys()


def test_events_go_to_stderr_by_default() -> None:
    result = run_cli("run", "--", PY, "-c", "pass")
    assert result.returncode == 0
    kinds = [json.loads(line)["kind"] for line in result.stderr.splitlines()]
    assert kinds == ["started", "exited"]


def test_stdin_is_passed_through() -> None:
    result = run_cli(
        "run", "--", PY, "-c", "import sys; print(sys.stdin.read()[::-1])", input=b"abc"
    )
    assert result.stdout == b"cba\n"


def test_signal_death_is_128_plus_the_signal() -> None:
    result = run_cli("run", "--", PY, "-c", "import os; os.kill(os.getpid(), 9)")
    assert result.returncode == 128 + signal.SIGKILL


def test_missing_program_is_one_line_and_non_zero() -> None:
    result = run_cli("run", "--", "no-such-program-xyz")
    assert result.returncode == 127
    assert result.stderr == b"trio-observer: command not found: no-such-program-xyz\n"


def test_unknown_category_names_the_allowed_ones() -> None:
    result = run_cli("run", "--category", "lifecycle,disk", "--", PY, "-c", "pass")
    assert result.returncode == 2
    assert b"unknown category 'disk'" in result.stderr
    assert b"lifecycle, process, file, network" in result.stderr


def test_no_command() -> None:
    result = run_cli("run")
    assert result.returncode == 2
    assert b"no command given" in result.stderr


def test_help() -> None:
    result = run_cli("run", "--help")
    assert result.returncode == 0
    assert b"--events FILE" in result.stdout
    assert b"JSON Lines" in result.stdout


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_stop_signal_to_the_cli_stops_the_tree(tmp_path: Path, sig: signal.Signals) -> None:
    events = tmp_path / "events.jsonl"
    script = (
        "import subprocess, sys, time\n"
        "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(1000)'],"
        " start_new_session=True)\n"
        "print(g.pid, flush=True)\n"
        "time.sleep(1000)\n"
    )
    cli = subprocess.Popen(
        [*CLI, "run", "--events", str(events), "--", PY, "-c", script],
        stdout=subprocess.PIPE,
    )
    try:
        assert cli.stdout is not None
        grandchild = int(cli.stdout.readline())
        cli.send_signal(sig)
        assert cli.wait(timeout=60) == 128 + sig
    finally:
        cli.kill()
        cli.wait()
        if cli.stdout is not None:
            cli.stdout.close()
    assert not os.path.exists(f"/proc/{grandchild}")
    kinds = [e["kind"] for e in read_events(events)]
    assert kinds == ["started", "exited"]


@pytest.mark.parametrize("entry", [["trio-observer"], CLI])
def test_entry_points(entry: list[str]) -> None:
    if entry == ["trio-observer"]:
        exe = Path(sys.executable).with_name("trio-observer")
        if not exe.exists():
            pytest.skip("the console script is installed only by pip install")
        entry = [str(exe)]
    result = subprocess.run([*entry, "--help"], capture_output=True, timeout=60)
    assert result.returncode == 0
    assert b"run" in result.stdout


def test_capabilities_command() -> None:
    result = run_cli("capabilities")
    assert result.returncode == 0
    lines = result.stdout.decode().splitlines()
    assert lines[0] == "scope: launched-process-tree"
    assert [line.split()[0] for line in lines[2:-2]] == ["lifecycle", "process", "file", "network"]
    assert lines[-2].startswith("containment: ")
    assert lines[-1].startswith("limits: ")


def test_process_category_reports_descendants(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    script = "import subprocess, sys; subprocess.run([sys.executable, '-c', 'pass'])"
    result = run_cli(
        "run", "--events", str(events), "--category", "lifecycle,process", "--", PY, "-c", script
    )
    assert result.returncode == 0
    seen = read_events(events)
    root = seen[0]["pid"]
    descendants = [e for e in seen if e["kind"] == "descendant-started"]
    assert any(e["ppid"] == root for e in descendants)
    assert [e["kind"] for e in seen if e["category"] == "lifecycle"] == ["started", "exited"]


def test_pty_mode_with_piped_input() -> None:
    script = "import os; print(os.isatty(0), os.isatty(1), input()[::-1])"
    result = run_cli("run", "--pty", "--", PY, "-c", script, input=b"hello\n")
    assert result.returncode == 0
    assert b"True True olleh" in result.stdout


def test_unavailable_category_is_one_clear_line(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    # A machine without /proc, simulated by pointing the probe elsewhere.
    from trio_observer import TraceScope, _capabilities, _cli

    real = _capabilities.negotiate_capabilities

    def without_proc(scope: TraceScope = TraceScope.LAUNCHED_PROCESS_TREE) -> object:
        return real(scope, proc_root="/nonexistent")

    # In the module itself: `run` imports it only when a tree category is asked for.
    monkeypatch.setattr(_capabilities, "negotiate_capabilities", without_proc)
    assert _cli.main(["run", "--category", "lifecycle,file", "--", PY, "-c", "pass"]) == 2
    err = capfd.readouterr().err
    assert err.startswith("trio-observer: cannot observe 'file' events here:")
    assert err.count("\n") == 1


def test_bad_grace_period() -> None:
    result = run_cli("run", "--grace-period", "-1", "--", PY, "-c", "pass")
    assert result.returncode == 2
    assert b"'-1' is not a number of seconds >= 0" in result.stderr


def test_help_says_events_are_appended() -> None:
    assert b"append events to FILE" in run_cli("run", "--help").stdout


def test_events_file_is_appended_to(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    events.write_text('{"earlier": true}\n')
    assert run_cli("run", "--events", str(events), "--", PY, "-c", "pass").returncode == 0
    first, *rest = read_events(events)
    assert first == {"earlier": True}
    assert [e["kind"] for e in rest] == ["started", "exited"]


def test_a_full_events_file_does_not_kill_the_command() -> None:
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this machine")
    script = "import sys; print('ran'); sys.exit(3)"
    result = run_cli("run", "--events", "/dev/full", "--", PY, "-c", script)
    assert result.returncode == 3
    assert result.stdout == b"ran\n"
    lines = result.stderr.decode().splitlines()
    assert lines == [
        "trio-observer: cannot write events to '/dev/full': No space left on device; "
        "counting them as lost from here on",
        "trio-observer: 2 event(s) could not be written to '/dev/full'",
    ]


def test_a_closed_stderr_pipe_does_not_kill_the_command(tmp_path: Path) -> None:
    # The events go to stderr, whose reader is gone (as with `2>&1 | head`):
    # CMD still runs to its end and its exit status is kept.
    marker = tmp_path / "marker"
    script = f"import sys, pathlib; pathlib.Path({str(marker)!r}).write_text('ran'); sys.exit(5)"
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run([*CLI, "run", "--", PY, "-c", script], stderr=write_end, timeout=60)
    finally:
        os.close(write_end)
    assert result.returncode == 5
    assert marker.read_text() == "ran"


@pytest.mark.parametrize(
    ("argv", "usage"),
    [
        (["--bogus"], b"usage: trio-observer [-h] COMMAND"),
        (["run", "--bogus", "--", "true"], b"usage: trio-observer run [-h]"),
        (["capabilities", "--bogus"], b"usage: trio-observer capabilities [-h]"),
    ],
)
def test_unknown_options_name_themselves(argv: list[str], usage: bytes) -> None:
    result = run_cli(*argv)
    assert result.returncode == 2
    assert result.stderr.startswith(usage)
    assert b"unrecognized arguments: --bogus" in result.stderr
    assert b"required" not in result.stderr


@pytest.mark.parametrize(
    ("program", "script", "printed"),
    [
        (["python3", "-i", "-q"], b"print(1+1)\n", b"2\r\n"),
        ([sys.executable, "-i", "-q"], b"print(1+1)\n", b"2\r\n"),
        (["bash", "--norc", "-i"], b"echo $((40+2))\n", b"42\r\n"),
    ],
)
def test_piped_input_to_a_readline_program_on_a_pty_ends(
    program: list[str], script: bytes, printed: bytes
) -> None:
    # The old copier typed one VEOF at once; a readline program read it in
    # canonical mode before its prompt and then waited at the prompt for ever.
    import shutil

    if shutil.which(program[0]) is None:
        pytest.skip(f"{program[0]} is not installed")
    env = {**os.environ, "TERM": "xterm", "INPUTRC": "/dev/null"}
    result = run_cli(
        "run", "--pty", "--events", os.devnull, "--", *program, input=script, env=env, timeout=15
    )
    assert printed in result.stdout
    assert result.returncode == 0


# `python -m trio_observer ARGS...` run from a script that first sets up what
# the exit must (or need not) take care of.
_AS_PROGRAM = """
import runpy, sys
sys.argv = ["trio_observer", *sys.argv[1:]]
runpy.run_module("trio_observer", run_name="__main__", alter_sys=True)
"""


def _as_program(setup: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    # Without PYTHONUNBUFFERED (set on this machine), so that stdout is block
    # buffered on a pipe and an exit that did not flush it would lose the line.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    return subprocess.run(
        [PY, "-c", setup + _AS_PROGRAM, *args], capture_output=True, timeout=60, env=env
    )


def test_the_program_exits_without_the_interpreters_teardown() -> None:
    # Exiting is what a normal exit does that anyone could notice (atexit
    # handlers, flushed streams, the status), without freeing every object
    # of every module first: a finalizer of a module's global never runs.
    setup = (
        "import atexit, os\n"
        "class TornDown:\n"
        "    def __del__(self, write=os.write):\n"
        "        write(2, b'torn down')\n"
        "kept = TornDown()\n"
        "atexit.register(print, 'atexit ran')\n"
        "print('buffered')\n"
    )
    result = _as_program(setup, "run", "--events", os.devnull, "--", PY, "-c", "exit(3)")
    assert result.returncode == 3
    assert result.stdout == b"buffered\natexit ran\n"
    assert b"torn down" not in result.stderr


def test_the_program_waits_for_a_non_daemon_thread() -> None:
    # The interpreter's exit lets such a thread finish; the fast exit must
    # not cut it off. This one finishes only once the main thread has.
    setup = (
        "import threading\n"
        "def after_main():\n"
        "    threading.main_thread().join()\n"
        "    print('thread finished', flush=True)\n"
        "threading.Thread(target=after_main).start()\n"
    )
    result = _as_program(setup, "run", "--events", os.devnull, "--", PY, "-c", "pass")
    assert result.returncode == 0
    assert result.stdout == b"thread finished\n"


def test_a_closed_stdout_is_reported_as_the_interpreter_would() -> None:
    # The fast exit cannot flush it, so the normal exit does, and says so.
    setup = "print('lost')\n"
    read_end, write_end = os.pipe()
    os.close(read_end)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    try:
        result = subprocess.run(
            [PY, "-c", setup + _AS_PROGRAM, "run", "--events", os.devnull, "--", PY, "-c", "pass"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            timeout=60,
            env=env,
        )
    finally:
        os.close(write_end)
    assert result.returncode == 120
    assert b"BrokenPipeError" in result.stderr
