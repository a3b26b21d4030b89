"""The engine target of scripts/fuzz: bytes as a socket delivers them to one ConnectionEngine
serving a TclMilter script, in process (``scripts/fuzz run --target engine``), and, as an
input's flags say, async Python callbacks ahead of its Tcl ones.

The core target (scripts/fuzz) answers every event itself; this one lets the real engine do it:
the Tcl bridge turns the MTA's strings into Tcl values, a script with a callback for every event
answers what an "answer tape" picks (every SMFIS_* status, an error quoting the MTA's text, a
``setreply`` of it, the modifications at end of message made of what the MTA sent, progress),
and the engine turns that into replies, modifications and log lines. With flag bit 6 an async
Python callback of each of those events runs first in the chain (``--python`` as a user writes
it): it reads the same tape through ``ctx.tcl``, lets the event loop turn 0 to 3 times, then
continues (to the Tcl callback), answers a status, raises with the MTA's text, returns that text
(no status), keeps or reads private data the Tcl side set, or adds a header of it at end of
message; its abort and close callbacks are async too. The engine then holds the connection's
commands until the chain ends, reads on until 4 KiB wait (the harness delivers no read while the
engine has paused reading, as a transport does), and, with flag bit 7, gets the EOF right after
the last read, while a callback may still await: it must cancel it, then run the abort and
close callbacks.

One input is a small header, then the byte stream:

    [0]      flags: bit 0 prepend a valid OPTNEG; bits 1-2 offer (as the core target);
             bit 3 the peer reads its replies late (the link reports itself blocked after each
             write: the engine must stop, and go on at resume); bit 4 --dry-run;
             bit 5 -onerror SMFIS_CONTINUE (else tempfail); bit 6 async Python callbacks too;
             bit 7 reads delivered back to back, and the EOF right after the last one, whose
             callbacks may still await (else the callbacks end before each read and the EOF)
    [1:3]    events with a Tcl callback (bit i: the i-th of EVENTS); eom, abort, close, negotiate always
    [3]      n: number of answer bytes that follow, then n answer bytes (cycled by the script)
    [4+n:8+n] four piece sizes (0 = the rest), cycled: how the stream is split into reads
    the rest the stream the MTA sends; EOF after it

Checked on every input (anything else is a crash for libFuzzer):

* no exception leaves ``data_received``, ``resume`` or ``connection_lost``;
* the replies, read by an MTA-side reading written here (not the core's codec), answer the
  commands in order: one final reply per command that waits for one, none for the others (a
  macro, ABORT, QUIT, a command negotiated without reply), ``s`` only for a body chunk of an MTA
  that can skip, ``d`` never at CONNECT or HELO, modifications only at end of message, only the
  negotiated ones, only before continue, accept or discard; unless a protocol error was logged,
  every command read gets its answer;
* at most one warning says why the connection was given up (protocol error, failed negotiation),
  and the connection is closed then; nothing is written after the close;
* every log line's text from the MTA or the script is escaped by its call site (each line
  printable, the lines after the first indented), at every level, the verdict lines included;
* the session's buffers are bounded after each read, as in the core target (while an async
  callback runs: at most 4 KiB and the read, or reading is paused);
* after EOF the connection is closed, its close callback ran once per SMTP session, its context
  command is gone from the interpreter and the host keeps no context; an EOF while a callback
  awaited leaves the commands from that one on unanswered, and one line says it was cancelled;
* the event loop gets the engine's tasks done within a bound number of turns (callbacks await
  nothing but the loop's turns): nothing is left waiting.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
import os
import struct
import tempfile
from typing import Any, Awaitable, Callable

from pytclmilter.engine import ConnectionEngine
from pytclmilter.protocol.negotiation import EVENT_FLAGS
from pytclmilter.status import Status
from pytclmilter.tcl.interp import TclHost

EVENTS = sorted(set(EVENT_FLAGS) - {"negotiate"})
ALWAYS = ["eom", "abort", "close"]  # (and negotiate): registered for every input
OFFERS = [(6, 0x1FF, 0x1FFFFF), (2, 0x3F, 0x7F), (6, 0xFFFFFFFF, 0xFFFFFFFF), (6, 0, 0)]
COMPACT_AT = 65536

SCRIPT = r"""
package require TclMilter
milter configure -calltimeout 5
set ::tape {}
set ::pos 0
set ::closes 0
proc next {} {
    if {![llength $::tape]} { return 0 }
    set b [lindex $::tape [expr {$::pos % [llength $::tape]}]]
    incr ::pos
    return $b
}
# The answer the tape picks; an error or a reply text quotes what the MTA sent.
proc verdict {ctx stage args} {
    $ctx setpriv last [list $stage {*}$args]
    switch -- [expr {[next] & 15}] {
        8 { return SMFIS_REJECT }
        9 { return SMFIS_TEMPFAIL }
        10 { return SMFIS_ACCEPT }
        11 { return SMFIS_DISCARD }
        12 { return SMFIS_SKIP }
        13 { return SMFIS_NOREPLY }
        14 { error "$stage failed on [lindex $args 0]" }
        15 { catch {$ctx setreply 550 5.7.1 "no [lindex $args 0]"}; return SMFIS_REJECT }
        7 { catch {$ctx setreply 451 "[lindex $args 0]"}; return SMFIS_TEMPFAIL }
        6 { return [lindex $args 0] }
        default { return SMFIS_CONTINUE }
    }
}
proc on_connect {ctx host addr} {
    $ctx setpriv body ""
    array set a $addr
    verdict $ctx connect $host $a(address) [$ctx getsymval j] [$ctx getsymval {{daemon_name}}]
}
proc on_helo {ctx name} { verdict $ctx helo $name [$ctx getsymval $name] }
proc on_envfrom {ctx from} { $ctx setpriv from [lindex $from 0]; verdict $ctx envfrom {*}$from }
proc on_envrcpt {ctx rcpt} { $ctx setpriv rcpt [lindex $rcpt 0]; verdict $ctx envrcpt {*}$rcpt }
proc on_data {ctx} { verdict $ctx data [$ctx getsymval i] }
proc on_unknown {ctx line} { verdict $ctx unknown $line }
proc on_header {ctx name value} {
    $ctx setpriv hname $name
    $ctx setpriv hval $value
    verdict $ctx header $value $name [$ctx getsymval $name]
}
proc on_eoh {ctx} { verdict $ctx eoh [$ctx getsymval {{mail_addr}}] }
proc on_body {ctx chunk} {
    if {[string length [$ctx getpriv body]] < 100000} { $ctx setpriv body "[$ctx getpriv body]$chunk" }
    verdict $ctx body $chunk
}
proc priv {ctx name} { if {[catch {$ctx getpriv $name} v]} { return "" }; return $v }
proc on_eom {ctx} {
    set n [expr {([next] >> 4) & 3}]
    for {set i 0} {$i < $n} {incr i} {
        set b [next]
        catch {
            switch -- [expr {$b % 11}] {
                0 { $ctx addheader X-Fuzz [priv $ctx hval] }
                1 { $ctx chgheader [priv $ctx hname] [expr {$b >> 4}] [priv $ctx hval] }
                2 { $ctx insheader [priv $ctx hname] 0 v }
                3 { $ctx replacebody [priv $ctx body] }
                4 { $ctx addrcpt [priv $ctx rcpt] }
                5 { $ctx addrcpt [priv $ctx rcpt] NOTIFY=NEVER }
                6 { $ctx delrcpt [priv $ctx rcpt] }
                7 { $ctx chgfrom [priv $ctx from] [priv $ctx hval] }
                8 { $ctx quarantine [priv $ctx hval] }
                9 { $ctx progress }
                10 { $ctx addheader [priv $ctx hname] [priv $ctx hval] }
            }
        }
    }
    verdict $ctx eom [priv $ctx last]
}
proc on_abort {ctx} { $ctx unsetpriv body; next }
proc on_close {ctx} { incr ::closes; next }
proc on_negotiate {ctx version actions protocol} {
    if {([next] & 0x1F) == 0x1F} { catch {$ctx setsymlist 2 "{rcpt_addr} i"} }
    return SMFIS_CONTINUE
}
milter register eom on_eom
milter register abort on_abort
milter register close on_close
milter register negotiate on_negotiate
milter main
"""

#: Replies (docs/protocol.md §3): final ones; modifications and the action flag each needs.
FINAL = frozenset(b"cartdys")
EMPTY = frozenset(b"cartdsp")
MODIFICATIONS = {ord("h"): 0x1, ord("i"): 0x1, ord("m"): 0x10, ord("+"): 0x4, ord("2"): 0x80, ord("-"): 0x8,
                 ord("e"): 0x40, ord("b"): 0x2, ord("q"): 0x20}
#: Commands answered by one final reply, and the SMFIP_NR_* bit that makes them unanswered.
ANSWERED = {b"C": 0x1000, b"H": 0x2000, b"M": 0x4000, b"R": 0x8000, b"T": 0x10000, b"U": 0x20000,
            b"L": 0x80, b"N": 0x40000, b"B": 0x80000, b"E": 0}
P_SKIP = 0x400


#: Turns of the event loop the engine gets to end its tasks (each callback awaits 3 turns at most).
TURNS = 2000
#: Bytes the engine reads on while an async callback runs (engine._WATCHED).
WATCHED = 4096


def async_callback(event: str) -> Callable[..., Awaitable[Any]]:
    """The async Python callback of ``event``: what it does is the tape's next byte (module docstring)."""

    async def callback(ctx: Any, *args: Any) -> Any:
        b = int(ctx.tcl("next"))
        for _ in range(b >> 6):
            await asyncio.sleep(0)
        text = args[0] if args and not isinstance(args[0], dict) else event
        what = (b >> 3) & 7
        if what == 1:
            raise ValueError(f"{event} failed on {text!r}")
        if what == 2:
            return list(Status)[b % len(Status)]
        if what == 3:
            return text  # no status: a warning quoting it
        if what == 4:
            ctx.setpriv("py", text)
            return ctx.getpriv("last", None) and Status.CONTINUE
        if what == 5 and event == "eom":
            ctx.addheader("X-Async", str(ctx.getpriv("py", "")))  # (MilterError for a control character)
        return Status.CONTINUE

    callback.__qualname__ = f"async_{event}"
    return callback


class Host:
    """One interpreter for every input (making one takes a tenth of a second), and one event loop."""

    host: TclHost | None = None
    loop: asyncio.AbstractEventLoop | None = None
    #: event -> its async Python callback, registered while an input asks for them
    python: dict[str, Callable[..., Awaitable[Any]]] = {}

    @classmethod
    def event_loop(cls) -> asyncio.AbstractEventLoop:
        if cls.loop is None:
            cls.loop = asyncio.new_event_loop()
        return cls.loop

    @classmethod
    def use_python(cls, events: list[str]) -> None:
        """The async Python callbacks of ``events`` (none: remove them), ahead of the Tcl ones."""
        milter = cls.get().milter
        for event, cb in list(cls.python.items()):
            if event not in events:
                milter.unregister(event, cb)
                del cls.python[event]
        for event in events:
            if event not in cls.python:
                cls.python[event] = cb = async_callback(event)
                milter.register(event, cb)

    @classmethod
    def get(cls) -> TclHost:
        if cls.host is None:
            fd, path = tempfile.mkstemp(suffix=".tcl")
            with os.fdopen(fd, "w") as f:
                f.write(SCRIPT)
            host = TclHost()
            try:
                assert host.start(path), "the script did not wait in milter main"
            finally:
                os.unlink(path)
            cls.host = host
        return cls.host


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class Link:
    """The engine's link: keeps what is written, counts closes; may say the peer lags."""

    peer = "the fuzzer"
    proxied = False

    def __init__(self, lags: bool) -> None:
        self.data = bytearray()
        self.closes = 0
        self.lags = lags
        self.blocked = False
        self.paused = False

    def write(self, data: bytes) -> None:
        assert self.closes == 0, f"written after the close: {bytes(data[:40])!r}"
        self.data += data
        self.blocked = self.lags

    def close(self) -> None:
        self.closes += 1

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def touch(self) -> None:
        pass


class Stats:
    def __init__(self) -> None:
        self.inputs = 0
        self.replies = 0
        self.warnings = 0
        self.asynchronous = 0  # inputs with async Python callbacks
        self.cut = 0  # of those, ended by an EOF while a callback awaited


STATS = Stats()
_ids = [0]


def parse_input(data: bytes) -> tuple[int, int, bytes, list[int], bytes]:
    head = data[:4].ljust(4, b"\0")
    n = head[3]
    tape = data[4 : 4 + n]
    sizes = list(data[4 + n : 8 + n])
    return head[0], head[1] | head[2] << 8, tape, sizes, data[8 + n :]


def pieces(stream: bytes, sizes: list[int]) -> list[bytes]:
    out, i, k = [], 0, 0
    while i < len(stream):
        size = sizes[k % len(sizes)] if sizes else 0
        k += 1
        step = len(stream) - i if size == 0 else size
        out.append(stream[i : i + step])
        i += step
    return out


def frames(data: bytes, strict: bool) -> list[tuple[int, bytes]]:
    """The frames of ``data`` (a length, a code, the payload); ``strict``: nothing may be left."""
    out, i = [], 0
    while len(data) - i >= 5:
        (length,) = struct.unpack_from("!I", data, i)
        if length == 0 or i + 4 + length > len(data):
            break
        out.append((data[i + 4], bytes(data[i + 5 : i + 4 + length])))
        i += 4 + length
    if strict:
        assert i == len(data), f"a reply cut short or of length 0 at byte {i}: {bytes(data[i:i + 16])!r}"
    return out


def check_replies(commands: list[tuple[int, bytes]], replies: list[tuple[int, bytes]], gave_up: bool,
                  offer: tuple[int, int, int] | None) -> None:
    """The replies answer the commands in order (see the module docstring)."""
    protocol = actions = 0
    r = 0
    for code, payload in commands:
        c = bytes([code])
        if c == b"Q":
            break
        if c == b"O":
            if r == len(replies):
                assert gave_up, "OPTNEG unanswered"
                return
            rc, rp = replies[r]
            assert rc == ord("O") and len(rp) >= 12, (rc, rp)
            _, actions, protocol = struct.unpack_from("!III", rp)
            if len(payload) >= 12:
                _, offered_actions, offered_protocol = struct.unpack_from("!III", payload)
                # (zero masks: version 1's defaults, as libmilter reads them)
                offered_actions, offered_protocol = offered_actions or 0x0F, offered_protocol or 0x3F
                assert actions & ~offered_actions == 0 and protocol & ~offered_protocol == 0, \
                    ("asked for more than offered", hex(actions), hex(protocol), payload)
            r += 1
            continue
        if c not in ANSWERED or protocol & ANSWERED[c]:
            continue
        # one answer: progress, modifications at end of message, then one final reply
        mods = 0
        while True:
            if r == len(replies):
                assert gave_up, f"command {c!r} unanswered"
                return
            rc, rp = replies[r]
            r += 1
            if rc in EMPTY:
                assert rp == b"", f"reply {chr(rc)!r} with a payload {rp[:20]!r}"
            if rc == ord("p"):
                continue
            if rc in MODIFICATIONS:
                assert c == b"E", f"modification {chr(rc)!r} in answer to {c!r}"
                assert actions & MODIFICATIONS[rc], f"modification {chr(rc)!r} not granted ({actions:#x})"
                mods += 1
                continue
            assert rc in FINAL, f"reply {chr(rc)!r} in answer to {c!r}"
            assert rc != ord("s") or (c == b"B" and protocol & P_SKIP), f"skip in answer to {c!r}"
            assert rc != ord("d") or c not in (b"C", b"H"), f"discard in answer to {c!r}"
            assert not mods or rc in b"cad", f"modifications before {chr(rc)!r}"
            break
    assert r == len(replies), f"{len(replies) - r} replies too many (to a command that waits for none?): " \
                              f"{[(chr(rc), rp[:20]) for rc, rp in replies[r:]]}"


def check_log(records: list[logging.LogRecord], name: str) -> bool:
    """Every line escaped; at most one line giving the connection up. Whether there was one."""
    given_up = 0
    for rec in records:
        text = rec.getMessage()
        lines = text.split("\n")
        for i, line in enumerate(lines):
            assert line.isprintable(), f"log line not escaped: {line[:120]!r}"
            assert i == 0 or line.startswith(" "), f"continuation line not indented: {line[:120]!r}"
        if rec.levelno >= logging.WARNING and (" protocol error from " in text or " negotiation with " in text):
            assert text.startswith(name + ":"), text
            given_up += 1
    assert given_up <= 1, [r.getMessage() for r in records]
    return given_up == 1


def one_input(data: bytes) -> None:
    STATS.inputs += 1
    flags, ev_mask, tape, sizes, stream = parse_input(data)
    host = Host.get()
    shared = host.milter.shared
    tcl = [e for i, e in enumerate(EVENTS) if ev_mask >> i & 1] + list(ALWAYS)
    for event in EVENTS + ALWAYS:  # (then registered after the Python ones, as a --python file's come first)
        host.child_call("milter", "register", event, "")
    asynchronous = bool(flags & 0x40)
    Host.use_python(tcl if asynchronous else [])
    STATS.asynchronous += asynchronous
    for event in tcl:
        host.child_call("milter", "register", event, f"on_{event}")
    shared.settings = replace(shared.settings, dry_run=bool(flags & 0x10),
                              on_error=Status.CONTINUE if flags & 0x20 else Status.TEMPFAIL)
    host.child_call("set", "::tape", tuple(tape))
    host.child_call("set", "::pos", 0)
    host.child_call("set", "::closes", 0)
    offer = OFFERS[(flags >> 1) & 3]
    if flags & 1:
        stream = struct.pack("!IcIII", 13, b"O", *offer) + stream
    link = Link(bool(flags & 0x08))
    _ids[0] += 1
    logger = logging.getLogger("pytclmilter")
    level = logger.level
    logger.setLevel(logging.DEBUG)  # every line is made (and checked), the verdict lines among them
    records = Records()
    logger.addHandler(records)
    try:
        engine = ConnectionEngine(shared, _ids[0], link)
        cut = Host.event_loop().run_until_complete(converse(engine, link, pieces(stream, sizes), bool(flags & 0x80)))
        assert engine.closed and link.closes == 1, (engine.closed, link.closes)
    finally:
        logger.removeHandler(records)
        logger.setLevel(level)
    # A fault's line is one of the first FAULT_LINES of its kind in a minute, else counted (_counted)
    counted = engine._counted
    if cut:
        STATS.cut += 1
        assert counted or any(", while its " in r.getMessage() and r.getMessage().endswith(": cancelled)")
                              for r in records.records), "no line says the callback was cancelled"
    gave_up = check_log(records.records, engine.name) or counted or cut
    STATS.warnings += gave_up
    replies = frames(bytes(link.data), strict=True)
    STATS.replies += len(replies)
    quit_seen = any(code == ord("Q") for code, _ in frames(stream, strict=False))
    check_replies(frames(stream, strict=False), replies, gave_up or quit_seen, offer)
    assert not host.contexts, host.contexts
    assert host.child_call("info", "commands", "::tclmilter::ctx*") == "", "a context command was left"
    if any(code == ord("O") for code, _ in replies):  # (close is always registered)
        assert int(host.child_call("set", "::closes")) >= 1, "no close callback"


async def converse(engine: ConnectionEngine, link: Link, reads: list[bytes], eof_at_once: bool) -> bool:
    """Deliver the reads as a transport does (none while reading is paused), then the EOF; wait for
    the connection's end. With ``eof_at_once`` the reads come as fast as they are read (but the
    last), and the EOF right after the last: its callbacks may still await. Whether the EOF came
    while a callback awaited (cut)."""
    reader = engine.session._reader
    for i, piece in enumerate(reads):
        if link.paused or not eof_at_once or i == len(reads) - 1:
            await turns(engine, link, lambda: not (link.paused or engine.busy) or engine.closed,
                        "the connection to be read again")
        engine.data_received(piece)
        drain(engine, link)
        if engine.closed:
            break
        if engine.busy:
            assert reader.pending <= WATCHED + len(piece) or link.paused, (reader.pending, link.paused)
        else:
            assert reader.pending < 5 + reader.max_payload, (reader.pending, reader.max_payload)
            assert len(reader._buf) <= reader.pending + COMPACT_AT + len(piece), (len(reader._buf), reader.pending)
            assert not engine.session._queue and not engine._out, "events or replies left queued"
    if not eof_at_once:
        await turns(engine, link, lambda: not engine.busy or engine.closed, "the callbacks to end")
    cut = not engine.closed and engine.busy and bool(engine.ctx.stage)
    if not engine.closed:
        engine.connection_lost("eof")
    # (an EOF read while not busy may start an async callback first: the close follows it)
    await turns(engine, link, lambda: engine.closed and (engine.ending is None or engine.ending.done()),
                "the connection's end and its abort and close callbacks")
    return cut


async def turns(engine: ConnectionEngine, link: Link, done: Callable[[], bool], what: str) -> None:
    """Let the event loop turn until ``done()``, the peer reading its replies meanwhile (drain);
    within TURNS turns (else the engine is stuck)."""
    for _ in range(TURNS):
        if done():
            return
        await asyncio.sleep(0)
        drain(engine, link)
    raise AssertionError(f"waited {TURNS} turns of the event loop for {what}")


def drain(engine: ConnectionEngine, link: Link) -> None:
    """A lagging peer reads its replies now: the server's resume_writing."""
    while link.blocked and not engine.closed:
        link.blocked = False
        engine.resume()


def seeds() -> dict[str, bytes]:
    fr = lambda code, payload=b"": struct.pack("!I", len(payload) + 1) + code + payload  # noqa: E731
    z = lambda *s: b"".join(x + b"\0" for x in s)  # noqa: E731
    conn = fr(b"C", b"client.example\x004" + struct.pack("!H", 25) + b"192.0.2.1\0")
    sendmail_msg = (fr(b"D", b"M" + z(b"i", b"4ABC")) + fr(b"M", z(b"<a@example.org>", b"SIZE=10")) +
                    fr(b"R", z(b"<b@example.com>")) + fr(b"T") + fr(b"L", z(b"X-B", b"\xff\x1b[2J\r\n")) +
                    fr(b"L", z(b"Subject", b"hi")) + fr(b"N") + fr(b"B", b"Hello\r\n") + fr(b"E"))
    msg = sendmail_msg + fr(b"A")  # (Postfix's ABORT after every message)
    session = fr(b"D", b"C" + z(b"j", b"mx", b"{daemon_name}", b"smtpd")) + conn + fr(b"H", z(b"helo")) + msg
    every = b"\xff\x01"
    # Every byte continues (low nibble 0-5) and, at end of message, asks for 1 to 3 modifications
    # (bits 4-5), each byte another one (modulo 11): the end of message modifies whatever the
    # tape's position is when it comes.
    mods = bytes([0x30, 0x21, 0x22, 0x23, 0x24, 0x25, 0x10, 0x11, 0x12, 0x13, 0x14, 0x15])
    many_rcpts = fr(b"R", z(b"<many@example.com>")) * 70  # (headers are asked for without replies)
    optneg_v1 = struct.pack("!IcIII", 13, b"O", 1, 0x1FF, 0x1FFFFF)
    return {
        "one-message": bytes([1, *every, 1, 0]) + b"\0" * 4 + session + fr(b"Q"),
        "two-messages-split-5": bytes([1, *every, 1, 0]) + b"\5\3\1\x20" + session + msg + fr(b"Q"),
        "answers-mixed": bytes([1, *every, 8, 0, 0x38, 0x08, 0x0E, 0x0F, 0x07, 0x06, 0x0C]) + b"\0" * 4
        + session + sendmail_msg + fr(b"K") + conn + fr(b"Q"),
        "eom-modifications": bytes([1, *every, len(mods), *mods]) + b"\0" * 4 + session + msg + fr(b"Q"),
        "eom-progress": bytes([1, *every, 1, 0x14]) + b"\0" * 4 + session + fr(b"Q"),
        "eom-modifications-dry-run": bytes([0x11, *every, len(mods), *mods]) + b"\0" * 4 + session + fr(b"Q"),
        "lagging-peer": bytes([0x09, *every, 0]) + b"\1\0\0\0" + session + fr(b"Q"),
        "lagging-peer-long-batch": bytes([0x09, *every, 0]) + b"\0" * 4
        + session.replace(fr(b"T"), many_rcpts + fr(b"T")) + fr(b"Q"),
        "dry-run-onerror": bytes([0x31, *every, 2, 0x0E, 0x08]) + b"\0" * 4 + session,
        "v2-offer": bytes([3, *every, 0]) + b"\0" * 4 + session,
        "v2-offer-skip": bytes([3, *every, 1, 0x0C]) + b"\0" * 4 + session,
        "mta-version-1": bytes([0, *every, 0]) + b"\0" * 4 + optneg_v1 + session,
        "no-callbacks": bytes([1, 0, 0, 0]) + b"\0" * 4 + session,
        "noise": bytes([1, *every, 0]) + b"\0" * 4 + conn + bytes(range(256)),
        "truncated": bytes([1, *every, 0]) + b"\0" * 4 + session[:-3],
        # async Python callbacks first: tape bytes pick turns (bits 6-7) and what they do (bits 3-5)
        "async-chain": bytes([0x41, *every, 2, 0x20, 0x60]) + b"\0" * 4 + session + msg + fr(b"Q"),
        "async-chain-answers": bytes([0x41, *every, 8, 0x40, 0xC0, 0x08, 0x10, 0x20, 0x28, 0x80, 0x00]) + b"\0" * 4
        + session + msg + fr(b"Q"),
        "async-chain-split": bytes([0x41, *every, 4, 0x40, 0x20, 0xE0, 0x00]) + b"\5\3\1\x20" + session + fr(b"Q"),
        "async-eof-while-awaiting": bytes([0xC1, *every, 1, 0xC0]) + b"\0" * 4 + session + fr(b"Q"),
        "async-eof-while-awaiting-eom": bytes([0xC1, *every, 2, 0xC0, 0x00]) + b"\1\1\1\1" + session[:-5],
        "async-pipelined-past-4k": bytes([0xC1, *every, 1, 0xC0]) + b"\xc8" * 4
        + session.replace(fr(b"T"), many_rcpts * 3 + fr(b"T")),
        "async-lagging-peer": bytes([0x49, *every, 2, 0x40, 0x00]) + b"\0" * 4
        + session.replace(fr(b"T"), many_rcpts + fr(b"T")) + fr(b"Q"),
    }
