"""The public face: everything in __all__ exists, is documented and is ours."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

import trio_observer


def test_all_names_exist_and_are_documented() -> None:
    for name in trio_observer.__all__:
        obj = getattr(trio_observer, name)
        assert inspect.getdoc(obj), f"{name} has no docstring"


def test_all_is_complete() -> None:
    # dir(), not vars(): the public names are imported on first use, so
    # the module's dict holds only those used so far.
    public = {
        name
        for name in dir(trio_observer)
        if not name.startswith("_") and not inspect.ismodule(getattr(trio_observer, name))
    }
    assert public == set(trio_observer.__all__)


def test_type_checkers_see_what_is_imported_at_run_time() -> None:
    # The imports mypy reads (under TYPE_CHECKING) and the table the module
    # __getattr__ imports from must name the same objects.
    tree = ast.parse(Path(trio_observer.__file__).read_text())
    seen = {}
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for stmt in node.body:
                if isinstance(stmt, ast.ImportFrom):
                    for alias in stmt.names:
                        assert alias.asname == alias.name, "re-export as `X as X`"
                        seen[alias.name] = "." * stmt.level + (stmt.module or "")
    assert seen
    assert seen == trio_observer._MODULE_OF
    assert set(seen) == set(trio_observer.__all__)


def test_unknown_names_are_attribute_errors() -> None:
    with pytest.raises(AttributeError, match="no_such_name"):
        trio_observer.no_such_name  # type: ignore[attr-defined]  # noqa: B018


def test_star_import_and_from_import_work_in_a_fresh_interpreter() -> None:
    # This interpreter has every module imported by other tests already.
    code = (
        "import trio_observer\n"
        "ns = {}\n"
        "exec('from trio_observer import *', ns)\n"
        "missing = set(trio_observer.__all__) - set(ns)\n"
        "assert not missing, missing\n"
        "from trio_observer import open_session, Session\n"
        "assert trio_observer.open_session is open_session\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_public_classes_say_they_are_public() -> None:
    for name in trio_observer.__all__:
        obj = getattr(trio_observer, name)
        if inspect.isclass(obj):
            assert obj.__module__.startswith("trio_observer._")
            # Shown to users as trio_observer.X, like trio does.
            assert name == obj.__name__
