"""Every ```python block in the README and docs/ is a program that must run."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def examples() -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        for number, match in enumerate(BLOCK.finditer(page.read_text()), 1):
            found.append((f"{page.relative_to(ROOT)}#{number}", match.group(1)))
    return found


@pytest.mark.parametrize(("where", "code"), examples(), ids=[w for w, _ in examples()])
def test_example_runs(where: str, code: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, timeout=120, cwd=ROOT
    )
    assert result.returncode == 0, f"{where} failed:\n{result.stderr.decode()}"


def test_examples_pass_mypy_strict(tmp_path: Path) -> None:
    """The examples are written as a strict user must write them.

    One mypy run over all of them (one file each, in a temp dir), with the
    project's cache so that a re-run checks only what changed.
    """
    api = pytest.importorskip("mypy.api")
    for number, (where, code) in enumerate(examples()):
        name = re.sub(r"\W", "_", where)
        (tmp_path / f"ex{number:03d}_{name}.py").write_text(code)
    out, err, status = api.run(
        ["--strict", "--cache-dir", str(ROOT / ".mypy_cache"), str(tmp_path)]
    )
    assert status == 0, f"mypy --strict on the docs' examples:\n{out}{err}"


def test_api_reference_is_current() -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        gen_api = importlib.import_module("gen_api")
    finally:
        sys.path.pop(0)
    assert (ROOT / "docs" / "api.md").read_text() == gen_api.render(), (
        "docs/api.md is stale: run python scripts/gen_api.py"
    )


# Imports everything first: uid 65534 may not read the interpreter's files.
AS_NOBODY = """
import os
from trio_observer import negotiate_capabilities
import trio_observer._linux._connector
os.setgroups([])
os.setgid(65534)
os.setuid(65534)
assert open("/proc/self/status").read().count("CapEff:\\t0000000000000000") == 1
print(negotiate_capabilities().render_summary())
"""


def _process_line(summary: str) -> str:
    return next(line for line in summary.splitlines() if line.startswith("process "))


def test_connector_needs_no_capability_here() -> None:
    """docs/observation.md: on this kernel the connector works as nobody."""
    if sys.platform != "linux" or os.getuid() != 0:
        pytest.skip("needs Linux and root, to drop to uid 65534")
    from trio_observer import negotiate_capabilities

    as_root = _process_line(negotiate_capabilities().render_summary())
    if "proc-connector" not in as_root:
        pytest.skip(f"no process connector here even as root: {as_root}")
    result = subprocess.run(
        [sys.executable, "-c", AS_NOBODY], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    as_nobody = _process_line(result.stdout)
    assert "proc-connector" in as_nobody, f"{os.uname().release}: {as_nobody}"
