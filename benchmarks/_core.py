"""What every benchmark section shares: interleaved timing and the table.

A section is a plain function ``(Config) -> Report``. It measures our code
and its alternatives *in the same run, interleaved*: the machine this runs on
is shared and has two cores, so a figure taken a minute after another one
says more about the neighbours than about the code. Each trial runs a block
of many operations and returns seconds per operation; trials take turns in
a rotating order. The verdict is on the median round of each (what a user
will typically see, where the best round only says what the machine can do
when nothing disturbs it), and the spread of the per-round ratios is
printed beside it, so a MET that holds only in a lucky round shows.
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import trio

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Config:
    """Options every section receives."""

    quick: bool = False
    """Smoke run: few rounds and small blocks; the figures are rough."""

    def pick(self, full: int, quick: int) -> int:
        """Return ``quick`` in a ``--quick`` run, else ``full``."""
        return quick if self.quick else full


@dataclass(frozen=True)
class Target:
    """A goal for a ratio, e.g. ours at most 1.15 times the alternative."""

    op: Literal["<=", ">="]
    value: float

    def met(self, ratio: float) -> bool:
        """Return True if ``ratio`` meets the goal."""
        return ratio <= self.value if self.op == "<=" else ratio >= self.value

    def __str__(self) -> str:
        return f"{self.op} {self.value:g}x"


@dataclass(frozen=True)
class Row:
    """One line of a section's table.

    ``ratio`` is ours relative to the alternative in the sense the target
    uses: time or memory ratios (ours / alternative, lower is better) or
    throughput ratios (ours / alternative, higher is better). A row without
    a target is information, not a goal.
    """

    name: str
    ours: str
    alternative: str
    ratio: float | None
    target: Target | None = None
    spread: tuple[float, float] | None = None
    """The lowest and highest per-round ratio, when both sides are
    :class:`Figure` values of the same rounds."""

    @property
    def verdict(self) -> str:
        """``MET``, ``MISSED`` or ``info``."""
        if self.target is None or self.ratio is None:
            return "info"
        return "MET" if self.target.met(self.ratio) else "MISSED"


@dataclass
class Report:
    """What a section returns: its rows and free-text notes under them."""

    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Section:
    """A named benchmark section, selectable with ``--only NAME``."""

    name: str
    title: str
    run: Callable[[Config], Report]


# -- timing -------------------------------------------------------------


def _rotations(names: Sequence[str], rounds: int) -> list[list[str]]:
    # Rotating the order keeps any trial from always running right after
    # the same neighbour (whose garbage or cache misses it would inherit).
    n = len(names)
    return [[*names[r % n :], *names[: r % n]] for r in range(rounds)]


def interleave(trials: Mapping[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Run each trial ``rounds`` times, taking turns; return each one's samples.

    A trial runs one block of operations and returns seconds per operation.
    """
    samples: dict[str, list[float]] = {name: [] for name in trials}
    for order in _rotations(list(trials), rounds):
        for name in order:
            gc.collect()
            samples[name].append(trials[name]())
    return samples


async def interleave_async(
    trials: Mapping[str, Callable[[], Awaitable[float]]], rounds: int
) -> dict[str, list[float]]:
    """Like :func:`interleave`, for trials that run inside trio."""
    samples: dict[str, list[float]] = {name: [] for name in trials}
    for order in _rotations(list(trials), rounds):
        for name in order:
            gc.collect()
            samples[name].append(await trials[name]())
    return samples


class Figure(float):
    """A per-operation figure: the median of the rounds, carrying the rounds.

    It is a float (sections compute with it as before); :func:`time_row`
    and :func:`rate_row` use the rounds to print the spread of the ratio.
    """

    rounds: tuple[float, ...]

    def __new__(cls, samples: Sequence[float]) -> Figure:
        if not samples:
            raise ValueError("samples must hold at least one round")
        figure = super().__new__(cls, statistics.median(samples))
        figure.rounds = tuple(samples)
        return figure


def median(samples: Sequence[float]) -> Figure:
    """The verdict figure of a trial: the median of its rounds."""
    return Figure(samples)


def ratio_spread(
    ours: float, alternative: float, *, invert: bool = False
) -> tuple[float, float] | None:
    """The lowest and highest per-round ratio of two :class:`Figure` values.

    ``invert=True`` for throughput rows (alternative / ours). None when
    either side is a plain float or the rounds do not pair up.
    """
    # Rounds are interleaved, so round i of both sides ran side by side:
    # their ratio is a fair sample of the ratio, and its range is the noise.
    if not (isinstance(ours, Figure) and isinstance(alternative, Figure)):
        return None
    if len(ours.rounds) != len(alternative.rounds):
        return None
    ratios = [
        (a / o if invert else o / a)
        for o, a in zip(ours.rounds, alternative.rounds, strict=True)
        if o > 0 and a > 0
    ]
    return (min(ratios), max(ratios)) if ratios else None


def spread_note(
    samples: Mapping[str, Sequence[float]], baseline: str, *, throughput: bool = False
) -> str:
    """A note with each trial's best-round ratio to ``baseline``.

    The table's verdict is on the medians; this says what the fastest
    rounds give, i.e. how far the machine's noise moved the median. With
    ``throughput=True`` the ratios are of operations per second (as in
    :func:`rate_row`), otherwise of seconds per operation.
    """
    base = min(samples[baseline])
    parts = []
    for name, values in samples.items():
        if name != baseline:
            ratio = min(values) / base
            parts.append(f"{name} {1 / ratio if throughput else ratio:.2f}x")
    return f"best-round ratios vs {baseline}: " + ", ".join(parts)


def time_row(name: str, ours: float, alternative: float, target: Target | None = None) -> Row:
    """A row comparing seconds per operation (ratio = ours / alternative)."""
    return Row(
        name,
        fmt_seconds(ours),
        fmt_seconds(alternative),
        ours / alternative,
        target,
        ratio_spread(ours, alternative),
    )


def rate_row(name: str, ours: float, alternative: float, target: Target | None = None) -> Row:
    """A row comparing throughput, from seconds per operation.

    The ratio is ours / alternative in operations per second, so higher is
    better.
    """
    return Row(
        name,
        fmt_rate(1 / ours),
        fmt_rate(1 / alternative),
        alternative / ours,
        target,
        ratio_spread(ours, alternative, invert=True),
    )


def bytes_row(name: str, ours: float, alternative: float, target: Target | None = None) -> Row:
    """A row comparing bytes (ratio = ours / alternative)."""
    ratio = ours / alternative if alternative > 0 else None
    return Row(name, fmt_bytes(ours), fmt_bytes(alternative), ratio, target)


# -- formatting ---------------------------------------------------------


def fmt_seconds(seconds: float) -> str:
    """``812.3 us``, ``95.1 ns``, ``1.20 ms``: per-operation times."""
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    if seconds >= 1e-6:
        return f"{seconds * 1e6:.1f} us"
    return f"{seconds * 1e9:.1f} ns"


def fmt_rate(per_second: float) -> str:
    """``1.23 M/s``, ``456.7 k/s``: operations per second."""
    if per_second >= 1e6:
        return f"{per_second / 1e6:.2f} M/s"
    return f"{per_second / 1e3:.1f} k/s"


def fmt_bytes(count: float) -> str:
    """``1.2 KiB``, ``340 B``."""
    if abs(count) >= 1024:
        return f"{count / 1024:.1f} KiB"
    return f"{count:.0f} B"


def fmt_ratio(ratio: float | None) -> str:
    """``1.073x``, or ``-`` when there is no ratio.

    Three decimals, so that a ratio just over its target (1.1504 against
    1.15) does not print as if it met it.
    """
    return "-" if ratio is None else f"{ratio:.3f}x"


HEADER = ("name", "ours", "alternative", "ratio", "spread", "target", "verdict")


def fmt_spread(spread: tuple[float, float] | None) -> str:
    """``1.21-1.40x``: the range of the per-round ratios, or ``-``."""
    return "-" if spread is None else f"{spread[0]:.2f}-{spread[1]:.2f}x"


def format_table(title: str, report: Report) -> str:
    """Render a section as an aligned ``name | ours | ... | verdict`` table."""
    cells = [HEADER] + [
        (
            row.name,
            row.ours,
            row.alternative,
            fmt_ratio(row.ratio),
            fmt_spread(row.spread),
            "-" if row.target is None else str(row.target),
            row.verdict,
        )
        for row in report.rows
    ]
    widths = [max(len(line[i]) for line in cells) for i in range(len(HEADER))]
    # Names left-aligned, figures right-aligned, so columns of numbers line up.
    lines = [f"## {title}", ""]
    for index, line in enumerate(cells):
        parts = [
            cell.ljust(width) if col in (0, 6) else cell.rjust(width)
            for col, (cell, width) in enumerate(zip(line, widths, strict=True))
        ]
        lines.append(" | ".join(parts).rstrip())
        if index == 0:
            lines.append("-+-".join("-" * width for width in widths))
    lines.extend(f"  note: {note}" for note in report.notes)
    return "\n".join(lines)


def machine_lines() -> list[str]:
    """What the figures were measured on: versions, CPU, load, commit."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return [
        f"python  {sys.version.split()[0]} ({platform.python_implementation()})",
        f"trio    {trio.__version__}",
        f"machine {platform.system()} {platform.release()} {platform.machine()}, "
        f"{os.cpu_count()} CPUs ({cpu}), load {load}",
        f"commit  {_git_commit()}",
        f"date    {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
    ]


def _git_commit() -> str:
    try:
        result = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty", "--abbrev=7"],
            capture_output=True,
            text=True,
            check=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return result.stdout.strip()
