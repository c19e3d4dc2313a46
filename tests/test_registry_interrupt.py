"""Tests for the observer registry (_registry): a Ctrl-C at any instruction leaves counts exact.

A tracer raises a real SIGINT at the n-th bytecode instruction executed in
the registry's and the sink's own frames, for every n in turn, so the
``KeyboardInterrupt`` lands at every point of the delivery routines in
turn (between a ``send_nowait`` that put the event in a channel and the
counter that records it, among others). Wherever it lands, once it has
surfaced no event may sit in a channel uncounted, and every event must be
accounted for by all its sinks or by none (one the interrupt stopped before
it began).
"""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Awaitable, Callable
from types import FrameType
from typing import Any

import pytest
import trio

import trio_observer._registry
import trio_observer._sink
import trio_observer._subscription
from tests.registry_helpers import BLOCK, DROP, FILE, LIFECYCLE, ev
from trio_observer import ObserverEvent, ObserverRegistry

# The code objects' file names, as the tracer sees them.
_OURS = frozenset(
    function.__code__.co_filename
    for function in (trio_observer._registry._offer_run, trio_observer._sink.check_backpressure)
)


class _CtrlCAt:
    """A tracer that raises SIGINT at one instruction of our frames."""

    def __init__(self, target: int, files: frozenset[str] = _OURS) -> None:
        self.target = target
        self.files = files
        self.seen = 0

    def __call__(self, frame: FrameType, event: str, arg: Any) -> Any:
        if event != "call" or frame.f_code.co_filename not in self.files:
            return None
        frame.f_trace_lines = False
        frame.f_trace_opcodes = True
        return self._local

    def _local(self, frame: FrameType, event: str, arg: Any) -> Any:
        if event == "opcode":
            self.seen += 1
            if self.seen == self.target:
                # Runs trio's handler now, in this frame: unprotected code
                # gets KeyboardInterrupt here, protected code has it
                # delivered at the next checkpoint.
                signal.raise_signal(signal.SIGINT)
        return self._local


def _sinks(registry: ObserverRegistry) -> list[tuple[Any, trio.MemoryReceiveChannel[Any], int]]:
    """One sink of every kind the routes tell apart, with what each holds."""
    made = []
    for categories, capacity, policy, prefill in [
        ([LIFECYCLE, FILE], 8, DROP, 0),  # plain route, room
        ([LIFECYCLE, FILE], 1, DROP, 1),  # plain route, full
        ([LIFECYCLE, FILE], 8, BLOCK, 0),  # general route, room
    ]:
        sink_id, receiver = registry.add_channel(categories, capacity, policy)
        for pid in range(prefill):
            registry._sinks[sink_id].send_channel.send_nowait(ev(-1 - pid))
        made.append((sink_id, receiver, prefill))
    # General route, receiver gone (found disconnected on the first send).
    sink_id, receiver = registry.add_channel([LIFECYCLE, FILE], 8, DROP)
    receiver.close()
    made.append((sink_id, receiver, 0))
    return made


def _held(receiver: trio.MemoryReceiveChannel[Any]) -> int:
    held = 0
    while True:
        try:
            receiver.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            return held
        held += 1


def _interrupt_everywhere(
    emit: Callable[[ObserverRegistry, list[ObserverEvent]], Awaitable[None]],
) -> int:
    """Run ``emit`` with a Ctrl-C at each instruction in turn; check counts.

    Returns how many instructions there were.
    """
    batch = [ev(1), ev(2, FILE)]

    async def main() -> int:
        target = 1
        while True:
            registry = ObserverRegistry()
            sinks = _sinks(registry)
            tracer = _CtrlCAt(target)
            try:
                sys.settrace(tracer)
                try:
                    await emit(registry, batch)
                finally:
                    sys.settrace(None)
                # Where a protected emit's KeyboardInterrupt is delivered.
                await trio.lowlevel.checkpoint()
            except KeyboardInterrupt:
                interrupted = True
            else:
                interrupted = False
            assert interrupted == (tracer.seen >= target), target
            accounted = set()
            for sink_id, receiver, prefill in sinks:
                counted = registry.status(sink_id)
                assert counted is not None
                where = f"Ctrl-C at instruction {target}: {counted}"
                # No event sits in a channel uncounted...
                assert _held(receiver) - prefill == counted.delivered_events, where
                accounted.add(counted.delivered_events + counted.missed_events)
            # ...and none is counted by some sinks and not by others (every
            # sink wants both categories).
            assert len(accounted) == 1, f"Ctrl-C at instruction {target}: {accounted}"
            if not interrupted:
                return target - 1
            target += 1

    return trio.run(main)


async def _emit_each(registry: ObserverRegistry, batch: list[ObserverEvent]) -> None:
    for event in batch:
        await registry.emit(event)


async def _emit_nowait_each(registry: ObserverRegistry, batch: list[ObserverEvent]) -> None:
    for event in batch:
        registry.emit_nowait(event)


async def _emit_many(registry: ObserverRegistry, batch: list[ObserverEvent]) -> None:
    await registry.emit_many(batch)


@pytest.mark.parametrize("emit", [_emit_each, _emit_nowait_each, _emit_many])
def test_ctrl_c_anywhere_in_an_emit_leaves_every_count_exact(
    emit: Callable[[ObserverRegistry, list[ObserverEvent]], Awaitable[None]],
) -> None:
    instructions = _interrupt_everywhere(emit)
    # The sweep did reach into the delivery routines.
    assert instructions > 50


def test_ctrl_c_anywhere_in_add_channel_leaves_no_sink_unrouted() -> None:
    # A sink registered but left out of the routes would be skipped by every
    # later emit without a count.
    async def main() -> int:
        target = 1
        while True:
            registry = ObserverRegistry()
            registry.add_channel([LIFECYCLE], 8, DROP)
            tracer = _CtrlCAt(target)
            try:
                sys.settrace(tracer)
                try:
                    registry.add_channel([LIFECYCLE, FILE], 8, BLOCK)
                finally:
                    sys.settrace(None)
                await trio.lowlevel.checkpoint()
            except KeyboardInterrupt:
                interrupted = True
            else:
                interrupted = False
            registry.emit_nowait(ev(1))
            for sink in registry._sinks.values():
                status = sink.status()
                assert status.delivered_events + status.missed_events == 1, target
            if not interrupted:
                return target - 1
            target += 1

    assert trio.run(main) > 20


def test_ctrl_c_anywhere_in_entering_or_leaving_subscribe_leaves_no_sink() -> None:
    # Raised after the sink was registered but before the block was entered
    # (in the generator before its try, in Subscription(), or in contextlib's
    # __aenter__ after the generator yielded), the sink stayed registered
    # with nobody holding its receiver: a BLOCK sink then stalled every
    # later emit of its categories for good.
    counted = _OURS | {
        trio_observer._subscription.Subscription.__init__.__code__.co_filename,
        contextlib.__file__,
    }

    async def main() -> int:
        target = 1
        while True:
            registry = ObserverRegistry()
            tracer = _CtrlCAt(target, counted)
            try:
                sys.settrace(tracer)
                try:
                    async with registry.subscribe([LIFECYCLE], backpressure=BLOCK):
                        pass
                finally:
                    sys.settrace(None)
                await trio.lowlevel.checkpoint()
            except KeyboardInterrupt:
                interrupted = True
            else:
                interrupted = False
            assert interrupted == (tracer.seen >= target), target
            assert registry._sinks == {}, f"Ctrl-C at instruction {target}: a sink was left"
            if not interrupted:
                return target - 1
            target += 1

    assert trio.run(main) > 20
