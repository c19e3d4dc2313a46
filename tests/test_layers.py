"""Dependencies point one way (docs/design.md): nothing lower imports higher.

Imports under ``if TYPE_CHECKING:`` are not counted: they cost nothing at
run time and exist only to name types.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "trio_observer"

# Lower numbers are lower layers. Same-layer imports are allowed.
LAYERS = {
    "_events": 0,
    "_checks": 0,
    "_grace": 0,
    "_sink": 1,
    "_pty": 1,
    "_spawn": 1,
    "_linux": 1,
    "_subscription": 2,
    "_cursor": 2,
    "_lines": 2,
    "_expect": 2,
    "_tee": 2,
    "_output": 2,
    "_terminal": 2,
    "_capabilities": 2,
    "_registry": 3,
    "_process": 4,
    "_start_args": 4,
    "_session": 5,
    "_run_process": 5,
    "_otel": 6,
    "_daemon": 6,
    "_cli": 7,
    "__main__": 8,
    "pytest_plugin": 8,
    "__init__": 8,
}


def layer_of(module: str) -> int:
    """``_linux._tree`` and ``_linux`` are one layer."""
    return LAYERS[module.split(".")[0]]


def runtime_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    type_checking_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in ast.walk(node):
                type_checking_only.add(id(child))
    found = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.ImportFrom)
            and node.level > 0
            and id(node) not in type_checking_only
        ):
            here = path.relative_to(PACKAGE).with_suffix("").parts
            base = list(here[: len(here) - node.level])
            target = ".".join([*base, node.module] if node.module else base)
            if target:
                found.add(target)
            else:  # "from . import x": the names are modules
                found.update(alias.name for alias in node.names)
    return found


def test_every_module_has_a_layer() -> None:
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        assert module.split(".")[0] in LAYERS, f"{module} is not in LAYERS"


def test_no_module_imports_a_higher_layer() -> None:
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        for target in runtime_imports(path):
            if layer_of(target) > layer_of(module):
                wrong.append(f"{module} imports {target}")
    assert wrong == []
