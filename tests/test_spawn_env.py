"""The default environment of a child: this process's, as it is at the spawn.

Both spawn routes keep os.environ's encoded contents rather than decoding
and re-encoding them (issue 12), the posix_spawn route even its envp array
while os.environ compares equal to the snapshot it was made from; these
check that what the child gets is still exactly os.environ plus the
session id, changes included, on either route.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from trio_observer import open_session

from .test_spawn_stdio import route  # noqa: F401 (the fixture, used below)

PY = sys.executable
_DUMP = "import json, os; print(json.dumps(dict(os.environ)))"


async def _child_environment(session: object) -> dict[str, str]:
    from trio_observer import Session

    assert isinstance(session, Session)
    process = await session.start_process([PY, "-c", _DUMP], stdout=subprocess.PIPE)
    assert process.stdout is not None
    chunks = []
    while chunk := await process.stdout.receive_some():
        chunks.append(chunk)
    assert await process.wait() == 0
    result: dict[str, str] = json.loads(b"".join(chunks))
    return result


@pytest.mark.usefixtures("route")
async def test_default_environment_follows_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERF2_BEFORE", "one")
    monkeypatch.delenv("PERF2_LATER", raising=False)
    async with open_session() as session:
        first = await _child_environment(session)
        # Changed between two spawns of one session: the second child sees it.
        monkeypatch.setenv("PERF2_LATER", "two")
        monkeypatch.setenv("PERF2_BEFORE", "changed")
        monkeypatch.setenv("PERF2_ODD", "caf\udce9")  # not UTF-8: surrogateescape
        second = await _child_environment(session)
        monkeypatch.delenv("PERF2_LATER")
        third = await _child_environment(session)
    expected = {**os.environ, "TRIO_OBSERVER_SESSION": session.id}
    del expected["PERF2_ODD"]  # compared on its own below
    assert first["PERF2_BEFORE"] == "one"
    assert "PERF2_LATER" not in first
    assert {k: v for k, v in second.items() if k != "PERF2_ODD"} == {
        **expected,
        "PERF2_LATER": "two",
    }
    assert second["PERF2_ODD"] == "caf\udce9"
    assert "PERF2_LATER" not in third
    assert third["TRIO_OBSERVER_SESSION"] == session.id
