"""The client commands: ``spawn``, ``ps``, ``logs``, ``events``, ``stop``.

Each is a thin use of :func:`trio_observer.connect`; ``attach`` is in
``_attach.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from .._cursor import OutputGap
from .._daemon._client import DaemonClient, DaemonError, RemoteMissed, connect, remote_item
from .._events import EventCategory
from ._daemon import add_socket_option
from ._prog import PROG
from ._run import _categories, _seconds


def _client_parser(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help: str
) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, help=help, description=help)
    add_socket_option(parser)
    parser.add_argument(
        "--session", default="default", help="the daemon session (default: default)"
    )
    parser.add_argument(
        "--no-autostart", action="store_true", help="fail if no daemon runs rather than start one"
    )
    return parser


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the client commands with the top-level parser."""
    spawn = _client_parser(
        commands, "spawn", "start a command in the daemon; it outlives this client"
    )
    spawn.set_defaults(handler=_handler(_spawn))
    spawn.add_argument("--name", help="the process's name (default: program-N)")
    spawn.add_argument("--pty", action="store_true", help="run it on a terminal you can attach to")
    spawn.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")

    ps = _client_parser(commands, "ps", "list the daemon's sessions and processes")
    ps.set_defaults(handler=_handler(_ps))
    ps.add_argument("--json", action="store_true", help="one JSON object per process")

    logs = _client_parser(commands, "logs", "print a process's captured output")
    logs.set_defaults(handler=_handler(_logs))
    logs.add_argument("name")
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing until it ends")
    logs.add_argument(
        "--from", dest="offset", type=int, metavar="OFFSET", help="start at this byte offset"
    )
    logs.add_argument("--stream", choices=["stdout", "stderr", "pty"], help="which stream")

    events = _client_parser(commands, "events", "write a session's events as JSON Lines")
    events.set_defaults(handler=_handler(_events))
    events.add_argument("--category", type=_categories, action="append", metavar="LIST")
    events.add_argument(
        "--follow",
        "-f",
        action="store_true",
        help="print the events as they come (without it: only the first line, then exit)",
    )
    events.add_argument("--resume", metavar="ID", help="resume subscription ID")
    events.add_argument(
        "--from-seq", type=int, default=0, help="with --resume: the first seq wanted"
    )
    events.add_argument("--capacity", type=int, default=256)
    events.add_argument(
        "--block", action="store_true", help="BLOCK backpressure (default DROP_OLDEST)"
    )

    stop = _client_parser(
        commands, "stop", "stop a process tree: SIGTERM, then SIGKILL after the grace period"
    )
    stop.set_defaults(handler=_handler(_stop))
    stop.add_argument("name")
    stop.add_argument("--grace-period", type=_seconds, metavar="SECONDS")


Command = Callable[[DaemonClient, argparse.Namespace, argparse.ArgumentParser], Awaitable[int]]


def _handler(body: Command) -> Callable[[argparse.Namespace, argparse.ArgumentParser], int]:
    def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
        async def main() -> int:
            async with connect(args.socket, autostart=not args.no_autostart) as client:
                return await body(client, args, parser)

        try:
            return trio.run(main)
        except (DaemonError, RuntimeError) as exc:
            print(f"{PROG}: {exc}", file=sys.stderr)
            return 1
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            print(f"{PROG}: no daemon answers: {exc}", file=sys.stderr)
            return 1

    return run


def _print(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


async def _spawn(
    client: DaemonClient, args: argparse.Namespace, parser: argparse.ArgumentParser
) -> int:
    cmd = list(args.cmd)
    if cmd[:1] == ["--"]:
        cmd = cmd[1:]
    if not cmd:
        parser.error("spawn: no command given (usage: trio-observer spawn -- CMD [ARGS...])")
    size = os.get_terminal_size(0) if args.pty and os.isatty(0) else None
    pty: bool | tuple[int, int] = (size.lines, size.columns) if size else bool(args.pty)
    sessions = {s["name"] for s in await client.sessions()}
    if args.session not in sessions and args.session != "default":
        await client.create_session(args.session, exist_ok=True)
    _print(await client.start(cmd, session=args.session, name=args.name, cwd=os.getcwd(), pty=pty))
    return 0


async def _ps(
    client: DaemonClient, args: argparse.Namespace, parser: argparse.ArgumentParser
) -> int:
    rows = [(s["name"], p) for s in await client.sessions() for p in s["processes"]]
    if args.json:
        for session, process in rows:
            _print({"session": session, **process})
        return 0
    print(f"{'SESSION':<12} {'NAME':<20} {'PID':>7} {'STATE':<8} {'EXIT':>5}  COMMAND")
    for session, p in rows:
        code = "" if p["exit_code"] is None else str(p["exit_code"])
        command = " ".join(p["argv"])
        print(f"{session:<12} {p['name']:<20} {p['pid']:>7} {p['state']:<8} {code:>5}  {command}")
    return 0


async def _logs(
    client: DaemonClient, args: argparse.Namespace, parser: argparse.ArgumentParser
) -> int:
    out = sys.stdout.buffer
    items = await client.output(
        args.name, session=args.session, stream=args.stream, offset=args.offset, follow=args.follow
    )
    async for item in items:
        if isinstance(item, OutputGap):
            print(
                f"{PROG}: {item.missed_bytes} bytes no longer held by the backlog", file=sys.stderr
            )
        else:
            out.write(item)
            out.flush()
    return 0


async def _events(
    client: DaemonClient, args: argparse.Namespace, parser: argparse.ArgumentParser
) -> int:
    if args.resume:
        stream = await client.resume(args.resume, from_seq=args.from_seq)
    else:
        groups = args.category or [[EventCategory.LIFECYCLE]]
        categories = sorted({c.value for group in groups for c in group})
        stream = await client.subscribe(
            session=args.session,
            categories=categories,
            capacity=args.capacity,
            backpressure="block" if args.block else "drop-oldest",
        )
    # The first line says which subscription this is, so that a later
    # `events --resume ID --from-seq N` picks up exactly where this one stopped.
    _print({"subscription": stream.result["id"], "next_seq": stream.result["next_seq"]})
    if not args.follow:
        return 0
    async for frame in stream:
        item = remote_item(frame)
        if isinstance(item, RemoteMissed):
            _print({"missed": item.count, "seq": item.seq, "lost_in": item.lost_in})
        else:
            _print({"seq": item.seq, **item.event})
    return 0


async def _stop(
    client: DaemonClient, args: argparse.Namespace, parser: argparse.ArgumentParser
) -> int:
    _print(await client.terminate(args.name, session=args.session, grace_period=args.grace_period))
    return 0
