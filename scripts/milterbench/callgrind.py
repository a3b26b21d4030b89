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


# Whose code each shared object is: the first pattern that matches its path names it.
OWNERS = [
    ("pytclmilter (the mypyc-compiled modules, _tclbytes)", r"__mypyc\.|/pytclmilter/"),
    ("tkinter (_tkinter: calls into Tcl, Tcl commands of Python)", r"/_tkinter\."),
    ("Tcl (libtcl: the script, aliases, the event queue)", r"/libtcl"),
    ("uvloop and libuv (the event loop, transports)", r"/uvloop/"),
    ("CPython (the interpreter, objects, its C modules, asyncio, logging)", r"/libpython|/lib-dynload/|/bin/python"),
    ("libc (memory, locks, thread-local data, system call stubs)", r"/libc\.|/libm\.|/ld-linux"),
]


def self_by_object(dump: Path) -> tuple[int, dict[str, int]]:
    """Each shared object's own (exclusive) instructions, read from the dump itself.

    A cost line counts for the object of the function it is in, except the line after
    ``calls=``: that is the callee's inclusive cost, counted where the callee is."""
    names: dict[str, str] = {}
    counts: dict[str, int] = {}
    obj, after_call, total = "???", False, 0
    for line in dump.read_text().splitlines():
        if line.startswith(("ob=", "cob=")):
            ident, _, name = line.partition("=")[2].partition(" ")
            names[ident] = name or names.get(ident, ident)
            if line.startswith("ob="):
                obj = names[ident]
        elif line.startswith("calls="):
            after_call = True
        elif line[:1].isdigit() or line[:1] in ("+", "-", "*"):  # a position and its cost
            if after_call:
                after_call = False
                continue
            cost = int(line.split()[-1])
            counts[obj] = counts.get(obj, 0) + cost
            total += cost
    return total, counts


def owners(counts: dict[str, int]) -> dict[str, int]:
    """``self_by_object``'s counts summed by whose code the objects are (OWNERS; else "other")."""
    summed: dict[str, int] = {}
    for obj, count in counts.items():
        owner = next((who for who, rx in OWNERS if re.search(rx, obj)), "other")
        summed[owner] = summed.get(owner, 0) + count
    return summed


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
    own_total, by_object = self_by_object(dump)
    say("by whose code the instructions are (each object's own, the tick included):")
    for who, count in sorted(owners(by_object).items(), key=lambda item: -item[1]):
        say(f"  {count / n:11,.0f}  {100 * count / own_total:5.1f} %  {who}")
    return 0
