"""Supervise child processes in Trio and observe what they do.

Start with :func:`open_session`; see the guide in ``docs/guide.md``.
"""

from ._events import EventCategory as EventCategory
from ._events import EventGrade as EventGrade
from ._events import ObserverEvent as ObserverEvent
from ._events import ObserverEventKind as ObserverEventKind
from ._events import TerminationOutcome as TerminationOutcome
from ._process import Process as Process
from ._registry import MissedEvents as MissedEvents
from ._registry import ObserverBackpressure as ObserverBackpressure
from ._registry import ObserverRegistry as ObserverRegistry
from ._registry import ObserverSinkStatus as ObserverSinkStatus
from ._registry import ObserverSubscriberId as ObserverSubscriberId
from ._registry import Subscription as Subscription
from ._session import Session as Session
from ._session import open_session as open_session

__version__ = "0.1.0"

__all__ = [
    "EventCategory",
    "EventGrade",
    "MissedEvents",
    "ObserverBackpressure",
    "ObserverEvent",
    "ObserverEventKind",
    "ObserverRegistry",
    "ObserverSinkStatus",
    "ObserverSubscriberId",
    "Process",
    "Session",
    "Subscription",
    "TerminationOutcome",
    "open_session",
]
