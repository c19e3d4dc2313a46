"""Supervise child processes in Trio and observe what they do.

Start with :func:`open_session`; the guide is ``docs/guide.md``.
"""

import importlib as _importlib
import typing as _typing

# Every public name is imported on first use (PEP 562), not here: a program
# that only runs a session, such as ``trio-observer run``, should not pay at
# start-up for the daemon client, OpenTelemetry export, expect or the
# capability probes. Type checkers read the imports below instead; a test
# (tests/test_public_api.py) checks that they and _MODULE_OF agree.
if _typing.TYPE_CHECKING:
    from ._capabilities import CapabilityReport as CapabilityReport
    from ._capabilities import CapabilitySupport as CapabilitySupport
    from ._capabilities import CategoryCapability as CategoryCapability
    from ._capabilities import ContainmentCapability as ContainmentCapability
    from ._capabilities import TraceScope as TraceScope
    from ._capabilities import UnsupportedCategoryError as UnsupportedCategoryError
    from ._capabilities import negotiate_capabilities as negotiate_capabilities
    from ._cursor import OutputCursor as OutputCursor
    from ._cursor import OutputGap as OutputGap
    from ._daemon._client import DaemonClient as DaemonClient
    from ._daemon._client import DaemonError as DaemonError
    from ._daemon._client import RemoteEvent as RemoteEvent
    from ._daemon._client import RemoteMissed as RemoteMissed
    from ._daemon._client import RemoteStream as RemoteStream
    from ._daemon._client import connect as connect
    from ._daemon._client import remote_item as remote_item
    from ._events import EventCategory as EventCategory
    from ._events import EventGrade as EventGrade
    from ._events import ObserverEvent as ObserverEvent
    from ._events import ObserverEventKind as ObserverEventKind
    from ._events import ResourceUsage as ResourceUsage
    from ._events import TerminationOutcome as TerminationOutcome
    from ._expect import ExpectEOF as ExpectEOF
    from ._expect import ExpectMatch as ExpectMatch
    from ._expect import ExpectTimeout as ExpectTimeout
    from ._limits import Limits as Limits
    from ._open_session import open_session as open_session
    from ._otel import OTelExporter as OTelExporter
    from ._otel import OTelExportStatus as OTelExportStatus
    from ._output import OutputLog as OutputLog
    from ._process import CAPTURE as CAPTURE
    from ._process import Process as Process
    from ._process import Pty as Pty
    from ._pty import PtySize as PtySize
    from ._registry import ObserverRegistry as ObserverRegistry
    from ._session import Session as Session
    from ._sink import ObserverBackpressure as ObserverBackpressure
    from ._sink import ObserverSinkStatus as ObserverSinkStatus
    from ._sink import ObserverSubscriberId as ObserverSubscriberId
    from ._subscription import MissedEvents as MissedEvents
    from ._subscription import Subscription as Subscription
    from ._tee import ByteTee as ByteTee
    from ._tee import ByteTeeStatus as ByteTeeStatus
    from ._tee import MissedBytes as MissedBytes

__version__ = "0.1.0"

_MODULE_OF: dict[str, str] = {
    "ByteTee": "._tee",
    "ByteTeeStatus": "._tee",
    "CAPTURE": "._process",
    "CapabilityReport": "._capabilities",
    "CapabilitySupport": "._capabilities",
    "CategoryCapability": "._capabilities",
    "ContainmentCapability": "._capabilities",
    "DaemonClient": "._daemon._client",
    "DaemonError": "._daemon._client",
    "EventCategory": "._events",
    "EventGrade": "._events",
    "ExpectEOF": "._expect",
    "ExpectMatch": "._expect",
    "ExpectTimeout": "._expect",
    "Limits": "._limits",
    "MissedBytes": "._tee",
    "MissedEvents": "._subscription",
    "OTelExportStatus": "._otel",
    "OTelExporter": "._otel",
    "ObserverBackpressure": "._sink",
    "ObserverEvent": "._events",
    "ObserverEventKind": "._events",
    "ObserverRegistry": "._registry",
    "ObserverSinkStatus": "._sink",
    "ObserverSubscriberId": "._sink",
    "OutputCursor": "._cursor",
    "OutputGap": "._cursor",
    "OutputLog": "._output",
    "Process": "._process",
    "Pty": "._process",
    "PtySize": "._pty",
    "RemoteEvent": "._daemon._client",
    "RemoteMissed": "._daemon._client",
    "RemoteStream": "._daemon._client",
    "ResourceUsage": "._events",
    "Session": "._session",
    "Subscription": "._subscription",
    "TerminationOutcome": "._events",
    "TraceScope": "._capabilities",
    "UnsupportedCategoryError": "._capabilities",
    "connect": "._daemon._client",
    "negotiate_capabilities": "._capabilities",
    "open_session": "._open_session",
    "remote_item": "._daemon._client",
}
"""The private module that defines each public name."""

__all__ = [
    "CAPTURE",
    "ByteTee",
    "ByteTeeStatus",
    "CapabilityReport",
    "CapabilitySupport",
    "CategoryCapability",
    "ContainmentCapability",
    "DaemonClient",
    "DaemonError",
    "EventCategory",
    "EventGrade",
    "ExpectEOF",
    "ExpectMatch",
    "ExpectTimeout",
    "Limits",
    "MissedBytes",
    "MissedEvents",
    "OTelExportStatus",
    "OTelExporter",
    "ObserverBackpressure",
    "ObserverEvent",
    "ObserverEventKind",
    "ObserverRegistry",
    "ObserverSinkStatus",
    "ObserverSubscriberId",
    "OutputCursor",
    "OutputGap",
    "OutputLog",
    "Process",
    "Pty",
    "PtySize",
    "RemoteEvent",
    "RemoteMissed",
    "RemoteStream",
    "ResourceUsage",
    "Session",
    "Subscription",
    "TerminationOutcome",
    "TraceScope",
    "UnsupportedCategoryError",
    "connect",
    "negotiate_capabilities",
    "open_session",
    "remote_item",
]


if not _typing.TYPE_CHECKING:
    # Hidden from type checkers: a module __getattr__ would make every
    # misspelt name type-check (as Any) instead of being an error.

    def __getattr__(name: str) -> object:
        module = _MODULE_OF.get(name)
        if module is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(_importlib.import_module(module, __name__), name)
        # Kept, so that the next use is a plain module attribute.
        globals()[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*globals(), *__all__})
