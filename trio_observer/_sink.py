"""One sink: its policy, its id, and the counters behind its status."""

from __future__ import annotations

import enum
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, final

import trio

from ._events import EventCategory, ObserverEvent


class ObserverBackpressure(enum.Enum):
    """What an emitter does when a sink's channel is full."""

    DROP_OLDEST = "drop-oldest"
    """Never wait. The event that does not fit is dropped and counted in
    ``missed_events``. (The name is the reference's: the channel keeps the
    *oldest* events it already holds and drops the newcomer, so a consumer
    that falls behind sees the start of a burst, then a gap.)"""
    BLOCK = "block"
    """The emitter waits until the sink's channel has room."""


@final
class ObserverSubscriberId:
    """The id of a registered sink: a UUID version 4 string, 36 characters.

    Ids are equal by value and hashable, so a consumer can keep the string
    (``str(id)``) and look the sink up again with :meth:`from_string`.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError(f"subscriber id must be a str, not {type(value).__name__}")
        self._value = value

    @classmethod
    def new(cls) -> ObserverSubscriberId:
        """Return a fresh id from the operating system's random source."""
        # A version-4 UUID, as str(uuid.uuid4()) gives, from os.urandom (a
        # CSPRNG; ids derived from clock bits, as the reference did, can
        # collide across processes). Built here: importing uuid took about
        # 2 ms of the CLI's start-up.
        raw = bytearray(os.urandom(16))
        raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
        raw[8] = (raw[8] & 0x3F) | 0x80  # the RFC 4122 variant
        h = raw.hex()
        return cls(f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}")

    @classmethod
    def from_string(cls, value: str) -> ObserverSubscriberId:
        """Wrap an id previously obtained with ``str(id)`` or :meth:`as_str`."""
        return cls(value)

    def as_str(self) -> str:
        """Return the id as a string."""
        return self._value

    def __str__(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"ObserverSubscriberId({self._value!r})"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ObserverSubscriberId):
            return self._value == other._value
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._value)


@final
@dataclass(frozen=True, slots=True)
class ObserverSinkStatus:
    """A snapshot of one sink's counters."""

    missed_events: int
    """Matching events that were not delivered: the channel was full
    (``DROP_OLDEST``), the receiver had gone away, the sink was removed while
    an emitter waited on it, or the emitter was cancelled while it waited."""
    delivered_events: int
    """Matching events whose ``send`` completed: they are in the channel or
    already received."""
    disconnected: bool
    """True once the receiving side was closed; every later matching event
    counts as missed."""


# What _Sink.offer() did with an event.
DELIVERED: Final = 0
"""In the channel, counted delivered."""
MISSED: Final = 1
"""Counted missed (full ``DROP_OLDEST`` channel, receiver gone, sink removed)."""
FULL: Final = 2
"""A ``BLOCK`` sink is full: nothing counted yet; the caller waits with
:meth:`_Sink.send`, or counts it missed if it must not wait."""


class _Sink:
    """One registered sink and the one routine that delivers to it.

    Every path that hands an event to a sink (``emit``, ``emit_nowait``,
    ``emit_many``, the blocking send) goes through :meth:`offer`,
    :meth:`send` and :meth:`count_failure`, so the answer to "what does this
    exception mean for the counters" is written once. Counters only go up;
    the session's tasks are the only writers, and trio runs them one at a
    time, so no lock is needed.
    """

    __slots__ = (
        "backpressure",
        "categories",
        "delivered",
        "disconnected",
        "missed",
        "on_disconnect",
        "send_channel",
        "send_nowait",
        "sequence",
        "tagged",
    )

    def __init__(
        self,
        categories: frozenset[EventCategory],
        send_channel: trio.MemorySendChannel[object],
        backpressure: ObserverBackpressure,
        tagged: bool,
        on_disconnect: Callable[[], None],
    ) -> None:
        self.categories = categories
        self.send_channel = send_channel
        # Bound once: emit()'s plain route calls it for every event.
        self.send_nowait = send_channel.send_nowait
        self.backpressure = backpressure
        # A tagged sink sends (sequence, event) pairs, which is how a
        # subscription knows exactly where a loss happened in its stream.
        self.tagged = tagged
        # The registry rebuilds its routes: a disconnected sink must leave
        # the plain route whichever path found the receiver gone.
        self.on_disconnect = on_disconnect
        self.delivered = 0
        self.missed = 0
        self.disconnected = False
        # Every matching event takes the next number when its fate is decided
        # or its blocking send begins, which is channel order. A snapshot of
        # `missed` would not do: an emitter queued behind one that is then
        # cancelled carries the count from before that loss, and the marker
        # would land after its event instead of before. (Untagged sinks on
        # the plain route skip the numbering: nothing reads it.)
        self.sequence = 0

    def item(self, event: ObserverEvent) -> object:
        """What to put in the channel for ``event``, numbered but unclaimed."""
        return (self.sequence, event) if self.tagged else event

    def count_missed(self) -> None:
        self.sequence += 1
        self.missed += 1

    def count_failure(self, exc: trio.BrokenResourceError | trio.ClosedResourceError) -> None:
        """Count an event whose ``send_nowait`` raised ``exc`` as missed.

        Broken means the receiver went away: the sink is disconnected for
        good. Closed means the sink was removed or the registry closed.
        """
        self.count_missed()
        if isinstance(exc, trio.BrokenResourceError):
            self.mark_disconnected()

    def offer(self, event: ObserverEvent, *, may_wait: bool) -> int:
        """Deliver ``event`` without waiting, or count it as missed.

        Returns:
          :data:`DELIVERED`, :data:`MISSED`, or :data:`FULL` when this is a
          full ``BLOCK`` sink and ``may_wait`` is true (then nothing is
          counted: the caller's :meth:`send` decides).
        """
        if self.disconnected:
            self.count_missed()
            return MISSED
        try:
            # item() written out: a BLOCK sink takes every event through here.
            self.send_nowait((self.sequence, event) if self.tagged else event)
        except trio.WouldBlock:
            if may_wait and self.backpressure is ObserverBackpressure.BLOCK:
                return FULL
            self.count_missed()
            return MISSED
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.count_failure(exc)
            return MISSED
        self.sequence += 1
        self.delivered += 1
        return DELIVERED

    async def send(self, event: ObserverEvent) -> None:
        """Wait for room and deliver ``event`` (a ``BLOCK`` sink found full).

        Cancellation (or any other exception) while waiting counts the event
        as missed, then propagates.
        """
        # Numbered now, not when the sink was found full: other emitters may
        # have queued on it since, and numbers must follow channel order.
        item = self.item(event)
        self.sequence += 1
        try:
            await self.send_channel.send(item)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.missed += 1
            if isinstance(exc, trio.BrokenResourceError):
                self.mark_disconnected()
        except BaseException:
            self.missed += 1
            raise
        else:
            self.delivered += 1

    @property
    def plain(self) -> bool:
        return (
            self.backpressure is ObserverBackpressure.DROP_OLDEST
            and not self.tagged
            and not self.disconnected
        )

    def mark_disconnected(self) -> None:
        self.disconnected = True
        self.send_channel.close()
        self.on_disconnect()

    def status(self) -> ObserverSinkStatus:
        # The receiver may have been closed since an emit last looked; the
        # status says so at once, not only after the next matching event.
        receiver_gone = self.send_channel.statistics().open_receive_channels == 0
        return ObserverSinkStatus(self.missed, self.delivered, self.disconnected or receiver_gone)


def check_backpressure(value: ObserverBackpressure) -> ObserverBackpressure:
    """Return ``value`` if it is an :class:`ObserverBackpressure`.

    Raises:
      TypeError: it is anything else (a string such as ``"block"`` included).
    """
    if not isinstance(value, ObserverBackpressure):
        raise TypeError(
            "backpressure must be ObserverBackpressure.BLOCK or "
            f"ObserverBackpressure.DROP_OLDEST, not {value!r}"
        )
    return value
