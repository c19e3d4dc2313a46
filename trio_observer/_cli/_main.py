"""The top-level parser: one subcommand a module, each registering itself."""

from __future__ import annotations

import argparse
import atexit
import importlib
import os
import sys
import threading
from collections.abc import Sequence
from typing import Final, NoReturn

from ._prog import PROG

_REGISTERS: Final = {
    "run": ("._run", "add_parser"),
    "daemon": ("._daemon", "add_parser"),
    "spawn": ("._client_cmds", "add_parsers"),
    "ps": ("._client_cmds", "add_parsers"),
    "logs": ("._client_cmds", "add_parsers"),
    "events": ("._client_cmds", "add_parsers"),
    "stop": ("._client_cmds", "add_parsers"),
    "attach": ("._attach", "add_parser"),
    "capabilities": ("._capabilities", "add_parser"),
}
"""Each subcommand's module and the function in it that registers it."""


def _parser(command: str | None) -> argparse.ArgumentParser:
    """The parser, with only ``command``'s module imported when it is one of ours.

    A launch runs one subcommand, and importing the others (the daemon's
    server, its client, the terminal code) would cost every ``run`` tens of
    milliseconds. Without a known subcommand (``--help``, a typo), every
    module registers, so that the help and the error list them all.
    """
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Run programs under a trio_observer session and report what they do.",
    )
    # Not required=True: argparse would then report a missing COMMAND before
    # an unknown option, and name the option nowhere (main() checks both).
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = [_REGISTERS[command]] if command in _REGISTERS else _REGISTERS.values()
    for module, register in dict.fromkeys(wanted):
        getattr(importlib.import_module(module, __package__), register)(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``trio-observer``; returns the exit status."""
    args_given = list(sys.argv[1:] if argv is None else argv)
    parser = _parser(args_given[0] if args_given else None)
    args, unknown = parser.parse_known_args(args_given)
    if unknown:
        # Name the option with the usage of the (sub)command it was given to.
        (_subcommand(parser, args.command) or parser).error(
            f"unrecognized arguments: {' '.join(unknown)}"
        )
    if args.command is None:
        parser.error("the following arguments are required: COMMAND")
    status: int = args.handler(args, parser)
    return status


def program() -> NoReturn:
    """The ``trio-observer`` program: :func:`main`, then exit without the teardown.

    When the command is done, nothing needs the interpreter's finalization
    (the session has reaped CMD's tree and closed what it opened), and
    freeing every module's objects one by one took longer than the whole
    session of ``run -- true`` (the start-up benchmark): the kernel frees
    the memory at once. So the program runs the ``atexit`` handlers
    (``logging``'s flush, an OpenTelemetry SDK's shutdown, a coverage
    tool's save), flushes stdout and stderr and ends with ``os._exit``, as
    servers that skip the final collection do. While a non-daemon thread
    runs, or when a stream cannot be flushed, it takes the normal exit
    instead, which waits for the thread or reports the stream (status 120).
    """
    status = main()
    _exit_now(status)


def _exit_now(status: int) -> NoReturn:
    if any(not t.daemon for t in threading.enumerate() if t is not threading.current_thread()):
        sys.exit(status)
    atexit._run_exitfuncs()  # and unregisters them: the normal exit would not run them again
    try:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
    except (OSError, ValueError):
        sys.exit(status)
    os._exit(status)


def _subcommand(
    parser: argparse.ArgumentParser, name: str | None
) -> argparse.ArgumentParser | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and name is not None:
            found: argparse.ArgumentParser | None = action.choices.get(name)
            return found
    return None
