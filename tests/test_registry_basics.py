"""Tests for the observer registry (_registry): routing, ids and argument checks."""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any

import pytest
import trio
import trio.testing

from tests.registry_helpers import (
    BLOCK,
    DROP,
    FILE,
    LIFECYCLE,
    PROCESS,
    drain,
    ev,
    snapshot,
    status,
)
from trio_observer import (
    EventGrade,
    ObserverEvent,
    ObserverRegistry,
    ObserverSinkStatus,
    ObserverSubscriberId,
    ResourceUsage,
    TerminationOutcome,
)
from trio_observer._events import ObserverEventKind, lifecycle_event

# -- carried over from the reference ------------------------------------------


async def test_only_matching_sinks_receive() -> None:
    registry = ObserverRegistry()
    _, lifecycle_rx = registry.add_channel([LIFECYCLE], 4, BLOCK)
    _, file_rx = registry.add_channel([FILE], 4, BLOCK)

    await registry.emit(ev(101, LIFECYCLE))
    received = lifecycle_rx.receive_nowait()
    assert (received.category, received.pid) == (LIFECYCLE, 101)
    with pytest.raises(trio.WouldBlock):
        file_rx.receive_nowait()

    await registry.emit(ev(202, FILE))
    received = file_rx.receive_nowait()
    assert (received.category, received.pid) == (FILE, 202)
    with pytest.raises(trio.WouldBlock):
        lifecycle_rx.receive_nowait()


async def test_drop_oldest_keeps_what_fits_and_counts_the_rest() -> None:
    registry = ObserverRegistry()
    sink_id, rx = registry.add_channel([LIFECYCLE], 2, DROP)
    for pid in range(5):
        await registry.emit(ev(pid))
    assert status(registry, sink_id) == ObserverSinkStatus(
        missed_events=3, delivered_events=2, disconnected=False
    )
    # The channel holds the start of the burst; the newcomers were dropped.
    assert drain(rx) == [0, 1]


async def test_removed_sink_gets_nothing_and_second_remove_is_false() -> None:
    registry = ObserverRegistry()
    sink_id, rx = registry.add_channel([LIFECYCLE], 4, BLOCK)
    assert registry.remove(sink_id) is True
    await registry.emit(ev(7))
    # The send side is closed and nothing was buffered: the stream is over.
    with pytest.raises(trio.EndOfChannel):
        rx.receive_nowait()
    assert registry.is_empty()
    assert len(registry) == 0
    assert registry.status(sink_id) is None
    assert registry.remove(sink_id) is False


async def test_emit_on_empty_registry_is_a_noop_without_checkpoint() -> None:
    registry = ObserverRegistry()
    with trio.CancelScope() as scope:
        scope.cancel()
        # Documented: with no sink, emit returns without a checkpoint, so a
        # pending cancellation is not delivered here.
        await registry.emit(ev(1))
        registry.emit_nowait(ev(2))
        reached = True
    assert reached
    assert not scope.cancelled_caught
    assert len(registry) == 0


async def test_unknown_id_is_not_registered() -> None:
    registry = ObserverRegistry()
    registry.add_channel([LIFECYCLE], 1, DROP)
    stranger = ObserverSubscriberId.new()
    assert registry.status(stranger) is None
    assert registry.remove(stranger) is False
    assert len(registry) == 1


def test_ids_are_unique_uuid4_strings() -> None:
    ids = {ObserverSubscriberId.new() for _ in range(1000)}
    assert len(ids) == 1000
    for sink_id in ids:
        text = sink_id.as_str()
        assert len(text) == 36
        assert uuid.UUID(text).version == 4
        assert uuid.UUID(text).variant == uuid.RFC_4122
        assert str(uuid.UUID(text)) == text


async def test_registered_ids_are_distinct() -> None:
    registry = ObserverRegistry()
    first, _ = registry.add_channel([LIFECYCLE], 1, DROP)
    second, _ = registry.add_channel([LIFECYCLE], 1, DROP)
    assert first != second
    assert uuid.UUID(str(first)).version == 4


def test_id_compares_and_hashes_by_value() -> None:
    original = ObserverSubscriberId.new()
    text = str(original)
    assert text == original.as_str()
    again = ObserverSubscriberId.from_string(text)
    assert again is not original
    assert again == original
    assert hash(again) == hash(original)
    assert {original: "sink"}[again] == "sink"
    assert again != ObserverSubscriberId.new()
    # An id is not its string: comparing across types is simply unequal.
    assert original != text
    assert repr(original) == f"ObserverSubscriberId({text!r})"
    with pytest.raises(TypeError, match="subscriber id must be a str"):
        ObserverSubscriberId.from_string(42)  # type: ignore[arg-type]


async def test_status_lookup_by_id_from_string() -> None:
    registry = ObserverRegistry()
    sink_id, _ = registry.add_channel([LIFECYCLE], 1, DROP)
    await registry.emit(ev(1))
    assert status(registry, ObserverSubscriberId.from_string(str(sink_id))).delivered_events == 1
    assert registry.remove(ObserverSubscriberId.from_string(sink_id.as_str())) is True


# -- arguments ------------------------------------------------------------------


async def test_capacity_zero_is_treated_as_one() -> None:
    registry = ObserverRegistry()
    sink_id, rx = registry.add_channel([LIFECYCLE], 0, DROP)
    assert rx.statistics().max_buffer_size == 1
    # No receiver is waiting, yet the first event still fits.
    await registry.emit(ev(1))
    await registry.emit(ev(2))
    assert status(registry, sink_id) == ObserverSinkStatus(1, 1, False)
    assert drain(rx) == [1]


async def test_capacity_zero_block_sink_buffers_one_without_waiting() -> None:
    registry = ObserverRegistry()
    sink_id, rx = registry.add_channel([LIFECYCLE], 0, BLOCK)
    with trio.fail_after(1):
        await registry.emit(ev(1))
    assert status(registry, sink_id).delivered_events == 1
    assert drain(rx) == [1]


_BAD_ARGUMENTS = [
    pytest.param(([LIFECYCLE], -1, DROP), ValueError, "capacity must be >= 0", id="negative"),
    pytest.param(([LIFECYCLE], 1.0, DROP), TypeError, "capacity must be an int", id="float"),
    pytest.param(([LIFECYCLE], "2", DROP), TypeError, "capacity must be an int", id="str-cap"),
    pytest.param(([LIFECYCLE], True, DROP), TypeError, "capacity must be an int", id="bool-cap"),
    pytest.param(("lifecycle", 1, DROP), TypeError, "categories", id="str-categories"),
    pytest.param((["lifecycle"], 1, DROP), TypeError, "categories", id="str-in-list"),
    pytest.param(([LIFECYCLE, "file"], 1, DROP), TypeError, "categories", id="mixed-list"),
    pytest.param((LIFECYCLE, 1, DROP), TypeError, "categories", id="bare-category"),
    pytest.param(([LIFECYCLE], 1, "block"), TypeError, "backpressure", id="str-policy"),
    pytest.param(([LIFECYCLE], 1, None), TypeError, "backpressure", id="none-policy"),
]


@pytest.mark.parametrize(("arguments", "error", "message"), _BAD_ARGUMENTS)
async def test_bad_add_channel_arguments_register_nothing(
    arguments: tuple[Any, Any, Any], error: type[Exception], message: str
) -> None:
    calls: list[None] = []
    registry = ObserverRegistry(on_interest_changed=lambda: calls.append(None))
    registry.add_channel([FILE], 1, DROP)
    calls.clear()
    before = snapshot(registry)
    with pytest.raises(error, match=message):
        registry.add_channel(*arguments)
    assert snapshot(registry) == before
    assert calls == []
    # The failure left nothing behind that an emit could reach.
    await registry.emit(ev(1, LIFECYCLE))


@pytest.mark.parametrize(("arguments", "error", "message"), _BAD_ARGUMENTS)
async def test_bad_subscribe_arguments_raise_on_entry(
    arguments: tuple[Any, Any, Any], error: type[Exception], message: str
) -> None:
    registry = ObserverRegistry()
    categories, capacity, backpressure = arguments
    before = snapshot(registry)
    with pytest.raises(error, match=message):
        async with registry.subscribe(categories, capacity=capacity, backpressure=backpressure):
            pytest.fail("the block must not be entered")
    assert snapshot(registry) == before


async def test_lifecycle_event_takes_its_category_from_the_kind() -> None:
    started = lifecycle_event(
        ObserverEventKind.STARTED, 10, ppid=1, timestamp_ms=5.0, argv=("/bin/true",)
    )
    assert (started.category, started.pid, started.ppid, started.argv) == (
        LIFECYCLE,
        10,
        1,
        ("/bin/true",),
    )
    assert started.timestamp_ms == 5.0
    exited = lifecycle_event(ObserverEventKind.DESCENDANT_EXITED, 11, ppid=10, exit_code=-9)
    assert (exited.category, exited.exit_code) == (PROCESS, -9)
    with pytest.raises(ValueError, match=r"kind must be one of .*STARTED"):
        lifecycle_event(ObserverEventKind.FILE_OPEN, 12, ppid=None)


async def test_lifecycle_event_is_what_the_constructor_builds() -> None:
    # lifecycle_event fills the slots itself, bypassing __init__: for every
    # kind and every argument it takes, the event must be the one
    # ObserverEvent(...) gives, field by field (wall_time_ms aside: it is
    # the time of building).
    usage = ResourceUsage(user_seconds=0.5, system_seconds=0.25, max_rss_bytes=4096)
    arguments = {
        "ppid": 7,
        "timestamp_ms": 12.5,
        "grade": EventGrade.INFERRED,
        "root_pid": 3,
        "argv": ("prog", "arg"),
        "exit_code": -9,
        "termination": TerminationOutcome.HARD_KILLED,
        "resources": usage,
    }
    for kind, category in (
        (ObserverEventKind.STARTED, LIFECYCLE),
        (ObserverEventKind.EXITED, LIFECYCLE),
        (ObserverEventKind.DESCENDANT_STARTED, PROCESS),
        (ObserverEventKind.DESCENDANT_EXITED, PROCESS),
        (ObserverEventKind.DESCENDANT_EXEC, PROCESS),
    ):
        for built, expected in (
            (
                lifecycle_event(kind, 42, **arguments),  # type: ignore[arg-type]
                ObserverEvent(category=category, kind=kind, pid=42, **arguments),  # type: ignore[arg-type]
            ),
            (
                lifecycle_event(kind, 42, ppid=None, timestamp_ms=1.0),
                ObserverEvent(category=category, kind=kind, pid=42, timestamp_ms=1.0),
            ),
        ):
            assert type(built) is ObserverEvent
            assert built == expected
            assert hash(built) == hash(expected)
            for field in dataclasses.fields(ObserverEvent):
                if field.name != "wall_time_ms":
                    assert getattr(built, field.name) == getattr(expected, field.name), field.name
            assert abs(built.wall_time_ms - expected.wall_time_ms) < 60_000
            assert built.to_dict().keys() == expected.to_dict().keys()
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.pid = 1  # type: ignore[misc]
