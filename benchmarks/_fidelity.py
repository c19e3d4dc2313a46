"""Section ``fidelity``: what a session reports, against what really ran.

Not a speed figure: each workload records its own ground truth (every
process of interest appends ``$$`` and its exit code to a file), runs as the
root of a session with a ``BLOCK`` sink for LIFECYCLE, PROCESS, FILE and
NETWORK read by a consumer outside the session (so the teardown is seen),
once on each backend (the connector, if this process may subscribe, and
polling, the connector refused as ``auto`` does without ``CAP_NET_ADMIN``).

Workloads:

* ``storm``: a shell starts 200 children at once (``&``), each recording
  itself and exiting 3, then waits;
* ``true``: a shell runs 500 children one after another, each recording
  itself and then ``exec /bin/true``;
* ``make``: ``make -j4`` of a generated 20-file C project (each recipe's
  shell records itself; the compilers under it are not in the ground truth,
  so precision is not computed here);
* ``zombies``: a Python root forks 5 children that record themselves and
  exit 3, holds them as zombies for 10 intervals, then reaps them;
* ``long``: 20 children, each living 3 poll intervals (what polling
  promises to see, with its exit);
* ``files``: a Python root holds 10 files, then 10 listening sockets, each
  for 0.5, 2 and 5 intervals (how many were seen opened and closed, per
  holding time).

Rows, per workload and backend: recall (recorded processes reported
started), exits (reported exited, with the recorded code where the backend
knows codes: the connector), precision (reported descendants that are
recorded ones), duplicates (recorded processes started more than once),
pairing (reported starts with exactly one exit), and the loss the session
counted (``observation-lost`` events, sink misses). Targets: on the
connector, recall and pairing 100 %, no duplicates; polling, 100 % of the
``long`` and ``zombies`` processes with their exits; everywhere, no
``missed_events`` on the sink.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import tempfile
import unittest.mock
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import trio

from trio_observer import (
    EventCategory,
    ObserverBackpressure,
    ObserverEvent,
    ObserverEventKind,
    Session,
    open_session,
)
from trio_observer._linux import _connector
from trio_observer._linux._connector import ConnectorUnavailableError, probe_connector

from ._core import Config, Report, Row, Target

INTERVAL = 0.02  # the session's default poll_interval
ALL = [EventCategory.LIFECYCLE, EventCategory.PROCESS, EventCategory.FILE, EventCategory.NETWORK]

_STORM = """
i=0
while [ $i -lt {n} ]; do
  sh -c 'echo $$ 3 >> {gt}; exit 3' &
  i=$((i+1))
done
wait
"""

_TRUE = """
i=0
while [ $i -lt {n} ]; do
  sh -c 'echo $$ 0 >> {gt}; exec /bin/true'
  i=$((i+1))
done
"""

_LONG = """
i=0
while [ $i -lt {n} ]; do
  sh -c 'echo $$ 0 >> {gt}; exec sleep {hold}' &
  i=$((i+1))
done
wait
"""

_ZOMBIES = """
import os, sys, time
gt, n, hold = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
pids = []
for _ in range(n):
    pid = os.fork()
    if pid == 0:
        with open(gt, "a") as f:
            f.write(f"{os.getpid()} 3\\n")
        os._exit(3)
    pids.append(pid)
time.sleep(hold)
for pid in pids:
    os.waitpid(pid, 0)
"""

_FILES = """
import socket, sys, time
where, interval = sys.argv[1], float(sys.argv[2])
with open(f"{where}/ports", "w") as ports:
    for factor in (0.5, 2, 5):
        for i in range(10):
            with open(f"{where}/held-{factor}-{i}", "w"):
                time.sleep(factor * interval)
            with socket.create_server(("127.0.0.1", 0)) as server:
                ports.write(f"{factor} {server.getsockname()[1]}\\n")
                ports.flush()
                time.sleep(factor * interval)
"""


@dataclass
class _Outcome:
    recorded: dict[int, int]
    events: list[ObserverEvent]
    missed: int
    where: Path
    ports: list[tuple[str, int]]
    """(hold factor, port) of each listening socket of the files workload."""


async def _consume(
    session: Session,
    seen: list[ObserverEvent],
    missed: list[int],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    async with session.observers.subscribe(
        ALL, capacity=8192, backpressure=ObserverBackpressure.BLOCK
    ) as events:
        task_status.started()
        async for event in events:
            assert isinstance(event, ObserverEvent)
            seen.append(event)
        missed.append(events.status().missed_events)


async def _observe(argv: list[str], cwd: Path) -> tuple[list[ObserverEvent], int]:
    seen: list[ObserverEvent] = []
    missed: list[int] = []
    # The consumer's nursery is outside the session: it sees the teardown.
    async with trio.open_nursery() as consumers, open_session(poll_interval=INTERVAL) as session:
        await consumers.start(_consume, session, seen, missed)
        await session.run_process(argv, cwd=cwd, stdout=subprocess.DEVNULL)
    return seen, missed[0]


@contextlib.contextmanager
def _backend(name: str) -> Iterator[None]:
    if name == "connector":
        yield
        return

    def refuse() -> None:
        raise ConnectorUnavailableError("refused by the benchmark: polling")

    # What "auto" meets without CAP_NET_ADMIN.
    with unittest.mock.patch.object(_connector, "open_connector_socket", refuse):
        yield


def _make_project(where: Path, gt: Path, files: int) -> None:
    objects = []
    for i in range(files):
        (where / f"f{i}.c").write_text(f"int f{i}(int x) {{ return x * {i} + 1; }}\n")
        objects.append(f"f{i}.o")
    calls = " + ".join(f"f{i}(1)" for i in range(files))
    decls = "".join(f"int f{i}(int);\n" for i in range(files))
    (where / "main.c").write_text(f"{decls}int main(void) {{ return ({calls}) == 0; }}\n")
    rule = "\t@echo $$$$ 0 >> " + str(gt) + "; "
    (where / "Makefile").write_text(
        f"prog: main.o {' '.join(objects)}\n{rule}cc -o $@ $^\n\n%.o: %.c\n{rule}cc -c -o $@ $<\n"
    )


def _read_truth(gt: Path) -> dict[int, int]:
    truth: dict[int, int] = {}
    if gt.exists():
        for line in gt.read_text().splitlines():
            pid, code = line.split()
            truth[int(pid)] = int(code)
    return truth


async def _workload(name: str, quick: bool, where: Path) -> _Outcome:
    gt = where / "truth"
    sh = shutil.which("sh") or "/bin/sh"
    if name == "storm":
        argv = [sh, "-c", _STORM.format(n=50 if quick else 200, gt=gt)]
    elif name == "true":
        argv = [sh, "-c", _TRUE.format(n=100 if quick else 500, gt=gt)]
    elif name == "long":
        argv = [sh, "-c", _LONG.format(n=20, gt=gt, hold=3 * INTERVAL)]
    elif name == "zombies":
        argv = [sys.executable, "-c", _ZOMBIES, str(gt), "5", str(10 * INTERVAL)]
    elif name == "make":
        _make_project(where, gt, 20)
        argv = [shutil.which("make") or "make", "-s", "-j4"]
    else:
        argv = [sys.executable, "-c", _FILES, str(where), str(INTERVAL)]
    events, missed = await _observe(argv, where)
    ports_file = where / "ports"
    ports = []
    if ports_file.exists():
        for line in ports_file.read_text().splitlines():
            factor, port = line.split()
            ports.append((factor, int(port)))
    return _Outcome(_read_truth(gt), events, missed, where, ports)


SOCKET_LISTEN = ObserverEventKind.SOCKET_LISTEN
SOCKET_CLOSE = ObserverEventKind.SOCKET_CLOSE


def _pct(part: int, whole: int) -> str:
    return f"{part}/{whole} ({100 * part / whole:.0f} %)" if whole else "0/0"


def _rows(name: str, backend: str, outcome: _Outcome) -> list[Row]:
    exact = backend == "connector"
    events = outcome.events
    starts = Counter(e.pid for e in events if e.kind is ObserverEventKind.DESCENDANT_STARTED)
    exit_events = [e for e in events if e.kind is ObserverEventKind.DESCENDANT_EXITED]
    exits = Counter(e.pid for e in exit_events)
    codes: dict[int, set[int | None]] = {}
    for e in exit_events:
        codes.setdefault(e.pid, set()).add(e.exit_code)
    lost = sum(1 for e in events if e.kind is ObserverEventKind.OBSERVATION_LOST)
    label = f"{name} [{backend}]"
    rows: list[Row] = []
    if name == "files":
        for factor in ("0.5", "2", "5"):
            paths = {str(outcome.where / f"held-{factor}-{i}") for i in range(10)}
            opened = {e.path for e in events if e.kind is ObserverEventKind.FILE_OPEN} & paths
            closed = {e.path for e in events if e.kind is ObserverEventKind.FILE_CLOSE} & paths
            target = Target(">=", 1.0) if factor != "0.5" else None
            rows.append(
                Row(
                    f"{label} files held {factor} intervals: opened / closed",
                    f"{len(opened)} / {len(closed)}",
                    "10 / 10",
                    min(len(opened), len(closed)) / 10,
                    target,
                )
            )
            held = {f"127.0.0.1:{port}" for f, port in outcome.ports if f == factor}
            listened = {e.local_address for e in events if e.kind is SOCKET_LISTEN} & held
            closed = {e.local_address for e in events if e.kind is SOCKET_CLOSE} & held
            rows.append(
                Row(
                    f"{label} sockets held {factor} intervals: listen / closed",
                    f"{len(listened)} / {len(closed)}",
                    f"{len(held)} / {len(held)}",
                    min(len(listened), len(closed)) / len(held) if held else None,
                    target,
                )
            )
    else:
        truth = outcome.recorded
        total = len(truth)
        seen = sum(1 for pid in truth if starts[pid])
        ended = sum(
            1 for pid, code in truth.items() if exits[pid] and (not exact or codes[pid] == {code})
        )
        must_see = exact or name in ("long", "zombies")
        full = Target(">=", 1.0) if must_see else None
        rows.append(Row(f"{label} recall", _pct(seen, total), "ground truth", seen / total, full))
        what = "exited, right code" if exact else "exited"
        rows.append(Row(f"{label} {what}", _pct(ended, total), "ground truth", ended / total, full))
        if name != "make":
            reported = set(starts)
            right = len(reported & truth.keys())
            rows.append(
                Row(
                    f"{label} precision",
                    _pct(right, len(reported)),
                    "ground truth",
                    right / len(reported) if reported else None,
                    Target(">=", 1.0) if reported else None,
                )
            )
        dups = sum(1 for pid in truth if starts[pid] > 1)
        rows.append(
            Row(
                f"{label} duplicates",
                str(dups),
                "0",
                float(dups),
                Target("<=", 0.0) if exact else None,
            )
        )
        paired = sum(1 for pid in starts if exits[pid] == 1)
        rows.append(
            Row(
                f"{label} starts paired with one exit",
                _pct(paired, len(starts)),
                "all",
                paired / len(starts) if starts else None,
                Target(">=", 1.0) if exact else None,
            )
        )
    rows.append(
        Row(
            f"{label} observation-lost / sink missed",
            f"{lost} / {outcome.missed}",
            "0 / 0",
            float(outcome.missed),
            Target("<=", 0.0),
        )
    )
    return rows


def run(config: Config) -> Report:
    """Run every workload on each backend; one block of rows per pair."""
    report = Report()
    backends = ["poll"]
    refused = probe_connector()
    if refused is None:
        backends.insert(0, "connector")
    else:
        report.notes.append(f"connector not usable here ({refused}): polling only")
    for backend in backends:
        for name in ("storm", "true", "make", "zombies", "long", "files"):
            with tempfile.TemporaryDirectory() as tmp, _backend(backend):
                outcome = trio.run(_workload, name, config.quick, Path(tmp))
            report.rows.extend(_rows(name, backend, outcome))
    report.notes.append(
        "Ground truth: the processes record their own pid and exit code; make's "
        "compilers are not recorded, so make has no precision row. Polling sees "
        "neither exit codes of processes their parent reaped nor processes that "
        "live less than an interval; its rows without a target are information."
    )
    return report
