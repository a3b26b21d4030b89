#!/usr/bin/env python3
"""The engine's own cost per message, in process: no sockets, no event loop, no other process.

Feeds the byte batches that scripts/loadgen.c sends for one message (Postfix 3.7's packets and
macros; 10 headers, skipped body) straight into a ConnectionEngine running the benchmark workload
(tclmilter/examples/bench.tcl, or scripts/bench_filter.py with --filter python), and reports the
CPU time per message: the best of --repeat runs. On a shared or drifting machine that still moves
by 10-20 %, so --callgrind counts instructions instead (valgrind, two runs: with 0 and with N
messages): the same figure on every run of the same code, which is what an optimisation should be
judged by.

    scripts/bench_inproc.py [--filter tcl|python] [--messages N] [--headers N] [--log-level L]
    scripts/bench_inproc.py --callgrind [--messages 300] [--metrics]
    scripts/bench_inproc.py --per-conn 50 [--callgrind]   # 50 messages per connection (default 1, as Postfix)
    scripts/bench_inproc.py --split                       # a connection's instructions, stage by stage
    build/venv/bin/python scripts/bench_inproc.py --installed   # the compiled build scripts/bench installs

--split counts, with callgrind, what each part of a one-message connection costs: the engine,
its context and the Tcl context command made and closed with no bytes; the negotiation; the
connect stage; the message itself (a message on a long connection); the rest of the first
message and the close (HELO's macros, the first MAIL, ABORT ABORT QUIT); and, within the first,
the context and the Tcl context command alone (the hooks the engine calls).

Log lines go to /dev/null through the formatter `pytclmilter run` uses.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if "--installed" not in sys.argv:  # by default this checkout's source; --installed: what pip installed
    sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "scripts"))

from pytclmilter.compiled import describe  # noqa: E402
from pytclmilter.protocol.codec import frame  # noqa: E402

from milterbench import message  # noqa: E402

QID = "4dBnch1Xq9z"
HEADERS = [  # as scripts/loadgen.c sends them
    ("Received", "from client.bench.test (client.bench.test [127.0.0.1])\n\tby mx.bench.test (Postfix) "
                 f"with ESMTP id {QID}\n\tfor <rcpt1@sink.bench.test>; Tue, 25 Nov 2025 12:00:00 +0000 (UTC)"),
    *message.HEADERS,
    ("X-Mailer", "pytclmilter loadgen"),
]


def _z(*strings: str) -> bytes:
    return b"".join(s.encode() + b"\0" for s in strings)


def _macros(stage: bytes, *pairs: str) -> bytes:
    return frame(b"D", stage + _z(*pairs))


OPTNEG = frame(b"O", struct.pack(">III", 6, 0x1FF, 0x1FFFFF))
CONNECT = _macros(b"C", "j", "mx.bench.test", "{daemon_name}", "mx.bench.test", "{daemon_addr}", "127.0.0.1",
                  "v", "Postfix 3.7.11", "_", "client.bench.test [127.0.0.1]") \
    + frame(b"C", _z("client.bench.test") + b"4" + struct.pack(">H", 40000) + _z("127.0.0.1"))
QUIT = frame(b"A") + frame(b"A") + frame(b"Q")


def transaction(headers: int) -> list[bytes]:
    """MAIL to end of message, one batch per write (the first starts with MAIL's macros)."""
    rcpt = ("{rcpt_host}", "[127.0.0.1]:25", "{rcpt_mailer}", "smtp")
    return [
        _macros(b"M", "{mail_addr}", "sender@client.bench.test", "{mail_host}", "[127.0.0.1]:25",
                "{mail_mailer}", "smtp") + frame(b"M", _z("<sender@client.bench.test>", "SIZE=5096")),
        _macros(b"R", "{rcpt_addr}", "rcpt1@sink.bench.test", *rcpt) + frame(b"R", _z("<rcpt1@sink.bench.test>")),
        _macros(b"R", "i", QID, "{rcpt_addr}", "rcpt2@sink.bench.test", *rcpt)
        + frame(b"R", _z("<rcpt2@sink.bench.test>")),
        _macros(b"T", "i", QID)
        + b"".join(_macros(b"L", "i", QID) + frame(b"L", _z(n, v)) for n, v in HEADERS[:headers])
        + _macros(b"E", "i", QID) + frame(b"E"),
    ]


def batches(headers: int, per_conn: int = 1) -> list[bytes]:
    """One connection as the load generator writes it, one batch per write, for the bench's
    negotiation: ``per_conn`` messages, each later one starting with ABORT as Postfix starts it."""
    first, *rest = transaction(headers)
    out = [OPTNEG, CONNECT, _macros(b"H") + first, *rest]
    for _ in range(per_conn - 1):
        first, *rest = transaction(headers)
        out += [frame(b"A") + first, *rest]
    return [*out, QUIT]


# --split: what one unit of each workload feeds a new engine (None: the context hooks alone).
STAGES: dict[str, list[bytes] | None] = {"open": [], "optneg": [OPTNEG], "connect": [OPTNEG, CONNECT], "ctx": None}


class Link:
    """The engine's connection, minus the socket: replies are kept to check the first message."""

    blocked = False
    peer = "the benchmark"
    proxied = False

    def __init__(self) -> None:
        self.out: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def close(self) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def touch(self) -> None: ...


def make_milter(kind: str):
    if kind == "tcl":
        from pytclmilter.tcl.interp import TclHost

        host = TclHost()
        script = (ROOT / "tclmilter" / "examples" / "bench.tcl").read_text()
        host.child_call("set", "argv", ())
        host.child_call("eval", script.replace("milter main", ""))
        return host.milter
    import bench_filter

    return bench_filter.build("inet:1@127.0.0.1", False)


def measure(kind: str, messages: int, headers: int, level: str, repeat: int, per_conn: int = 1,
            stage: str = "", metrics: bool = False) -> float:
    """Best CPU µs per message (per unit of ``stage``) over ``repeat`` runs, after a warm-up of 200
    one-message connections (the same in every run, so that --callgrind's runs differ only in what
    they measure)."""""
    sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - the log lines, as `run` writes them, to nowhere
    from pytclmilter.commands.logs import setup_logging
    from pytclmilter.context import Context
    from pytclmilter.engine import ConnectionEngine
    from pytclmilter.protocol.macros import MacroStore

    setup_logging(level)
    milter = make_milter(kind)
    shared = milter.shared
    first = batches(headers)  # the check and the warm-up: the same in every run, whatever is measured
    data = batches(headers, per_conn)
    conns = max(messages // per_conn, 1) if messages else 0
    if metrics:  # what --metrics counts per message (the HTTP side costs nothing per message)
        from pytclmilter.meter import Meter

        shared.meter = Meter()

    def one(conn_id: int, data: list[bytes] = data) -> Link:
        link = Link()
        engine = ConnectionEngine(shared, conn_id, link)
        for batch in data:
            engine.data_received(batch)
        engine.connection_lost("eof")
        return link

    def context(conn_id: int) -> None:
        ctx = Context(conn_id, MacroStore(), lambda: None)
        shared.hooks.context_created(ctx)
        shared.hooks.context_closed(ctx)
        ctx.detach()

    if b"X-Bench" not in b"".join(one(0, first).out):
        raise SystemExit("bench_inproc: the filter did not add X-Bench: the workload is not running")
    for i in range(200):
        one(i, first)
    unit: Callable[[int], object] = one
    if stage:
        conns = messages
        stage_data = STAGES[stage]
        unit = context if stage_data is None else (lambda conn_id: one(conn_id, stage_data))
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        for i in range(conns):
            unit(i)
        best = min(best, time.process_time() - start)
    return best / max(conns * (1 if stage else per_conn), 1) * 1e6


def callgrind(opts: argparse.Namespace) -> int:
    if not shutil.which("valgrind"):
        raise SystemExit("bench_inproc: --callgrind needs valgrind (apt-get install valgrind)")

    def instructions(n: int, per_conn: int = opts.per_conn, stage: str = "") -> int:
        cmd = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, __file__,
               "--filter", opts.filter, "--messages", str(n), "--headers", str(opts.headers),
               "--log-level", opts.log_level, "--repeat", "1", "--per-conn", str(per_conn),
               *(["--stage", stage] if stage else []), *(["--installed"] if opts.installed else []),
               *(["--metrics"] if opts.metrics else [])]
        # A fixed hash seed: with Python's per-process random one, dict and set probing (and so
        # the count) moved by about 2,000 instructions a message between runs of the same build.
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stderr
        found = re.search(r"Collected : (\d+)", out)
        if not found:
            raise SystemExit(f"bench_inproc: no instruction count in valgrind's output:\n{out[-2000:]}")
        return int(found.group(1))

    if opts.split:
        return split(opts, instructions)
    n = opts.messages - opts.messages % opts.per_conn or opts.per_conn
    per = (instructions(n) - instructions(0)) / n
    print(f"{opts.filter}: {per:,.0f} instructions per message ({opts.per_conn} per connection, {opts.headers}"
          f" headers, log level {opts.log_level}{', metrics on' if opts.metrics else ''}; callgrind, {n} messages; {describe()})")
    return 0


def split(opts: argparse.Namespace, instructions: Callable[..., int]) -> int:
    """Where a one-message connection's instructions go: each stage's workload counted against
    the same empty run (the same start-up), per connection."""
    n, long = opts.messages, 50
    base = instructions(0, 1)
    per = {stage: (instructions(n, 1, stage) - base) / n for stage in STAGES}
    per["one"] = (instructions(n, 1) - base) / n
    per["message"] = (instructions(n * long // 10, long) - base) / (n * long // 10)
    rows = [
        ("the context and the Tcl context command, made and deleted (hooks)", per["ctx"]),
        ("the engine, its session, and closing it (no bytes)", per["open"] - per["ctx"]),
        ("negotiation (OPTNEG)", per["optneg"] - per["open"]),
        ("connect stage (macros, connect callback)", per["connect"] - per["optneg"]),
        ("the message itself (as the 2nd-50th of a connection)", per["message"]),
        ("the rest: HELO macros, first MAIL, ABORT ABORT QUIT, close", per["one"] - per["connect"] - per["message"]),
    ]
    print(f"{opts.filter}: instructions of a one-message connection, in process ({opts.headers} headers, log level"
          f" {opts.log_level}; callgrind, {n} connections; {describe()})")
    for what, count in rows:
        print(f"  {count:11,.0f}  {count / per['one']:4.0%}  {what}")
    print(f"  {per['one']:11,.0f}  100%  one message per connection")
    print(f"  {per['one'] - per['message']:11,.0f}  {1 - per['message'] / per['one']:4.0%}  of it per connection"
          f" (at {long} messages per connection: {per['message']:,.0f} per message)")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--filter", choices=["tcl", "python"], default="tcl")
    p.add_argument("--messages", type=int, default=None, help="messages per run (default 3000; 300 with --callgrind)")
    p.add_argument("--headers", type=int, default=10, choices=range(0, 11), metavar="0..10")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--repeat", type=int, default=5, help="runs; the best is reported (default 5)")
    p.add_argument("--per-conn", type=int, default=1, help="messages per connection (default 1, as Postfix)")
    p.add_argument("--callgrind", action="store_true", help="count instructions with valgrind instead")
    p.add_argument("--split", action="store_true",
                   help="with callgrind: a one-message connection's instructions, stage by stage (~3 min)")
    p.add_argument("--stage", choices=list(STAGES), default="", help=argparse.SUPPRESS)  # --split's runs
    p.add_argument("--installed", action="store_true",
                   help="measure the pytclmilter this Python has installed, not this checkout's src/")
    p.add_argument("--metrics", action="store_true", help="count what --metrics counts (meter.py)")
    opts = p.parse_args()
    if opts.per_conn < 1:
        raise SystemExit("bench_inproc: --per-conn must be at least 1")
    if opts.callgrind or opts.split:
        opts.messages = opts.messages if opts.messages is not None else 300
        return callgrind(opts)
    messages = 3000 if opts.messages is None else opts.messages
    us = measure(opts.filter, messages, opts.headers, opts.log_level, opts.repeat, opts.per_conn, opts.stage,
                 opts.metrics)
    unit = f"{opts.stage} unit" if opts.stage else "message"
    print(f"{opts.filter}: {us:.1f} µs CPU per {unit} ({opts.per_conn} per connection, {opts.headers} headers, log"
          f" level {opts.log_level}; best of {opts.repeat} x {messages}; {describe()})", file=sys.__stdout__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
