"""The wire format: length-prefixed JSON frames, the handshake, and the decoder.

Every frame is a 4-byte big-endian length followed by that many bytes of
UTF-8 JSON holding one object with a ``"type"``. JSON because a person can
read a captured stream and any language can speak it; the benchmark
compares it with a raw loop writing the same frames (docs/performance.md).
The full description, for implementers in other languages, is
``docs/protocol.md``.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from typing import Any, Final

PROTOCOL_NAME: Final = "trio-observer"
PROTOCOL_VERSION: Final = 1
MAX_FRAME_BYTES: Final = 1 << 20
"""The largest frame body either side accepts (1 MiB). Output chunks are
cut well below it (see ``OUTPUT_CHUNK_BYTES``)."""
OUTPUT_CHUNK_BYTES: Final = 256 * 1024
"""The most output bytes one stream frame carries (base64 grows it by 4/3)."""

FRAME_TYPES: Final = frozenset({"hello", "request", "reply", "error", "stream", "end"})
"""Every frame type there is. A frame of any other type is a protocol error."""

_HEADER: Final = struct.Struct(">I")


class ProtocolError(Exception):
    """The peer sent something that is not a valid frame.

    ``code`` is one of the error codes of docs/protocol.md
    (``"oversized-frame"``, ``"malformed-frame"``, ``"unknown-frame"``,
    ``"bad-handshake"``); the message names the problem.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def encode(message: dict[str, Any]) -> bytes:
    """Return one frame holding ``message``.

    A string that is not valid Unicode (a command line or a path with
    bytes that are not UTF-8, which Python holds as lone surrogates
    U+DC80..U+DCFF) is written as ``\\udcXX`` escapes: JSON can say it,
    UTF-8 cannot, and a Python peer reads back the same string.

    Raises:
      ProtocolError: the encoded message is larger than ``MAX_FRAME_BYTES``.
    """
    text = json.dumps(message, separators=(",", ":"), ensure_ascii=False)
    try:
        body = text.encode("utf-8")
    except UnicodeEncodeError:
        body = json.dumps(message, separators=(",", ":")).encode("ascii")
    if len(body) > MAX_FRAME_BYTES:
        raise ProtocolError(
            "oversized-frame", f"frame of {len(body)} bytes exceeds {MAX_FRAME_BYTES}"
        )
    return _HEADER.pack(len(body)) + body


def hello(**fields: Any) -> dict[str, Any]:
    """The handshake frame each side sends first."""
    return {"type": "hello", "protocol": PROTOCOL_NAME, "version": PROTOCOL_VERSION, **fields}


def check_hello(message: dict[str, Any]) -> None:
    """Accept the peer's first frame, or raise :class:`ProtocolError`."""
    if message.get("type") != "hello" or message.get("protocol") != PROTOCOL_NAME:
        raise ProtocolError(
            "bad-handshake",
            f"the first frame must be {{'type': 'hello', 'protocol': {PROTOCOL_NAME!r}, ...}}",
        )
    if message.get("version") != PROTOCOL_VERSION:
        raise ProtocolError(
            "bad-handshake",
            f"protocol version {message.get('version')!r} is not supported "
            f"(this side speaks {PROTOCOL_VERSION})",
        )


class FrameDecoder:
    """Split a byte stream into messages, checking each one.

    Feed it whatever the socket returned; it returns the complete messages
    so far and keeps the rest. Once it has raised, the stream is out of
    step and the connection must be closed.
    """

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """Add ``data`` and return every message it completed.

        Raises:
          ProtocolError: as :meth:`iter_feed`.
        """
        return list(self.iter_feed(data))

    def iter_feed(self, data: bytes) -> Iterator[dict[str, Any]]:
        """Add ``data`` and yield the messages it completed, one at a time.

        The messages before a bad frame come out before the error, so that
        a peer is answered for what it sent correctly.

        Raises:
          ProtocolError: a frame announced more than ``MAX_FRAME_BYTES``
            (raised as soon as its header arrives, before the body is
            buffered), is not UTF-8 JSON, is not an object, or has an
            unknown ``type``.
        """
        buffer = self._buffer
        buffer += data
        while len(buffer) >= 4:
            (length,) = _HEADER.unpack_from(buffer, 0)
            if length > MAX_FRAME_BYTES:
                raise ProtocolError(
                    "oversized-frame",
                    f"frame announces {length} bytes; the limit is {MAX_FRAME_BYTES}",
                )
            if len(buffer) < 4 + length:
                break
            body = bytes(buffer[4 : 4 + length])
            # Deleting from the front of a bytearray is O(1) in CPython.
            del buffer[: 4 + length]
            yield parse(body)

    @property
    def pending_bytes(self) -> int:
        """Bytes of an incomplete frame held back."""
        return len(self._buffer)


def parse(body: bytes) -> dict[str, Any]:
    """Decode one frame body and check its shape."""
    try:
        message = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError("malformed-frame", f"frame is not UTF-8 JSON: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError(
            "malformed-frame", f"frame must be a JSON object, not {type(message).__name__}"
        )
    kind = message.get("type")
    if not isinstance(kind, str) or kind not in FRAME_TYPES:
        allowed = ", ".join(sorted(FRAME_TYPES))
        raise ProtocolError("unknown-frame", f"unknown frame type {kind!r} (known: {allowed})")
    if kind == "request":
        request_id = message.get("id")
        if isinstance(request_id, bool) or not isinstance(request_id, int):
            raise ProtocolError("malformed-frame", "a request needs an integer 'id'")
        if not isinstance(message.get("method"), str):
            raise ProtocolError("malformed-frame", "a request needs a string 'method'")
        params = message.setdefault("params", {})
        if not isinstance(params, dict):
            raise ProtocolError("malformed-frame", "a request's 'params' must be an object")
    return message


def error(request_id: int | None, code: str, message: str) -> dict[str, Any]:
    """An error frame; ``request_id`` is None when no request is to blame."""
    return {"type": "error", "id": request_id, "code": code, "message": message}
