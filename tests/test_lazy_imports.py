"""What ``import trio_observer`` and a plain ``trio-observer run`` must not import.

The tree observer's parts are imported when a tree category is wanted (or
descendants are tracked); the daemon, OpenTelemetry export, expect, output
cursors and tees, the terminal code and the capability probes when
something uses them. So the
CLI's start-up, and every session nobody observes, does not pay for them.
Checked in a fresh interpreter: this one has them imported already by other
tests.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

_HEAVY = (
    "trio_observer._linux._connector",
    "trio_observer._linux._nettables",
    "trio_observer._linux._descriptors",
    "trio_observer._linux._tree_members",
    "trio_observer._linux._tree_members_state",
    "trio_observer._linux._tree_members_scan",
    "trio_observer._linux._tree_members_orphans",
    "trio_observer._linux._tree_members_records",
)

# Not needed to run a command in a session and write its LIFECYCLE events.
_UNNEEDED = (
    *_HEAVY,
    "trio_observer._otel",
    "trio_observer._otel_records",
    "trio_observer._daemon",
    "trio_observer._daemon._client",
    "trio_observer._daemon._server",
    "trio_observer._expect",
    "trio_observer._cursor",
    "trio_observer._lines",
    "trio_observer._tee",
    "trio_observer._capabilities",
    "trio_observer._terminal",
    "trio_observer._cli._daemon",
    "trio_observer._cli._attach",
    "trio_observer._cli._client_cmds",
    "trio_observer._cli._capabilities",
    "uuid",
)

# Runs the CLI as `python -m trio_observer` does, then reports which modules
# were loaded, on a line of its own after the child's output: from an atexit
# handler, because the program ends with os._exit (after running them).
_WRAPPER = """
import atexit, json, runpy, sys
atexit.register(lambda: print("MODULES " + json.dumps(sorted(sys.modules)), flush=True))
sys.argv = ["trio_observer", *sys.argv[1:]]
runpy.run_module("trio_observer", run_name="__main__", alter_sys=True)
"""


def _modules_after(*args: str) -> set[str]:
    result = subprocess.run(
        [sys.executable, "-c", _WRAPPER, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    line = next(x for x in result.stdout.splitlines() if x.startswith("MODULES "))
    return set(json.loads(line.removeprefix("MODULES ")))


def test_plain_run_does_not_import_the_tree_parts() -> None:
    loaded = _modules_after("run", "--", sys.executable, "-c", "pass")
    assert "trio_observer._session" in loaded  # it did run a session
    assert not loaded.intersection(_HEAVY), sorted(loaded.intersection(_HEAVY))


def test_plain_run_imports_only_what_it_uses() -> None:
    loaded = _modules_after("run", "--", sys.executable, "-c", "pass")
    assert "trio_observer._cli._run" in loaded
    assert not loaded.intersection(_UNNEEDED), sorted(loaded.intersection(_UNNEEDED))


def test_import_trio_observer_imports_none_of_its_modules() -> None:
    code = (
        "import json, sys\n"
        "import trio_observer\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('trio_observer'))))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert json.loads(result.stdout) == ["trio_observer"]


def test_a_public_name_imports_its_module_on_first_use() -> None:
    # The other side of the test above: the names still work, each one
    # importing what it needs (here the daemon client, and not OTel).
    code = (
        "import json, sys\n"
        "import trio_observer\n"
        "assert trio_observer.DaemonClient.__name__ == 'DaemonClient'\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    loaded = set(json.loads(result.stdout))
    assert "trio_observer._daemon._client" in loaded
    assert "trio_observer._otel" not in loaded


@pytest.mark.parametrize(
    ("args", "module"),
    [
        (("capabilities",), "trio_observer._cli._capabilities"),
        (("daemon", "--help"), "trio_observer._cli._daemon"),
        (("--help",), "trio_observer._cli._attach"),
    ],
)
def test_the_cli_imports_the_subcommand_it_runs(args: tuple[str, ...], module: str) -> None:
    assert module in _modules_after(*args)


def test_a_tree_category_imports_them() -> None:
    # The other side: asking for PROCESS events does load the parts (and a
    # working observer needs them), so the test above is not vacuous.
    from trio_observer import UnsupportedCategoryError, negotiate_capabilities
    from trio_observer._events import EventCategory

    try:
        negotiate_capabilities().require(EventCategory.PROCESS)
    except UnsupportedCategoryError as exc:
        pytest.skip(f"this machine cannot observe PROCESS events: {exc}")
    loaded = _modules_after(
        "run", "--category", "process", "--events", "/dev/null", "--", sys.executable, "-c", "pass"
    )
    assert "trio_observer._linux._tree_members" in loaded
