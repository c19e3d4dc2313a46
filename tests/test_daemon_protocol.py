"""The daemon's frame decoder: every input is messages or one named error."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_observer._daemon._protocol import (
    FRAME_TYPES,
    MAX_FRAME_BYTES,
    FrameDecoder,
    ProtocolError,
    check_hello,
    encode,
    hello,
)

CODES = {"oversized-frame", "malformed-frame", "unknown-frame"}


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


@given(st.binary(max_size=2000), st.integers(min_value=1, max_value=64))
@settings(max_examples=300, deadline=None)
def test_arbitrary_bytes_give_messages_or_a_named_error(data: bytes, step: int) -> None:
    decoder = FrameDecoder()
    try:
        for start in range(0, len(data), step):
            for message in decoder.feed(data[start : start + step]):
                assert message["type"] in FRAME_TYPES
    except ProtocolError as exc:
        assert exc.code in CODES  # noqa: PT017 - the point is that any input is handled
        assert str(exc)  # noqa: PT017


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)


@given(json_values)
@settings(max_examples=300, deadline=None)
def test_any_json_value_is_accepted_only_as_a_well_formed_frame(value: object) -> None:
    try:
        (message,) = FrameDecoder().feed(frame(json.dumps(value).encode()))
    except ProtocolError as exc:
        assert exc.code in CODES  # noqa: PT017
        return
    assert isinstance(value, dict)
    assert value["type"] in FRAME_TYPES
    if message["type"] == "request":
        assert isinstance(message["id"], int)
        assert isinstance(message["method"], str)


@given(st.lists(st.dictionaries(st.text(max_size=5), st.integers(), max_size=3), max_size=5))
def test_frames_round_trip_split_anywhere(bodies: list[dict[str, int]]) -> None:
    messages = [{**b, "type": "reply"} for b in bodies]
    data = b"".join(encode(m) for m in messages)
    decoder = FrameDecoder()
    out = []
    for byte in range(len(data)):
        out.extend(decoder.feed(data[byte : byte + 1]))
    assert out == messages
    assert decoder.pending_bytes == 0


def test_oversized_frame_is_refused_from_its_header() -> None:
    with pytest.raises(ProtocolError, match="limit is") as info:
        FrameDecoder().feed(struct.pack(">I", MAX_FRAME_BYTES + 1))
    assert info.value.code == "oversized-frame"
    with pytest.raises(ProtocolError):
        encode({"type": "reply", "x": "a" * MAX_FRAME_BYTES})


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"\xff\xfe", "malformed-frame"),
        (b"[1, 2]", "malformed-frame"),
        (b'{"type": "launch"}', "unknown-frame"),
        (b'{"type": "request", "id": "1", "method": "ps"}', "malformed-frame"),
        (b'{"type": "request", "id": 1, "method": "ps", "params": []}', "malformed-frame"),
    ],
)
def test_bad_frames_are_named(body: bytes, code: str) -> None:
    with pytest.raises(ProtocolError) as info:
        FrameDecoder().feed(frame(body))
    assert info.value.code == code


def test_handshake_checks_protocol_and_version() -> None:
    check_hello(hello())
    with pytest.raises(ProtocolError, match="version 99"):
        check_hello({**hello(), "version": 99})
    with pytest.raises(ProtocolError, match="first frame"):
        check_hello({"type": "request"})


@pytest.mark.parametrize("kind", [["request"], {"a": 1}])
def test_an_unhashable_frame_type_is_an_unknown_frame(kind: object) -> None:
    # Found by the fuzz above: `kind not in FRAME_TYPES` raised TypeError for
    # a list, which the daemon would have turned into an internal error.
    with pytest.raises(ProtocolError) as info:
        FrameDecoder().feed(frame(json.dumps({"type": kind}).encode()))
    assert info.value.code == "unknown-frame"
