"""What a run prints and keeps: the machine's facts, the engine table, the targets, the results file."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from milterbench import BUILD, ROOT, VENV, say
from milterbench.build import installed_python
from milterbench.load import KB4, MB1, Cell, MedianCell, body_text
from milterbench.measure import OTHER_LOAD_WARN

# Targets of the issue, for the Tcl workload in one process.
TARGET_FACTOR = 2.0  # x pymilter's messages/s at 32 connections
TARGET_WORKERS_FACTOR = 1.0  # tcl-w2 (--workers 2): x libmilter's messages/s, at each connection count, 4 KB
TARGET_CPU_US = 150.0
TARGET_P99_MS = 10.0
TARGET_POSTFIX_RATIO = 0.90
TARGET_IDLE_KB = 50.0  # RSS per idle milter connection
# Issue 20: ratios of the Tcl workload at 32 connections, 4 KB, in one run. Per milter connection
# "one" is 1 message (as Postfix), "many" more than one.
TARGET_ONE_VS_NULL = 0.6  # x the null milter's msgs/s, 1 message per connection
TARGET_ONE_VS_PYMILTER = 2.0
TARGET_MANY_VS_PYMILTER = 2.0
TARGET_MANY_VS_LIBMILTER = 1.3
TARGET_MB_VS_NULL = 0.8  # x the null milter's MB/s with 1 MB bodies
TARGET_POSTFIX_VS_NULL = 0.95  # x Postfix with the null milter, through Postfix


def machine_info() -> dict[str, str]:
    info: dict[str, str] = {}
    info["date"] = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info["cpu"] = f"{cpu}, {os.cpu_count()} CPU(s)"
    info["kernel"] = platform.release()
    info["load average"] = " ".join(f"{x:.2f}" for x in os.getloadavg()) + " (at start)"
    info["python"] = f"{platform.python_implementation()} {platform.python_version()} ({sys.executable})"
    try:
        import tkinter

        info["tcl"] = str(tkinter.Tcl().eval("info patchlevel"))
    except Exception as exc:  # noqa: BLE001
        info["tcl"] = f"unavailable: {exc}"
    git = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True)
    info["pytclmilter"] = git.stdout.strip() or "unknown"
    # The tcl and python filters run in build/venv (compiled_python), not in this interpreter.
    filter_py = VENV / "bin" / "python"
    loop = subprocess.run([str(filter_py) if filter_py.exists() else sys.executable, "-c",
                           "import uvloop; print(uvloop.__version__)"], capture_output=True, text=True)
    if os.environ.get("PYTCLMILTER_LOOP") == "asyncio" or loop.returncode != 0:
        info["event loop"] = "asyncio (standard library)"
    else:
        info["event loop"] = f"uvloop {loop.stdout.strip()} (the *-asyncio filters: asyncio's own)"
    py = None
    with contextlib.suppress(Exception):
        py = installed_python("Milter")
    if py:
        v = subprocess.run([py, "-c", "import importlib.metadata as m; print(m.version('pymilter'))"],
                           capture_output=True, text=True)
        info["pymilter"] = v.stdout.strip() or "unknown"
    v = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "libmilter-dev"], capture_output=True, text=True)
    if v.returncode == 0:
        info["libmilter"] = v.stdout.strip()
    if Path("/usr/sbin/postconf").exists():  # engine mode runs without Postfix installed
        v = subprocess.run(["/usr/sbin/postconf", "-h", "mail_version"], capture_output=True, text=True)
        if v.returncode == 0:
            info["postfix"] = v.stdout.strip()
    return info


def print_info(info: dict[str, str]) -> None:
    for k, v in info.items():
        say(f"  {k + ':':13} {v}")


def table(cells: list[Cell], tag: str = "", medians: bool = False) -> str:
    """One line per cell. tag: a first note on every line (e.g. the round). medians: the cells are
    MedianCells, shown with two more columns: the kernel part of the CPU and the spread of msgs/s."""
    head = f"{'filter':14} {'conns':>5} {'m/c':>4} {'body':>6} {'msgs/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'CPU us/msg':>10}" \
           + (f" {'sys us':>6}" if medians else "") + f" {'loadgen us':>10} {'other%':>6}" \
           + (f" {'spread%':>7}" if medians else "") + "  notes"
    lines = [head, "-" * len(head)]
    for c in cells:
        notes = [tag] if tag else []
        if c.errors:
            notes.append(f"{c.errors} errors" if c.errors > 0 else "failed")
        if isinstance(c, MedianCell) and c.failed_rounds and c.errors >= 0:
            notes.append(f"{c.failed_rounds} of {c.rounds_measured + c.failed_rounds} rounds failed")
        if c.other_pct > OTHER_LOAD_WARN:
            notes.append("machine busy with other work: rerun")
        sys_col = f" {c.cpu_sys_us:6.0f}" if medians else ""
        spread = ""
        if medians:
            spread = f" {c.spread_pct:7.0f}" if isinstance(c, MedianCell) and c.rounds_measured > 1 else f" {'-':>7}"
        lines.append(f"{c.filter:14} {c.conns:5d} {c.per_conn:4d} {body_text(c.body):>6} {c.rate:8.0f} {c.p50_ms:8.2f}"
                     f" {c.p99_ms:8.2f} {c.cpu_us:10.0f}{sys_col} {c.loadgen_cpu_us:10.0f} {c.other_pct:6.0f}{spread}"
                     f"  {'; '.join(notes)}")
    return "\n".join(lines)


def engine_targets(cells: list[Cell]) -> list[str]:
    def find(name: str, conns: int = 32) -> Cell | None:
        return next((c for c in cells if c.filter == name and c.conns == conns and c.body == KB4
                     and c.per_conn == 1), None)

    # --workers 2 against libmilter, at every connection count measured with 4 KB bodies by both.
    workers = []
    for n in sorted({c.conns for c in cells if c.body == KB4}):
        w2, lib = find("tcl-w2", n), find("libmilter", n)
        if w2 is not None and lib is not None and lib.rate:
            ratio = w2.rate / lib.rate
            workers.append(f"--workers 2 at {n} conns: tcl-w2 {w2.rate:.0f} msgs/s = {ratio:.2f} x libmilter"
                           f" {lib.rate:.0f} (target >= {TARGET_WORKERS_FACTOR:g}x):"
                           f" {'MET' if ratio >= TARGET_WORKERS_FACTOR else 'MISSED'}")
    tcl, pym = find("tcl"), find("pymilter")
    out = []
    if tcl is None:
        return ["(no tcl cell at 32 connections, 4 KB: the one-process targets not evaluated)", *workers]
    if pym is not None and pym.rate:
        ratio = tcl.rate / pym.rate
        out.append(f"messages/s at 32 conns: tcl {tcl.rate:.0f} = {ratio:.2f} x pymilter {pym.rate:.0f}"
                   f" (target >= {TARGET_FACTOR:g}x): {'MET' if ratio >= TARGET_FACTOR else 'MISSED'}")
    out.append(f"CPU per message at 32 conns: tcl {tcl.cpu_us:.0f} us (target <= {TARGET_CPU_US:.0f} us): "
               f"{'MET' if tcl.cpu_us <= TARGET_CPU_US else 'MISSED'}"
               + beside(find, lambda c: f"{c.cpu_us:.0f} us", lambda c: c.cpu_us <= TARGET_CPU_US))
    out.append(f"p99 latency at 32 conns: tcl {tcl.p99_ms:.2f} ms (target < {TARGET_P99_MS:g} ms): "
               f"{'MET' if tcl.p99_ms < TARGET_P99_MS else 'MISSED'}"
               + beside(find, lambda c: f"{c.p99_ms:.2f} ms", lambda c: c.p99_ms < TARGET_P99_MS))
    return out + workers


def ratio_lines(cells: list[Cell]) -> list[str]:
    """One line per cell of the Tcl workload: its msgs/s (MB/s for bodies of 1 MB and more) and CPU,
    and its ratio to the null milter, pymilter and libmilter of the same cell in the same run."""
    out = []
    for tcl in (c for c in cells if c.filter == "tcl"):
        peers = {c.filter: c for c in cells if (c.conns, c.body, c.per_conn) == (tcl.conns, tcl.body, tcl.per_conn)}
        ratios = [f"{tcl.rate / p.rate:.2f} x {name} {_speed(p)}" for name in ("null", "pymilter", "libmilter")
                  if (p := peers.get(name)) is not None and p.rate]
        out.append(f"{tcl.per_conn} msg/conn, {tcl.conns} conns, {body_text(tcl.body)}: tcl {_speed(tcl)}"
                   f" ({tcl.cpu_us:.0f} us CPU/msg)" + (" = " + ", ".join(ratios) if ratios else ""))
    return out


def _speed(c: Cell) -> str:
    if c.body >= MB1:
        return f"{c.rate * c.body / 1e6:.0f} MB/s"
    return f"{c.rate:.0f} msgs/s"


def ratio_targets(cells: list[Cell]) -> list[str]:
    """Issue 20's targets, at 32 connections, each where its cells were measured."""
    def ratio(per_conn: Callable[[int], bool], body: Callable[[int], bool], ref: str) -> tuple[float, Cell] | None:
        for tcl in cells:
            if tcl.filter == "tcl" and tcl.conns == 32 and per_conn(tcl.per_conn) and body(tcl.body):
                p = next((c for c in cells if c.filter == ref and (c.conns, c.body, c.per_conn)
                          == (tcl.conns, tcl.body, tcl.per_conn)), None)
                if p is not None and p.rate:
                    return tcl.rate / p.rate, tcl
        return None

    one, many, kb4, big = (lambda m: m == 1), (lambda m: m > 1), (lambda b: b == KB4), (lambda b: b >= MB1)
    out = []
    for per_conn, body, ref, target in ((one, kb4, "null", TARGET_ONE_VS_NULL),
                                        (one, kb4, "pymilter", TARGET_ONE_VS_PYMILTER),
                                        (many, kb4, "pymilter", TARGET_MANY_VS_PYMILTER),
                                        (many, kb4, "libmilter", TARGET_MANY_VS_LIBMILTER),
                                        (lambda m: True, big, "null", TARGET_MB_VS_NULL)):
        found = ratio(per_conn, body, ref)
        if found is not None:
            r, tcl = found
            out.append(f"{tcl.per_conn} msg/conn, 32 conns, {body_text(tcl.body)}: tcl = {r:.2f} x {ref}"
                       f"{' in MB/s' if tcl.body >= MB1 else ''} (target >= {target:g}x):"
                       f" {'MET' if r >= target else 'MISSED'}")
    return out


def beside(find: Callable[[str], Cell | None], show: Callable[[Cell], str], meets: Callable[[Cell], bool]) -> str:
    """The same figure for the floor and libmilter of the run, for an absolute target: whether
    this machine, in its present phase, allows it at all (the floor has no engine)."""
    refs = [c for c in (find("floor"), find("libmilter")) if c is not None]
    if not refs:
        return ""
    text = "; same run: " + ", ".join(f"{c.filter} {show(c)}" for c in refs)
    floor = find("floor")
    if floor is not None and not meets(floor):
        text += " (the floor, with no engine, misses it too)"
    return text


def save_results(kind: str, payload: Mapping[str, object], path: str | None) -> None:
    """Write the run's results as JSON (default build/bench/results/KIND-DATE.json) and say where."""
    out = Path(path) if path else BUILD / "results" / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    say(f"\nsaved {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
