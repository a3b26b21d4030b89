#!/usr/bin/env python3
"""Large bodies through a Tcl script that rewrites them: 8-bit against ASCII, 1 MiB against 10 MiB.

One message (envfrom, envrcpt, the body in the MTA's 65535-byte blocks, end of message) is fed
straight into a ConnectionEngine, in process as scripts/bench_inproc.py does, through one of two
scripts that collect the body and hand it back with replacebody:

    idiom  the manual's: `if {[catch {$ctx getpriv body} sofar]} {set sofar ""}`
           `$ctx setpriv body "$sofar$block"`, at eom `$ctx replacebody [$ctx getpriv body]`
    var    the body in a Tcl variable: `append ::body($ctx) $block`, at eom replacebody of it

for bodies of ASCII text, the same kind of text in UTF-8 and in Latin-1 (a German and French
letter: a few percent of its bytes are 8-bit), a Russian letter in CP1251 (most of its bytes are
8-bit), and random bytes. The figure is the CPU time of one message, the best of --repeat rounds
(in each the bodies take turns) after one warm-up, and its ratio to the ASCII body of the same
size and script, measured in the same run; "per MiB" tells whether the cost grows linearly with
the body. Every run checks that the body came back byte for byte.

    scripts/bench_bodies.py [--sizes 1,10] [--kinds ascii,utf8,latin1,cp1251,random] [--scripts idiom,var]
    build/venv/bin/python scripts/bench_bodies.py --installed   # the compiled build
    scripts/bench_bodies.py --tcl-only   # the scripts' string work alone, in Tcl: its share of the cost
"""

from __future__ import annotations

import argparse
import random
import struct
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if "--installed" not in sys.argv:  # by default this checkout's source; --installed: what pip installed
    sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_inproc import Link, _z  # noqa: E402
from pytclmilter.compiled import describe  # noqa: E402
from pytclmilter.protocol.codec import frame  # noqa: E402

MIB = 1 << 20
CHUNK = 65535

SCRIPTS = {
    "idiom": r"""
        proc body {ctx block} {
            if {[catch {$ctx getpriv body} sofar]} {set sofar ""}
            $ctx setpriv body "$sofar$block"
            return SMFIS_CONTINUE
        }
        proc eom {ctx} { $ctx replacebody [$ctx getpriv body]; $ctx unsetpriv body; return SMFIS_CONTINUE }
    """,
    "var": r"""
        proc body {ctx block} { append ::body($ctx) $block; return SMFIS_CONTINUE }
        proc eom {ctx} { $ctx replacebody $::body($ctx); unset ::body($ctx); return SMFIS_CONTINUE }
    """,
}

LETTER = ("Sehr geehrte Frau Müller, vielen Dank für Ihre Anfrage vom Dienstag. Anbei die Unterlagen "
          "für das Büro in Köln; die Übergabe ist am Freitag. Chère Hélène, à bientôt, ça va très bien.\r\n")
RUSSIAN = ("Уважаемый Иван Петрович, благодарим Вас за письмо от вторника. Документы для офиса в Москве "
           "приложены; передача состоится в пятницу. До скорой встречи, всё в порядке.\r\n")
ASCII = ("Dear Ms Miller, thank you for your enquiry of Tuesday. Please find attached the documents "
         "for the office in Cologne; the handover is on Friday. Dear Helen, see you soon, all is well.\r\n")


def body(kind: str, size: int) -> bytes:
    if kind == "random":
        return random.Random(1).randbytes(size)
    line = {"ascii": ASCII.encode(), "utf8": LETTER.encode(), "latin1": LETTER.encode("latin-1"),
            "cp1251": RUSSIAN.encode("cp1251")}[kind]
    return (line * (size // len(line) + 1))[:size]


def frames(data: bytes) -> list[bytes]:
    """The MTA's side of one message, one batch per packet."""
    out = [frame(b"O", struct.pack(">III", 6, 0x1FF, 0x1FFFFF)),
           frame(b"C", _z("client.bench.test") + b"4" + struct.pack(">H", 40000) + _z("127.0.0.1")),
           frame(b"M", _z("<sender@client.bench.test>")), frame(b"R", _z("<rcpt@sink.bench.test>"))]
    out += [frame(b"B", data[i:i + CHUNK]) for i in range(0, len(data), CHUNK)]
    return out + [frame(b"E")]


def replaced(out: bytes) -> bytes:
    """The body the filter sent back: the payloads of its replace-body packets."""
    parts, i = [], 0
    while i < len(out):
        (length,) = struct.unpack_from(">I", out, i)
        if out[i + 4:i + 5] == b"b":
            parts.append(out[i + 5:i + 4 + length])
        i += 4 + length
    return b"".join(parts)


# STEADY: a message of each body runs untimed before the timed one. Most of the time goes to
# allocating and copying megabytes, and a message right after one of another size pays for the
# allocator's change of mind (glibc gives the memory back to the system and takes it again,
# page by page): the first body of each round was up to three times slower than the same body
# run twice. A server that gets such mail gets it more than once.


def measure(script: str, bodies: dict[str, bytes], repeat: int) -> dict[str, float]:
    """Best CPU seconds for one message of each body over ``repeat`` rounds, after a warm-up that
    checks the body. The bodies take turns within a round, so that a slow phase of a shared
    machine falls on all of them rather than on one."""
    from pytclmilter.engine import ConnectionEngine
    from pytclmilter.tcl.interp import TclHost

    host = TclHost()
    host.child_call("eval", SCRIPTS[script] + "milter register body body; milter register eom eom")
    batches = {kind: frames(data) for kind, data in bodies.items()}

    def one(kind: str, conn_id: int) -> bytes:
        link = Link()
        engine = ConnectionEngine(host.milter.shared, conn_id, link)
        for batch in batches[kind]:
            engine.data_received(batch)
        engine.connection_lost("eof")
        return b"".join(link.out)

    for kind, data in bodies.items():
        if replaced(one(kind, 0)) != data:
            raise SystemExit(f"bench_bodies: {script}, {kind}: the body did not come back byte for byte")
    best = dict.fromkeys(bodies, float("inf"))
    for i in range(repeat):
        for kind in bodies:
            one(kind, 2 * i + 1)  # untimed: the allocator settles to this body's sizes (see STEADY)
            start = time.process_time()
            one(kind, 2 * i + 2)
            best[kind] = min(best[kind], time.process_time() - start)
    return best


# --tcl-only: the scripts' own string work, in Tcl alone. The blocks are made Tcl text before the
# clock starts; then one call runs what the script does with them for one message: join them
# (the idiom's "$sofar$block", or append) and, as replacebody does, take the bytes Tcl keeps the
# text in. No Python, no conversion: what is left for Tcl however fast the rest is.
TCL_ONLY = r"""
    proc idiom {blocks} {
        set sofar ""
        foreach block $blocks { set sofar "$sofar$block" }
        encoding convertto identity $sofar
        return
    }
    proc var {blocks} {
        set body ""
        foreach block $blocks { append body $block }
        encoding convertto identity $body
        return
    }
"""


def measure_tcl_only(script: str, bodies: dict[str, bytes], repeat: int) -> dict[str, float]:
    """Best CPU seconds of the script's string work alone, for each body (see TCL_ONLY)."""
    import tkinter

    from pytclmilter.tcl.strings import wire_to_tcl

    tk = tkinter.Tcl().tk
    tk.eval(TCL_ONLY)
    for kind, data in bodies.items():
        blocks = tuple(wire_to_tcl(data[i:i + CHUNK]) for i in range(0, len(data), CHUNK))
        tk.call("set", "raw", blocks)
        tk.eval(f"set blocks({kind}) {{}}; foreach b $raw {{ lappend blocks({kind}) [encoding convertfrom identity $b] }}")
    best = dict.fromkeys(bodies, float("inf"))
    for _ in range(repeat):
        for kind in bodies:
            tk.eval(f"{script} $blocks({kind})")  # untimed, see STEADY
            start = time.process_time()
            tk.eval(f"{script} $blocks({kind})")
            best[kind] = min(best[kind], time.process_time() - start)
    return best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1,10", help="body sizes in MiB (default 1,10)")
    p.add_argument("--kinds", default="ascii,utf8,latin1,cp1251,random", help="bodies (default all five)")
    p.add_argument("--scripts", default="idiom,var", help="scripts (default idiom,var)")
    p.add_argument("--repeat", type=int, default=5, help="rounds; the best of each body is reported (default 5)")
    p.add_argument("--installed", action="store_true",
                   help="measure the pytclmilter this Python has installed, not this checkout's src/")
    p.add_argument("--tcl-only", action="store_true",
                   help="only the scripts' string work, in Tcl alone, on text made before the clock starts")
    opts = p.parse_args()
    kinds = opts.kinds.split(",")
    what = "the script's string work in Tcl alone" if opts.tcl_only else describe()
    print(f"CPU ms per message, best of {opts.repeat}; ratio to ascii of the same size and script ({what})")
    print(f"{'script':6} {'MiB':>4} {'body':7} {'8-bit':>6} {'ms':>9} {'ms/MiB':>8} {'x ascii':>8}")
    for script in opts.scripts.split(","):
        for size in (float(s) for s in opts.sizes.split(",")):
            bodies = {kind: body(kind, int(size * MIB)) for kind in kinds}
            best = (measure_tcl_only if opts.tcl_only else measure)(script, bodies, opts.repeat)
            for kind, data in bodies.items():
                ms = best[kind] * 1000
                share = sum(data.count(bytes([b])) for b in range(0x80, 0x100)) / len(data)
                ratio = f"{ms / (best['ascii'] * 1000):8.1f}" if "ascii" in best else f"{'-':>8}"
                print(f"{script:6} {size:4g} {kind:7} {share:6.1%} {ms:9.1f} {ms / size:8.1f} {ratio}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
