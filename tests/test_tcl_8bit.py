"""Large 8-bit bodies through Tcl: the manual's setpriv idiom, replacebody, private data shared with Python.

The manual collects the body with ``setpriv`` and rewrites it at end of message.
Private data a script sets stays in Tcl, so the growing body must not cross
into Python on every block (that made the idiom quadratic, and 8-bit text,
whose conversion was a Python call per byte, took seconds per MiB while every
other connection waited). What crosses is counted from inside the script, by
wrapping the Python-backed commands the context command calls; bodies are sent
and read back raw by the MTA side (tests/support/tclrun.py).
"""

from __future__ import annotations

import random
import textwrap

import pytest

from support.tclrun import TCL_HELPERS, TclRun, tclrun_factory

tclrun = pytest.fixture(tclrun_factory, name="tclrun")

CHUNK = 65535
MIB = 1 << 20

# The manual's idiom, and the same body kept in a Tcl variable; the MTA's sender chooses which
# one replacebody sends back. X-Crossed: the bytes that went between Tcl and Python for the
# message (arguments and results of the Python-backed commands, the body replacebody hands over).
IDIOM = TCL_HELPERS + r"""
package require TclMilter
foreach cmd {::tclmilter::py::context ::tclmilter::py::replacebody} {
    if {![llength [info commands $cmd]]} continue
    rename $cmd ${cmd}_counted
    proc $cmd args [string map [list @ ${cmd}_counted] {
        set r [@ {*}$args]
        incr ::crossed [expr {[string length [join $args]] + [string length $r]}]
        if {[info exists ::tclmilter::outgoing]} { incr ::crossed [string length $::tclmilter::outgoing] }
        return $r
    }]
}
proc from {ctx list} { set ::crossed 0; set ::sender [lindex $list 0]; set ::acc($ctx) ""; return SMFIS_CONTINUE }
proc body {ctx block} {
    if {[catch {$ctx getpriv body} sofar]} {set sofar ""}
    $ctx setpriv body "$sofar$block"
    append ::acc($ctx) $block
    return SMFIS_CONTINUE
}
proc eom {ctx} {
    if {$::sender eq "<var@example.org>"} {
        $ctx replacebody $::acc($ctx)
    } else {
        $ctx replacebody [$ctx getpriv body]
    }
    $ctx addheader X-Same [string equal $::acc($ctx) [$ctx getpriv body]]
    $ctx unsetpriv body
    unset ::acc($ctx)
    $ctx addheader X-Crossed $::crossed
    return SMFIS_CONTINUE
}
milter register envfrom from
milter register body body
milter register eom eom
milter main
"""


def send(m, body: bytes, sender: str = "<idiom@example.org>") -> tuple[bytes, dict[bytes, bytes]]:
    """One message: the body the filter sent back, and the headers it added."""
    with m.mta() as mta:
        mta.negotiate()
        assert mta.mail(sender) == ("c", {})
        assert all(reply == ("c", b"") for reply in mta.body(body))
        eom = mta.eom()
    assert eom[-1] == ("c", b"")
    headers = dict(p.rstrip(b"\0").split(b"\0", 1) for c, p in eom if c == "h")
    return b"".join(p for c, p in eom if c == "b"), headers


def test_the_setpriv_idiom_moves_the_body_across_once_whatever_the_number_of_blocks(tclrun):
    """Bug: each block the script's getpriv brought the whole body so far into Tcl and its setpriv
    took it back into Python (converted both ways), so a body of N blocks crossed N²/2 times."""
    m = tclrun(IDIOM)
    crossed = {}
    for blocks in (2, 8):
        body = (b"0123456789abcdef" * (blocks * CHUNK // 16 + 1))[: blocks * CHUNK]
        new, headers = send(m, body)
        assert new == body and headers[b"X-Same"] == b"1"
        crossed[blocks] = int(headers[b"X-Crossed"])
        # The body once (handed to replacebody), the rest names and status words.
        assert len(body) <= crossed[blocks] <= len(body) + 1024, (blocks, crossed[blocks])
    assert m.stop() == 0
    assert crossed[8] - crossed[2] <= 6 * CHUNK + 512  # linear in the blocks, with slope one block


def latin1_text(size: int) -> bytes:
    line = ("Sehr geehrte Frau Müller, anbei die Unterlagen für Köln. À bientôt, "
            "ça va très bien; señor Núñez grüßt.\r\n").encode("latin-1")
    return (line * (size // len(line) + 1))[:size]


@pytest.mark.parametrize("kind", ["latin-1", "random"])
@pytest.mark.parametrize("sender", ["<idiom@example.org>", "<var@example.org>"])
def test_a_mib_of_8bit_body_comes_back_byte_exact(tclrun, kind, sender):
    """Bug: 1 MiB of Latin-1 took over 20 s with the idiom (the MTA side gives up after 10 s)."""
    body = latin1_text(MIB) if kind == "latin-1" else random.Random(7).randbytes(MIB)
    m = tclrun(IDIOM)
    new, headers = send(m, body, sender)
    assert m.stop() == 0
    assert (len(new), new == body) == (len(body), True)
    assert headers[b"X-Same"] == b"1"
    # Once, as the bytes Tcl keeps the text in: three for each byte that is not UTF-8.
    assert int(headers[b"X-Crossed"]) <= 3 * len(body) + 1024


SHARED = TCL_HELPERS + r"""
package require TclMilter
proc from {ctx list} {
    $ctx setpriv tcl.latin [encoding convertfrom identity [binary format H* 4361666520e9]]
    $ctx setpriv both "tcl wrote this"
    return SMFIS_CONTINUE
}
proc body {ctx block} { $ctx setpriv tcl.body $block; return SMFIS_CONTINUE }
proc eom {ctx} {
    T py.int     {$ctx getpriv py.int}
    T py.setget  {$ctx setpriv py.text}
    T overwrote  {$ctx getpriv both}
    T names      {lsort [dict keys [$ctx getpriv]]}
    T unset      {$ctx unsetpriv py.t*}
    T gone       {$ctx getpriv py.text}
    T names2     {lsort [dict keys [$ctx getpriv]]}
    T gonecode   {catch {$ctx getpriv py.text} m o; dict get $o -errorcode}
    $ctx setpriv tcl.last "tcl again"
    return SMFIS_CONTINUE
}
proc close {ctx} { T close-names {lsort [dict keys [$ctx getpriv]]}; return SMFIS_CONTINUE }
milter register envfrom from
milter register body body
milter register eom eom
milter register close close
milter main
"""

SHARED_HOOKS = r'''
def setup(milter):
    @milter.register("envrcpt")
    def rcpt(ctx, args):
        ctx.setpriv("py.int", 42)
        ctx.setpriv("py.text", "from Python")
        ctx.setpriv("both", "python wrote this")   # after Tcl: Python's value wins
        print("PY sees", repr(ctx.getpriv("tcl.latin")), sorted(ctx.getpriv()), flush=True)

    @milter.register("eom")
    def eom(ctx):
        print("PY body", ctx.getpriv("tcl.body").encode("utf-8", "surrogateescape").hex(), flush=True)

    @milter.register("close")
    def close(ctx):
        print("PY last", repr(ctx.getpriv("tcl.last")), flush=True)
        ctx.unsetpriv("tcl.*")
        print("PY left", sorted(ctx.getpriv()), repr(ctx.getpriv("tcl.body", "gone")), flush=True)
'''


def test_python_and_tcl_share_private_data_whichever_side_keeps_it(tclrun):
    """What a script sets stays in Tcl, what Python sets in Python: each side reads the other's,
    the latest write wins, unsetpriv and the key/value list cover both."""
    block = b"8-bit \xe9\xff\x00 \xc3\xa9 end"
    m = tclrun(SHARED, python=[SHARED_HOOKS])
    with m.mta() as mta:
        mta.negotiate()
        assert mta.mail("<a@example.org>") == ("c", {})
        assert mta.rcpt("<b@example.org>") == ("c", {})
        assert mta.body(block) == [("c", b"")]
        assert mta.eom()[-1] == ("c", b"")
    m.wait_for("PY left")
    assert m.stop() == 0
    out, r = m.text, m.results()
    assert "PY sees 'Cafe \\udce9' ['both', 'py.int', 'py.text', 'tcl.latin']" in out
    assert f"PY body {block.hex()}" in out  # Tcl's value read from Python: the very bytes
    assert r["py.int"] == "OK 42" and r["py.setget"] == "OK from Python"
    assert r["overwrote"] == "OK python wrote this"
    assert r["names"] == "OK both py.int py.text tcl.body tcl.latin"
    assert r["unset"] == "OK " and r["gone"] == 'ERR can\'t read "py.text": no such private data'
    assert r["names2"] == "OK both py.int tcl.body tcl.latin"
    assert r["gonecode"] == "OK TCL LOOKUP VARNAME py.text"  # as Tcl's own `can't read` (was NONE)
    assert "PY last 'tcl again'" in out
    assert "PY left ['both', 'py.int'] 'gone'" in out
    assert r["close-names"] == "OK both py.int"


PY_BYTES_HOOKS = r'''
def setup(milter):
    @milter.register("envrcpt")
    def rcpt(ctx, args):
        ctx.setpriv("py.bytes", b"caf\xc3\xa9 \xe9\xff")
        ctx.setpriv("py.list", [b"\xc3\xa9", None, {"k": b"\xe9"}])
'''


def test_bytes_python_sets_in_private_data_reach_tcl_under_the_bytes_rule(tclrun):
    """Bug: Python's bytes reached Tcl as one character per byte (UTF-8 read as Latin-1), so a
    script that put them in a header sent the MTA other bytes than Python had set."""
    m = tclrun(TCL_HELPERS + r"""
        package require TclMilter
        proc eom {ctx} {
            $ctx addheader X-Py-Bytes [$ctx getpriv py.bytes]
            $ctx addheader X-Py-List [$ctx getpriv py.list]
            $ctx addheader X-Py-All [dict get [$ctx getpriv] py.bytes]
            R length [string length [$ctx getpriv py.bytes]]
            return SMFIS_CONTINUE
        }
        milter register eom eom
        milter main
    """, python=[PY_BYTES_HOOKS])
    with m.mta() as mta:
        mta.negotiate()
        mta.mail("<a@example.org>")  # skipped: no envfrom callback
        assert mta.rcpt("<b@example.org>") == ("c", {})
        headers = [p for code, p in mta.eom() if code == "h"]
    assert m.stop() == 0
    assert headers == [b"X-Py-Bytes\0caf\xc3\xa9 \xe9\xff\0",
                       b"X-Py-List\0\xc3\xa9 {} {k \xe9}\0",
                       b"X-Py-All\0caf\xc3\xa9 \xe9\xff\0"]
    assert m.results()["length"] == "7"  # c a f \u00e9 space, then two bytes that are not UTF-8


def test_a_body_callback_is_called_alike_for_ascii_and_8bit_blocks(tclrun):
    """An 8-bit block takes another way into Tcl (as bytes, through a lambda): the callback must not
    notice, not even when it has the name of one of the bridge's own procs, and errors read alike."""
    m = tclrun(TCL_HELPERS + r"""
        package require TclMilter
        proc unsetpriv {ctx block} {
            R level-[string length $block] [info level]/[uplevel 1 {namespace current}]/[lindex [info level 0] 0]
            if {[string length $block] > 5} { error "long block" }
            return SMFIS_CONTINUE
        }
        milter register body unsetpriv
        milter main
    """)
    with m.mta() as mta:
        mta.negotiate()
        mta.mail("<a@example.org>")  # skipped: no envfrom callback
        assert mta.body(b"abc") == [("c", b"")]
        assert mta.body(b"\xe9\xff") == [("c", b"")]
        assert mta.body(b"caf\xe9 au lait") == [("t", b"")]
    assert m.stop() == 0
    r = m.results()
    assert r["level-3"] == r["level-2"] == r["level-12"]  # the same level ...
    assert r["level-3"].endswith("/::/unsetpriv")  # ... at global scope, the script's own proc
    # errorInfo's lines are indented in the log (logline.escape_lines)
    assert 'invoked from within\n  "unsetpriv ::tclmilter::ctx1 {caf' in m.text


# Callbacks that end in `break` and `continue`: errors, as in TclMilter 1.0 (Tcl's outside a loop).
_BREAKING = r"""
        proc bd {tag ctx block} { return -code continue }
        proc first {ctx host} { return -code break SMFIS_REJECT }
        milter register helo first
"""
_BROKEN = ['helo callback first failed (invoked "break" outside of a loop), answering SMFIS_TEMPFAIL:\n'
           '  invoked "break" outside of a loop\n    while executing\n'
           '  "first ::tclmilter::ctx1 mx.example"\n',
           'body callback bd mytag failed (invoked "continue" outside of a loop), answering SMFIS_TEMPFAIL:\n'
           '  invoked "continue" outside of a loop\n    while executing\n'
           '  "bd mytag ::tclmilter::ctx2 {caf\\xe9 au lait}"\n']

# How the two callbacks fail, and the frames their failures must show (each as registered).
# (`run` refuses to serve a callback missing at `milter main`: this one goes once it serves.)
FAILING = {
    "error": (r"""
        proc bd {tag ctx block} { error "bad block $block" }
        proc noSuchProc {ctx host} {}
        milter register helo noSuchProc
        after idle {rename noSuchProc {}; puts gone; flush stdout}
    """, ['helo callback noSuchProc failed (invalid command name "noSuchProc"), answering SMFIS_TEMPFAIL:\n'
          '  invalid command name "noSuchProc"\n    invoked from within\n'
          '  "noSuchProc ::tclmilter::ctx1 mx.example"\n',
          "body callback bd mytag failed (bad block caf\\xe9 au lait)",
          '    (procedure "bd" line 1)\n    invoked from within\n'
          '  "bd mytag ::tclmilter::ctx2 {caf\\xe9 au lait}"\n']),
    # no frame of their own: Tcl's error names the command that was called (the alias, and for an
    # 8-bit block its bytes)
    "break": (_BREAKING, _BROKEN),
    # the same once the host polled Tcl's events (for the `after`), and after a callback that ran
    # `interp eval` of a list (`from`): the poll left break and continue taken as a normal return
    # ('r', 'c') when the callback's interpreter had run that, logged with the frame "invoked from
    # within" when it had not
    "break after a poll": (_BREAKING + """
        proc from {ctx args} { interp eval {} [list set sender [lindex $args 0]] }
        milter register envfrom from
        after idle {puts gone; flush stdout}
    """, _BROKEN),
}


@pytest.mark.parametrize("ending", list(FAILING))
def test_a_failed_callback_is_logged_as_the_script_registered_it_with_the_bytes_it_was_given(tclrun, ending):
    """errorInfo named the alias a callback is called through (`::tclmilter::cb1`), for an 8-bit
    block twice, the second time with the bytes Tcl keeps its text in ("cafí³©"), and a byte that
    was not UTF-8 was logged as the three bytes of Tcl's form (`\\xed\\xb3\\xa9`), not as itself."""
    procs, expected = FAILING[ending]
    m = tclrun("package require TclMilter\n" + textwrap.dedent(procs) +
               "milter register body [list bd mytag]\nmilter main\n")
    if "puts gone" in procs:
        m.wait_for(r"gone")
    out = _failing_helo_and_body(m)
    assert "::tclmilter::cb" not in out and "\\xed\\xb3" not in out, out
    for text in expected:
        assert text in out, (text, out)


def _failing_helo_and_body(m: TclRun) -> str:
    """The log of a run whose helo callback and body callback (an 8-bit block) fail, each on a
    connection of its own, to its stop."""
    with m.mta() as mta:
        mta.negotiate()
        assert mta.helo("mx.example") == ("t", {})
    with m.mta() as mta:
        mta.negotiate()
        mta.mail("<a@example.org>")
        assert mta.body(b"caf\xe9 au lait") == [("t", b"")]
    assert m.stop() == 0
    return m.text


@pytest.mark.parametrize("main", ["time {milter main}", "if 1 {time {milter main}}", "interp eval {} {milter main}",
                                  "lsort -command {apply {{a b} {milter main; return 0}}} {1 2}"])
def test_a_callback_break_is_an_error_wherever_the_script_called_milter_main(tclrun, main):
    """`milter main` called inside a command implemented in C (`time`, `lsort -command`) serves in
    that call, so Tcl runs the callbacks below the top level of both interpreters, where it lets
    break and continue through: a helo callback's `return -code break SMFIS_REJECT` was answered
    'r', a body callback's `return -code continue` 'c'. Now as at the top level, log lines too."""
    m = tclrun("package require TclMilter\n" + textwrap.dedent(_BREAKING) +
               f"milter register body [list bd mytag]\n{main}\n")
    out = _failing_helo_and_body(m)
    for text in _BROKEN:
        assert text in out, (text, out)


@pytest.mark.parametrize("main, answer", [("milter main", "r"), ("time {milter main}", "t")])
def test_a_return_from_more_levels_than_the_callback_is_as_the_docs_say(tclrun, main, answer):
    """docs/tcl-reference.md: `return -code return -level 2 X` is tclsh's "command returned bad
    code: 2" where the script serves inside a command, and returns X where `milter main` is at
    the script's top level (Tcl takes a level off in each interpreter of the alias); a plain
    `return -code return X` returns X on both."""
    m = tclrun("package require TclMilter\n"
               "proc first {ctx host} { return -code return -level 2 SMFIS_REJECT }\n"
               "proc from {ctx args} { return -code return SMFIS_REJECT }\n"
               f"milter register helo first\nmilter register envfrom from\n{main}\n")
    with m.mta() as mta:
        mta.negotiate()
        assert mta.helo("mx.example") == (answer, {})
    with m.mta() as mta:
        mta.negotiate()
        assert mta.mail("<a@example.org>") == ("r", {})
    assert m.stop() == 0
    failed = "helo callback first failed (command returned bad code: 2), answering SMFIS_TEMPFAIL"
    assert (failed in m.text) == (answer == "t"), m.text
