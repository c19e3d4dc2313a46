"""Every ```python block in the README and docs/ is a program that must run."""

from __future__ import annotations

import importlib
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


def test_api_reference_is_current() -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        gen_api = importlib.import_module("gen_api")
    finally:
        sys.path.pop(0)
    assert (ROOT / "docs" / "api.md").read_text() == gen_api.render(), (
        "docs/api.md is stale: run python scripts/gen_api.py"
    )
