"""The top-level parser: one subcommand a module, each registering itself."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from .._capabilities import TraceScope, negotiate_capabilities
from . import _attach, _client_cmds, _daemon, _run
from ._prog import PROG


def _capabilities(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    print(negotiate_capabilities(TraceScope(args.scope)).render_summary())
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Run programs under a trio_observer session and report what they do.",
    )
    # Not required=True: argparse would then report a missing COMMAND before
    # an unknown option, and name the option nowhere (main() checks both).
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _run.add_parser(commands)
    _daemon.add_parser(commands)
    _client_cmds.add_parsers(commands)
    _attach.add_parser(commands)
    caps = commands.add_parser(
        "capabilities",
        help="show what this machine can observe",
        description="Show, per event category, whether this machine can observe it and how.",
    )
    caps.set_defaults(handler=_capabilities)
    caps.add_argument(
        "--scope",
        choices=[scope.value for scope in TraceScope],
        default=TraceScope.LAUNCHED_PROCESS_TREE.value,
        help="what to observe: the launched tree (default) or the whole system",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``trio-observer``; returns the exit status."""
    parser = _parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        # Name the option with the usage of the (sub)command it was given to.
        (_subcommand(parser, args.command) or parser).error(
            f"unrecognized arguments: {' '.join(unknown)}"
        )
    if args.command is None:
        parser.error("the following arguments are required: COMMAND")
    status: int = args.handler(args, parser)
    return status


def _subcommand(
    parser: argparse.ArgumentParser, name: str | None
) -> argparse.ArgumentParser | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and name is not None:
            found: argparse.ArgumentParser | None = action.choices.get(name)
            return found
    return None
