"""``trio-observer capabilities``: what this machine can observe."""

from __future__ import annotations

import argparse

from .._capabilities import TraceScope, negotiate_capabilities


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``capabilities`` with the top-level parser."""
    caps = commands.add_parser(
        "capabilities",
        help="show what this machine can observe",
        description="Show, per event category, whether this machine can observe it and how.",
    )
    caps.set_defaults(handler=command)
    caps.add_argument(
        "--scope",
        choices=[scope.value for scope in TraceScope],
        default=TraceScope.LAUNCHED_PROCESS_TREE.value,
        help="what to observe: the launched tree (default) or the whole system",
    )


def command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run ``trio-observer capabilities``; returns the exit status."""
    print(negotiate_capabilities(TraceScope(args.scope)).render_summary())
    return 0
