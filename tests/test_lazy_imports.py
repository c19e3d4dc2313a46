"""What a plain ``trio-observer run`` must not import: the tree observer's parts.

They are imported when a tree category is wanted (or descendants are
tracked), so that the CLI's start-up, and every session nobody observes,
does not pay for them. Checked in a fresh interpreter: this one has them
imported already by other tests.
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
)

# Runs the CLI's main as `python -m trio_observer` does, then reports which
# modules were loaded, on a line of its own after the child's output.
_WRAPPER = """
import json, runpy, sys
sys.argv = ["trio_observer", *sys.argv[1:]]
try:
    runpy.run_module("trio_observer", run_name="__main__", alter_sys=True)
except SystemExit as exc:
    code = exc.code
else:
    code = 0
print("MODULES " + json.dumps(sorted(sys.modules)), flush=True)
sys.exit(code)
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
