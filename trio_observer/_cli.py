"""The command line: ``trio-observer run -- CMD`` writes CMD's events as JSON Lines."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from typing import IO, Final

import trio

from ._events import EventCategory, TerminationOutcome
from ._registry import ObserverBackpressure
from ._session import Session, open_session

_PROG: Final = "trio-observer"
_STOP_SIGNALS: Final = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _categories(text: str) -> list[EventCategory]:
    chosen = []
    for name in text.split(","):
        name = name.strip().lower()
        try:
            chosen.append(EventCategory(name))
        except ValueError:
            allowed = ", ".join(c.value for c in EventCategory)
            raise argparse.ArgumentTypeError(
                f"unknown category {name!r} (choose from: {allowed})"
            ) from None
    return chosen


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="Run programs under a trio_observer session and report what they do.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser(
        "run",
        help="run a command and write its events as JSON Lines",
        description=(
            "Run CMD in a session. CMD's stdin, stdout and stderr are passed through; "
            "its events are written as JSON Lines, one object per line. The exit status "
            "is CMD's (128 + N when signal N ended it). Ctrl-C or SIGTERM stops CMD and "
            "everything it started."
        ),
        epilog="example: trio-observer run --events events.jsonl -- make test",
    )
    run.add_argument(
        "--events",
        metavar="FILE",
        help="write events to FILE (default: standard error)",
    )
    run.add_argument(
        "--category",
        metavar="LIST",
        type=_categories,
        action="append",
        help=(
            "comma-separated event categories to report: lifecycle, process, file, "
            "network (default: lifecycle; may be repeated)"
        ),
    )
    run.add_argument(
        "--grace-period",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="time between SIGTERM and SIGKILL when stopping CMD's tree (default: 5)",
    )
    run.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``trio-observer``; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "run":
        cmd = list(args.cmd)
        if cmd[:1] == ["--"]:
            cmd = cmd[1:]
        if not cmd:
            parser.error("run: no command given (usage: trio-observer run -- CMD [ARGS...])")
        categories = sorted(
            {c for group in (args.category or [[EventCategory.LIFECYCLE]]) for c in group},
            key=lambda c: c.value,
        )
        with contextlib.ExitStack() as stack:
            events_file: IO[str] = sys.stderr
            if args.events:
                try:
                    events_file = stack.enter_context(open(args.events, "a", encoding="utf-8"))
                except OSError as exc:
                    print(f"{_PROG}: cannot open --events {args.events!r}: {exc}", file=sys.stderr)
                    return 2
            return trio.run(_run, cmd, categories, events_file, args.grace_period)
    raise AssertionError(args.command)  # pragma: no cover - argparse enforces choices


async def _run(
    cmd: list[str],
    categories: list[EventCategory],
    events_file: IO[str],
    grace_period: float,
) -> int:
    stopped_by: list[int] = []
    watch_signals = trio.CancelScope()
    async with trio.open_nursery() as helpers:
        async with open_session(grace_period=grace_period) as session:
            await helpers.start(_write_events, session, categories, events_file)
            helpers.start_soon(_stop_on_signal, session, stopped_by, watch_signals)
            try:
                process = await session.start_process(cmd)
            except FileNotFoundError:
                print(f"{_PROG}: command not found: {cmd[0]}", file=sys.stderr)
                return 127
            except PermissionError:
                print(f"{_PROG}: permission denied: {cmd[0]}", file=sys.stderr)
                return 126
            finally:
                if session.processes == ():
                    watch_signals.cancel()
            with _terminal_foreground(process.pid):
                await process.wait()
        # The session has ended: CMD and all it left behind are reaped, and
        # the event writer drains and stops by itself.
        watch_signals.cancel()
    code = process.returncode
    assert code is not None
    if code < 0:
        return 128 - code
    if stopped_by and process.termination is not TerminationOutcome.NATURAL_EXIT:
        return 128 + stopped_by[0]
    return code


async def _write_events(
    session: Session,
    categories: list[EventCategory],
    events_file: IO[str],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    # BLOCK: the log should be complete, and writing a line is quick. The
    # loop ends when the session closes its sinks.
    async with session.observers.subscribe(
        categories, capacity=1024, backpressure=ObserverBackpressure.BLOCK
    ) as subscription:
        task_status.started()
        async for event in subscription:
            events_file.write(event.to_json() + "\n")
            events_file.flush()


async def _stop_on_signal(session: Session, stopped_by: list[int], scope: trio.CancelScope) -> None:
    with scope, trio.open_signal_receiver(*_STOP_SIGNALS) as signals:
        async for sig in signals:
            stopped_by.append(sig)
            session.cancel_scope.cancel()
            return


@contextlib.contextmanager
def _terminal_foreground(pgid: int) -> Iterator[None]:
    """Give the controlling terminal to CMD's process group while it runs.

    CMD leads its own process group (so that its tree can be stopped as
    one); from the terminal's point of view that group is in the
    background, and reading the terminal would stop it with SIGTTIN. So,
    like a shell, hand it the terminal, wake it in case it was already
    stopped, and take the terminal back afterwards.
    """
    try:
        tty_fd = sys.stdin.fileno()
        ours = os.tcgetpgrp(tty_fd) == os.getpgrp()
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        yield
        return
    old_handler = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    try:
        os.tcsetpgrp(tty_fd, pgid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGCONT)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.tcsetpgrp(tty_fd, os.getpgrp())
        signal.signal(signal.SIGTTOU, old_handler)
