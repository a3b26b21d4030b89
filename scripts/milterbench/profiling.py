"""profile mode: where a pytclmilter filter spends its time under load (py-spy, cProfile, callgrind).

py-spy samples the running filter from outside (raw collapsed stacks, summarised here by
function, line and layer); cProfile runs inside it and is printed with pstats; callgrind counts
the instructions of the whole server process (callgrind.py).
"""

from __future__ import annotations

import argparse
import pstats
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from milterbench import BUILD, say, warn
from milterbench.build import loadgen_path
from milterbench.load import KB4, run_cell
from milterbench.report import table
from milterbench.rigs import make_filters


def py_spy() -> str:
    """py-spy's executable, installed with pip beside this Python if it is missing."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(exe).exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "py-spy"], check=True)
        exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return exe


def cmd_profile(opts: argparse.Namespace) -> int:
    if opts.tool == "callgrind":
        from milterbench.callgrind import cmd_callgrind

        return cmd_callgrind(opts)
    loadgen = loadgen_path()
    out_dir = BUILD / "profile"
    out_dir.mkdir(parents=True, exist_ok=True)
    if opts.filter.partition("-")[0] not in ("tcl", "python") or "-w" in opts.filter:
        raise SystemExit("bench: profile works on the tcl and python filters (one process)")
    (flt,) = make_filters([opts.filter], opts.log_level, False)
    prof = out_dir / f"{opts.filter}.cprofile"
    raw = out_dir / f"{opts.filter}.pyspy.txt"
    if opts.tool == "cprofile":
        flt.cmd = [flt.cmd[0], "-m", "cProfile", "-o", str(prof), *flt.cmd[1:]]
    flt.start()
    try:
        spy = None
        if opts.tool == "py-spy":
            spy = subprocess.Popen([py_spy(), "record", "-p", str(flt.pid), "-d", str(int(opts.duration + 2)),
                                    "-r", str(opts.rate), "-f", "raw", "-o", str(raw),
                                    # --native needs to pause the process for each sample
                                    *(["--native"] if opts.native else ["--nonblocking"])],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            time.sleep(1.0)
        cell = run_cell(loadgen, flt, opts.conns, KB4, opts.duration, 0.5, 1, True)
        say(table([cell]))
        say(f"filter CPU per message: {cell.cpu_us:.0f} us, of which {cell.cpu_sys_us:.0f} us in the kernel")
        if spy is not None:
            _, err = spy.communicate(timeout=opts.duration + 30)
            if spy.returncode != 0:
                warn(f"py-spy failed: {err}")
                return 1
    finally:
        flt.stop()
    if opts.tool == "cprofile":
        st = pstats.Stats(str(prof))
        st.sort_stats("tottime").print_stats(30)
        st.sort_stats("cumulative").print_stats(30)
        say(f"profile: {prof}")
    else:
        summarize_pyspy(raw, opts.top)
    return 0


_GROUPS = [
    ("logging", re.compile(r"\(logging/")),
    ("Tcl bridge + Tcl interpreter", re.compile(r"\(pytclmilter/tcl/|\(tkinter/")),
    ("protocol core (src/pytclmilter/protocol)", re.compile(r"\(pytclmilter/protocol/")),
    ("engine, context, callbacks", re.compile(r"\(pytclmilter/(engine|context|callbacks|status)\.py")),
    ("server (src/pytclmilter/server.py, connection.py)", re.compile(r"\(pytclmilter/(server|connection)\.py")),
    ("asyncio loop + socket system calls", re.compile(r"\((asyncio/|selectors\.py|socket\.py)")),
]


def summarize_pyspy(path: Path, top: int) -> None:
    """Self and inclusive time per function, and time per layer, from py-spy's raw output.

    py-spy's raw format is one collapsed stack per line, root first, with a sample count;
    a frame reads "function (file:line)". Time spent in C (a system call, the Tcl
    interpreter) is charged to the Python line that called it.
    """
    self_f: dict[str, int] = {}
    self_l: dict[str, int] = {}
    incl: dict[str, int] = {}
    groups: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += n
        funcs = [re.sub(r":\d+\)$", ")", f) for f in frames]
        self_f[funcs[-1]] = self_f.get(funcs[-1], 0) + n
        self_l[frames[-1]] = self_l.get(frames[-1], 0) + n
        for f in set(funcs):
            incl[f] = incl.get(f, 0) + n
        name = layer(frames)
        groups[name] = groups.get(name, 0) + n
    if not total:
        say(f"no samples in {path}")
        return

    def show(title: str, d: dict[str, int], k: int) -> None:
        say(f"\n{title}:")
        for f, n in sorted(d.items(), key=lambda kv: -kv[1])[:k]:
            say(f"  {100 * n / total:5.1f}%  {f}")

    say(f"\n{total} samples of the filter while busy, from {path}")
    show("time by layer (innermost frame of a known layer)", groups, len(groups))
    show("self time by function (C code called from Python is charged to its caller)", self_f, top)
    show("self time by line", self_l, top // 2)
    show("inclusive time by function", incl, top)


def layer(frames: list[str]) -> str:
    """The layer of _GROUPS that the innermost frame of a known layer belongs to, else "other"."""
    for f in reversed(frames):
        name = next((g for g, rx in _GROUPS if rx.search(f)), None)
        if name:
            return name
    return "other"
