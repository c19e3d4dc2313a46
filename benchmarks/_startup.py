"""Section ``startup``: ``trio-observer run -- /bin/true`` against a bare trio program.

Ours is ``trio-observer run -- true``, the console script ``pip install``
puts on ``PATH`` (the target row), and ``python -m trio_observer run --
true``, which also goes through ``runpy``: the CLI imports, starts a
session, runs ``true`` in it, reaps it and writes its events. The
alternative is the smallest trio program a user would write to do the
same, ``python -c "import trio; trio.run(...)"`` starting and reaping
``true`` with ``trio.run_process``. Both are whole interpreter launches,
timed from outside, interleaved round by round; the verdict is the median
of the rounds and the spread is the range of the per-round ratios.

Two info rows show where the time goes: the console script's work run
as ``sys.exit(main())``, so that the interpreter tears every module down
before it exits (the program skips that, see ``_cli.program``), and
``python -m`` with ``--containment process-group`` (no cgroup: what the
default containment costs at start-up).

The compiled rows byte-compile trio_observer first, as pip does when it
installs the wheel. The last row runs both with ``-B`` and ``PYTHONDONTWRITEBYTECODE`` from a
fresh ``PYTHONPYCACHEPREFIX``, so nothing is read from or written to a
``.pyc`` cache: what an install that was never byte-compiled costs on every
launch.
"""

from __future__ import annotations

import compileall
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import trio_observer

from ._core import REPO_ROOT, Config, Report, Target, interleave, median, time_row

TRUE = shutil.which("true") or "/bin/true"

BARE = (
    "import trio, sys\n"
    "async def main():\n"
    "    await trio.run_process([sys.argv[1]])\n"
    "trio.run(main)\n"
)


def _launcher(argv: list[str], env: dict[str, str]) -> Callable[[], float]:
    def launch() -> float:
        start = time.perf_counter()
        subprocess.run(
            argv, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        return time.perf_counter() - start

    return launch


def run(config: Config) -> Report:
    """Measure start-up of the CLI and of a bare trio program; see the module docstring."""
    rounds = config.pick(21, 3)
    report = Report()
    # The checkout first on every side's path (for the console script it
    # would otherwise be whatever the venv has installed).
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    ours = [sys.executable, "-m", "trio_observer", "run", "--", TRUE]
    bare = [sys.executable, "-c", BARE, TRUE]
    # What `pip install` puts on PATH (project.scripts), run by this
    # interpreter: unlike `python -m`, it does not go through runpy.
    script = Path(sys.executable).with_name("trio-observer")
    console = [sys.executable, str(script), "run", "--", TRUE] if script.exists() else None
    # Compiled as pip compiles a wheel it installs (every module, checked
    # with `pip install --target`): otherwise an edited checkout, under
    # PYTHONDONTWRITEBYTECODE, would have its changed modules compiled on
    # every launch, and the first row would time the compiler. Trio's own
    # modules were compiled when pip installed it.
    compileall.compile_dir(str(Path(trio_observer.__file__).parent), quiet=1)
    # Info rows, from the same rounds: the console script's work with the
    # interpreter's own exit (``sys.exit(main())``, as before the program
    # skipped the teardown), and with containment by process groups (what the
    # default cgroup costs: the session cgroup, the child's move, the rmdir).
    interpreter_exit = [
        sys.executable,
        "-c",
        "import sys; from trio_observer._cli import main; sys.exit(main())",
        "run",
        "--",
        TRUE,
    ]
    process_group = [*ours[:4], "--containment", "process-group", "--", TRUE]
    # One launch each first, so the file caches are warm for the first row.
    trials = {"ours": ours, "bare": bare, "exit": interpreter_exit, "pg": process_group}
    if console is not None:
        trials["console"] = console
    for argv in trials.values():
        subprocess.run(
            argv, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
    samples = interleave({name: _launcher(argv, env) for name, argv in trials.items()}, rounds)
    if console is not None:
        report.rows.append(
            time_row(
                "trio-observer run -- true (console script), compiled",
                median(samples["console"]),
                median(samples["bare"]),
                Target("<=", 1.15),
            )
        )
    report.rows.append(
        time_row(
            "python -m trio_observer run -- true, compiled",
            median(samples["ours"]),
            median(samples["bare"]),
            None if console is not None else Target("<=", 1.15),
        )
    )
    report.rows.append(
        time_row(
            "run -- true as sys.exit(main()): the interpreter's teardown",
            median(samples["exit"]),
            median(samples["bare"]),
        )
    )
    report.rows.append(
        time_row(
            "python -m trio_observer run, process-group containment",
            median(samples["pg"]),
            median(samples["bare"]),
        )
    )
    with tempfile.TemporaryDirectory() as cache:
        cold = dict(env, PYTHONDONTWRITEBYTECODE="1", PYTHONPYCACHEPREFIX=cache)
        samples = interleave(
            {
                "ours": _launcher([sys.executable, "-B", *ours[1:]], cold),
                "bare": _launcher([sys.executable, "-B", *bare[1:]], cold),
            },
            rounds,
        )
    report.rows.append(
        time_row(
            "python -m trio_observer run -- true, no .pyc at all",
            median(samples["ours"]),
            median(samples["bare"]),
        )
    )
    report.notes.append(
        "whole interpreter launches timed from outside; ours = the console script (the "
        "target) and python -m trio_observer run -- true; alternative = python -c 'import "
        "trio; trio.run(...)' running true with trio.run_process"
    )
    report.notes.append(
        "sys.exit: the console script's work run as python -c 'sys.exit(main())', so the "
        "interpreter frees every module before exiting (the program itself ends with os._exit "
        "after atexit handlers and flushes); process-group: no cgroup (the other rows use "
        "the default, containment auto, a cgroup here)"
    )
    report.notes.append(
        "compiled = trio_observer byte-compiled first, as pip does on install; no .pyc = "
        "an empty PYTHONPYCACHEPREFIX and -B: both sides compile everything on every launch"
    )
    return report
