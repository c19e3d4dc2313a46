"""The public face: everything in __all__ exists, is documented and is ours."""

from __future__ import annotations

import inspect

import trio_observer


def test_all_names_exist_and_are_documented() -> None:
    for name in trio_observer.__all__:
        obj = getattr(trio_observer, name)
        assert inspect.getdoc(obj), f"{name} has no docstring"


def test_all_is_complete() -> None:
    public = {
        name
        for name, obj in vars(trio_observer).items()
        if not name.startswith("_") and not inspect.ismodule(obj)
    }
    assert public == set(trio_observer.__all__)


def test_public_classes_say_they_are_public() -> None:
    for name in trio_observer.__all__:
        obj = getattr(trio_observer, name)
        if inspect.isclass(obj):
            assert obj.__module__.startswith("trio_observer._")
            # Shown to users as trio_observer.X, like trio does.
            assert name == obj.__name__
