"""fleet mode: one pytclmilter instance against two behind HAProxy, under the load generator.

The balancer is the test suite's private HAProxy (tests/support/haproxy.py), which runs the shipped
scripts/haproxy.cfg (leastconn, the milter health check). Three targets, each the Tcl workload
(tclmilter/examples/bench.tcl, compiled build):

    direct   the load generator straight to one instance
    hap-1    through HAProxy, one instance in the pool
    hap-2    through HAProxy, two instances in the pool

In every round the three run back to back, in an order rotated by one each round, and the figures
are the medians over the rounds; ratios are to hap-1 and direct of the same run. On one machine
the instances, HAProxy and the load generator share its CPUs, so hap-2 shows what a second
process gains where CPUs are free, not what a second machine would.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import asdict, dataclass, field

from milterbench import ROOT, say, warn
from milterbench.build import loadgen_path
from milterbench.load import Cell, body_text, run_cell
from milterbench.measure import OTHER_LOAD_WARN, proc_cpu, set_quiet_budget, wait_quiet
from milterbench.report import machine_info, print_info, save_results
from milterbench.rigs import Filter, filters_cpu, make_filters

sys.path.insert(0, str(ROOT / "tests"))  # the harness is the test suite's, as postfix mode's Postfix
from support.haproxy import PrivateHAProxy  # noqa: E402


@dataclass
class Target:
    """What the load generator is pointed at, and whose CPU counts as the filter's."""

    name: str
    spec: str
    members: list[Filter]
    balancer: PrivateHAProxy | None = None
    cells: list[Cell] = field(default_factory=list)
    balancer_us: list[float] = field(default_factory=list)

    def cpu_split(self) -> tuple[float, float]:
        splits = [f.cpu_split() for f in self.members]
        return sum(u for u, _ in splits), sum(s for _, s in splits)

    def balancer_cpu(self) -> float:
        proc = self.balancer.proc if self.balancer is not None else None
        return proc_cpu(proc.pid) if proc is not None else 0.0


def targets(one: Filter, two: Filter) -> list[Target]:
    hap1 = PrivateHAProxy({"i1": f"127.0.0.1:{one.port}"}).start()
    hap2 = PrivateHAProxy({"i1": f"127.0.0.1:{one.port}", "i2": f"127.0.0.1:{two.port}"}).start()
    for hap in (hap1, hap2):
        for name in hap.servers:
            hap.wait_status(name, "UP")
    return [Target("direct", one.spec, [one]), Target("hap-1", hap1.milter, [one], hap1),
            Target("hap-2", hap2.milter, [one, two], hap2)]


def cmd_fleet(opts: argparse.Namespace) -> int:
    duration = opts.duration or (1.5 if opts.quick else 5.0)
    warmup = 0.3 if opts.quick else 1.0
    rounds = opts.rounds or (1 if opts.quick else 3)
    loadgen = loadgen_path()
    set_quiet_budget((10.0 if opts.quick else 30.0) * rounds)
    info = machine_info()
    say("pytclmilter benchmark: fleet mode (one instance against two behind HAProxy, scripts/haproxy.cfg)")
    print_info(info)
    one, two = make_filters(["tcl", "tcl"], opts.log_level, False)
    one.name, two.name = "tcl-1", "tcl-2"  # their log files
    say(f"  load:         {opts.conns} connections, one message each, {body_text(opts.body)} body, {warmup:g}s"
        f" warm-up + {duration:g}s measured per cell, {rounds} round(s), order rotated every round")
    runs: list[Target] = []
    try:
        one.start()
        two.start()
        runs = targets(one, two)
        for r in range(rounds):
            order = runs[r % len(runs):] + runs[:r % len(runs)]
            for t in order:
                wait_quiet(OTHER_LOAD_WARN, 3 if opts.quick else 10, lambda: filters_cpu([one, two]))
                before = t.balancer_cpu()
                cell = run_cell(loadgen, t, opts.conns, opts.body, duration, warmup, 1, True)
                cell.filter = t.name
                t.cells.append(cell)
                if cell.messages:
                    # The balancer's CPU over the whole run (warm-up included), per counted message.
                    t.balancer_us.append((t.balancer_cpu() - before) / cell.messages * 1e6)
                say(f"  round {r + 1}: {t.name:7} {cell.rate:8.0f} msgs/s  p99 {cell.p99_ms:6.1f} ms"
                    f"  other {cell.other_pct:4.0f}%")
                if cell.errors:
                    warn(f"{t.name}, round {r + 1}: {cell.error_text}")
    finally:
        for t in runs:
            if t.balancer is not None:
                t.balancer.close()
        one.stop()
        two.stop()
    report(runs, rounds)
    save_results("fleet", {"info": info, "options": vars(opts),
                           "cells": {t.name: [asdict(c) for c in t.cells] for t in runs}}, opts.json)
    return 1 if any(c.errors for t in runs for c in t.cells) else 0


def report(runs: list[Target], rounds: int) -> None:
    med = {t.name: statistics.median(c.rate for c in t.cells) for t in runs if t.cells}
    say("")
    say(f"Results (medians over {rounds} round(s); filter us: CPU of the instances per message;"
        " haproxy us: HAProxy's, warm-up included)")
    say(f"{'target':8} {'msgs/s':>8} {'x direct':>9} {'x hap-1':>8} {'p50 ms':>7} {'p99 ms':>7}"
        f" {'filter us':>10} {'haproxy us':>11}")
    for t in runs:
        if not t.cells:
            continue
        rate = med[t.name]
        say(f"{t.name:8} {rate:8.0f} {rate / med['direct']:9.2f} {rate / med['hap-1']:8.2f}"
            f" {statistics.median(c.p50_ms for c in t.cells):7.1f} {statistics.median(c.p99_ms for c in t.cells):7.1f}"
            f" {statistics.median(c.cpu_us for c in t.cells):10.0f}"
            f" {statistics.median(t.balancer_us) if t.balancer_us else 0:11.0f}")

