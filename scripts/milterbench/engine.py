"""engine mode: each filter alone under the C load generator, over a grid of connections x bodies.

Each filter is started once and serves every cell of every round; the load generator's warm-up
precedes each measured window. With --rounds N the filters of a cell run back to back, in an
order rotated by one every round, and the final cells are the medians over the rounds.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict

from milterbench import say, warn
from milterbench.build import loadgen_path
from milterbench.load import Cell, body_text, median_cell, parse_size, run_cell
from milterbench.measure import OTHER_LOAD_WARN, set_quiet_budget, wait_quiet
from milterbench.report import engine_targets, machine_info, print_info, ratio_lines, ratio_targets, save_results, \
    table
from milterbench.rigs import Filter, filters_cpu, make_filters

Round = tuple[list[str], list[Cell]]  # the filter order of a round, its cells in the order measured


def cmd_engine(opts: argparse.Namespace) -> int:
    conns = [int(x) for x in opts.conns.split(",")]
    bodies = [parse_size(x) for x in opts.bodies.split(",")]
    per_conns = [int(x) for x in str(opts.per_conn).split(",")]
    duration = opts.duration or (1.2 if opts.quick else 6.0)
    warmup = opts.warmup if opts.warmup is not None else (0.3 if opts.quick else 1.0)
    rounds = opts.rounds
    if rounds < 1:
        raise SystemExit("bench: --rounds must be at least 1")
    if min(per_conns) < 1:
        raise SystemExit("bench: --per-conn must be at least 1")
    loadgen = loadgen_path()
    set_quiet_budget((10.0 if opts.quick else 60.0) * rounds)
    info = machine_info()
    say("pytclmilter benchmark: engine mode")
    print_info(info)
    filters = make_filters(opts.filters.split(","), opts.log_level, opts.body_callback)
    say(f"  workload:     connect/envfrom/envrcpt/header/eom callbacks, X-Bench added at eom"
        f"{', body callback too' if opts.body_callback else ' (no body callback: the body is skipped)'}")
    say(f"  load:         {' and '.join(map(str, per_conns))} message(s) per milter connection, {warmup:g}s warm-up +"
        f" {duration:g}s measured per cell, {'quick' if not opts.delayed_acks else 'delayed'} ACKs,"
        f" filter log level {opts.log_level}")
    if rounds > 1:
        say(f"  rounds:       {rounds}, each the whole grid; in each cell the filters run back to back, the order"
            f" rotated by one every round; results are the medians over the rounds")
    per_round: list[Round] = []
    try:
        for f in filters:
            f.start()
        say("")
        say(table([]))
        dead: set[str] = set()
        for r in range(rounds):
            k = r % len(filters) if filters else 0
            order = filters[k:] + filters[:k]
            tag = f"round {r + 1}/{rounds}" if rounds > 1 else ""
            if rounds > 1:
                say(f"-- round {r + 1}/{rounds}: filter order {', '.join(f.name for f in order)}")
            measured: list[Cell] = []
            per_round.append(([f.name for f in order], measured))
            for body, n, per_conn in grid(bodies, conns, per_conns):
                for f in order:
                    if not f.alive():
                        if f.name not in dead:
                            dead.add(f.name)
                            warn(f"filter {f.name} died:\n{f.log_tail()}")
                        continue
                    wait_quiet(OTHER_LOAD_WARN, 3 if opts.quick else 10, lambda: filters_cpu(filters))
                    cell = run_cell(loadgen, f, n, body, duration, warmup, per_conn, not opts.delayed_acks)
                    measured.append(cell)
                    say(table([cell], tag).splitlines()[-1])
                    if cell.errors:
                        warn(f"{f.name}, {n} conns, {per_conn} msgs/conn, {body_text(body)}"
                             f"{', ' + tag if tag else ''}: {cell.error_text}")
    finally:
        for f in filters:
            f.stop()
    raw = [c for _, measured in per_round for c in measured]
    cells = final_cells(raw, filters, grid(bodies, conns, per_conns), rounds)
    say("")
    if rounds == 1:
        say("Results")
        say(table(cells))
    else:
        say(f"Results: medians over {rounds} rounds (sys us: the kernel part of CPU us/msg;"
            f" spread%: (max - min) / median of msgs/s over the rounds)")
        say(table(cells, medians=True))
    say("")
    say("Targets (Tcl workload, 4 KB: one process at 32 connections; --workers 2 against libmilter"
        + (f"; medians over {rounds} rounds)" if rounds > 1 else ")"))
    for line in engine_targets(cells):
        say(f"  {line}")
    say("")
    say("Ratios in this run (the Tcl workload against the null milter, pymilter and libmilter), and the"
        " targets of issue 20")
    for line in ratio_lines(cells) + ratio_targets(cells):
        say(f"  {line}")
    payload = {"info": info, "options": vars(opts), "cells": [asdict(c) for c in cells],
               "rounds": [{"round": i + 1, "filter_order": order, "cells": [asdict(c) for c in measured]}
                          for i, (order, measured) in enumerate(per_round)]}
    save_results("engine", payload, opts.json)
    return 1 if any(c.errors for c in raw) else 0


def grid(bodies: list[int], conns: list[int], per_conns: list[int]) -> list[tuple[int, int, int]]:
    """The cells of a round, in the order they run: (body, connections, messages per connection)."""
    return [(body, n, m) for body in bodies for n in conns for m in per_conns]


def final_cells(raw: list[Cell], filters: list[Filter], cells_grid: list[tuple[int, int, int]],
                rounds: int) -> list[Cell]:
    """The cells in grid order (body, conns, per_conn, filters as given), whatever order they ran in:
    the one measured, or with several rounds the medians over them."""
    cells: list[Cell] = []
    for body, n, per_conn in cells_grid:
        for f in filters:
            runs = [c for c in raw if c.filter == f.name and c.conns == n and c.body == body
                    and c.per_conn == per_conn]
            if runs:
                cells.append(runs[0] if rounds == 1 else median_cell(runs))
    return cells
