"""The pytest plugin, run the way a user runs it: pytester in a subprocess."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

INI = """
[pytest]
trio_mode = true
"""


def test_a_clean_test_passes_and_a_leaky_one_names_its_leftovers(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeini(INI)
    pytester.makepyfile(
        """
        import os
        import sys

        from trio_observer import Session


        async def test_clean(observer_session: Session) -> None:
            done = await observer_session.run_process([sys.executable, "-c", "pass"])
            assert done.returncode == 0


        async def test_leaves_a_process(observer_session: Session) -> None:
            await observer_session.start_process(
                [sys.executable, "-c", "import time; time.sleep(60)"]
            )


        async def test_leaves_an_fd(observer_session: Session) -> None:
            global kept
            kept = os.open(os.devnull, os.O_RDONLY)
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines(
        [
            "*still running at teardown: <trio_observer.Process *time.sleep(60)* running>*",
            "*file descriptor * left open (/dev/null)*",
        ]
    )
