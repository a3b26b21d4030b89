"""TclMilter 1.0's command set as scripts see it: ``milter configure|register|main|stop`` and the context command.

Every test runs a real script under ``pytclmilter run`` and plays the MTA
(see tests/support/tclrun.py). The contract is the TclMilter manual
(TclMilter(n) 1.0) plus the issue's additions (-onerror,
-grace, the extra events and context subcommands).
"""

from __future__ import annotations

import os

import pytest
from miltertest import constants as K

from support.tclrun import NOREPLY, SKIPPED, TCL_HELPERS, tclrun_factory

tclrun = pytest.fixture(tclrun_factory, name="tclrun")

OPTIONS = ["-backlog", "-calltimeout", "-connection", "-debuglevel", "-dryrun", "-grace", "-maxconnections", "-metrics",
           "-name", "-onerror", "-timeout", "-workers"]
BAD_OPTION = ('bad option "-x": must be -backlog, -calltimeout, -connection, -debuglevel, -dryrun, -grace, '
              "-maxconnections, -metrics, -name, -onerror, -timeout, or -workers")
EVENTS = ["abort", "body", "close", "connect", "data", "envfrom", "envrcpt", "eoh", "eom", "header", "helo",
          "negotiate", "unknown"]


def tcl_pairs(text: str) -> dict[str, str]:
    """A flat Tcl list of option/value pairs whose values have no spaces."""
    words = text.split()
    assert len(words) % 2 == 0, text
    return dict(zip(words[::2], words[1::2]))


# ---------------------------------------------------------------------------- milter configure


def test_configure_defaults_query_set_and_errors(tclrun):
    m = tclrun(TCL_HELPERS + r"""
        package require TclMilter
        T all      {milter configure}
        foreach o {-name -connection -timeout -debuglevel -onerror -backlog -grace} { T get$o {milter configure $o} }
        T set      {milter configure -name Custom -timeout 99 -backlog 7 -debuglevel 0 -onerror SMFIS_ACCEPT -grace 2}
        T set-conn {milter configure -connection inet:9999@127.0.0.1}
        T after    {milter configure}
        T one      {milter configure -name}
        T bad      {milter configure -x}
        T badset   {milter configure -name A -x 1}
        T odd      {milter configure -name A -timeout}
        T timeout  {milter configure -timeout abc}
        T backlog  {milter configure -backlog 0}
        T maxconn  {milter configure -maxconnections -1}
        T nolimit  {milter configure -maxconnections 0}
        T onerror  {milter configure -onerror SMFIS_BOGUS}
        T conn     {milter configure -connection bogus:x}
        T noname   {milter configure -name ""}
        T noargs   {milter}
        T badsub   {milter bogus}
        T mainargs {milter main now}
        T stopargs {milter stop now}
        exit 0
    """, connection=None, wait=False)
    assert m.wait_exit() == 0, m.output
    r = m.results()

    assert r["all"].startswith("OK ")
    defaults = tcl_pairs(r["all"][3:])
    assert sorted(defaults) == OPTIONS
    assert defaults["-name"] == "TclMilter"
    assert defaults["-connection"] == "unix:/var/run/tclmilter.sock"
    assert defaults["-timeout"] == "7210"
    assert defaults["-debuglevel"] == "0"
    assert defaults["-onerror"] == "SMFIS_TEMPFAIL"
    assert int(defaults["-backlog"]) > 0  # "the system default"
    assert float(defaults["-grace"]) >= 0
    assert defaults["-maxconnections"] == "1000"
    for option in ["-name", "-connection", "-timeout", "-debuglevel", "-onerror", "-backlog", "-grace"]:
        assert r["get" + option] == "OK " + defaults[option]

    assert r["set"] == "OK " and r["set-conn"] == "OK "
    now = tcl_pairs(r["after"][3:])
    assert now["-name"] == "Custom" and now["-timeout"] == "99" and now["-backlog"] == "7"
    assert now["-onerror"] == "SMFIS_ACCEPT" and float(now["-grace"]) == 2
    assert now["-connection"] == "inet:9999@127.0.0.1"
    assert r["one"] == "OK Custom"

    assert r["bad"] == "ERR " + BAD_OPTION
    assert r["badset"] == "ERR " + BAD_OPTION
    assert r["odd"].startswith("ERR ") and "-timeout" in r["odd"]
    assert r["timeout"] == 'ERR expected integer but got "abc"'
    assert r["backlog"].startswith("ERR ") and '"0"' in r["backlog"]
    assert r["maxconn"] == 'ERR expected non-negative integer but got "-1"'
    assert r["nolimit"] == "OK "
    assert r["onerror"].startswith('ERR bad status "SMFIS_BOGUS"')
    assert r["conn"].startswith("ERR ") and "bogus" in r["conn"]
    assert r["noname"] == 'ERR bad name "": must not be empty'  # the listening line shows it
    assert r["noargs"] == 'ERR wrong # args: should be "milter option ?arg ...?"'
    assert r["badsub"] == 'ERR bad option "bogus": must be configure, main, register, or stop'
    assert r["mainargs"] == 'ERR wrong # args: should be "milter main"'
    assert r["stopargs"] == 'ERR wrong # args: should be "milter stop"'


def test_configure_name_used_and_only_before_main(tclrun):
    m = tclrun(TCL_HELPERS + r"""
        package require TclMilter
        milter configure -name Early
        proc helo {ctx host} {
            foreach {o v} {-name Late -connection inet:1@127.0.0.1 -timeout 5 -backlog 3} { T fixed$o {milter configure $o $v} }
            foreach {o v} {-debuglevel 0 -onerror SMFIS_CONTINUE -grace 3} { T free$o {milter configure $o $v} }
            T read {milter configure -name}
            return SMFIS_CONTINUE
        }
        milter register helo helo
        milter main
    """)
    assert m.name == "Early"
    with m.mta() as mta:
        mta.negotiate()
        assert mta.helo() == ("c", {})
    assert m.stop() == 0
    r = m.results()
    for option in ["-name", "-connection", "-timeout", "-backlog"]:
        assert r["fixed" + option] == f'ERR option "{option}" can only be changed before milter main', r
    for option in ["-debuglevel", "-onerror", "-grace"]:
        assert r["free" + option] == "OK ", r
    assert r["read"] == "OK Early"


def test_command_line_overrides_script_settings(tclrun):
    m = tclrun(TCL_HELPERS + r"""
        package require TclMilter
        milter configure -name FromScript -timeout 5 -onerror SMFIS_REJECT -grace 9
        milter configure -connection unix:/nonexistent/dir/milter.sock
        R cfg [milter configure]
        proc helo {ctx host} { error "helo fails on purpose" }
        milter register helo helo
        milter main
    """, "--name", "FromCli", "--timeout", "99", "--on-error", "SMFIS_ACCEPT", "--grace", "1")
    assert m.name == "FromCli"
    assert m.spec.startswith("inet:") and m.port
    with m.mta() as mta:
        mta.negotiate()
        assert mta.helo() == ("a", {})  # --on-error, not the script's -onerror
    assert m.stop() == 0
    cfg = tcl_pairs(m.results()["cfg"])
    assert cfg["-name"] == "FromCli"
    assert cfg["-timeout"] == "99"
    assert cfg["-onerror"] == "SMFIS_ACCEPT"
    assert float(cfg["-grace"]) == 1
    assert cfg["-connection"].startswith("inet:")


@pytest.mark.parametrize("option, big, most, refused", [
    ("backlog", "2147483648", "2147483647", "integer value too large to represent"),
    ("workers", "100000", "1024", 'expected positive integer up to 1024 but got "100000"'),
])
def test_an_option_value_above_its_cap_is_refused_when_set(tclrun, option, big, most, refused):
    """listen() takes a C int: -backlog 2147483648 was accepted and `milter main` died with a
    Python traceback (OverflowError). -workers 100000 was taken, and `milter main` set out to fork
    a hundred thousand processes, each with its own interpreter. From the command line too."""
    m = tclrun(TCL_HELPERS + f"""
        package require TclMilter
        T big {{milter configure -{option} {big}}}
        T max {{milter configure -{option} {most}}}
        exit 0
    """, connection=None, wait=False)
    assert m.wait_exit() == 0, m.output
    assert m.results() == {"big": f"ERR {refused}", "max": "OK "}
    m = tclrun("package require TclMilter\nmilter main\n", f"--{option}", big, wait=False)
    assert m.wait_exit() == 64, m.output
    assert f"pytclmilter run: --{option}: {refused}" in m.output and "Traceback" not in m.output, m.output


def test_a_socket_path_that_is_not_utf8_is_taken(tmp_path):
    """A path from argv with a byte that is not UTF-8 (a Latin-1 directory name) reaches the
    script as the bytes rule says; `milter configure -connection` then failed with "internal
    error: 'utf-8' codec can't encode ..." and a Python traceback in the log."""
    import subprocess
    import sys

    from support.tclrun import child_env

    script = tmp_path / "s.tcl"
    script.write_text("package require TclMilter\n"
                      "milter configure -connection unix:[lindex $argv 0]\n"
                      "puts [string length [milter configure -connection]]\n"
                      "milter main\n")
    path = bytes(tmp_path) + b"/caf\xe9.sock"
    done = subprocess.run([sys.executable, "-m", "pytclmilter.cli", "check", str(script), "--", path],
                          capture_output=True, env=child_env(), timeout=60)
    assert done.returncode == 0, done.stderr
    assert b"internal error" not in done.stderr and b"Traceback" not in done.stderr, done.stderr
    assert done.stdout.startswith(b"%d\n" % len("unix:" + os.fsdecode(path))), done.stdout


# ---------------------------------------------------------------------------- milter register


def test_register_query_replace_unregister_and_errors(tclrun):
    m = tclrun(TCL_HELPERS + r"""
        package require TclMilter
        proc a {args} {}
        proc b {args} {}
        foreach e {connect helo envfrom envrcpt header eoh body eom abort close data unknown negotiate} {
            T none-$e {milter register $e}
            T set-$e  {milter register $e a}
            T get-$e  {milter register $e}
        }
        T replace  {milter register helo b}
        T replaced {milter register helo}
        T prefix   {milter register eom [list b extra words]}
        T prefixed {milter register eom}
        T unset    {milter register envfrom {}}
        T unsetget {milter register envfrom}
        T badevent {milter register bogus a}
        T noargs   {milter register}
        T toomany  {milter register helo a b}
        exit 0
    """, connection=None, wait=False)
    assert m.wait_exit() == 0, m.output
    r = m.results()
    for e in EVENTS:
        assert r["none-" + e] == "OK ", e
        assert r["set-" + e] == "OK ", (e, r["set-" + e])
        assert r["get-" + e] == "OK a", e
    assert r["replaced"] == "OK b"
    assert r["prefixed"] == "OK b extra words"
    assert r["unset"] == "OK " and r["unsetget"] == "OK "
    assert r["badevent"] == 'ERR bad event "bogus": must be ' + ", ".join(EVENTS[:-1]) + ", or " + EVENTS[-1]
    assert r["noargs"] == 'ERR wrong # args: should be "milter register event ?callback?"'
    assert r["toomany"] == 'ERR wrong # args: should be "milter register event ?callback?"'


def test_a_callback_that_is_no_list_is_refused_in_tcls_words(tclrun):
    """A callback is a command prefix, i.e. a list: one that is not ("a {") was an "internal
    error" with a Python traceback in the log, and one without words (" ") was too."""
    m = tclrun(TCL_HELPERS + r"""
        package require TclMilter
        proc from {ctx l} { return SMFIS_REJECT }
        T brace {milter register envfrom "from \{"}
        T set   {milter register envfrom from}
        T blank {milter register envfrom " "}
        T after {milter register envfrom}
        exit 0
    """, connection=None, wait=False)
    assert m.wait_exit() == 0, m.output
    assert m.results() == {"brace": "ERR unmatched open brace in list", "set": "OK ", "blank": "OK ", "after": "OK "}
    assert "internal error" not in m.output and "Traceback" not in m.output, m.output


RECORDER = TCL_HELPERS + r"""
package require TclMilter
# One line per callback: event, context, arguments (formatted per event).
proc rec {event ctx args} {
    set ok [expr {[llength [info commands $ctx]] == 1}]
    switch -- $event {
        connect {
            lassign $args host addr
            set a "host=$host family=[dict get $addr family] address=[dict get $addr address] port=[dict get $addr port] keys=[lsort [dict keys $addr]]"
        }
        envfrom - envrcpt {
            lassign $args list
            set a "n=[llength $list] first=[lindex $list 0] rest=[join [lrange $list 1 end] ,]"
        }
        header { set a "name=[lindex $args 0] value=[lindex $args 1]" }
        body { set a "len=[string length [lindex $args 0]] data=[string trim [lindex $args 0]]" }
        default { set a [join $args ,] }
    }
    R "$event#[incr ::seen($event)]" "nargs=[llength $args] cmd=$ok ctx=$ctx $a"
    return SMFIS_CONTINUE
}
foreach e {negotiate connect helo envfrom envrcpt data unknown header eoh body eom abort close} {
    milter register $e [list rec $e]
}
milter main
"""


def test_every_event_gets_the_manuals_arguments(tclrun):
    m = tclrun(RECORDER)
    with m.mta() as mta:
        actions, protocol = mta.negotiate()
        assert protocol & (K.SMFIP_NOCONNECT | K.SMFIP_NOHELO | K.SMFIP_NOMAIL | K.SMFIP_NORCPT | K.SMFIP_NOHDRS
                           | K.SMFIP_NOEOH | K.SMFIP_NOBODY | K.SMFIP_NOUNKNOWN | K.SMFIP_NODATA) == 0
        assert mta.connect("client.example.net", "192.0.2.7", 40123) == ("c", {})
        assert mta.helo("helo.example.net") == ("c", {})
        assert mta.mail("<from@example.org>", "SIZE=1234", "BODY=8BITMIME") == ("c", {})
        assert mta.rcpt("<to@example.com>", "NOTIFY=NEVER") == ("c", {})
        assert mta.data() == ("c", {})
        assert mta.header("Subject", "hello world") in (("c", {}), NOREPLY)
        assert mta.eoh() == ("c", {})
        assert mta.body(b"body text\r\n") == [("c", b"")]
        assert mta.eom() == [("c", b"")]
        assert mta.unknown("XFOO bar") == ("c", b"")
        assert mta.mail("<second@example.org>") == ("c", {})
        mta.abort()
        mta.quit()
        assert mta.eof()
    with m.mta() as mta:  # a second connection has a context of its own
        mta.negotiate()
        assert mta.connect("v6.example.net", "2001:db8::1", 2525, family="6") == ("c", {})
    with m.mta() as mta:
        mta.negotiate()
        assert mta.connect("localhost", "/run/client.sock", 0, family="L") == ("c", {})
    assert m.stop() == 0
    r = m.results()

    ctx = r["connect#1"].split()[2]
    assert ctx.startswith("ctx=")
    assert r["negotiate#1"] == f"nargs=3 cmd=1 {ctx} 6,{0x1FF},{0x1FFFFF}"
    assert r["connect#1"] == (f"nargs=2 cmd=1 {ctx} host=client.example.net family=inet address=192.0.2.7 "
                              "port=40123 keys=address family port")
    assert r["helo#1"] == f"nargs=1 cmd=1 {ctx} helo.example.net"
    assert r["envfrom#1"] == f"nargs=1 cmd=1 {ctx} n=3 first=<from@example.org> rest=SIZE=1234,BODY=8BITMIME"
    assert r["envrcpt#1"] == f"nargs=1 cmd=1 {ctx} n=2 first=<to@example.com> rest=NOTIFY=NEVER"
    assert r["data#1"] == f"nargs=0 cmd=1 {ctx} "
    assert r["header#1"] == f"nargs=2 cmd=1 {ctx} name=Subject value=hello world"
    assert r["eoh#1"] == f"nargs=0 cmd=1 {ctx} "
    assert r["body#1"] == f"nargs=1 cmd=1 {ctx} len=11 data=body text"
    assert r["eom#1"] == f"nargs=0 cmd=1 {ctx} "
    assert r["unknown#1"] == f"nargs=1 cmd=1 {ctx} XFOO bar"
    assert r["envfrom#2"] == f"nargs=1 cmd=1 {ctx} n=1 first=<second@example.org> rest="
    assert r["abort#1"] == f"nargs=0 cmd=1 {ctx} "
    assert r["close#1"] == f"nargs=0 cmd=1 {ctx} "
    assert r["connect#2"].endswith("host=v6.example.net family=inet6 address=2001:db8::1 port=2525 "
                                   "keys=address family port")
    assert r["connect#3"].endswith("host=localhost family=unix address=/run/client.sock port=0 "
                                   "keys=address family port")
    contexts = {r[f"connect#{i}"].split()[2] for i in (1, 2, 3)}
    assert len(contexts) == 3, "every connection has its own context command"


# ---------------------------------------------------------------------------- return codes


def test_return_codes_become_the_replies(tclrun):
    m = tclrun(r"""
        package require TclMilter
        proc rcpt {ctx list} {
            set want [string trim [lindex $list 0] <>]
            if {$want eq "empty"} { return {} }
            return $want
        }
        proc body {ctx data} { return SMFIS_SKIP }
        milter register envrcpt rcpt
        milter register body body
        milter main
    """)
    with m.mta() as mta:
        mta.negotiate()
        assert mta.mail("<a@example.org>") == SKIPPED
        for status, reply in [("SMFIS_CONTINUE", "c"), ("SMFIS_REJECT", "r"), ("SMFIS_TEMPFAIL", "t"),
                              ("SMFIS_ACCEPT", "a"), ("empty", "c"),
                              ("not-a-status", "c"), ("SMFIS_NOREPLY", "c")]:
            assert mta.rcpt(f"<{status}>")[0] == reply, status
        assert mta.body(b"x" * 70000)[0] == ("s", b"")  # SKIP from the body callback: the MTA offered SMFIP_SKIP
        assert mta.eom()[-1] == ("c", b"")
        # a discard at RCPT is the whole message's: the MTA sends none of its events after it
        assert mta.mail("<b@example.org>") == SKIPPED
        assert mta.rcpt("<SMFIS_DISCARD>")[0] == "d"
    assert m.stop() == 0
    assert "not-a-status" in m.text  # "anything else logged and treated as continue"


def test_empty_result_is_continue_without_a_warning(tclrun):
    """An empty result means continue, silently: only "anything else" is logged.

    Bug: tkinter hands the empty result of ``return`` / ``return {}`` back as a
    ``Tcl_Obj`` (internal type "bytecode" or "dict"), which parse_status does not
    recognise: every such callback logs "returned <bytecode object: ''>, not a status".
    """
    m = tclrun(r"""
        package require TclMilter
        proc helo {ctx host} { return }
        proc from {ctx list} { return {} }
        proc rcpt {ctx list} { return "" }
        proc eom {ctx} { set r ""; return $r }
        milter register helo helo
        milter register envfrom from
        milter register envrcpt rcpt
        milter register eom eom
        milter main
    """)
    with m.mta() as mta:
        mta.negotiate()
        assert mta.helo() == ("c", {})
        assert mta.message()["eom"] == [("c", b"")]
    assert m.stop() == 0
    assert "not a status" not in m.text, m.text


def test_status_names_honoured_whatever_tcl_made_of_them(tclrun):
    """``return SMFIS_REJECT`` must reject even if Tcl gave the value another internal representation.

    Bug: the callback result is taken from tkinter as an object: a value Tcl
    holds as a list arrives as the tuple ('SMFIS_REJECT',) and is treated as
    continue, so the recipient is let through. Tcl shares a literal within a
    proc, so once the ``<listrep>`` branch has run ``llength`` on it, the plain
    ``return SMFIS_REJECT`` of the ``<plain>`` branch is ignored too.
    """
    m = tclrun(r"""
        package require TclMilter
        proc rcpt {ctx list} {
            switch -- [lindex $list 0] {
                <listrep> { set s SMFIS_REJECT; llength $s; return $s }
                <plain>   { return SMFIS_REJECT }
                <built>   { return [list SMFIS_TEMPFAIL] }
            }
            return SMFIS_CONTINUE
        }
        milter register envrcpt rcpt
        milter main
    """)
    with m.mta() as mta:
        mta.negotiate()
        got = {a: mta.rcpt(f"<{a}>")[0] for a in ["listrep", "plain", "built"]}
    assert m.stop() == 0
    assert got == {"listrep": "r", "plain": "r", "built": "t"}, m.text


def test_numbers_are_not_statuses(tclrun):
    """Only the SMFIS_* names are statuses; "anything else [is] logged and treated as continue".

    Bug: a number reaches parse_status as a Python int when Tcl holds it as an
    integer, and ints are taken as Status values: ``return 1`` rejects,
    ``return [expr {2+2}]`` tempfails, while the same text built as a string
    (``return [string trim " 1 "]``) continues.
    """
    m = tclrun(r"""
        package require TclMilter
        proc rcpt {ctx list} {
            switch -- [lindex $list 0] {
                <literal> { return 1 }
                <expr>    { return [expr {2 + 2}] }
                <string>  { return [string trim " 1 "] }
            }
        }
        milter register envrcpt rcpt
        milter main
    """)
    with m.mta() as mta:
        mta.negotiate()
        got = {a: mta.rcpt(f"<{a}>")[0] for a in ["literal", "expr", "string"]}
    assert m.stop() == 0
    assert got == {"literal": "c", "expr": "c", "string": "c"}, m.text


def test_a_long_result_that_is_no_status_is_logged_by_its_start(tclrun):
    """The manual's advice, collecting the body with setpriv, without a `return`: the callback's
    result is the body so far. It was logged whole for every block (a 10 MB message: some 800 MB
    of log, the mail's content in it); now its first 60 characters and its length, and once a
    minute for the callback (a line per block was still a line per 64 KB of every message)."""
    m = tclrun(r"""
        package require TclMilter
        proc body {ctx block} {
            if {[catch {$ctx getpriv body} sofar]} { set sofar "" }
            $ctx setpriv body "$sofar$block"
        }
        milter register body body
        milter main
    """)
    block = b"confidential line\r\n" * 3000  # 57000 bytes
    with m.mta() as mta:
        mta.negotiate()
        steps = mta.message(body=block * 3)
    assert m.stop() == 0
    assert steps["eom"][-1][0] in ("a", "c"), steps  # treated as continue: the message goes through
    warnings = [ln for ln in m.text.splitlines() if "not a status" in ln]
    assert len(warnings) == 1, m.text[-2000:]
    (line,) = warnings
    assert len(line) < 400, line[:400]
    assert 'returned "' + "confidential line\\r\\n" * 3 in line and "...\" (" in line, line
    assert line.endswith("not a status; treated as continue (said once a minute for this callback)"), line


# ---------------------------------------------------------------------------- the context command


def test_context_data_access(tclrun):
    m = tclrun(TCL_HELPERS + r"""
        package require TclMilter
        proc helo {ctx host} {
            T set1     {$ctx setpriv a1 one}
            T set2     {$ctx setpriv a2 "two words"}
            T set3     {$ctx setpriv b1 three}
            T set4     {$ctx setpriv *x star}
            T set5     {$ctx setpriv list {x {y z}}}
            T get1     {$ctx getpriv a1}
            T get2     {$ctx getpriv a2}
            T getlist  {llength [$ctx getpriv list]}
            T setget   {$ctx setpriv b1}
            T all      {llength [$ctx getpriv]}
            T allarr   {array set p [$ctx getpriv]; set p(a2)}
            T missing  {$ctx getpriv nope}
            T unglob   {$ctx unsetpriv a?}
            T left1    {lsort [dict keys [$ctx getpriv]]}
            T unlit    {$ctx unsetpriv {\*x}}
            T left2    {lsort [dict keys [$ctx getpriv]]}
            T unclass  {$ctx unsetpriv {[bl]*}}
            T left3    {lsort [dict keys [$ctx getpriv]]}
            $ctx setpriv k1 v; $ctx setpriv k2 v
            T unall    {$ctx unsetpriv}
            T left4    {$ctx getpriv}
            T sym-j    {$ctx getsymval j}
            T sym-{j}  {$ctx getsymval {{j}}}
            T sym-dn   {$ctx getsymval {{daemon_name}}}
            T sym-bare {$ctx getsymval daemon_name}
            T sym-i    {$ctx getsymval i}
            T sym-none {$ctx getsymval {{nothing}}}
            T sym-none2 {$ctx getsymval nothing}
            T sym-bare2 {$ctx getsymval daemon_name}
            return SMFIS_CONTINUE
        }
        proc from {ctx list} {
            T sym-i2   {$ctx getsymval i}
            T sym-{i}  {$ctx getsymval {{i}}}
            T keep     {$ctx getpriv}
            return SMFIS_CONTINUE
        }
        milter register helo helo
        milter register envfrom from
        milter main
    """)
    with m.mta() as mta:
        mta.negotiate()
        mta.macro("H", j="mx.example.net", **{"{daemon_name}": "smtpd", "{i}": "QUEUEID1"})
        assert mta.helo() == ("c", {})
        mta.macro("M", i="QUEUEID2")
        assert mta.mail("<a@example.org>") == ("c", {})
    assert m.stop() == 0
    r = m.results()
    assert r["set1"] == "OK one" and r["set2"] == "OK two words"
    assert r["get1"] == "OK one" and r["get2"] == "OK two words"
    assert r["getlist"] == "OK 2"
    assert r["setget"] == "OK three"  # setpriv without a value reads
    assert r["all"] == "OK 10"  # five pairs, dictionary format
    assert r["allarr"] == "OK two words"  # "suitable for use with array set"
    assert r["missing"].startswith("ERR ") and "nope" in r["missing"]
    assert r["unglob"] == "OK "
    assert r["left1"] == "OK *x b1 list"
    assert r["left2"] == "OK b1 list"  # a backslash-escaped * is literal
    assert r["left3"] == "OK "
    assert r["unall"] == "OK " and r["left4"] == "OK "
    assert r["sym-j"] == "OK mx.example.net"
    assert r["sym-{j}"] == "OK mx.example.net"  # {j} also finds j
    assert r["sym-dn"] == "OK smtpd"
    assert r["sym-bare"] == "OK "  # long names only in braces, as in libmilter
    # ... and the admin learns why the value is empty
    # (once an hour: the second call is counted, and the count told at stop)
    hint = [ln for ln in m.text.splitlines() if "getsymval daemon_name" in ln]
    said = ("getsymval daemon_name found nothing though the MTA sent {daemon_name}: a long macro name needs "
            'its braces in the value, as in getsymval {{daemon_name}} or "{daemon_name}" (said once an hour')
    assert len(hint) == 2 and hint[0].endswith(said + ")") and hint[1].endswith(said + "; 1 more since)"), m.text
    assert "getsymval nothing" not in m.text  # nor a name the MTA did not send either way
    assert r["sym-i"] == "OK QUEUEID1"  # i also finds {i}
    assert r["sym-none"] == "OK "
    assert r["sym-i2"] == "OK QUEUEID2" and r["sym-{i}"] == "OK QUEUEID2"
    assert r["keep"] == "OK "  # private data lives as long as the connection (emptied above)


def test_setreply_and_setmlreply_forms(tclrun):
    m = tclrun(TCL_HELPERS + r"""
        package require TclMilter
        proc rcpt {ctx list} {
            set form [string trim [lindex $list 0] <>]
            switch -- $form {
                code     { $ctx setreply 550 }
                message  { $ctx setreply 550 "two args: the second is the message" }
                xcode    { $ctx setreply 550 5.7.1 }
                full     { $ctx setreply 550 5.7.1 "all three" }
                tab      { $ctx setreply 550 5.7.1 "a\tb" }
                emptyx   { $ctx setreply 550 {} "no xcode" }
                temp     { $ctx setreply 451 4.7.1 "later"; return SMFIS_TEMPFAIL }
                multi    { $ctx setmlreply 550 5.7.1 "first line" "second line" "third line" }
                keep     { $ctx setreply 550 5.7.1 "kept for a reject"; return SMFIS_TEMPFAIL }
                later    { return SMFIS_REJECT }
                errors {
                    R ctx $ctx
                    T badcode  {$ctx setreply 250 "ok"}
                    T badx     {$ctx setreply 550 9.9 "x"}
                    T mismatch {$ctx setreply 550 4.7.1 "x"}
                    T crlf     {$ctx setreply 550 5.7.1 "a\r\nb"}
                    T esc      {$ctx setreply 550 5.7.1 "a\x1b\[31mred"}
                    T mldel    {$ctx setmlreply 550 5.7.1 ok "a\x7f"}
                    T noargs   {$ctx setreply}
                    T toomany  {$ctx setreply 550 5.7.1 a b}
                    T mlfew    {$ctx setmlreply 550 5.7.1}
                    return SMFIS_CONTINUE
                }
            }
            return SMFIS_REJECT
        }
        milter register envrcpt rcpt
        milter main
    """)
    with m.mta() as mta:
        mta.negotiate()
        got = {}
        for form in ["code", "message", "xcode", "full", "tab", "emptyx", "temp", "multi", "keep", "later", "errors"]:
            reply = mta.event_raw("R", f"<{form}>\0".encode())
            got[form] = reply if reply[0] != "y" else ("y", reply[1].rstrip(b"\0").decode())
    assert m.stop() == 0
    assert got["code"] == ("y", "550 ")
    assert got["message"] == ("y", "550 two args: the second is the message")
    assert got["xcode"] == ("y", "550 5.7.1")
    assert got["full"] == ("y", "550 5.7.1 all three")
    assert got["tab"] == ("y", "550 5.7.1 a\tb")  # RFC 5321's reply text allows a tab
    assert got["emptyx"] == ("y", "550 no xcode")
    assert got["temp"] == ("y", "451 4.7.1 later")
    assert got["multi"] == ("y", "550-5.7.1 first line\r\n550-5.7.1 second line\r\n550 5.7.1 third line")
    assert got["keep"] == ("t", b"")  # a 5xx text does not go with a tempfail ...
    assert got["later"] == ("y", "550 5.7.1 kept for a reject")  # ... it is kept for the next reject
    assert got["errors"] == ("c", b"")
    r = m.results()
    for key in ["badcode", "badx", "mismatch", "crlf"]:
        assert r[key].startswith("ERR "), (key, r[key])
    # Postfix 3.7 and Sendmail 8.17 pass these on to the SMTP client as they are
    assert r["esc"] == r"ERR reply text must not contain CR, LF, NUL or other control characters (\x1b)"
    assert r["mldel"] == r"ERR reply text must not contain CR, LF, NUL or other control characters (\x7f)"
    assert "250" in r["badcode"]
    usage = f'ERR wrong # args: should be "{r["ctx"]} setreply rcode ??xcode? message?"'
    assert r["noargs"] == usage and r["toomany"] == usage
    assert r["mlfew"] == f'ERR wrong # args: should be "{r["ctx"]} setmlreply rcode xcode line ?line ...?"'


def test_empty_esmtp_arguments_are_none(tclrun):
    """``[lrange $from 1 end]`` of a MAIL without arguments is "": before, that went out as an
    (empty) argument field, an ADDRCPT_PAR for addrcpt, and Sendmail took it as new MAIL arguments:
    the client's BODY, ENVID and RET were dropped and an empty AUTH= was relayed."""
    m = tclrun(r"""
        package require TclMilter
        proc from {ctx list} { $ctx setpriv args [lrange $list 1 end]; return SMFIS_CONTINUE }
        proc eom {ctx} {
            $ctx chgfrom <bounce@example.org> [$ctx getpriv args]
            $ctx addrcpt <new@example.com> "  "
            return SMFIS_CONTINUE
        }
        milter register envfrom from
        milter register eom eom
        milter main
    """)
    with m.mta() as mta:
        mta.negotiate()
        eom = mta.message()["eom"]
    assert m.stop() == 0
    assert eom == [("e", b"<bounce@example.org>\0"), ("+", b"<new@example.com>\0"), ("c", b"")]


def test_message_modifications_at_eom(tclrun):
    m = tclrun(r"""
        package require TclMilter
        proc from {ctx list} { return SMFIS_CONTINUE }
        proc eom {ctx} {
            $ctx progress
            $ctx addheader X-Added "added value"
            $ctx chgheader Subject "changed subject"
            $ctx chgheader Received 2 ""
            $ctx insheader X-First "at the top"
            $ctx insheader X-Third 3 "before the third"
            $ctx addrcpt <new@example.com>
            $ctx addrcpt <new2@example.com> "NOTIFY=NEVER ORCPT=rfc822;x@example.com"
            $ctx delrcpt <old@example.com>
            $ctx chgfrom <bounce@example.org>
            $ctx chgfrom <bounce2@example.org> "RET=HDRS ENVID=abc"
            $ctx quarantine "held for review"
            $ctx replacebody "new body, "
            $ctx replacebody "in two calls\r\n"
            return SMFIS_CONTINUE
        }
        milter register envfrom from
        milter register eom eom
        milter main
    """)
    with m.mta() as mta:
        mta.negotiate()
        eom = mta.message()["eom"]
    assert m.stop() == 0
    assert eom == [
        ("p", b""),
        ("h", b"X-Added\0added value\0"),
        ("m", b"\0\0\0\x01Subject\0changed subject\0"),  # index defaults to 1
        ("m", b"\0\0\0\x02Received\0\0"),
        ("i", b"\0\0\0\0X-First\0at the top\0"),  # index defaults to 0
        ("i", b"\0\0\0\x03X-Third\0before the third\0"),
        ("+", b"<new@example.com>\0"),
        ("2", b"<new2@example.com>\0NOTIFY=NEVER ORCPT=rfc822;x@example.com\0"),
        ("-", b"<old@example.com>\0"),
        ("e", b"<bounce@example.org>\0"),
        ("e", b"<bounce2@example.org>\0RET=HDRS ENVID=abc\0"),
        ("q", b"held for review\0"),
        ("b", b"new body, in two calls\r\n"),
        ("c", b""),
    ]


SUBCOMMANDS = {
    "addheader": "name data",
    "addrcpt": "rcpt ?esmtpArgs?",
    "chgfrom": "sender ?esmtpArgs?",
    "chgheader": "name ?index? data",
    "delrcpt": "rcpt",
    "getpriv": "?name?",
    "getsymval": "symbol",
    "insheader": "name ?index? data",
    "progress": "",
    "quarantine": "reason",
    "replacebody": "data",
    "setmlreply": "rcode xcode line ?line ...?",
    "setpriv": "name ?value?",
    "setreply": "rcode ??xcode? message?",
    "setsymlist": "stage macros",
    "unsetpriv": "?pattern?",
}


def test_context_command_errors(tclrun):
    m = tclrun(TCL_HELPERS + r"""
        package require TclMilter
        set ::too_many {a b c d e f g h i j k l m n o p q r s t u v w x y z 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31 32 33 34}
        proc helo {ctx host} {
            R ctx $ctx
            T nosub {$ctx}
            T badsub {$ctx bogus}
            foreach sub {addheader addrcpt chgfrom chgheader delrcpt getpriv getsymval insheader progress
                         quarantine replacebody setmlreply setpriv setreply setsymlist unsetpriv} {
                T many-$sub {$ctx $sub {*}$::too_many}
            }
            foreach {sub args} {addheader {X v} chgheader {X v} insheader {X v} addrcpt <a@b> delrcpt <a@b>
                                chgfrom <a@b> replacebody x quarantine why} {
                T outside-$sub {$ctx $sub {*}$args}
            }
            T setsymlist {$ctx setsymlist envfrom i}
            return SMFIS_CONTINUE
        }
        proc eom {ctx} {
            T badname  {$ctx addheader "Bad Name" v}
            T badvalue {$ctx addheader X-Ok "line\nnot folded"}
            T badindex {$ctx chgheader X-Ok -1 v}
            T notint   {$ctx insheader X-Ok notanumber v}
            T norcpt   {$ctx addrcpt {}}
            T noreason {$ctx quarantine {}}
            return SMFIS_CONTINUE
        }
        milter register helo helo
        milter register eom eom
        milter main
    """)
    with m.mta() as mta:
        mta.negotiate()
        assert mta.helo() == ("c", {})
        assert mta.message()["eom"] == [("c", b"")]  # every failed modification sent nothing
    assert m.stop() == 0
    r = m.results()
    ctx = r["ctx"]
    assert r["nosub"] == f'ERR wrong # args: should be "{ctx} subcommand ?arg ...?"'
    assert r["badsub"] == ('ERR bad option "bogus": must be addheader, addrcpt, chgfrom, chgheader, delrcpt, '
                           "getpriv, getsymval, insheader, progress, quarantine, replacebody, setmlreply, "
                           "setpriv, setreply, setsymlist, or unsetpriv")
    for sub, usage in SUBCOMMANDS.items():
        if sub == "setmlreply":
            continue  # up to 32 lines: many arguments are valid there
        expected = f'ERR wrong # args: should be "{ctx} {sub}{" " + usage if usage else ""}"'
        assert r["many-" + sub] == expected, sub
    assert r["many-setmlreply"].startswith("ERR ")  # 35 lines are too many
    for sub in ["addheader", "chgheader", "insheader", "addrcpt", "delrcpt", "chgfrom", "replacebody", "quarantine"]:
        assert r["outside-" + sub].startswith("ERR ") and "eom" in r["outside-" + sub], (sub, r["outside-" + sub])
    assert r["setsymlist"].startswith("ERR ") and "negotiate" in r["setsymlist"]
    assert r["badname"].startswith("ERR ") and "Bad Name" in r["badname"]
    assert r["badvalue"].startswith("ERR ")
    assert r["badindex"].startswith("ERR ")
    assert r["notint"] == 'ERR expected integer but got "notanumber"'
    assert r["norcpt"].startswith("ERR ") and r["noreason"].startswith("ERR ")


def test_context_is_a_command_deleted_when_the_connection_ends(tclrun):
    m = tclrun(TCL_HELPERS + r"""
        package require TclMilter
        proc helo {ctx host} {
            lappend ::contexts $ctx
            R exists-$host [llength [info commands $ctx]]
            $ctx setpriv host $host
            return SMFIS_CONTINUE
        }
        proc close {ctx} {
            R closing-[$ctx getpriv host] [llength [info commands $ctx]]
            after 0 [list check $ctx [$ctx getpriv host]]
        }
        proc check {ctx host} {
            T after-$host {$ctx getpriv host}
            R gone-$host [llength [info commands $ctx]]
        }
        milter register helo helo
        milter register close close
        milter main
    """)
    for host in ["one", "two"]:
        with m.mta() as mta:
            mta.negotiate()
            assert mta.helo(host) == ("c", {})
            mta.quit()
            assert mta.eof()
        m.wait_for(f"R\tgone-{host}\t")
    assert m.stop() == 0
    r = m.results()
    for host in ["one", "two"]:
        assert r[f"exists-{host}"] == "1" and r[f"closing-{host}"] == "1"
        assert r[f"gone-{host}"] == "0"
        assert r[f"after-{host}"].startswith('ERR invalid command name "'), r[f"after-{host}"]
    assert r["after-one"] != r["after-two"]  # two connections, two commands


def test_setsymlist_in_negotiate_asks_for_macros(tclrun):
    m = tclrun(TCL_HELPERS + r"""
        package require TclMilter
        proc negotiate {ctx version actions protocol} {
            T first  {$ctx setsymlist envfrom {i {mail_addr}}}
            T byno   {$ctx setsymlist 5 {{msg_id}}}
            T twice  {$ctx setsymlist envfrom {j}}
            T bad    {$ctx setsymlist nowhere {j}}
            return SMFIS_CONTINUE
        }
        milter register negotiate negotiate
        milter main
    """)
    with m.mta() as mta:
        actions, protocol, lists = mta.negotiate_raw()
        assert actions & K.SMFIF_SETSYMLIST
        assert lists == {K.SMFIM_ENVFROM: "i {mail_addr}", K.SMFIM_EOM: "{msg_id}"}
    assert m.stop() == 0
    r = m.results()
    assert r["first"] == "OK " and r["byno"] == "OK "
    assert r["twice"].startswith("ERR ") and r["bad"].startswith("ERR ")


def test_setsymlist_refuses_a_long_macro_name_without_braces(tclrun):
    """``[list i {rcpt_addr}]`` is the string ``i rcpt_addr``: Tcl's list drops the braces (and
    ``[list i {{rcpt_addr}}]`` doubles them). Before,
    that list went to the MTA as it was, and Sendmail sent the macro of the first letter under
    the long name (``daemon_name`` got ``$d``, a date) while the braced name the script read got
    nothing; Postfix sent nothing. Now the call fails, naming the braced form."""
    m = tclrun(TCL_HELPERS + r"""
        package require TclMilter
        proc negotiate {ctx version actions protocol} {
            T bare   {$ctx setsymlist envrcpt [list i {rcpt_addr}]}
            T open   {$ctx setsymlist eoh [string range "{daemon_name}" 0 end-1]}
            T double {$ctx setsymlist helo [list i {{mail_addr}}]}
            T braced {$ctx setsymlist envfrom {i {mail_addr}}}
            return SMFIS_CONTINUE
        }
        milter register negotiate negotiate
        milter main
    """)
    with m.mta() as mta:
        _, _, lists = mta.negotiate_raw()
        assert lists == {K.SMFIM_ENVFROM: "i {mail_addr}"}
    assert m.stop() == 0
    r = m.results()
    assert r["bare"] == ('ERR invalid macro name "rcpt_addr": a name longer than one character '
                         "is written in one pair of braces, {rcpt_addr}")
    assert r["open"].startswith('ERR invalid macro name "{daemon_name"')
    assert r["double"].startswith('ERR invalid macro name "{{mail_addr}}"')
    assert r["braced"] == "OK "


# ---------------------------------------------------------------------------- milter main / stop


def test_stop_from_a_callback_makes_main_return(tclrun):
    m = tclrun(r"""
        package require TclMilter
        proc helo {ctx host} { milter stop; return SMFIS_CONTINUE }
        milter register helo helo
        puts "before main"
        milter main
        puts "main returned"
        exit 0
    """)
    with m.mta() as mta:
        mta.negotiate()
        assert mta.helo() == ("c", {})  # the stopping callback's own answer still goes out
        mta.quit()
    m.wait_for("main returned")
    assert m.wait_exit() == 0
    assert m.text.index("before main") < m.text.index("listening on") < m.text.index("main returned")


INTEGER_FORMS = ["12", "012", "08", "00", " 12 ", "\t7\n", "+7", "-0", "0x1F", "0X1f", "0o17", "0b101",
                 "0d12", "1_0", "0x", "", " ", "1e3", "12a", "0o8", "0b2", "९"]


def test_integer_options_read_numbers_as_tcl_does(tcl_host):
    """`milter configure -timeout` (and every integer argument) reads an integer as this very Tcl
    does (Tcl_GetIntFromObj): "012" is octal 10, "08" no integer, space around it is fine; before,
    "012" was 12 and "1_0" (Python's) 10."""
    import tkinter

    tk = tkinter.Tcl().tk
    host = tcl_host
    host.child_call("package", "require", "TclMilter")
    for form in INTEGER_FORMS:
        try:
            expected: object = str(tk.call("format", "%lld", form))
        except tkinter.TclError as exc:
            expected = str(exc)
        try:
            host.child_call("milter", "configure", "-timeout", form)
            got: object = str(host.child_call("milter", "configure", "-timeout"))
        except tkinter.TclError as exc:
            got = str(exc)
        assert got == expected, repr(form)


DOUBLE_FORMS = INTEGER_FORMS + ["1.5", ".5", "5.", "1e-3", " 2.5e1 ", "inf", "Infinity", "1e", "1.2.3", "0x1.8",
                                "08.5", "08e1", "nan", " NaN ", "-1.5"]


def test_seconds_options_read_numbers_as_tcl_does(tcl_host):
    """`-grace` and `-calltimeout` read a number as Tcl does (Tcl_GetDoubleFromObj), with its
    errorCode; before, Python's float() took "1_0" and refused Tcl's integers ("0x10")."""
    import tkinter

    tk = tkinter.Tcl().tk
    host = tcl_host
    host.child_call("package", "require", "TclMilter")
    for form in DOUBLE_FORMS:
        try:
            expected: object = ("ok", float(tk.call("format", "%.17g", form)))
        except tkinter.TclError as exc:
            expected = ("error", str(exc), tk.call("set", "errorCode"))
        try:
            host.child_call("milter", "configure", "-grace", form)
            got: object = ("ok", float(host.child_call("milter", "configure", "-grace")))
        except tkinter.TclError as exc:
            got = ("error", str(exc), host.child_call("set", "errorCode"))
        if form == "-1.5":  # a number, but no time
            expected = ("error", 'expected non-negative number but got "-1.5"', ("TCL", "VALUE", "NUMBER"))
        assert got == expected, repr(form)


def test_usage_errors_carry_the_error_code_tcls_own_commands_set(tcl_host):
    """`try ... trap {TCL WRONGARGS}` and `trap {TCL LOOKUP INDEX}` matched Tcl's own commands'
    errors but not TclMilter's: every error of `milter` and the context command had errorCode NONE."""
    import tkinter

    host = tcl_host
    host.child_call("package", "require", "TclMilter")

    def code_of(*words: str) -> str:
        with pytest.raises(tkinter.TclError):
            host.child_call(*words)
        return " ".join(map(str, host.tk.splitlist(host.child_call("set", "errorCode"))))

    assert code_of("string", "repeat") == "TCL WRONGARGS"  # (Tcl's own, for comparison)
    assert code_of("milter") == "TCL WRONGARGS"
    assert code_of("milter", "register") == "TCL WRONGARGS"
    assert code_of("milter", "foo") == "TCL LOOKUP INDEX option foo"
    assert code_of("milter", "configure", "-nosuch") == "TCL LOOKUP INDEX option -nosuch"
    assert code_of("milter", "register", "nosuchevent", "x") == "TCL LOOKUP INDEX event nosuchevent"
    assert code_of("milter", "configure", "-timeout", "x") == "TCL VALUE NUMBER"
    assert code_of("milter", "configure", "-dryrun", "maybe") == "TCL VALUE BOOLEAN"
    assert code_of("milter", "configure", "-onerror", "SMFIS_NOSUCH") == "NONE"  # a message of TclMilter's own


def test_an_empty_onerror_is_refused_not_taken_as_continue(tclrun):
    """An empty result of a callback means continue, and `-onerror {}` (or `--on-error ""`) was
    taken the same way: every callback that failed then let its message through, without a word.
    The Python API refuses an empty on_error for that reason; so do the option and the flag."""
    m = tclrun(TCL_HELPERS + r"""
        package require TclMilter
        T empty {milter configure -onerror {}}
        T after {milter configure -onerror}
        exit 0
    """, connection=None, wait=False)
    assert m.wait_exit() == 0, m.output
    bad = ('ERR bad status "": must be SMFIS_ACCEPT, SMFIS_CONTINUE, SMFIS_DISCARD, SMFIS_REJECT, '
           "or SMFIS_TEMPFAIL")
    assert m.results() == {"empty": bad, "after": "OK SMFIS_TEMPFAIL"}
    m = tclrun("package require TclMilter\nmilter main\n", "--on-error", "", wait=False)
    assert m.wait_exit() == 64, m.output
    assert 'bad status ""' in m.output, m.output


def test_a_failing_abort_or_close_callback_is_logged_without_an_answer(tclrun):
    """ABORT and close take no reply (docs/protocol.md): a failing abort or close callback's line
    said "answering SMFIS_TEMPFAIL", and an admin looked for a tempfail the MTA never got."""
    m = tclrun(r"""
        package require TclMilter
        proc drop {ctx} { error "abort went wrong" }
        proc bye {ctx} { error "close went wrong" }
        proc to {ctx list} { error "envrcpt went wrong" }
        milter register abort drop
        milter register close bye
        milter register envrcpt to
        milter main
    """)
    with m.mta() as mta:
        mta.negotiate()
        mta.mail("<a@example.org>")
        assert mta.rcpt("<b@example.org>")[0] == "t"  # -onerror's default: the MTA is answered
        mta.abort()
    assert m.stop() == 0
    failed = {ln.split(" callback ")[0].split()[-1]: ln for ln in m.text.splitlines() if " failed (" in ln}
    assert failed["envrcpt"].endswith("envrcpt callback to failed (envrcpt went wrong), answering SMFIS_TEMPFAIL:")
    assert failed["abort"].endswith("abort callback drop failed (abort went wrong), no answer (abort takes none):")
    assert failed["close"].endswith("close callback bye failed (close went wrong), no answer (close takes none):")

