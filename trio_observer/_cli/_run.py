"""``trio-observer run -- CMD``: run CMD in a session and write its events as JSON Lines."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from collections.abc import Callable, Iterator
from typing import Any, Final

import trio

from .._checks import check_seconds
from .._events import EventCategory, TerminationOutcome
from .._limits import Limits
from .._linux import CONTAINMENTS, CgroupUnavailableError, probe_cgroup
from .._open_session import open_session
from .._process import Process
from .._pty import PtySize
from .._session import Session
from .._sink import ObserverBackpressure
from . import _otlp
from ._prog import PROG

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


def _seconds(text: str) -> float:
    try:
        return check_seconds("--grace-period", float(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds >= 0") from exc


_SIZE_UNITS: Final = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def _limit(field: str, parse: Callable[[str], float]) -> Callable[[str], float]:
    """An argparse type: ``parse``, then the check of ``Limits`` (one wording)."""

    def convert(text: str) -> float:
        try:
            value = parse(text)
            checked: dict[str, Any] = {field: value}
            Limits(**checked)
        except (TypeError, ValueError) as exc:
            raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None
        return value

    return convert


def _size(text: str) -> int:
    digits = text.strip()
    unit = digits[-1:].lower() if digits[-1:].isalpha() else ""
    if unit not in _SIZE_UNITS:
        raise ValueError("a size is a number of bytes with an optional K, M or G suffix")
    number = digits[: len(digits) - len(unit)]
    if not number.isdigit():
        raise ValueError("a size is a number of bytes with an optional K, M or G suffix")
    return int(number) * _SIZE_UNITS[unit]


def _count(text: str) -> int:
    if not text.strip().isdigit():
        raise ValueError("N is a whole number of processes, such as 64")
    return int(text)


def _cpus(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError("CPUS is a number of CPUs, such as 0.5 or 2") from None


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``run`` with the top-level parser."""
    run = commands.add_parser(
        "run",
        help="run a command and write its events as JSON Lines",
        description=(
            "Run CMD in a session. CMD's stdin, stdout and stderr are passed through; "
            "its events are written as JSON Lines, one object per line. The exit status "
            "is CMD's (128 + N when signal N ended it). Signal N (Ctrl-C, SIGTERM, SIGHUP) "
            "to trio-observer stops CMD and everything it started, and the exit status "
            "is then 128 + N; a second signal while it waits out the grace period "
            "sends SIGKILL at once."
        ),
        epilog="example: trio-observer run --events events.jsonl -- make test",
    )
    run.set_defaults(handler=command)
    run.add_argument(
        "--events",
        metavar="FILE",
        help=(
            "append events to FILE, creating it if needed (default: standard error); "
            "if writing fails, CMD runs on and the lost events are counted"
        ),
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
        type=_seconds,
        default=5.0,
        metavar="SECONDS",
        help="time between SIGTERM and SIGKILL when stopping CMD's tree (default: 5)",
    )
    run.add_argument(
        "--pty",
        action="store_true",
        help=(
            "run CMD on a pseudo-terminal attached to yours (raw mode while it runs, "
            "window size follows yours), so interactive programs work"
        ),
    )
    run.add_argument(
        "--containment",
        choices=CONTAINMENTS,
        default=None,
        help=(
            "how the session holds CMD's tree: auto (default: a cgroup where this "
            "process may make one, else process groups; cgroup when a limit is given), "
            "cgroup (nothing escapes; an error where no cgroup can be made) or "
            "process-group (env -i setsid escapes)"
        ),
    )
    limits = run.add_argument_group(
        "limits",
        "limits on CMD and everything it starts, together (the session's cgroup); they "
        "need cgroup containment and the cgroup v2 controller of each, and where one "
        "cannot be kept the command does not run (exit status 2, with the reason)",
    )
    limits.add_argument(
        "--memory-max",
        type=_limit("memory_max", _size),
        metavar="SIZE",
        help="memory.max: bytes, or with a K, M or G suffix (1024-based), e.g. 512M",
    )
    limits.add_argument(
        "--pids-max",
        type=_limit("pids_max", _count),
        metavar="N",
        help="pids.max: processes and threads at once; a fork beyond it fails",
    )
    limits.add_argument(
        "--cpu-max",
        type=_limit("cpu_max", _cpus),
        metavar="CPUS",
        help="cpu.max: CPUs' worth of time, e.g. 0.5 (from 0.01)",
    )
    limits.add_argument(
        "--move-self-to-leaf",
        action="store_true",
        help=(
            "where the controllers must be enabled in trio-observer's own cgroup and it "
            "is the only process there, move it into a leaf cgroup of its own first "
            "(the kernel's no-internal-processes rule); without it, that is an error"
        ),
    )
    _otlp.add_arguments(run)
    run.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")


def command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run ``trio-observer run``; returns the exit status."""
    cmd = list(args.cmd)
    if cmd[:1] == ["--"]:
        cmd = cmd[1:]
    if not cmd:
        parser.error("run: no command given (usage: trio-observer run -- CMD [ARGS...])")
    categories = sorted(
        {c for group in (args.category or [[EventCategory.LIFECYCLE]]) for c in group},
        key=lambda c: c.value,
    )
    # Refused here, in one line, rather than as an error from inside the
    # session (probing opens a netlink socket, so only when needed).
    tree_categories = [c for c in categories if c is not EventCategory.LIFECYCLE]
    if tree_categories:
        from .._capabilities import UnsupportedCategoryError, negotiate_capabilities

        capabilities = negotiate_capabilities()
        for category in tree_categories:
            try:
                capabilities.require(category)
            except UnsupportedCategoryError as exc:
                say(str(exc))
                return 2
    limits = Limits(memory_max=args.memory_max, pids_max=args.pids_max, cpu_max=args.cpu_max)
    containment = args.containment or ("cgroup" if limits else "auto")
    if limits and containment == "process-group":
        parser.error(
            "run: --memory-max, --pids-max and --cpu-max need --containment cgroup or auto"
        )
    if containment == "cgroup":
        support = probe_cgroup()
        if not support.available:
            needs = "--containment cgroup" if args.containment else "limits need a cgroup, but it"
            say(f"{needs} is not available: {support.reason}")
            return 2
    with contextlib.ExitStack() as stack:
        writer = _EventWriter(sys.stderr.fileno(), "standard error")
        if args.events:
            try:
                events_file = stack.enter_context(open(args.events, "ab", buffering=0))
            except OSError as exc:
                say(f"cannot open --events {args.events!r}: {exc}")
                return 2
            writer = _EventWriter(events_file.fileno(), repr(args.events))
        exporter = _otlp.open_from_args(args, stack)
        if exporter is False:
            return 2
        try:
            return trio.run(
                _run,
                cmd,
                categories,
                writer,
                args.grace_period,
                args.pty,
                exporter,
                containment,
                limits,
                args.move_self_to_leaf,
            )
        finally:
            writer.summary()


async def _run(
    cmd: list[str],
    categories: list[EventCategory],
    writer: _EventWriter,
    grace_period: float,
    use_pty: bool,
    exporter: _otlp.OTelExporter | None = None,
    containment: str = "auto",
    limits: Limits | None = None,
    move_self_to_leaf: bool = False,
) -> int:
    stopped_by: list[int] = []
    watch_signals = trio.CancelScope()
    process: Process | None = None
    async with trio.open_nursery() as helpers:
        try:
            async with open_session(
                grace_period=grace_period,
                containment=containment,
                limits=limits,
                move_self_to_leaf=move_self_to_leaf,
            ) as session:
                await helpers.start(_write_events, session, categories, writer)
                if exporter is not None:
                    await helpers.start(_otlp.export, exporter, session, categories)
                # Started, not start_soon: the handlers must be installed
                # before CMD exists, or a SIGTERM/SIGHUP right after the
                # spawn kills this process and orphans CMD's tree.
                await helpers.start(_stop_on_signal, session, stopped_by, watch_signals)
                try:
                    pty: PtySize | bool = False
                    if use_pty:
                        from .._terminal import terminal_size

                        pty = terminal_size(sys.stdin.fileno()) or PtySize()
                    process = await session.start_process(cmd, pty=pty)
                except FileNotFoundError:
                    say(f"command not found: {cmd[0]}")
                    return 127
                except PermissionError:
                    say(f"permission denied: {cmd[0]}")
                    return 126
                if process.pty is not None:
                    await _attach_terminal(process, helpers)
                else:
                    with _terminal_foreground(process.pid):
                        await process.wait()
            # The session has ended: CMD and all it left behind are reaped,
            # and the event writer drains and stops by itself.
        except CgroupUnavailableError as exc:
            # Raised only as the session opens (from inside it, errors come
            # in a group): a limit that cannot be kept, before CMD exists.
            say(str(exc))
            return 2
        finally:
            watch_signals.cancel()
    if process is None:
        # Stopped before CMD could start (the observer was being set up).
        return 128 + stopped_by[0] if stopped_by else 1
    code = process.returncode
    assert code is not None
    if stopped_by and process.termination is not TerminationOutcome.NATURAL_EXIT:
        # We stopped CMD because we were told to stop: report that signal,
        # as a shell would (130 after Ctrl-C), not the SIGTERM we sent.
        return 128 + stopped_by[0]
    if code < 0:
        return 128 - code
    return code


async def _attach_terminal(process: Process, helpers: trio.Nursery) -> None:
    """Connect the user's terminal to CMD's until CMD exits.

    The user's terminal is in raw mode from here until CMD's output has been
    copied to the end, which is when the session has ended and closed the
    pty's log; the copier reads the log with a cursor from its first byte.
    """
    from .._terminal import copy_input, forward_resizes, raw_terminal, write_all

    assert process.pty is not None
    stream = process.pty.stream
    user_in, user_out = sys.stdin.fileno(), sys.stdout.fileno()
    cursor = process.pty.log.cursor("oldest")

    async def copy_out(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with raw_terminal(user_in):
            task_status.started()
            async for item in cursor:
                if isinstance(item, bytes):
                    try:
                        await write_all(user_out, item)
                    except OSError as exc:
                        # Our stdout went away (| head): CMD runs on, its
                        # output stays in the pty's log.
                        say(f"cannot write CMD's terminal output: {exc.strerror or exc}")
                        return

    await helpers.start(copy_out)
    async with trio.open_nursery() as nursery:
        await nursery.start(forward_resizes, user_in, stream)
        nursery.start_soon(copy_input, user_in, stream)
        await process.wait()
        nursery.cancel_scope.cancel()


def say(text: str) -> None:
    """Write one line to stderr, unbuffered; a broken stderr is not our death.

    ``os.write`` rather than ``print``: a failed buffered write would stay in
    ``sys.stderr``'s buffer and fail again (with a traceback) at exit.
    """
    with contextlib.suppress(OSError, ValueError):
        _write_fd(sys.stderr.fileno(), f"{PROG}: {text}\n".encode())


def _write_fd(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class _EventWriter:
    """Writes events to a file descriptor until a write fails, then counts them.

    Writing the events is what ``run`` is for, but CMD matters more: a full
    disk or a closed pipe (``| head``) must not kill it or change its exit
    status. After the first failure, one line on stderr names the problem
    and every later event is counted as lost instead.
    """

    def __init__(self, fd: int, name: str) -> None:
        self._fd = fd
        self._name = name
        self.lost = 0

    def write(self, line: str) -> None:
        if self.lost:
            self.lost += 1
            return
        try:
            _write_fd(self._fd, line.encode("utf-8"))
        except OSError as exc:
            self.lost = 1
            say(
                f"cannot write events to {self._name}: {exc.strerror or exc}; "
                "counting them as lost from here on"
            )

    def summary(self) -> None:
        if self.lost:
            say(f"{self.lost} event(s) could not be written to {self._name}")


async def _write_events(
    session: Session,
    categories: list[EventCategory],
    writer: _EventWriter,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    # BLOCK: the log should be complete, and writing a line is quick. The
    # loop ends when the session closes its sinks. After a failed write the
    # loop goes on consuming, so that a BLOCK sink never stalls CMD.
    async with session.observers.subscribe(
        categories, capacity=1024, backpressure=ObserverBackpressure.BLOCK
    ) as subscription:
        task_status.started()
        async for event in subscription:
            writer.write(event.to_json() + "\n")


async def _stop_on_signal(
    session: Session,
    stopped_by: list[int],
    scope: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    # Kept until the session has ended (the caller cancels ``scope`` then),
    # not left at the first signal: the handlers would go back to the
    # defaults, and a second SIGTERM or SIGHUP during the teardown would
    # kill this process while CMD's tree waits out its grace period, so
    # a CMD that ignores SIGTERM outlived us. A second signal ends the
    # grace instead (SIGKILL now), as a second Ctrl-C does for a session.
    with scope, trio.open_signal_receiver(*_STOP_SIGNALS) as signals:
        task_status.started()
        async for sig in signals:
            if stopped_by:
                session._hurry_teardown()
            else:
                stopped_by.append(sig)
                session.cancel_scope.cancel()


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
