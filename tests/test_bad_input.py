"""Bad arguments to the public entry points: TypeError/ValueError naming them."""

from __future__ import annotations

import math

import pytest

from trio_observer import open_session


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        # Passed the check once, then the teardown raised OverflowError.
        ({"grace_period": 10**400}, ValueError, "grace_period"),
        ({"grace_period": math.nan}, ValueError, "grace_period"),
        ({"grace_period": "5"}, TypeError, "grace_period"),
        # Raised an ExceptionGroup from the tree observer at open.
        ({"poll_interval": math.inf}, ValueError, "poll_interval"),
        ({"poll_interval": 10**400}, ValueError, "poll_interval"),
        ({"poll_interval": 0}, ValueError, "poll_interval"),
        # Was accepted as one second.
        ({"poll_interval": True}, TypeError, "poll_interval"),
        ({"track_descendants": "yes"}, TypeError, "track_descendants"),
    ],
)
async def test_open_session_refuses_bad_numbers(
    kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        async with open_session(**kwargs):  # type: ignore[arg-type]
            pass
