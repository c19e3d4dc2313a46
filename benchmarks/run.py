"""Print trio_observer's benchmark table: ``python benchmarks/run.py [--quick] [--only NAME]``.

Each section measures our code against the alternative a user would
otherwise write, in the same run, and prints rows
``name | ours | alternative | ratio | target | verdict``. Nothing here
asserts: a missed target is printed as ``MISSED``. See
``docs/performance.md`` for a recorded run and how to read it.

To add a section, write a function ``(Config) -> Report`` in a module of
this package (see ``_core.py``) and append a :class:`Section` to
``SECTIONS`` below.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script: measure the trio_observer of this checkout, not
    # whatever copy happens to be installed, and make this package importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import (
    _cgroup,
    _close,
    _daemon,
    _emit,
    _fidelity,
    _memory,
    _otel,
    _output,
    _pty,
    _scaling,
    _spawn,
    _startup,
    _tree,
)
from benchmarks._core import Config, Section, format_table, machine_lines

SECTIONS: list[Section] = [
    Section("spawn", "Spawn and reap /bin/true, per process", _spawn.run),
    Section("emit-idle", "emit() with no sink", _emit.run_idle),
    Section("fanout", "DROP_OLDEST fan-out, per event", _emit.run_fanout),
    Section("block", "BLOCK sink throughput", _emit.run_block),
    Section("memory", "Memory and fds", _memory.run),
    Section("capture", "Captured pipe output throughput", _output.run_capture),
    Section("lines", "Captured output read as lines", _output.run_lines),
    Section("pty", "Terminal output throughput", _pty.run_throughput),
    Section("expect", "Expect latency on a terminal", _pty.run_expect),
    Section("tree-cpu", "CPU cost of observing a 50-process tree", _tree.run_cpu),
    Section("tree-latency", "Descendant detection latency", _tree.run_latency),
    Section("tree-pass", "One scan of ours vs psutil", _tree.run_pass),
    Section("scaling", "How cost grows: children, sinks, cursors", _scaling.run),
    Section("fidelity", "What a session reports against what ran", _fidelity.run),
    Section("startup", "CLI start-up: run -- true vs a bare trio program", _startup.run),
    Section("otel", "OpenTelemetry export: per event, and a 500-process build", _otel.run),
    Section("tree-scale", "Tree scans as the tree grows, vs psutil", _tree.run_scale),
    Section("daemon", "The daemon vs in-process, and vs a raw frame loop", _daemon.run),
    Section("cgroup", "Containment by cgroup v2 vs process groups", _cgroup.run),
    Section("close", "Closing an empty session on a busy machine", _close.run),
]


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run the chosen sections, print their tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: few, small rounds (rough figures)"
    )
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        choices=[section.name for section in SECTIONS],
        help="run only this section (repeatable); one of: "
        + ", ".join(section.name for section in SECTIONS),
    )
    args = parser.parse_args(argv)
    config = Config(quick=args.quick)
    chosen = [s for s in SECTIONS if args.only is None or s.name in args.only]

    print("# trio_observer benchmarks" + (" (--quick: rough figures)" if args.quick else ""))
    print()
    for line in machine_lines():
        print(line)
    started = time.perf_counter()
    for section in chosen:
        section_started = time.perf_counter()
        report = section.run(config)
        print()
        print(format_table(f"{section.name}: {section.title}", report))
        print(f"  ({time.perf_counter() - section_started:.1f} s)", flush=True)
    print()
    print(f"total {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
