"""Write docs/api.md from the docstrings of trio_observer's public names.

Run ``python scripts/gen_api.py``; ``tests/test_docs.py`` fails when the
file is out of date, so the reference cannot drift from the code.
"""

from __future__ import annotations

import enum
import inspect
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import trio_observer  # noqa: E402

OUT = ROOT / "docs" / "api.md"


def _doc(obj: object) -> str:
    return inspect.cleandoc(inspect.getdoc(obj) or "(undocumented)")


def _signature(obj: object) -> str:
    try:
        return str(inspect.signature(obj))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "(...)"


def _members(cls: type) -> list[str]:
    out = []
    for name, member in vars(cls).items():
        if name.startswith("_") and name not in ("__aiter__",):
            continue
        if name == "__aiter__":
            continue
        if isinstance(member, property):
            out.append(f"#### `{cls.__name__}.{name}` (property)\n\n{_doc(member)}\n")
        elif isinstance(member, (staticmethod, classmethod)):
            func = member.__func__
            out.append(f"#### `{cls.__name__}.{name}{_signature(func)}`\n\n{_doc(func)}\n")
        elif inspect.isfunction(member):
            prefix = "async " if inspect.iscoroutinefunction(member) else ""
            out.append(
                f"#### `{prefix}{cls.__name__}.{name}{_signature(member)}`\n\n{_doc(member)}\n"
            )
    return out


def render() -> str:
    parts = [
        "# API reference\n",
        "Generated from the docstrings by `python scripts/gen_api.py`; do not edit.\n",
    ]
    for name in trio_observer.__all__:
        obj = getattr(trio_observer, name)
        if inspect.isclass(obj) and issubclass(obj, enum.Enum):
            values = "\n".join(f"- `{m.name}` = `{m.value!r}`" for m in obj)
            parts.append(f"## `{name}` (enum)\n\n{_doc(obj)}\n\n{values}\n")
        elif inspect.isclass(obj):
            parts.append(f"## `{name}`\n\n{_doc(obj)}\n")
            parts.extend(_members(obj))
        elif callable(obj):
            prefix = "async " if inspect.iscoroutinefunction(obj) else ""
            parts.append(f"## `{prefix}{name}{_signature(obj)}`\n\n{_doc(obj)}\n")
        else:
            parts.append(f"## `{name}`\n\n`{obj!r}`\n")
    return "\n".join(parts)


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT.relative_to(ROOT)}")
