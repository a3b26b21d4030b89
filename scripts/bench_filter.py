#!/usr/bin/env python3
"""The benchmark workload of scripts/bench with pytclmilter's Python API.

Registers connect, envfrom, envrcpt, header and eom; every callback answers
CONTINUE and the eom callback adds "X-Bench: 1" -- the same workload as
tclmilter/examples/bench.tcl, so the Tcl bridge's cost can be told apart from
the engine's.

    scripts/bench_filter.py inet:8899@127.0.0.1 [--body] [--log-level info]

``--body`` also registers a body callback (the MTA then sends the body).
Logging is set up as ``pytclmilter run`` sets it up (stderr, level info by
default), so both runs do the same logging work.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import pytclmilter  # noqa: F401
except ModuleNotFoundError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from pytclmilter import CONTINUE, Hooks, Milter  # noqa: E402
from pytclmilter.commands.logs import setup_logging  # noqa: E402


def build(connection: str, body: bool) -> Milter:
    milter = Milter(name="BenchPy", connection=connection, hooks=Hooks(
        listening=lambda spec: print(f"pytclmilter: {milter.name} listening on {spec}", flush=True)))

    @milter.register("connect")
    def connect(ctx, hostname, addr):
        return CONTINUE

    @milter.register("envfrom")
    def envfrom(ctx, args):
        return CONTINUE

    @milter.register("envrcpt")
    def envrcpt(ctx, args):
        return CONTINUE

    @milter.register("header")
    def header(ctx, name, value):
        return CONTINUE

    if body:
        @milter.register("body")
        def body_(ctx, chunk):
            return CONTINUE

    @milter.register("eom")
    def eom(ctx):
        ctx.addheader("X-Bench", "1")
        return CONTINUE

    return milter


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("connection", nargs="?", default="inet:8899@127.0.0.1")
    p.add_argument("--body", action="store_true", help="also register a body callback")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    opts = p.parse_args()
    setup_logging(opts.log_level)  # as `pytclmilter run`: the same line, handler and record factory
    build(opts.connection, opts.body).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
