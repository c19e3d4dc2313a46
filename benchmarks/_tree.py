"""Sections ``tree-cpu``, ``tree-latency``, ``tree-pass``, ``tree-scale``: observing a tree.

These sections drive a :class:`TreeObserver` directly, as the session does:
``add_root(pid)`` for a process we spawned, then ``await
nursery.start(observer.run)``. Where this machine lets us make a cgroup, the
tree is also placed in one of its own and observed with
``TreeObserver(cgroup=...)``, as a session with containment by cgroup does
("in a cgroup" rows).

``tree-cpu``: a Python root with 49 idle ``sleep`` children (50 processes);
this process's CPU time (``time.process_time()``, all threads) over a window
of wall time while observing PROCESS, FILE and NETWORK at the default
interval, with the connector backend and with the poll backend, against the
same window with no observer. Reported as the fraction of one core the
observer adds (observing minus idle, over wall time), beside a bare trio
loop that only wakes every interval: the floor of an observer that wakes the
trio loop for every look. Ours does not while the tree is quiet (a thread
re-reads the counters; see docs/observation.md), so it can cost less. The
"busy machine" rows run the connector while another process starts
``/bin/true`` in a loop: the connector hears of every process of the
machine, and these rows show what that costs.

``tree-latency``: a root that, per line on stdin, forks a child that sleeps
and prints ``FORK <pid> <ns before fork> <ns after fork>`` (monotonic clock,
shared with this process). Latency is from the timestamp taken just before
``fork()`` to the ``DESCENDANT_STARTED`` event for that pid reaching the
observer's ``emit``. Before each fork we wait a random fraction of the poll
interval, so forks do not always land right after a scan.

``tree-pass``: one scan of ours (what ``run`` does every interval; a private
call, timed directly) against ``psutil`` calls a user would make instead on
the same 50-process tree.

``tree-scale``: the PROCESS+FILE+NETWORK scan of ``tree-pass`` on trees of
10, 50, 200 and 500 processes, over more passes than ``VERIFY_EVERY`` (so
the periodic full looks are in the timing), median of the rounds.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from functools import partial

import psutil  # type: ignore[import-untyped]  # no type information shipped
import trio

from trio_observer import EventCategory, ObserverEvent, ObserverEventKind
from trio_observer._linux import _cgroup, _cgroup_leftovers
from trio_observer._linux._cgroup import Cgroup
from trio_observer._linux._tree import Backend, TreeObserver

from ._core import Config, Report, Row, Target, fmt_seconds, interleave_async, median, time_row

SLEEP = shutil.which("sleep") or "/usr/bin/sleep"
ALL = frozenset({EventCategory.PROCESS, EventCategory.FILE, EventCategory.NETWORK})
INTERVAL = 0.02  # TreeObserver's default poll_interval

# The stranger of the busy-machine rows (about 1,000 to 4,000 processes a
# second on the 2-core machine of docs/performance.md).
_CHURN = "while :; do /bin/true; done"

_TREE_CHILD = """
import subprocess, sys
children = [subprocess.Popen([sys.argv[1], "1000"]) for _ in range(int(sys.argv[2]))]
print("READY", flush=True)
sys.stdin.read()
"""

_FORK_CHILD = """
import os, sys, time
for line in sys.stdin:
    if line.strip() == "quit":
        break
    before = time.monotonic_ns()
    pid = os.fork()
    if pid == 0:
        time.sleep(600)
        os._exit(0)
    after = time.monotonic_ns()
    os.write(1, b"FORK %d %d %d\\n" % (pid, before, after))
"""


def _check(ok: bool, what: str) -> None:
    # A benchmark that silently observed nothing would time the wrong thing.
    if not ok:
        raise RuntimeError(f"benchmark data check failed: {what}")


class _Tree:
    """A 50-process tree (a root and 49 idle ``sleep``s) in its own session."""

    def __init__(self, children: int = 49) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", _TREE_CHILD, SLEEP, str(children)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        assert self.process.stdout is not None
        _check(self.process.stdout.readline() == b"READY\n", "tree root did not start")
        self.pid = self.process.pid
        self.size = 1 + len(psutil.Process(self.pid).children(recursive=True))
        # The whole tree in a cgroup of its own, as a session with
        # containment by cgroup has it, where this machine allows one.
        self.group: Cgroup | None = None
        self._group_fd = -1
        support = _cgroup.probe()
        if support.available and support.parent is not None:
            self.group = Cgroup.create_session(support.parent, "be7c4")
            # Locked, as a session locks its own: another process's sweep
            # of crashed sessions' cgroups must not take it for a leftover.
            self._group_fd = os.open(self.group.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            _cgroup_leftovers.lock_session(self._group_fd)
            moved = self.group.leaf(f"p{self.pid}").place(self.pid)
            _check(len(moved) == self.size, f"placed {len(moved)} of {self.size}")

    def close(self) -> None:
        # The root leads its own process group, and every sleep is in it.
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                stream.close()
        if self.group is not None:
            deadline = time.monotonic() + 10
            while self.group.populated() and time.monotonic() < deadline:
                time.sleep(0.01)  # the sleeps die a moment after the kill
            self.group.remove()
            os.close(self._group_fd)


async def _ignore(event: ObserverEvent) -> None:
    pass


def _fixed(group: Cgroup) -> Callable[[], Cgroup]:
    # What a session passes as TreeObserver(cgroup=...): its cgroup.
    return lambda: group


# -- CPU cost -----------------------------------------------------------


def run_cpu(config: Config) -> Report:
    """CPU cost of observing a 50-process tree, connector and poll backends."""
    tree = _Tree()
    try:
        return trio.run(_measure_cpu, config, tree)
    finally:
        tree.close()


async def _measure_cpu(config: Config, tree: _Tree) -> Report:
    window = config.pick(4, 1) * 1.0
    rounds = config.pick(3, 1)
    stats: dict[str, list[str]] = {
        "connector": [],
        "poll": [],
        "poll, in a cgroup": [],
        "connector, PROCESS only": [],
        "connector, busy machine": [],
        "connector, PROCESS only, busy machine": [],
    }

    async def waking() -> float:
        # A trio loop that only wakes every interval (the timer, epoll_wait,
        # the scheduler) and does nothing: what any look from the loop costs.
        cpu, wall = time.process_time(), time.perf_counter()
        deadline = trio.current_time() + window
        while trio.current_time() < deadline:  # noqa: ASYNC110 (waking is what is measured)
            await trio.sleep(INTERVAL)
        return (time.process_time() - cpu) / (time.perf_counter() - wall)

    async def observing(
        backend: Backend | None,
        categories: frozenset[EventCategory] = ALL,
        *,
        contained: bool = False,
        busy: bool = False,
    ) -> float:
        group = tree.group if contained else None
        # Another process of the machine starting /bin/true in a loop: the
        # connector hears of every fork, exec and exit on the machine.
        churn = subprocess.Popen(["sh", "-c", _CHURN]) if busy else None  # noqa: ASYNC220
        try:
            return await _observe(backend, categories, group, busy)
        finally:
            if churn is not None:
                churn.kill()
                churn.wait()

    async def _observe(
        backend: Backend | None,
        categories: frozenset[EventCategory],
        group: Cgroup | None,
        busy: bool,
    ) -> float:
        contained = group is not None
        async with trio.open_nursery() as nursery:
            if backend is not None:
                observer = TreeObserver(
                    emit=_ignore,
                    categories=categories,
                    backend=backend,
                    cgroup=None if group is None else _fixed(group),
                )
                observer.add_root(tree.pid)
                # Started means the first scan is done: the window measures
                # the steady state, not the initial 49 DESCENDANT_STARTED.
                await nursery.start(observer.run)
            cpu, wall = time.process_time(), time.perf_counter()
            await trio.sleep(window)
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            if backend is not None:
                statistic = observer.statistics()
                _check(
                    statistic.backend == backend and statistic.known_descendants == tree.size - 1,
                    f"observer {statistic}",
                )
                key = backend if categories == ALL else f"{backend}, PROCESS only"
                key += ", in a cgroup" if contained else ""
                key += ", busy machine" if busy else ""
                stats[key].append(
                    f"{statistic.polls} scans, {statistic.connector_records} connector records"
                )
            nursery.cancel_scope.cancel()
        return cpu / wall

    trials: dict[str, Callable[[], Awaitable[float]]] = {
        "idle": lambda: observing(None),
        "bare loop": waking,
        "connector": lambda: observing("connector"),
        "poll": lambda: observing("poll"),
        **(
            {"poll, in a cgroup": lambda: observing("poll", contained=True)}
            if tree.group is not None
            else {}
        ),
        "connector, PROCESS only": lambda: observing(
            "connector", frozenset({EventCategory.PROCESS})
        ),
        "connector, busy machine": lambda: observing("connector", busy=True),
        "connector, PROCESS only, busy machine": lambda: observing(
            "connector", frozenset({EventCategory.PROCESS}), busy=True
        ),
    }
    samples = await interleave_async(trials, rounds)
    idle = median(samples["idle"])
    rows = []
    for backend in ("connector", "poll"):
        used = median(samples[backend])
        rows.append(
            Row(
                f"observe {tree.size}-process tree, PROCESS+FILE+NETWORK, {backend}",
                f"{100 * used:.2f}% core",
                f"{100 * idle:.2f}% idle",
                used - idle,
                Target("<=", 0.02),
            )
        )
    if tree.group is not None:
        used = median(samples["poll, in a cgroup"])
        rows.append(
            Row(
                f"observe {tree.size}-process tree, PROCESS+FILE+NETWORK, poll, in a cgroup",
                f"{100 * used:.2f}% core",
                f"{100 * idle:.2f}% idle",
                used - idle,
                Target("<=", 0.02),
            )
        )
    used = median(samples["connector, PROCESS only"])
    rows.append(
        Row(
            f"observe {tree.size}-process tree, PROCESS only, connector",
            f"{100 * used:.2f}% core",
            f"{100 * idle:.2f}% idle",
            used - idle,
        )
    )
    for categories in ("PROCESS+FILE+NETWORK", "PROCESS only"):
        key = (
            "connector, busy machine"
            if categories != "PROCESS only"
            else ("connector, PROCESS only, busy machine")
        )
        used = median(samples[key])
        rows.append(
            Row(
                f"the same, {categories}, connector, while a stranger starts /bin/true in a loop",
                f"{100 * used:.2f}% core",
                f"{100 * idle:.2f}% idle",
                used - idle,
            )
        )
    floor = median(samples["bare loop"])
    rows.append(
        Row(
            f"a bare trio loop waking every {INTERVAL * 1e3:.0f} ms (a look per wake costs more)",
            f"{100 * floor:.2f}% core",
            f"{100 * idle:.2f}% idle",
            floor - idle,
        )
    )
    return Report(
        rows=rows,
        notes=[
            f"CPU time of this process over {window:.0f} s windows at poll_interval={INTERVAL}; "
            "ratio = (observing - idle) CPU seconds per wall second, i.e. the fraction of one "
            f"core the observer adds; median of {rounds} rounds each, interleaved",
            "per window: "
            + "; ".join(
                f"{backend}: {', '.join(lines)}" for backend, lines in stats.items() if lines
            ),
            "all rounds (% core): "
            + ", ".join(
                f"{name} " + "/".join(f"{100 * v:.2f}" for v in values)
                for name, values in samples.items()
            ),
        ],
    )


# -- detection latency ---------------------------------------------------


def run_latency(config: Config) -> Report:
    """Fork-to-event latency of DESCENDANT_STARTED, connector and poll backends."""
    return trio.run(_measure_latency, config)


async def _fork_latencies(backend: Backend, forks: int) -> tuple[list[float], list[float]]:
    """Return (latencies, fork durations) in seconds for ``forks`` forks."""
    arrivals: dict[int, int] = {}
    arrived = trio.Event()

    async def emit(event: ObserverEvent) -> None:
        nonlocal arrived
        if event.kind is ObserverEventKind.DESCENDANT_STARTED:
            arrivals[event.pid] = time.monotonic_ns()
            arrived.set()
            arrived = trio.Event()

    latencies: list[float] = []
    fork_times: list[float] = []
    process = await trio.lowlevel.open_process(
        [sys.executable, "-c", _FORK_CHILD],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    assert process.stdin is not None
    assert process.stdout is not None
    try:
        observer = TreeObserver(
            emit=emit, categories=frozenset({EventCategory.PROCESS}), backend=backend
        )
        observer.add_root(process.pid)
        buffer = b""
        async with trio.open_nursery() as nursery:
            await nursery.start(observer.run)
            _check(observer.statistics().backend == backend, f"backend {backend}")
            with trio.fail_after(30):
                for _ in range(forks):
                    # Real time on purpose: a random phase against the scan timer.
                    await trio.sleep(random.uniform(0, INTERVAL))
                    await process.stdin.send_all(b"fork\n")
                    while b"\n" not in buffer:
                        data = await process.stdout.receive_some(4096)
                        _check(bool(data), "fork root exited")
                        buffer += data
                    line, buffer = buffer.split(b"\n", 1)
                    tag, pid_text, before_text, after_text = line.split()
                    _check(tag == b"FORK", f"unexpected line {line!r}")
                    pid = int(pid_text)
                    while pid not in arrivals:
                        await arrived.wait()
                    latencies.append((arrivals[pid] - int(before_text)) / 1e9)
                    fork_times.append((int(after_text) - int(before_text)) / 1e9)
            nursery.cancel_scope.cancel()
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        with trio.CancelScope(shield=True):
            await process.wait()
        await process.stdin.aclose()
        await process.stdout.aclose()
    return latencies, fork_times


async def _measure_latency(config: Config) -> Report:
    forks = config.pick(50, 10)
    connector, connector_forks = await _fork_latencies("connector", forks)
    poll, poll_forks = await _fork_latencies("poll", forks)
    c_median, p_median = statistics.median(connector), statistics.median(poll)
    return Report(
        rows=[
            Row(
                "DESCENDANT_STARTED latency, median: connector vs poll",
                fmt_seconds(c_median),
                fmt_seconds(p_median),
                c_median / p_median,
            ),
            Row(
                "DESCENDANT_STARTED latency, worst: connector vs poll",
                fmt_seconds(max(connector)),
                fmt_seconds(max(poll)),
                max(connector) / max(poll),
            ),
        ],
        notes=[
            f"{forks} forks per backend, PROCESS only, poll_interval={INTERVAL}; from "
            "monotonic_ns() just before fork() in the root to the event reaching emit",
            "the fork call itself (parent side) took median "
            f"{fmt_seconds(statistics.median(connector_forks + poll_forks))} of that",
        ],
    )


# -- one scan vs psutil --------------------------------------------------


def run_pass(config: Config) -> Report:
    """One scan of ours vs the equivalent psutil calls, on a 50-process tree."""
    tree = _Tree()
    try:
        return trio.run(_measure_pass, config, tree)
    finally:
        tree.close()


def _psutil_children(root: int) -> int:
    return len(psutil.Process(root).children(recursive=True))


def _psutil_children_net(root: int) -> int:
    return _psutil_children(root) + len(psutil.net_connections())


def _psutil_children_files_net(root: int) -> int:
    total = 0
    for process in psutil.Process(root).children(recursive=True):
        try:
            total += len(process.open_files())
        except psutil.NoSuchProcess:
            pass
    return total + len(psutil.net_connections())


async def _measure_pass(config: Config, tree: _Tree) -> Report:
    passes = config.pick(20, 3)
    rounds = config.pick(5, 1)
    kinds = {
        "PROCESS": frozenset({EventCategory.PROCESS}),
        "PROCESS+NETWORK": frozenset({EventCategory.PROCESS, EventCategory.NETWORK}),
        "PROCESS+FILE+NETWORK": ALL,
    }
    observers = {}
    for name, categories in kinds.items():
        observer = TreeObserver(emit=_ignore, categories=categories, backend="poll")
        observer.add_root(tree.pid)
        # The first scan reports the whole tree; later ones only differences,
        # as in run()'s steady state.
        await observer._pass(scan_tree=True)
        _check(observer.statistics().known_descendants == tree.size - 1, name)
        observers[name] = observer

    def ours(observer: TreeObserver) -> Callable[[], Awaitable[float]]:
        async def trial() -> float:
            start = time.perf_counter()
            for _ in range(passes):
                await observer._pass(scan_tree=True)
            return (time.perf_counter() - start) / passes

        return trial

    def theirs(call: Callable[[int], int]) -> Callable[[], Awaitable[float]]:
        async def trial() -> float:
            start = time.perf_counter()
            for _ in range(passes):
                call(tree.pid)
            elapsed = time.perf_counter() - start
            await trio.lowlevel.checkpoint()
            return elapsed / passes

        return trial

    trials: dict[str, Callable[[], Awaitable[float]]] = {
        **{name: ours(observer) for name, observer in observers.items()},
        "children": theirs(_psutil_children),
        "children+net": theirs(_psutil_children_net),
        "children+files+net": theirs(_psutil_children_files_net),
    }
    await interleave_async(trials, 1)
    samples = await interleave_async(trials, rounds)
    pairs = [
        ("PROCESS", "children", "psutil children(recursive=True)"),
        ("PROCESS+NETWORK", "children+net", "+ psutil.net_connections()"),
        ("PROCESS+FILE+NETWORK", "children+files+net", "+ open_files() of each"),
    ]
    return Report(
        rows=[
            time_row(
                f"one {ours_name} scan vs {label}",
                median(samples[ours_name]),
                median(samples[theirs_name]),
            )
            for ours_name, theirs_name, label in pairs
        ],
        notes=[
            f"{tree.size}-process tree (root + {tree.size - 1} sleeps); ours: one poll-backend "
            "scan (`_pass(scan_tree=True)`, what run() does each interval), after a first scan; "
            "psutil: a user's equivalent, system-wide net_connections() (root); "
            f"median of {rounds} rounds x {passes} scans",
        ],
    )


# -- scans as the tree grows ---------------------------------------------


def run_scale(config: Config) -> Report:
    """One PROCESS+FILE+NETWORK scan vs psutil, at 10, 50, 200 and 500 processes."""
    return trio.run(_measure_scale, config)


async def _measure_scale(config: Config) -> Report:
    sizes = (10, 50, 200, 500)[: config.pick(4, 2)]
    # More than VERIFY_EVERY passes, so each process gets its periodic full
    # look inside the timing, as it does in run().
    passes = config.pick(60, 30)
    rounds = config.pick(3, 1)
    rows: list[Row] = []
    spreads: list[str] = []
    for size in sizes:
        tree = _Tree(children=size - 1)
        try:
            observer = TreeObserver(emit=_ignore, categories=ALL, backend="poll")
            observer.add_root(tree.pid)
            await observer._pass(scan_tree=True)
            _check(observer.statistics().known_descendants == tree.size - 1, f"size {size}")
            group = tree.group
            in_group = TreeObserver(
                emit=_ignore,
                categories=ALL,
                backend="poll",
                cgroup=None if group is None else _fixed(group),
            )
            in_group.add_root(tree.pid)
            await in_group._pass(scan_tree=True)

            async def ours(observer: TreeObserver = observer) -> float:
                start = time.perf_counter()
                for _ in range(passes):
                    # As run() calls it every interval.
                    await observer._pass(scan_tree=True, may_skip=True)
                return (time.perf_counter() - start) / passes

            async def theirs(tree: _Tree = tree) -> float:
                start = time.perf_counter()
                for _ in range(max(1, passes // 10)):
                    _psutil_children_files_net(tree.pid)
                elapsed = time.perf_counter() - start
                await trio.lowlevel.checkpoint()
                return elapsed / max(1, passes // 10)

            trials: dict[str, Callable[[], Awaitable[float]]] = {"ours": ours, "psutil": theirs}
            if group is not None:
                trials["in a cgroup"] = partial(ours, in_group)
            samples = await interleave_async(trials, rounds)
        finally:
            observer._activity.forget_all()
            in_group._activity.forget_all()
            tree.close()
        median_ours = statistics.median(samples["ours"])
        median_theirs = statistics.median(samples["psutil"])
        rows.append(
            time_row(
                f"{tree.size} processes: PROCESS+FILE+NETWORK scan vs psutil",
                median_ours,
                median_theirs,
                Target("<=", 0.07),
            )
        )
        if "in a cgroup" in samples:
            rows.append(
                time_row(
                    f"{tree.size} processes, in a cgroup: the same scan vs psutil",
                    statistics.median(samples["in a cgroup"]),
                    median_theirs,
                    Target("<=", 0.07),
                )
            )
        low, high = min(samples["ours"]) * 1e6, max(samples["ours"]) * 1e6
        spreads.append(f"{tree.size}: ours {low:.0f}-{high:.0f} us")
    return Report(
        rows=rows,
        notes=[
            "root + N-1 idle sleeps; ours: one poll-backend scan (`_pass(scan_tree=True)`, "
            "as run() makes it every interval; in a cgroup: the tree in a cgroup of its own, "
            "passed as TreeObserver(cgroup=...), as a session with containment by cgroup does) "
            f"averaged over {passes} scans (periodic full looks included); psutil: "
            "children(recursive=True) + open_files() of each + net_connections(); "
            f"median of {rounds} rounds",
            "spread: " + "; ".join(spreads),
        ],
    )
