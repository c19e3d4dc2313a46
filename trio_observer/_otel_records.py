"""Each event as an OpenTelemetry log record: its name, attributes, body and severity.

Plain data, no opentelemetry import: ``docs/otel.md`` lists what each
record holds.
"""

from __future__ import annotations

import dataclasses
import enum
import os
from typing import Any, Final

from ._events import ObserverEvent, ObserverEventKind

EVENT_PREFIX: Final = "trio_observer.process."

# Event fields that map to named attributes below; any other field an event
# carries (one added after this module was written) becomes
# trio_observer.<field>, so a new field needs no code here.
_MAPPED: Final = frozenset(
    {
        "category",
        "kind",
        "pid",
        "ppid",
        "timestamp_ms",
        "wall_time_ms",
        "exit_code",
        "grade",
        "argv",
        "termination",
        "root_pid",
        "path",
        "fd",
        "protocol",
        "local_address",
        "remote_address",
        "count",
    }
)
# The fields to look at beyond the mapped ones, read once per event class.
_extra_fields: dict[type, tuple[str, ...]] = {}
STARTS: Final = frozenset({ObserverEventKind.STARTED, ObserverEventKind.DESCENDANT_STARTED})
EXITS: Final = frozenset({ObserverEventKind.EXITED, ObserverEventKind.DESCENDANT_EXITED})


def event_name(kind: ObserverEventKind) -> str:
    """The log record's event name for ``kind``: ``trio_observer.process.file_open``."""
    return EVENT_PREFIX + kind.value.replace("-", "_")


EVENT_NAMES: Final = {kind: event_name(kind) for kind in ObserverEventKind}


def exit_class(exit_code: int | None) -> str:
    """``success``, ``failure`` (non-zero code), ``signal`` or ``unknown``."""
    if exit_code is None:
        return "unknown"
    if exit_code < 0:
        return "signal"
    return "success" if exit_code == 0 else "failure"


def _split_address(address: str) -> tuple[str, int | None]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return address, None  # a Unix socket path
    return host.removeprefix("[").removesuffix("]"), int(port)


_SCALARS: Final = (str, bool, int, float)
# The field names of each dataclass type met in a field (ResourceUsage on
# every exit), read once: dataclasses.fields() is slow for a per-event path.
_dataclass_fields: dict[type, tuple[str, ...]] = {}


def _flatten(prefix: str, value: object, out: dict[str, Any]) -> None:
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, _SCALARS):
        out[prefix] = value
    elif isinstance(value, tuple | list):
        if all(isinstance(item, _SCALARS) for item in value):
            out[prefix] = list(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            _flatten(f"{prefix}.{key}", item, out)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        names = _dataclass_fields.get(type(value))
        if names is None:
            names = _dataclass_fields[type(value)] = tuple(
                f.name for f in dataclasses.fields(value)
            )
        for name in names:
            item = getattr(value, name)
            if item is not None:
                _flatten(f"{prefix}.{name}", item, out)


def event_attributes(
    event: ObserverEvent, *, session_id: str | None, command_args: bool
) -> dict[str, Any]:
    """The log record's attributes for ``event`` (see ``docs/otel.md``)."""
    out: dict[str, Any] = {
        "process.pid": event.pid,
        "trio_observer.category": event.category.value,
        "trio_observer.grade": event.grade.value,
    }
    if session_id is not None:
        out["trio_observer.session.id"] = session_id
    if event.ppid is not None:
        out["process.parent_pid"] = event.ppid
    if event.root_pid is not None:
        out["trio_observer.root_pid"] = event.root_pid
    if event.argv:
        out["process.executable.name"] = os.path.basename(event.argv[0])
        # The process conventions: command_args SHOULD NOT be collected by
        # default, since command lines often hold secrets.
        if command_args:
            out["process.command_args"] = list(event.argv)
    if event.exit_code is not None:
        if event.exit_code >= 0:
            out["process.exit.code"] = event.exit_code
        else:
            out["trio_observer.signal"] = -event.exit_code
    if event.kind in EXITS:
        out["trio_observer.exit.class"] = exit_class(event.exit_code)
    if event.termination is not None:
        out["trio_observer.termination"] = event.termination.value
    if event.path is not None:
        out["file.path"] = event.path
    if event.fd is not None:
        out["trio_observer.fd"] = event.fd
    if event.protocol is not None:
        out["network.transport"] = event.protocol.rstrip("6")
        if event.protocol != "unix":
            out["network.type"] = "ipv6" if event.protocol.endswith("6") else "ipv4"
    for key, field in (
        ("network.local", event.local_address),
        ("network.peer", event.remote_address),
    ):
        if field is not None:
            host, port = _split_address(field)
            out[f"{key}.address"] = host
            if port is not None:
                out[f"{key}.port"] = port
    if event.count is not None:
        out["trio_observer.lost.count"] = event.count
    extra = _extra_fields.get(type(event))
    if extra is None:
        extra = tuple(f.name for f in dataclasses.fields(event) if f.name not in _MAPPED)
        _extra_fields[type(event)] = extra
    for key in extra:
        value = getattr(event, key)
        if value is not None:
            _flatten(f"trio_observer.{key}", value, out)
    return out


def record_body(event: ObserverEvent) -> str:
    what = event.kind.value.replace("-", " ")
    if event.kind in EXITS:
        if event.exit_code is None:
            return f"process {event.pid} {what}"
        if event.exit_code < 0:
            return f"process {event.pid} {what} by signal {-event.exit_code}"
        return f"process {event.pid} {what} with code {event.exit_code}"
    if event.kind is ObserverEventKind.OBSERVATION_LOST:
        lost = "an unknown number of" if event.count is None else str(event.count)
        return f"observation lost: {lost} records"
    if event.path is not None:
        return f"process {event.pid} {what} {event.path}"
    return f"process {event.pid} {what}"


def warns(event: ObserverEvent) -> bool:
    if event.kind is ObserverEventKind.OBSERVATION_LOST:
        return True
    return event.kind in EXITS and event.exit_code is not None and event.exit_code != 0
