"""What the tree observer tests share: an event collector, real children, observing."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from subprocess import PIPE

import trio
import trio.testing

from trio_observer._events import EventCategory, ObserverEvent, ObserverEventKind
from trio_observer._linux._tree import TreeObserver

PY = sys.executable
K = ObserverEventKind
PROCESS = frozenset({EventCategory.PROCESS})
ALL = frozenset({EventCategory.PROCESS, EventCategory.FILE, EventCategory.NETWORK})


class Collector:
    """An ``emit`` that records events and lets a test wait for one."""

    def __init__(self) -> None:
        self.events: list[ObserverEvent] = []
        self._changed = trio.Event()

    async def emit(self, event: ObserverEvent) -> None:
        self.events.append(event)
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    async def wait_for(self, predicate: Callable[[ObserverEvent], bool]) -> ObserverEvent:
        """Wait (bounded by the caller's deadline) for a matching event."""
        while True:
            for event in self.events:
                if predicate(event):
                    return event
            await self._changed.wait()

    def kinds(self, pid: int | None = None, *, execs: bool = False) -> list[ObserverEventKind]:
        """The kinds of the events (of ``pid``), without the execs unless asked.

        A poll sees an exec only if it happened to look before it, so most
        tests leave them out.
        """
        return [
            e.kind
            for e in self.events
            if (pid is None or e.pid == pid) and (execs or e.kind is not K.DESCENDANT_EXEC)
        ]

    def take_files(self) -> list[tuple[ObserverEventKind, int | None, str | None]]:
        """The (kind, fd, path) of the events so far, which are then forgotten."""
        out = [(e.kind, e.fd, e.path) for e in self.events]
        self.events.clear()
        return out


class Child:
    """A real child process driven line by line over its stdin and stdout."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self._buffer = b""

    @property
    def pid(self) -> int:
        return self.process.pid

    async def send(self, line: str) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send_all(line.encode() + b"\n")

    async def receive_line(self) -> str:
        assert self.process.stdout is not None
        while b"\n" not in self._buffer:
            chunk = await self.process.stdout.receive_some()
            assert chunk, "child closed its stdout"
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()


@asynccontextmanager
async def child(script: str) -> AsyncIterator[Child]:
    """Run ``script``; kill and reap it (and close its pipes) on the way out.

    Descendants in these scripts block on a pipe from their parent, so they
    see EOF and exit when their parent dies.
    """
    process = await trio.lowlevel.open_process([PY, "-c", script], stdin=PIPE, stdout=PIPE)
    try:
        yield Child(process)
    finally:
        with trio.CancelScope(shield=True):
            process.kill()
            await process.wait()
            for stream in (process.stdin, process.stdout):
                if stream is not None:
                    await stream.aclose()


@asynccontextmanager
async def observing(observer: TreeObserver) -> AsyncIterator[None]:
    async with trio.open_nursery() as nursery:
        await nursery.start(observer.run)
        yield
        nursery.cancel_scope.cancel()


async def settle() -> None:
    await trio.testing.wait_all_tasks_blocked()


def fake_tree_observer(
    proc_root: str, collector: Collector, *categories: EventCategory, root: int = 100
) -> TreeObserver:
    """A polling observer of ``categories`` over a fake ``/proc``, rooted at ``root``.

    The interval is 1 s on the trio clock: tests drive scans with
    ``mock_clock.jump(1.0)``.
    """
    observer = TreeObserver(
        emit=collector.emit,
        categories=frozenset(categories),
        proc_root=proc_root,
        poll_interval=1.0,
    )
    observer.add_root(root)
    return observer
