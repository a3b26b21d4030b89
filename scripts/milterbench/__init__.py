"""The benchmark behind ``scripts/bench``: a developer tool, not part of the installed product.

    build.py      what a run needs, made on first use: the C programs, build/venv and its Pythons
    measure.py    readings from /proc: CPU of a process tree and of the machine, memory, files
    rigs.py       the filters under test, by name: their commands, start, stop, CPU
    load.py       one measured cell: driving scripts/loadgen.c and reading its result
    report.py     result tables, the targets, the machine's facts, the results file
    message.py    the benchmark message's headers (loadgen.c's, bench_inproc.py's, smtp-source's)
    engine.py, postfix.py, idle.py, profiling.py, fleet.py    the modes
    cli.py        the command line

The programs it runs stay beside it in scripts/ (loadgen.c, bench_libmilter.c, bench_filter.py,
bench_floor.py, bench_pymilter.py), where the docs name them. scripts/ is on the path of every
script run from it; the tests import this package through tests/support/bench.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts"
BUILD = ROOT / "build" / "bench"  # load generator, C filter, logs, results
VENV = ROOT / "build" / "venv"  # this checkout installed as users install it, and what the filters need


def say(*args: object) -> None:
    print(*args, flush=True)


def warn(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)
