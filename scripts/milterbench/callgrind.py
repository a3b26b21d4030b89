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

`--per-conn 1,100` measures both in one run of the server and then what a connection costs
beyond its messages: (per message at 1 - per message at 100) / (1 - 1/100), by part, by whose
code it is and function by function (each function's own instructions). The tick, which runs by
the clock and so costs more per message the longer a message takes under valgrind, is taken out
of those: its part as counted, its share of each owner's and function's instructions as the
server's own split while idle (counted for a few seconds after the load), which is all tick.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Final, NamedTuple

from milterbench import BUILD, ROOT, say
from milterbench.build import loadgen_path
from milterbench.rigs import make_filters

#: The function of the tick, which runs by the clock (every 20 ms), not per message.
TICK: Final = "CPyDef_interp___TclHost___service_events"
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
    ("  of it: connection.py's connection_made", "CPyDef_connection___Connection___connection_made"),
    ("    of it: the engine made (session, context)", "CPyDef_engine___ConnectionEngine_____init__"),
    ("      of it: the Tcl context command made", "CPyDef_interp___TclHost____context_created"),
    ("reads (connection.py data_received: the engine)", "CPyDef_connection___Connection___data_received"),
    ("  of it: the verdict log line", "CPyDef_engine___ConnectionEngine____log_verdict"),
    ("  of it: writes (transport.write)", "CPyDef_connection___Connection___write"),
    ("  of it: closing the engine at QUIT", "CPyDef_engine___ConnectionEngine____finish"),
    ("    of it: the Tcl context command deleted", "CPyDef_interp___TclHost____context_closed"),
    ("close (uvloop's connection_lost)", "__pyx_f_6uvloop_4loop_15UVBaseTransport__call_connection_lost"),
    ("by the clock: the Tcl event tick (not per message)", TICK),
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


def self_by_function(dump: Path) -> tuple[int, dict[tuple[str, str], int]]:
    """Each function's own (exclusive) instructions, keyed by (shared object, function).

    A cost line counts for the function it is in, except the line after ``calls=``: that is the
    callee's inclusive cost, counted where the callee is. Names are given once, then by number."""
    names: dict[str, dict[str, str]] = {"ob": {}, "fn": {}}
    counts: dict[tuple[str, str], int] = {}
    obj, fn, after_call, total = "???", "???", False, 0
    for line in dump.read_text().splitlines():
        key, eq, rest = line.partition("=")
        if eq and key in ("ob", "cob", "fn", "cfn"):
            table = names[key[-2:]]
            ident, _, name = rest.partition(" ")
            table[ident] = name or table.get(ident, ident)
            if key == "ob":
                obj = table[ident]
            elif key == "fn":
                fn = table[ident]
        elif line.startswith("calls="):
            after_call = True
        elif line[:1].isdigit() or line[:1] in ("+", "-", "*"):  # a position and its cost
            if after_call:
                after_call = False
                continue
            cost = int(line.split()[-1])
            counts[obj, fn] = counts.get((obj, fn), 0) + cost
            total += cost
    return total, counts


def owner(obj: str) -> str:
    """Whose code a shared object is (OWNERS; else "other")."""
    return next((who for who, rx in OWNERS if re.search(rx, obj)), "other")


def owner_sums(own: dict[tuple[str, str], float]) -> dict[str, float]:
    """Own counts summed by whose code the objects are."""
    summed: dict[str, float] = {}
    for (obj, _), count in own.items():
        summed[owner(obj)] = summed.get(owner(obj), 0.0) + count
    return summed


#: Seconds the server is counted idle after the load (--per-conn A,B): its tick's own split.
IDLE: Final = 5.0


class Profile(NamedTuple):
    """One measured load: per message, inclusive counts of the parts' functions, and own counts."""

    messages: int
    total: float  # the whole process, per message
    parts: dict[str, float]  # function -> inclusive count per message
    own: dict[tuple[str, str], float]  # (object, function) -> own count per message

    def tick(self) -> float:
        return self.parts.get(TICK, 0.0)


def read_dump(dump: Path, messages: int) -> Profile:
    total, counts = inclusive(dump)
    _, own = self_by_function(dump)
    return Profile(messages, total / messages, {k: v / messages for k, v in counts.items()},
                   {k: v / messages for k, v in own.items()})


def cmd_callgrind(opts: argparse.Namespace) -> int:
    for tool in ("valgrind", "callgrind_control", "callgrind_annotate"):
        if not shutil.which(tool):
            raise SystemExit("bench: --tool callgrind needs valgrind (apt-get install valgrind)")
    if opts.filter != "tcl":
        raise SystemExit("bench: --tool callgrind profiles the compiled tcl filter (--filter tcl)")
    per_conns = [int(x) for x in str(opts.per_conn).split(",")]
    if len(per_conns) > 2 or min(per_conns) < 1 or (len(per_conns) == 2 and per_conns[0] >= per_conns[1]):
        raise SystemExit("bench: --per-conn with --tool callgrind: N, or A,B with A < B (e.g. 1,100)")
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
    profiles: list[Profile] = []
    flt.start(timeout=1200)  # valgrind starts Python and Tcl slowly, slower still on a busy machine
    try:
        def control(*args: str) -> None:
            subprocess.run(["callgrind_control", *args, str(flt.pid)], check=True, capture_output=True)

        def load(n: int, per_conn: int) -> None:
            subprocess.run([loadgen, "-q", "-c", str(opts.conns), "-n", str(n), "-m", str(per_conn), spec],
                           check=True, capture_output=True, text=True, timeout=3600)

        def dumped() -> Path:  # callgrind_control -d writes the next numbered part
            return max(out_dir.glob("tcl.callgrind.*"), key=lambda p: int(p.name.rpartition(".")[2]))

        for per_conn in per_conns:
            n = max(opts.messages, opts.conns * per_conn)  # (1,100: 300 and 3,200 messages)
            load(max(opts.conns * per_conn, 64), per_conn)  # warm-up: first-use costs out of the count
            control("-z")
            t0 = time.monotonic()
            load(n, per_conn)
            seconds = time.monotonic() - t0
            control("-d")
            profiles.append(read_dump(dumped(), n))
            show(profiles[-1], per_conn, opts.conns, seconds, dumped())
        idle = None
        if len(per_conns) == 2:  # the server idle: all it does is the tick
            control("-z")
            time.sleep(IDLE)
            control("-d")
            idle = read_dump(dumped(), 1)
    finally:
        flt.stop()
    if idle is not None:
        per_connection(profiles[0], profiles[1], per_conns, idle, opts.top)
    return 0


def show(p: Profile, per_conn: int, conns: int, seconds: float, dump: Path) -> None:
    say(f"tcl (compiled), {per_conn} message(s) per connection, {conns} connections, {p.messages} messages in"
        f" {seconds:.0f} s under valgrind; instructions per message (inclusive; {dump.relative_to(ROOT)}):")
    say(f"  {p.total:11,.0f}  the whole process")
    say(f"  {p.total - p.tick():11,.0f}  without the clock's work (the tick)")
    for what, func in PARTS:
        say(f"  {sum(p.parts.get(name, 0.0) for name in func.split('|')):11,.0f}  {what}")
    say("by whose code the instructions are (each object's own, the tick included):")
    by_owner = owner_sums(p.own)
    whole = sum(by_owner.values())
    for who, count in sorted(by_owner.items(), key=lambda item: -item[1]):
        say(f"  {count:11,.0f}  {100 * count / whole:5.1f} %  {who}")


def per_connection(few: Profile, many: Profile, per_conns: list[int], idle: Profile, top: int) -> None:
    """What a connection costs beyond its messages: the two loads' difference per message,
    scaled to one connection, the tick taken out (see the module's docstring)."""
    a, b = per_conns
    scale = 1 / (1 / a - 1 / b)
    idle_tick = idle.tick()
    if not idle_tick:
        raise SystemExit("bench: no tick counted while idle: cannot take the tick out")

    def own_without_tick(p: Profile) -> dict[tuple[str, str], float]:
        share = p.tick() / idle_tick  # the run's tick, in units of the idle window's
        return {k: p.own.get(k, 0.0) - share * idle.own.get(k, 0.0) for k in set(p.own) | set(idle.own)}

    own_few, own_many = own_without_tick(few), own_without_tick(many)
    diff = {k: (own_few.get(k, 0.0) - own_many.get(k, 0.0)) * scale for k in set(own_few) | set(own_many)}
    whole = ((few.total - few.tick()) - (many.total - many.tick())) * scale
    say(f"per connection, beyond its messages ({a} against {b} a connection; the tick taken out):")
    say(f"  {whole:11,.0f}  the whole process: {100 * whole / a / (few.total - few.tick()):.1f} % of a message at"
        f" {a} a connection")
    for what, func in PARTS[:-1]:
        count = sum(few.parts.get(n, 0.0) - many.parts.get(n, 0.0) for n in func.split("|")) * scale
        say(f"  {count:11,.0f}  {what}")
    by_owner = owner_sums(diff)
    say(f"  by whose code (each object's own; they sum to {sum(by_owner.values()):,.0f}, the tick taken out by"
        " its idle split):")
    for who, count in sorted(by_owner.items(), key=lambda item: -item[1]):
        say(f"  {count:11,.0f}  {100 * count / sum(by_owner.values()):5.1f} %  {who}")
    say(f"  the {top} functions with the most own instructions:")
    for (obj, fn), count in sorted(diff.items(), key=lambda item: -item[1])[:top]:
        say(f"  {count:11,.0f}  {fn.rpartition(':')[2]}  ({owner(obj).partition(' ')[0]})")
