"""``trio-observer daemon [start|stop|status]``: run or manage the daemon."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from .._daemon._client import DaemonError, connect, start_daemon
from .._daemon._paths import UnsafeSocketDirectory, prepare_directory, resolve_socket_path
from .._daemon._server import DaemonAlreadyRunning, serve
from . import _otlp
from ._prog import PROG

if TYPE_CHECKING:
    # _otlp imports the exporter only where --otlp builds it.
    from ._otlp import OTelExporter


def add_socket_option(parser: argparse.ArgumentParser) -> None:
    """The ``--socket PATH`` option every daemon command takes."""
    parser.add_argument(
        "--socket",
        metavar="PATH",
        help="the daemon's socket (default: $TRIO_OBSERVER_SOCKET, else "
        "$XDG_RUNTIME_DIR/trio-observer/daemon.sock, else /tmp/trio-observer-UID/daemon.sock)",
    )


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``daemon`` with the top-level parser."""
    daemon = commands.add_parser(
        "daemon",
        help="run the daemon that keeps sessions alive between clients",
        description=(
            "Without an action, run the daemon in the foreground (for systemd units and "
            "tests); 'start' runs it in the background, 'stop' stops every session with "
            "its grace period and exits it, 'status' prints its state as JSON."
        ),
    )
    daemon.set_defaults(handler=command)
    daemon.add_argument("action", nargs="?", choices=["start", "stop", "status"])
    add_socket_option(daemon)
    _otlp.add_arguments(daemon)
    daemon.add_argument("--detach", action="store_true", help=argparse.SUPPRESS)
    daemon.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)


def command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run ``trio-observer daemon``; returns the exit status."""
    path = resolve_socket_path(args.socket)
    if args.action is None:
        return _foreground(path, args, detach=args.detach, ready_fd=args.ready_fd)
    if args.action != "start" and args.otlp is not None:
        parser.error(f"daemon {args.action}: --otlp is for the daemon itself or 'daemon start'")
    return trio.run(_manage, args.action, path, _otlp.passed_on(args))


def _foreground(path: Path, args: argparse.Namespace, *, detach: bool, ready_fd: int | None) -> int:
    if detach and os.fork() != 0:
        # The parent returns at once; the daemon is reparented away from
        # whoever started us, so that it never becomes their zombie.
        os._exit(0)
    logging.basicConfig(level=logging.INFO, format=f"{PROG} daemon: %(message)s")
    if detach:
        try:
            prepare_directory(path.parent)
        except OSError as exc:
            if ready_fd is not None:
                os.write(ready_fd, f"error: {exc}\n".encode())
            return 1
        _to_log_file(path)

    async def main(exporter: OTelExporter | None) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(serve, path, exporter=exporter))
            if ready_fd is not None:
                os.write(ready_fd, b"ready\n")
                os.close(ready_fd)

    try:
        # The OTLP pipeline outlives the daemon's trio run: it is flushed,
        # and its losses reported (in the log), once every session is down.
        with contextlib.ExitStack() as stack:
            exporter = _otlp.open_from_args(args, stack)
            if exporter is False:
                if ready_fd is not None:
                    os.write(ready_fd, b"error: --otlp needs the otel-cli extra\n")
                return 2
            trio.run(main, exporter)
    except (DaemonAlreadyRunning, UnsafeSocketDirectory, OSError) as exc:
        print(f"{PROG} daemon: {exc}", file=sys.stderr)
        if ready_fd is not None:
            os.write(ready_fd, f"error: {exc}\n".encode())
        return 1
    return 0


def _to_log_file(path: Path) -> None:
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    log = os.open(path.parent / "daemon.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)


async def _manage(action: str, path: Path, daemon_args: list[str]) -> int:
    try:
        if action == "start":
            try:
                async with connect(path, autostart=False) as client:
                    print(json.dumps(await client.status()))
                    return 0
            except (FileNotFoundError, ConnectionRefusedError):
                await start_daemon(path, daemon_args)
            async with connect(path, autostart=False) as client:
                print(json.dumps(await client.status()))
            return 0
        async with connect(path, autostart=False) as client:
            if action == "status":
                print(json.dumps(await client.status()))
            else:
                await client.shutdown()
                # The daemon closes the connection once every session is down.
                await client.wait_closed()
        return 0
    except (FileNotFoundError, ConnectionRefusedError):
        print(f"{PROG}: no daemon is running on {path}", file=sys.stderr)
        return 1
    except (DaemonError, RuntimeError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
