"""``trio-observer attach NAME``: your terminal on a PTY process of the daemon.

The backlog is replayed first, then output follows live. Keys go to the
process in raw mode; ``Ctrl-]`` (byte 0x1d, as telnet's escape) detaches
and leaves the process running. One client at a time types: a second
``attach`` while another is the writer watches read-only and is told so.
"""

from __future__ import annotations

import argparse
import base64
import signal
import sys
from typing import Final

import trio

from .._daemon._client import DaemonClient, RemoteStream
from .._terminal import fd_never_blocks, raw_terminal, read_user, terminal_size, write_all
from ._client_cmds import _client_parser, _handler
from ._prog import PROG

DETACH_KEY: Final = b"\x1d"
"""Ctrl-]: detaches without stopping the process."""


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``attach`` with the top-level parser."""
    attach = _client_parser(
        commands, "attach", "connect your terminal to a PTY process (Ctrl-] detaches)"
    )
    attach.set_defaults(handler=_handler(_attach))
    attach.add_argument("name")
    attach.add_argument("--read-only", action="store_true", help="watch without typing")


async def _attach(
    client: DaemonClient, args: argparse.Namespace, parser: argparse.ArgumentParser
) -> int:
    stream = await client.attach(args.name, session=args.session, write=not args.read_only)
    user_in, user_out = sys.stdin.fileno(), sys.stdout.fileno()
    if not stream.result["writer"] and not args.read_only:
        print(
            f"{PROG}: another client is typing into {args.name}; watching read-only",
            file=sys.stderr,
        )
    with raw_terminal(user_in):
        async with trio.open_nursery() as nursery:
            writer = bool(stream.result["writer"])
            # A watcher reads its keys too, for the detach key; only the
            # writer's reach the process.
            nursery.start_soon(_keys, client, args, user_in, writer, nursery.cancel_scope)
            if writer:
                nursery.start_soon(_resizes, client, args, user_in)
            await _screen(stream, user_out)
            nursery.cancel_scope.cancel()
    await stream.aclose()
    return 0


async def _screen(stream: RemoteStream, user_out: int) -> None:
    async for frame in stream:
        if "data" in frame:
            await write_all(user_out, base64.b64decode(frame["data"]))


async def _keys(
    client: DaemonClient,
    args: argparse.Namespace,
    user_in: int,
    writer: bool,
    scope: trio.CancelScope,
) -> None:
    never_blocks = fd_never_blocks(user_in)
    while data := await read_user(user_in, never_blocks):
        head, detach, _ = data.partition(DETACH_KEY)
        if head and writer:
            await client.send_input(args.name, head, session=args.session)
        if detach:
            scope.cancel()
            return


async def _resizes(client: DaemonClient, args: argparse.Namespace, user_in: int) -> None:
    with trio.open_signal_receiver(signal.SIGWINCH) as changes:
        size = terminal_size(user_in)
        if size is not None:
            await client.resize(args.name, size.rows, size.cols, session=args.session)
        async for _ in changes:
            size = terminal_size(user_in)
            if size is not None:
                await client.resize(args.name, size.rows, size.cols, session=args.session)
