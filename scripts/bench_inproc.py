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
    build/venv/bin/python scripts/bench_inproc.py --installed   # the compiled build scripts/bench installs

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


def batches(headers: int) -> list[bytes]:
    """One message as the load generator writes it: one batch per write, for the bench's negotiation."""
    rcpt = ("{rcpt_host}", "[127.0.0.1]:25", "{rcpt_mailer}", "smtp")
    return [
        frame(b"O", struct.pack(">III", 6, 0x1FF, 0x1FFFFF)),
        _macros(b"C", "j", "mx.bench.test", "{daemon_name}", "mx.bench.test", "{daemon_addr}", "127.0.0.1",
                "v", "Postfix 3.7.11", "_", "client.bench.test [127.0.0.1]")
        + frame(b"C", _z("client.bench.test") + b"4" + struct.pack(">H", 40000) + _z("127.0.0.1")),
        _macros(b"H") + _macros(b"M", "{mail_addr}", "sender@client.bench.test", "{mail_host}", "[127.0.0.1]:25",
                                "{mail_mailer}", "smtp")
        + frame(b"M", _z("<sender@client.bench.test>", "SIZE=5096")),
        _macros(b"R", "{rcpt_addr}", "rcpt1@sink.bench.test", *rcpt) + frame(b"R", _z("<rcpt1@sink.bench.test>")),
        _macros(b"R", "i", QID, "{rcpt_addr}", "rcpt2@sink.bench.test", *rcpt)
        + frame(b"R", _z("<rcpt2@sink.bench.test>")),
        _macros(b"T", "i", QID)
        + b"".join(_macros(b"L", "i", QID) + frame(b"L", _z(n, v)) for n, v in HEADERS[:headers])
        + _macros(b"E", "i", QID) + frame(b"E"),
        frame(b"A") + frame(b"A") + frame(b"Q"),
    ]


class Link:
    """The engine's connection, minus the socket: replies are kept to check the first message."""

    blocked = False

    def __init__(self) -> None:
        self.out: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def close(self) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def touch(self) -> None: ...


def make_milter(kind: str):  # type: ignore[no-untyped-def]
    if kind == "tcl":
        from pytclmilter.tcl.interp import TclHost

        host = TclHost()
        script = (ROOT / "tclmilter" / "examples" / "bench.tcl").read_text()
        host.child_call("set", "argv", ())
        host.child_call("eval", script.replace("milter main", ""))
        return host.milter
    import bench_filter

    return bench_filter.build("inet:1@127.0.0.1", False)


def measure(kind: str, messages: int, headers: int, level: str, repeat: int, metrics: bool) -> float:
    """Best CPU µs per message over ``repeat`` runs (after a warm-up of 200)."""
    sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - the log lines, as `run` writes them, to nowhere
    from pytclmilter.commands.logs import setup_logging
    from pytclmilter.engine import ConnectionEngine

    setup_logging(level)
    milter = make_milter(kind)
    if metrics:  # what --metrics counts per message (the HTTP side costs nothing per message)
        from pytclmilter.meter import Meter

        milter.shared.meter = Meter()
    data = batches(headers)

    def one(conn_id: int) -> Link:
        link = Link()
        engine = ConnectionEngine(milter.shared, conn_id, link)
        for batch in data:
            engine.data_received(batch)
        engine.connection_lost("eof")
        return link

    if b"X-Bench" not in b"".join(one(0).out):
        raise SystemExit("bench_inproc: the filter did not add X-Bench: the workload is not running")
    for i in range(200):
        one(i)
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        for i in range(messages):
            one(i)
        best = min(best, time.process_time() - start)
    return best / max(messages, 1) * 1e6


def callgrind(opts: argparse.Namespace) -> int:
    if not shutil.which("valgrind"):
        raise SystemExit("bench_inproc: --callgrind needs valgrind (apt-get install valgrind)")

    def instructions(n: int) -> int:
        cmd = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, __file__,
               "--filter", opts.filter, "--messages", str(n), "--headers", str(opts.headers),
               "--log-level", opts.log_level, "--repeat", "1", *(["--installed"] if opts.installed else []),
               *(["--metrics"] if opts.metrics else [])]
        # A fixed hash seed: with Python's per-process random one, dict and set probing (and so
        # the count) moved by about 2,000 instructions a message between runs of the same build.
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stderr
        found = re.search(r"Collected : (\d+)", out)
        if not found:
            raise SystemExit(f"bench_inproc: no instruction count in valgrind's output:\n{out[-2000:]}")
        return int(found.group(1))

    per = (instructions(opts.messages) - instructions(0)) / opts.messages
    print(f"{opts.filter}: {per:,.0f} instructions per message ({opts.headers} headers, log level "
          f"{opts.log_level}{', metrics on' if opts.metrics else ''}; callgrind, {opts.messages} messages; {describe()})")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--filter", choices=["tcl", "python"], default="tcl")
    p.add_argument("--messages", type=int, default=None, help="messages per run (default 3000; 300 with --callgrind)")
    p.add_argument("--headers", type=int, default=10, choices=range(0, 11), metavar="0..10")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--repeat", type=int, default=5, help="runs; the best is reported (default 5)")
    p.add_argument("--callgrind", action="store_true", help="count instructions with valgrind instead")
    p.add_argument("--installed", action="store_true",
                   help="measure the pytclmilter this Python has installed, not this checkout's src/")
    p.add_argument("--metrics", action="store_true", help="count what --metrics counts (meter.py)")
    opts = p.parse_args()
    if opts.callgrind:
        opts.messages = opts.messages or 300
        return callgrind(opts)
    messages = 3000 if opts.messages is None else opts.messages
    us = measure(opts.filter, messages, opts.headers, opts.log_level, opts.repeat, opts.metrics)
    print(f"{opts.filter}: {us:.1f} µs CPU per message ({opts.headers} headers, log level {opts.log_level}; "
          f"best of {opts.repeat} x {messages}; {describe()})", file=sys.__stdout__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
