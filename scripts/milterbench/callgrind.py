"""profile --tool callgrind: a served connection's instructions, the whole process, by part.

scripts/bench_inproc.py counts the engine alone, fed bytes in process. This runs the real server
(`pytclmilter run` of the bench script, the compiled build) under valgrind's callgrind, drives it
with the load generator, and counts only the measured messages: the counters are zeroed after a
warm-up and dumped after the load (callgrind_control). The parts are inclusive counts of the C
functions that mark them (uvloop's, the compiled modules', Tcl's), per message. What runs by the
clock (the Tcl event tick every 20 ms) is shown apart: under valgrind a message takes a hundred
times longer, so its share here is a hundred times its share at full speed. Only user-space
instructions are counted: the kernel's part of accept, read, write and close is the filter's
system time in engine mode (`sys us`).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import time
from pathlib import Path

from milterbench import BUILD, ROOT, say
from milterbench.build import loadgen_path
from milterbench.rigs import make_filters

# (what, the function whose inclusive count it is, or several: "a|b", their sum); indented parts
# are within the part above. PyGen_am_send is the connect task's coroutine while accept.py runs
# uncompiled: the only Python generator the served process resumes per connection.
PARTS = [
    ("accept: the listening socket ready (accept.py: accept(), the socket object, the task)",
     "__pyx_f_6uvloop_4loop___on_uvpoll_event"),
    ("  of it: asyncio's Task for connect_accepted_socket", "__pyx_pw_6uvloop_4loop_4Loop_39create_task"),
    ("the connect task (accept.py's _connect: uvloop's connect_accepted_socket, the transport)",
     "PyGen_am_send|CPyDunder_am_sendaccept____connect_Acceptor_gen"),
    ("connection_made, run by the loop (uvloop)", "__pyx_f_6uvloop_4loop_12TCPTransport__call_connection_made"),
    ("  of it: server.py's connection_made", "CPyDef_server____Connection___connection_made"),
    ("    of it: the engine made (session, context)", "CPyDef_engine___ConnectionEngine_____init__"),
    ("      of it: the Tcl context command made", "CPyDef_interp___TclHost____context_created"),
    ("reads (server.py data_received: the engine)", "CPyDef_server____Connection___data_received"),
    ("  of it: the verdict log line", "CPyDef_engine___ConnectionEngine____log_verdict"),
    ("  of it: writes (transport.write)", "CPyDef_server____Connection___write"),
    ("  of it: closing the engine at QUIT", "CPyDef_engine___ConnectionEngine____finish"),
    ("    of it: the Tcl context command deleted", "CPyDef_interp___TclHost____context_closed"),
    ("close (uvloop's connection_lost)", "__pyx_f_6uvloop_4loop_15UVBaseTransport__call_connection_lost"),
    ("by the clock: the Tcl event tick (not per message)", "CPyDef_interp___TclHost___service_events"),
]


def inclusive(dump: Path) -> tuple[int, dict[str, int]]:
    """The dump's total and each function's largest inclusive count (its outermost calls)."""
    text = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=100", str(dump)],
                          capture_output=True, text=True, check=True).stdout
    found = re.search(r"([\d,]+) +\(100.0%\) +PROGRAM TOTALS", text)
    if found is None:
        raise SystemExit(f"bench: no total in callgrind_annotate's output of {dump}")
    total = int(found.group(1).replace(",", ""))
    counts: dict[str, int] = {}
    for m in re.finditer(r"^ *([\d,]+) \([ \d.]+%\)  \S*?:(\w+)(?: |$)", text, re.M):
        n, name = int(m.group(1).replace(",", "")), m.group(2)
        counts[name] = max(counts.get(name, 0), n)
    return total, counts


def cmd_callgrind(opts: argparse.Namespace) -> int:
    for tool in ("valgrind", "callgrind_control", "callgrind_annotate"):
        if not shutil.which(tool):
            raise SystemExit("bench: --tool callgrind needs valgrind (apt-get install valgrind)")
    if opts.filter != "tcl":
        raise SystemExit("bench: --tool callgrind profiles the compiled tcl filter (--filter tcl)")
    (flt,) = make_filters(["tcl"], opts.log_level, False)
    out_dir = BUILD / "profile"
    out_dir.mkdir(parents=True, exist_ok=True)
    base = out_dir / "tcl.callgrind"
    for old in out_dir.glob("tcl.callgrind*"):
        old.unlink()
    spec = f"inet:{flt.port}@127.0.0.1"
    flt.cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={base}", *flt.cmd]  # rigs.py's command
    flt.env["PYTHONHASHSEED"] = "0"  # as bench_inproc.py --callgrind: dict probing the same in every run
    loadgen = str(loadgen_path())
    flt.start(timeout=1200)  # valgrind starts Python and Tcl slowly, slower still on a busy machine
    try:
        def load(n: int) -> None:
            subprocess.run([loadgen, "-q", "-c", str(opts.conns), "-n", str(n), "-m", str(opts.per_conn), spec],
                           check=True, capture_output=True, text=True, timeout=3600)

        load(max(opts.conns * opts.per_conn, 64))  # warm-up: first-use costs out of the count
        subprocess.run(["callgrind_control", "-z", str(flt.pid)], check=True, capture_output=True)
        t0 = time.monotonic()
        load(opts.messages)
        seconds = time.monotonic() - t0
        subprocess.run(["callgrind_control", "-d", str(flt.pid)], check=True, capture_output=True)
    finally:
        flt.stop()
    dump = next(iter(sorted(out_dir.glob("tcl.callgrind.*"))), None)
    if dump is None:
        raise SystemExit(f"bench: no callgrind dump in {out_dir}")
    total, counts = inclusive(dump)
    n = opts.messages
    tick = counts.get("CPyDef_interp___TclHost___service_events", 0)
    say(f"tcl (compiled), {opts.per_conn} message(s) per connection, {opts.conns} connections, {n} messages in"
        f" {seconds:.0f} s under valgrind; instructions per message (inclusive; {dump.relative_to(ROOT)}):")
    say(f"  {total / n:11,.0f}  the whole process")
    say(f"  {(total - tick) / n:11,.0f}  without the clock's work (the tick)")
    for what, func in PARTS:
        count = sum(counts.get(name, 0) for name in func.split("|"))
        say(f"  {count / n:11,.0f}  {what}")
    return 0
