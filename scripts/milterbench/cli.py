"""The command line of scripts/bench: one sub-command per mode."""

from __future__ import annotations

import argparse
import sys

from milterbench.engine import cmd_engine
from milterbench.idle import cmd_idle
from milterbench.load import KB4, parse_size
from milterbench.profiling import cmd_profile
from milterbench.rigs import FILTERS


def add_log_level(q: argparse.ArgumentParser) -> None:
    q.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="log level of the pytclmilter filters (default info, as `pytclmilter run`)")


def add_json(q: argparse.ArgumentParser) -> None:
    q.add_argument("--json", metavar="PATH", help="write the results here (default build/bench/results/)")


def add_common(q: argparse.ArgumentParser, filters: tuple[str, ...] = FILTERS) -> None:
    """The options of the modes that measure several filters side by side (engine, postfix)."""
    q.add_argument("--filters", default=",".join(filters),
                   help=f"comma-separated (default: {','.join(filters)}); also tcl-pure, python-pure (the hot "
                        "path not compiled), tcl-asyncio, python-asyncio (the standard event loop instead of "
                        "uvloop), tcl-wN (--workers N) and, in engine mode, floor")
    add_log_level(q)
    add_json(q)
    q.add_argument("--quick", action="store_true", help="short run (under a minute)")


def parser(doc: str) -> argparse.ArgumentParser:
    """The parser; ``doc`` (scripts/bench's docstring) is the help's description and epilog."""
    p = argparse.ArgumentParser(prog="scripts/bench", description=doc.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc)
    sub = p.add_subparsers(dest="mode", required=True)

    e = sub.add_parser("engine", help="filters alone, driven by the C load generator")
    add_common(e, ("floor", *FILTERS))  # the floor: what the absolute targets are compared with
    e.add_argument("--conns", default="1,32,256", help="concurrent connections (default 1,32,256)")
    e.add_argument("--bodies", default="4k,1m", help="body sizes (default 4k,1m)")
    e.add_argument("--duration", type=float, help="measured seconds per cell (default 6, quick 1.2)")
    e.add_argument("--warmup", type=float, help="warm-up seconds per cell (default 1, quick 0.3)")
    e.add_argument("--per-conn", default="1",
                   help="messages per milter connection, comma-separated for several in one run (default 1, as"
                        " Postfix: one connection per SMTP session; e.g. 1,100)")
    e.add_argument("--rounds", type=int, default=1,
                   help="run the whole grid N times, the filters of a cell back to back in an order rotated"
                        " every round, and report the medians over the rounds and the spread of msgs/s (default 1)")
    e.add_argument("--body-callback", action="store_true",
                   help="filters also register a body callback, so the body is sent to them")
    e.add_argument("--delayed-acks", action="store_true",
                   help="load generator keeps delayed ACKs (as Postfix); libmilter then waits ~40 ms per message")

    pf = sub.add_parser("postfix", help="through a private Postfix, beside Postfix without a milter")
    add_common(pf)
    pf.add_argument("--messages", type=int, help="messages per run (default 3000, quick 600)")
    pf.add_argument("--sessions", type=int, default=32, help="parallel SMTP sessions (default 32)")
    pf.add_argument("--rounds", type=int, help="rounds over all configs (default 2, quick 1)")
    pf.add_argument("--body", type=parse_size, default=KB4, help="body size (default 4k)")

    fl = sub.add_parser("fleet", help="one instance against two behind HAProxy (scripts/haproxy.cfg)")
    fl.add_argument("--conns", type=int, default=32, help="concurrent connections (default 32)")
    fl.add_argument("--body", type=parse_size, default=KB4, help="body size (default 4k)")
    fl.add_argument("--duration", type=float, help="measured seconds per cell (default 5, quick 1.5)")
    fl.add_argument("--rounds", type=int, help="rounds, the targets back to back in each (default 3, quick 1)")
    fl.add_argument("--quick", action="store_true", help="short run")
    add_log_level(fl)
    add_json(fl)

    pr = sub.add_parser("profile", help="profile a pytclmilter filter under load (32 connections)")
    pr.add_argument("--tool", choices=["py-spy", "cprofile", "callgrind"], default="py-spy",
                    help="callgrind: instructions per message of the whole server process (accept, uvloop,"
                         " engine, Tcl), by part; the compiled tcl filter only")
    pr.add_argument("--filter", choices=["tcl-pure", "python-pure", "tcl", "python", "tcl-asyncio", "python-asyncio"],
                    default="tcl-pure", help="default tcl-pure: the Python source, whose frames py-spy can name")
    pr.add_argument("--conns", type=int, default=32)
    pr.add_argument("--duration", type=float, default=10.0)
    pr.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    pr.add_argument("--native", action="store_true", help="py-spy --native (C frames: Tcl, the interpreter)")
    pr.add_argument("--messages", type=int, default=300, help="callgrind: messages measured (default 300)")
    pr.add_argument("--per-conn", default="1",
                    help="callgrind: messages per connection (default 1); A,B (e.g. 1,100): both, and what a"
                         " connection costs beyond its messages")
    pr.add_argument("--top", type=int, default=30)
    add_log_level(pr)

    idle = sub.add_parser("idle", help="resident memory of a filter holding N idle milter connections")
    idle.add_argument("--conns", type=int, default=1000, help="idle connections to open (default 1000)")
    idle.add_argument("--filters", default="tcl,python",
                      help="comma-separated (default tcl,python); also libmilter, pymilter, tcl-asyncio, "
                           "python-asyncio (one process each: not tcl-wN)")
    idle.add_argument("--settle", type=float, default=1.0,
                      help="seconds to wait before each RSS reading (default 1)")
    idle.add_argument("--timeout", type=float, default=60.0,
                      help="give up if opening the connections takes longer (default 60 s)")
    add_log_level(idle)
    add_json(idle)
    return p


def main(doc: str, argv: list[str] | None = None) -> int:
    opts = parser(doc).parse_args(argv)
    if opts.mode == "postfix":
        # Imported here: it needs the test suite's Postfix harness, which the other modes do not.
        from milterbench.postfix import cmd_postfix

        return cmd_postfix(opts)
    if opts.mode == "fleet":
        # Imported here: it needs the test suite's HAProxy harness, which the other modes do not.
        from milterbench.fleet import cmd_fleet

        return cmd_fleet(opts)
    return {"engine": cmd_engine, "idle": cmd_idle, "profile": cmd_profile}[opts.mode](opts)


def run(doc: str) -> None:
    """scripts/bench's entry: exit with the mode's status, 130 on Ctrl-C."""
    try:
        sys.exit(main(doc))
    except KeyboardInterrupt:
        sys.exit(130)
