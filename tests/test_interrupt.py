"""Signals and KeyboardInterrupt at the worst moments leave nothing behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

PY = sys.executable

# Runs the real CLI, but signals it (SIGTERM/SIGHUP to itself) the moment
# Popen has started CMD: the narrowest window between CMD existing and
# anything else the CLI does. The pid goes to a file first, so the test can
# check CMD is gone afterwards whatever became of the CLI.
_SIGNAL_RIGHT_AFTER_START = """
import os, subprocess, sys
from trio_observer._cli._main import main

pid_file, sig = sys.argv[1], int(sys.argv[2])

class SignalledPopen(subprocess.Popen):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        with open(pid_file, "w") as f:
            f.write(str(self.pid))
        os.kill(os.getpid(), sig)

subprocess.Popen = SignalledPopen
sys.exit(main(["run", "--grace-period", "30", "--", *sys.argv[3:]]))
"""


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except FileNotFoundError:
        return True
    # A zombie is already dead (init reaps it soon); a live one escaped.
    return text[text.rindex(")") + 2] in "ZX"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_right_after_cmd_started_stops_cmd(tmp_path: Path, sig: signal.Signals) -> None:
    pid_file = tmp_path / "cmd.pid"
    cmd = [PY, "-c", "import time; time.sleep(60)"]
    cli = subprocess.run(
        [PY, "-c", _SIGNAL_RIGHT_AFTER_START, str(pid_file), str(int(sig)), *cmd],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        # Not a pipe: an orphaned CMD would hold it open past the CLI.
        stderr=subprocess.DEVNULL,
        timeout=60,
    )
    pid = int(pid_file.read_text())
    try:
        assert _gone(pid), f"CMD {pid} outlived the CLI (exit {cli.returncode})"
        assert cli.returncode == 128 + sig
    finally:
        if not _gone(pid):
            os.kill(pid, signal.SIGKILL)
