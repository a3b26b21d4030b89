"""One measured cell: a filter under build/bench/loadgen (scripts/loadgen.c) at N connections.

The load generator prints "WINDOW start" and "WINDOW end" around its measuring window and one
"RESULT key=value ..." line at the end (messages/s, latency percentiles, its own CPU per message,
errors). The filter's CPU and the machine's are read here exactly at the window's two edges.
"""

from __future__ import annotations

import re
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from milterbench.measure import box_busy, other_load_pct


class Measured(Protocol):
    """What a cell measures: a filter (rigs.Filter), or a pool of them behind a balancer (fleet.py)."""

    name: str

    @property
    def spec(self) -> str: ...

    def cpu_split(self) -> tuple[float, float]: ...

KB4, MB1 = 4096, 1024 * 1024


def body_text(n: int) -> str:
    return "4 KB" if n == KB4 else "1 MB" if n == MB1 else f"{n} B"


def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+)\s*([kKmM]?)[bB]?", text.strip())
    if not m:
        raise SystemExit(f"bench: bad size {text!r} (e.g. 4096, 4k, 1m)")
    return int(m.group(1)) * {"": 1, "k": 1024, "m": 1024 * 1024}[m.group(2).lower()]


@dataclass
class Cell:
    filter: str
    conns: int
    body: int
    messages: int = 0
    seconds: float = 0.0
    rate: float = 0.0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    cpu_us: float = 0.0
    cpu_sys_us: float = 0.0  # the part of cpu_us spent in the kernel
    loadgen_cpu_us: float = 0.0
    other_pct: float = 0.0  # CPU used by processes other than the filter and loadgen, % of all CPUs
    errors: int = 0
    error_text: str = ""
    per_conn: int = 1  # messages per milter connection


@dataclass
class MedianCell(Cell):
    """A cell over several rounds: every Cell field is the median over the rounds that produced a result
    (errors: their sum, -1 if no round produced a result), plus the spread of messages/s."""

    rounds_measured: int = 0  # rounds that produced a result
    failed_rounds: int = 0  # rounds without a result (left out of the medians)
    spread_pct: float = 0.0  # (max - min) / median of msgs/s, in %
    rate_min: float = 0.0
    rate_max: float = 0.0


# Cell fields that are medians in a MedianCell; the others are not numbers over rounds.
_MEDIAN_FIELDS = ("seconds", "rate", "p50_ms", "p90_ms", "p99_ms", "max_ms", "cpu_us", "cpu_sys_us",
                  "loadgen_cpu_us", "other_pct")


def median_cell(runs: list[Cell]) -> MedianCell:
    """The medians over the rounds of one cell (same filter, conns, body, per_conn); failed rounds are
    left out."""
    first = runs[0]
    m = MedianCell(first.filter, first.conns, first.body, per_conn=first.per_conn)
    ok = [c for c in runs if c.errors >= 0]
    texts = list(dict.fromkeys(c.error_text for c in runs if c.error_text))
    m.error_text = "\n".join(texts)
    m.failed_rounds = len(runs) - len(ok)
    if not ok:
        m.errors = -1
        return m
    m.rounds_measured = len(ok)
    m.errors = sum(c.errors for c in ok)
    m.messages = round(statistics.median(c.messages for c in ok))
    for name in _MEDIAN_FIELDS:
        setattr(m, name, statistics.median(getattr(c, name) for c in ok))
    rates = [c.rate for c in ok]
    m.rate_min, m.rate_max = min(rates), max(rates)
    m.spread_pct = (m.rate_max - m.rate_min) / m.rate * 100 if m.rate else 0.0
    return m


@dataclass
class _Edge:
    """The readings at one edge of the measuring window."""

    cpu: tuple[float, float]  # the filter's (user, system) CPU seconds
    busy: float  # the machine's busy CPU seconds
    at: float  # time.monotonic()

    @classmethod
    def read(cls, flt: Measured) -> _Edge:
        return cls(flt.cpu_split(), box_busy(), time.monotonic())


_RESULT = re.compile(r"(\w+)=([-\d.]+)")


def run_cell(loadgen: Path, flt: Measured, conns: int, body: int, duration: float, warmup: float,
             per_conn: int, quickack: bool) -> Cell:
    cell = Cell(flt.name, conns, body, per_conn=per_conn)
    cmd = [str(loadgen), "-q", "-c", str(conns), "-d", str(duration), "-w", str(warmup), "-b", str(body),
           "-m", str(per_conn), *([] if quickack else ["-D"]), flt.spec]
    start = end = None
    result = ""
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("WINDOW start"):
                start = _Edge.read(flt)
            elif line.startswith("WINDOW end"):
                end = _Edge.read(flt)
            elif line.startswith("RESULT"):
                result = line
        proc.wait()
        err.seek(0)
        cell.error_text = err.read().decode(errors="replace").strip()
    values = {k: float(v) for k, v in _RESULT.findall(result)}
    cell.messages = int(values.get("messages", 0))
    cell.seconds = values.get("seconds", 0.0)
    cell.rate = values.get("rate", 0.0)
    cell.p50_ms, cell.p90_ms = values.get("p50_ms", 0.0), values.get("p90_ms", 0.0)
    cell.p99_ms, cell.max_ms = values.get("p99_ms", 0.0), values.get("max_ms", 0.0)
    cell.loadgen_cpu_us = values.get("loadgen_cpu_us", 0.0)
    cell.errors = int(values.get("errors", 0)) if result else -1
    if start is not None and end is not None:
        filter_cpu = sum(end.cpu) - sum(start.cpu)
        if cell.messages:
            cell.cpu_us = filter_cpu / cell.messages * 1e6
            cell.cpu_sys_us = (end.cpu[1] - start.cpu[1]) / cell.messages * 1e6
        if end.at > start.at:
            ours = filter_cpu + cell.loadgen_cpu_us * cell.messages / 1e6
            cell.other_pct = other_load_pct(end.busy - start.busy, ours, end.at - start.at)
    if not result:
        cell.error_text = cell.error_text or f"loadgen exited {proc.returncode} without a result"
    return cell
