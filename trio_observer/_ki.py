"""Context managers whose enter and exit a Ctrl-C cannot split.

trio raises KeyboardInterrupt at whatever instruction unprotected code is
running; in the frames of an ``asynccontextmanager`` that is between
acquiring a resource and the ``try`` that releases it, or after the
generator yielded but before the ``async with`` block was entered. See
``docs/design.md`` ("Ctrl-C").
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from types import TracebackType
from typing import ParamSpec, TypeVar, final

import trio

_P = ParamSpec("_P")
_T = TypeVar("_T")


@final
class _ProtectedContext(AbstractAsyncContextManager[_T]):
    """An ``asynccontextmanager``'s context, entered and exited under KI protection."""

    __slots__ = ("_context",)

    def __init__(self, context: AbstractAsyncContextManager[_T]) -> None:
        self._context = context

    # contextlib's __aenter__ and __aexit__ run our generator: a
    # KeyboardInterrupt in their frames, after the generator yielded or
    # before it is resumed, would leave what the generator holds behind (a
    # session's nursery open, its cgroup and processes; a registry's
    # sink). Called from here, their frames are protected too.
    @trio.lowlevel.enable_ki_protection
    async def __aenter__(self) -> _T:
        return await self._context.__aenter__()

    @trio.lowlevel.enable_ki_protection
    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool | None:
        return await self._context.__aexit__(exc_type, exc, traceback)


def ki_protected_context(
    function: Callable[_P, AsyncIterator[_T]],
) -> Callable[_P, AbstractAsyncContextManager[_T]]:
    """``asynccontextmanager`` with the generator, its enter and its exit protected.

    Trio raises KeyboardInterrupt at any instruction of unprotected code;
    protected, it comes at the next checkpoint, where the generator's
    ``try``/``finally`` blocks handle it like any other exception. The
    caller's block itself stays unprotected: it is the user's code.
    """
    make = asynccontextmanager(trio.lowlevel.enable_ki_protection(function))

    @functools.wraps(function)
    def protected(*args: _P.args, **kwargs: _P.kwargs) -> AbstractAsyncContextManager[_T]:
        return _ProtectedContext(make(*args, **kwargs))

    return protected
