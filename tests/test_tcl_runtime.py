"""Running TclMilter scripts: the manual's example, Tcl and Python in one chain, stopping, errors, exit, argv."""

from __future__ import annotations

import re

import signal
import socket
import time

import pytest
from miltertest import constants as K
from miltertest.client import MilterError

from support.tclrun import REPO, SKIPPED, TCL_HELPERS, ok, tclrun_factory, z

tclrun = pytest.fixture(tclrun_factory, name="tclrun")

BLACKLIST = REPO / "tclmilter" / "examples" / "blacklist.tcl"


# ---------------------------------------------------------------------------- the manual's example


def test_blacklist_example_runs_verbatim(tclrun):
    assert "milter configure -connection {unix:/var/run/blmilter.sock}" in BLACKLIST.read_text()
    m = tclrun(BLACKLIST)  # the file itself; only the connection is overridden on the command line
    assert m.name == "Blacklist"
    assert m.spec.startswith("inet:")

    with m.mta() as mta:
        actions, protocol = mta.negotiate()
        # Only envfrom and header are registered: the MTA is told to skip the rest.
        assert protocol & K.SMFIP_NOCONNECT and protocol & K.SMFIP_NOHELO and protocol & K.SMFIP_NORCPT
        assert not protocol & (K.SMFIP_NOMAIL | K.SMFIP_NOHDRS)
        assert mta.connect() == SKIPPED

        # Blacklisted envelope senders are rejected at MAIL, with or without ESMTP arguments.
        assert mta.mail("<spammer@spamdomain.com>") == ("r", {})
        assert mta.mail("<friend@public.com>", "SIZE=100") == ("r", {})
        # A blacklisted From header rejects the message (at the end, as headers need no reply).
        steps = mta.message(sender="<someone@example.org>",
                            headers=[("From", "<friend@public.com>"), ("Subject", "hi")])
        assert steps["mail"] == ("c", {})
        assert steps["eom"] == [("r", b"")]
        # Everything else passes.
        steps = mta.message(sender="<someone@example.org>",
                            headers=[("From", "someone@example.org"), ("Subject", "friend@public.com")])
        assert steps["mail"] == ("c", {}) and steps["eom"] == [("c", b"")]
        assert mta.mail("<spammer@spamdomain.com.example>") == ("c", {})

    with m.mta() as mta:  # an MTA that cannot skip header replies gets the reject at the header itself
        mta.negotiate(protocol=K.SMFI_V2_PROT)
        assert mta.mail("<someone@example.org>") == ("c", {})
        assert mta.rcpt("<rcpt@example.com>") == SKIPPED
        assert mta.header("Subject", "hi") == ("c", {})
        assert mta.header("From", "spammer@spamdomain.com") == ("r", {})

    assert m.stop() == 0  # main returns on SIGTERM; the script's "file delete" runs; exit 0


# ---------------------------------------------------------------------------- Tcl and Python together


HOOKS = r'''
from pytclmilter.status import Status


def setup(milter):
    @milter.register("envfrom")
    def py_envfrom(ctx, args):
        print("PY envfrom", args[0], flush=True)
        ctx.setpriv("py", "set by python")
        if args[0] == "<py-reject@example.org>":
            return Status.REJECT
        return "SMFIS_CONTINUE"

    @milter.register("eom")
    def py_eom(ctx):
        ctx.addheader("X-Python-Sees", ctx.getpriv("tcl", "nothing"))
        return None
'''


def test_tcl_and_python_callbacks_share_chains_and_private_data(tclrun):
    m = tclrun(r"""
        package require TclMilter
        proc from {ctx list} {
            puts "TCL envfrom [lindex $list 0]"
            $ctx setpriv tcl "set by tcl"
            if {[lindex $list 0] eq "<tcl-reject@example.org>"} { return SMFIS_REJECT }
            return SMFIS_CONTINUE
        }
        proc eom {ctx} {
            $ctx addheader X-Tcl-Sees [$ctx getpriv py]
            return SMFIS_CONTINUE
        }
        milter register envfrom from
        milter register eom eom
        milter main
    """, python=[HOOKS])
    with m.mta() as mta:
        mta.negotiate()
        assert mta.mail("<py-reject@example.org>") == ("r", {})  # Python answers first ...
        assert mta.mail("<tcl-reject@example.org>") == ("r", {})  # ... then Tcl
        steps = mta.message(sender="<both@example.org>")
    assert m.stop() == 0
    assert steps["mail"] == ("c", {})
    # Python's eom was registered first (setup runs before the script), so its header comes first.
    assert steps["eom"] == [("h", b"X-Python-Sees\0set by tcl\0"), ("h", b"X-Tcl-Sees\0set by python\0"),
                            ("c", b"")]
    out = m.text
    assert "TCL envfrom <py-reject@example.org>" not in out  # the first non-continue answers
    assert out.index("PY envfrom <tcl-reject@example.org>") < out.index("TCL envfrom <tcl-reject@example.org>")


def test_a_session_after_quit_nc_starts_without_the_last_ones_private_data(tclrun):
    """QUIT_NC: the MTA keeps the connection for another SMTP session, maybe another client's.
    Before, a value the script kept with setpriv for the first session was there in the second."""
    m = tclrun(r"""
        package require TclMilter
        proc conn {ctx host addr} {
            if {[catch {$ctx getpriv who} who]} { return SMFIS_CONTINUE }
            $ctx setreply 550 5.7.1 "kept: $who"
            return SMFIS_REJECT
        }
        proc from {ctx args} { $ctx setpriv who [lindex $args 0 0]; return SMFIS_CONTINUE }
        milter register connect conn
        milter register envfrom from
        milter main
    """)
    connect = z("h.example") + b"4\x19\x01" + z("127.0.0.1")  # family 4, port 6401
    with m.mta() as mta:
        mta.negotiate_raw()
        for _session in range(2):
            assert mta.event_raw("C", connect) == ("c", b"")
            assert mta.event_raw("M", z("<first@example.org>")) == ("c", b"")
            assert mta.event_raw("E") == ("c", b"")
            mta.send_raw("K")
    assert m.stop() == 0


# ---------------------------------------------------------------------------- stopping


def test_stop_from_an_after_handler(tclrun):
    m = tclrun(r"""
        package require TclMilter
        proc helo {ctx host} { after 50 {milter stop}; return SMFIS_CONTINUE }
        milter register helo helo
        milter main
        puts "main returned"
        exit 0
    """)
    with m.mta() as mta:
        mta.negotiate()
        assert mta.helo() == ("c", {})
    m.wait_for("main returned")
    assert m.wait_exit() == 0


def test_stop_from_a_timer_set_before_main(tclrun):
    m = tclrun(r"""
        package require TclMilter
        after 300 {milter stop}
        milter main
        puts "main returned"
    """)
    m.wait_for("main returned")
    assert m.wait_exit() == 0


def test_stop_from_a_fileevent_handler(tclrun):
    """A channel handler runs while serving (the event tick sees the open channel and polls Tcl)."""
    m = tclrun(r"""
        package require TclMilter
        proc accepted {chan addr port} { puts "accepted"; close $chan; milter stop }
        set srv [socket -server accepted -myaddr 127.0.0.1 0]
        puts "control port [lindex [chan configure $srv -sockname] 2]"
        milter main
        puts "main returned"
    """, wait=False)
    port = int(m.wait_for(r"control port (\d+)").group(1))
    m.wait_listening()
    socket.create_connection(("127.0.0.1", port), timeout=5).close()
    m.wait_for("accepted")
    m.wait_for("main returned")
    assert m.wait_exit() == 0


def test_a_script_that_closed_stdin_accepts_on_its_server_socket(tclrun):
    """Whether Tcl had events to serve was told by counting channels: with stdin closed (a
    daemon's habit) a server socket was the third channel, and its clients were never answered."""
    m = tclrun(r"""
        package require TclMilter
        close stdin
        proc accepted {chan addr port} { puts $chan "hello from the script"; close $chan }
        set srv [socket -server accepted -myaddr 127.0.0.1 0]
        puts "control port [lindex [chan configure $srv -sockname] 2]"
        milter main
    """, wait=False)
    port = int(m.wait_for(r"control port (\d+)").group(1))
    m.wait_listening()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        assert s.makefile("rb").readline() == b"hello from the script\r\n"  # (a socket's default: crlf)
    assert m.stop() == 0


def test_a_fileevent_on_stdin_fires_while_milter_main_runs(tclrun):
    m = tclrun(r"""
        package require TclMilter
        fileevent stdin readable {
            if {[gets stdin line] > 0} { puts "read <$line>" } elseif {[eof stdin]} { fileevent stdin readable {} }
        }
        milter main
    """)
    m.child.sendline("from the terminal")
    m.wait_for(r"read <from the terminal>")
    assert m.stop() == 0


@pytest.mark.parametrize("where", ["before main", "after main"])
def test_a_yield_at_the_top_level_of_the_script_is_refused_as_under_tclsh(tclrun, where):
    """The script runs in a coroutine of the host's (so that `milter main` can suspend it): a
    `yield` of its own at the top level suspended it as `milter main` does, and the milter served
    a script that never called `milter main`, or served again after it returned."""
    m = tclrun(r"""
        package require TclMilter
        if {"%s" eq "after main"} { after 100 {milter stop}; milter main; puts "main returned" }
        yield something
        puts "after yield"
        milter main
    """ % where, wait=False)
    assert m.wait_exit() == 1
    assert "yield can only be called in a coroutine" in m.text, m.text
    assert "after yield" not in m.text
    assert m.text.count("listening on") == (1 if where == "after main" else 0), m.text


@pytest.mark.parametrize("where", ["before main", "after main"])
@pytest.mark.parametrize("ending, message", [("return -code break", 'invoked "break" outside of a loop'),
                                             ("continue", 'invoked "continue" outside of a loop'),
                                             ("return -code 7 x", "command returned bad code: 7")])
def test_a_break_at_the_top_level_of_the_script_names_the_script_not_the_host(tclrun, where, ending, message):
    """tclsh makes a break, continue or other code at a file's top level an error; under run and
    check its only frame was the host's own call, `interp eval filter {coroutine
    ::tclmilter::py::script source top.tcl}` (after `milter main`: `{::tclmilter::py::script {ok
    {}}}`), which no script author wrote. Now it is the script's file, as for an error there."""
    m = tclrun(r"""
        package require TclMilter
        if {"%s" eq "after main"} { after 100 {milter stop}; milter main }
        %s
        milter main
    """ % (where, ending), wait=False)
    assert m.wait_exit() == 1
    assert f'{message}\n    while executing\n  "source ' in m.text, m.text
    assert "tclmilter::py" not in m.text and "interp eval" not in m.text, m.text


def test_a_stop_after_a_milter_main_served_inside_says_the_script_runs_after_it(tclrun):
    """`milter main` in an `after` handler (the script then in `vwait`) serves inside that call,
    and the script goes on after it within the load: a stop signal then was logged as `while
    loading` a script whose `milter main` had served and returned."""
    m = tclrun(r"""
        package require TclMilter
        after 0 {milter main; puts "main returned"; flush stdout}
        vwait forever
    """)
    m.child.kill(signal.SIGTERM)
    m.wait_for(r"main returned")
    assert m.stop() == 0
    assert re.search(r"WARNING: stopped by SIGTERM while running \S+ after its milter main", m.text), m.text
    assert "while loading" not in m.text, m.text


LOGS_TO_ITS_FILE = r"""
    package require TclMilter
    set log [open [lindex $argv 0] a]
    puts $log "started [pid]"
    proc envfrom {ctx from} {
        puts $::log "from $from in [pid]"
        if {$from eq "<exit@example.org>"} { exit 3 }
        return SMFIS_CONTINUE
    }
    milter register envfrom envfrom
    milter main
    puts -nonewline "main returned"
"""


@pytest.mark.parametrize("how", ["sigterm", "exit", "workers"])
def test_what_the_script_wrote_to_its_channels_is_written_when_the_milter_ends(tclrun, tmp_path, how):
    """Tcl's exit flushes every channel; the milter ended without it, so a script's log file lost
    its buffered lines (all of them, for a quiet day), and `puts -nonewline` to stdout was lost
    (now it is written, and its line ended).
    With --workers, what was written before the fork is written once, not by every worker."""
    log = tmp_path / "filter.log"
    m = tclrun(LOGS_TO_ITS_FILE, *(["--workers", "2"] if how == "workers" else []), args=[str(log)])
    for n in range(3):
        with m.mta() as mta:
            mta.negotiate()
            assert ok(mta.connect())
            if how == "exit" and n == 2:
                with pytest.raises(MilterError, match="unexpected EOF"):  # the process ended
                    mta.mail("<exit@example.org>")
            else:
                assert ok(mta.mail(f"<s{n}@example.org>"))
    if how == "exit":
        assert m.wait_exit() == 3
    else:
        assert m.stop() == 0
        assert m.text.endswith("main returned\n"), m.text[-300:]  # (the open line ended: output.py)
    lines = log.read_text().splitlines()
    assert len([line for line in lines if line.startswith("started ")]) == 1, lines
    expected = ["<s0@example.org>", "<s1@example.org>", "<exit@example.org>" if how == "exit" else "<s2@example.org>"]
    assert sorted(line.split()[1] for line in lines if line.startswith("from ")) == sorted(expected), lines


def test_stop_from_a_secondary_thread(tclrun):
    m = tclrun(TCL_HELPERS + r"""
        package require TclMilter
        package require Thread
        proc helo {ctx host} {
            set ::worker [thread::create {
                package require TclMilter
                proc T {key script} {
                    if {[catch {uplevel 1 $script} m]} { set r "ERR $m" } else { set r "OK $m" }
                    puts "R\t$key\t$r"
                }
                thread::wait
            }]
            thread::send -async $::worker {
                T thread-configure {milter configure}
                T thread-register  {milter register helo x}
                T thread-main      {milter main}
                T thread-stop      {milter stop}
            }
            return SMFIS_CONTINUE
        }
        milter register helo helo
        milter main
        puts "main returned"
        exit 0
    """)
    with m.mta() as mta:
        mta.negotiate()
        assert mta.helo() == ("c", {})
    m.wait_for("main returned")
    assert m.wait_exit() == 0
    r = m.results()
    assert r["thread-stop"] == "OK "
    for cmd in ["configure", "register", "main"]:  # "Only the milter stop command will function in secondary threads"
        assert r[f"thread-{cmd}"].startswith("ERR "), r


def test_main_called_in_a_coroutine_of_the_script_serves(tclrun):
    """`milter main` suspends the script by yielding from the host's coroutine; called in a
    coroutine of the script's own, the yield returned to the script instead: `run` went on
    after it without ever listening, and exited 0."""
    m = tclrun(r"""
        package require TclMilter
        proc from {ctx list} { return SMFIS_REJECT }
        milter register envfrom from
        proc start {} { milter main; puts "main returned" }
        coroutine starter start
        puts "script end"
    """)
    with m.mta() as mta:
        mta.negotiate()
        assert mta.mail("<a@example.org>") == ("r", {})
    assert m.stop() == 0
    assert m.text.index("listening on") < m.text.index("main returned") < m.text.index("script end")


def test_main_called_twice_serves_again(tclrun):
    """``milter main`` after a ``milter stop`` must serve again until the next stop.

    Bug: MilterServer.stop() leaves ``_stop_requested`` set after the serve it
    stopped, and the next serve() takes it as a stop asked for before it
    started: the second ``milter main`` announces its socket and returns at once.
    """
    m = tclrun(r"""
        package require TclMilter
        proc helo {ctx host} { if {$host eq "stop"} { milter stop }; return SMFIS_CONTINUE }
        milter register helo helo
        milter main
        puts "first main returned"
        milter main
        puts "second main returned"
        exit 0
    """)
    with m.mta() as mta:
        mta.negotiate()
        assert mta.helo("stop") == ("c", {})
    m.wait_for("first main returned")
    m.wait_listening()
    second = m.mark()
    try:
        with m.mta() as mta:
            mta.negotiate()
            assert mta.helo("hello again") == ("c", {})
            assert mta.helo("stop") == ("c", {})
    except ConnectionRefusedError:
        pytest.fail("the second milter main stopped before serving anyone:\n" + m.output[second - 200:])
    m.wait_for("second main returned")
    assert m.wait_exit() == 0


def test_grace_bounds_the_wait_for_open_sessions_at_stop(tclrun):
    m = tclrun(r"""
        package require TclMilter
        milter configure -grace 0.5
        proc abort {ctx} { puts "ABORT callback" }
        proc close {ctx} { puts "CLOSE callback" }
        milter register envfrom {apply {{ctx list} { return SMFIS_CONTINUE }}}
        milter register abort abort
        milter register close close
        milter main
        puts "main returned"
    """)
    with m.mta() as mta:
        mta.negotiate()
        assert mta.mail("<a@example.org>") == ("c", {})  # and the MTA goes quiet mid-message
        started = time.monotonic()
        assert m.stop(timeout=10) == 0
        waited = time.monotonic() - started
        assert mta.eof()
    assert 0.4 <= waited < 5, waited
    out = m.text
    assert out.index("ABORT callback") < out.index("CLOSE callback") < out.index("main returned")


def test_abort_is_not_called_for_the_abort_postfix_sends_after_a_completed_message(tclrun):
    """The manual: the abort callback "is not invoked if message transmission is completed".
    A script without an envfrom callback had MAIL skipped (SMFIP_NOMAIL), which makes ABORT legal
    between messages: Postfix's ABORT after every message, accepted or rejected, called the abort
    callback of a message that had ended with its eom or its verdict (TclMilter 1.0, which
    registers every libmilter callback to let scripts register theirs at any time, never skips
    MAIL). An ABORT in the middle of a message still calls it."""
    m = tclrun(TCL_HELPERS + r"""
        package require TclMilter
        proc eoh {ctx} { if {[incr ::messages] == 2} { return SMFIS_REJECT }; return SMFIS_CONTINUE }
        proc eom {ctx} { R eom$::messages called; return SMFIS_CONTINUE }
        proc aborted {ctx} { R abort[incr ::aborts] "after $::messages messages" }
        milter register eoh eoh
        milter register eom eom
        milter register abort aborted
        milter main
    """)
    with m.mta() as mta:
        mta.negotiate()
        assert mta.message()["eom"] == [("c", b"")]
        mta.abort()  # Postfix, after a completed message
        assert ok(mta.mail("<second@example.org>")) and ok(mta.rcpt("<rcpt@example.com>"))
        assert ok(mta.data()) and ok(mta.header("Subject", "second"))
        assert mta.eoh() == ("r", {})
        mta.abort()  # Postfix, after the rejected one
        assert ok(mta.mail("<third@example.org>")) and ok(mta.rcpt("<rcpt@example.com>"))
        mta.abort()  # the client said RSET: a real abort
        mta.quit()
        assert mta.eof()
    assert m.stop() == 0
    assert m.results() == {"eom1": "called", "abort1": "after 2 messages"}


# ---------------------------------------------------------------------------- registering at run time


def test_unregister_and_register_at_run_time(tclrun):
    m = tclrun(TCL_HELPERS + r"""
        package require TclMilter
        proc from {ctx list} {
            if {[lindex $list 0] eq "<off@example.org>"} {
                milter register envfrom {}
                R after-unregister "[milter register envfrom]"
            }
            return SMFIS_REJECT
        }
        proc helo {ctx host} {
            if {$host eq "on"} { milter register envfrom from }
            return SMFIS_CONTINUE
        }
        milter register envfrom from
        milter register helo helo
        milter main
    """)
    with m.mta() as mta:
        mta.negotiate()
        assert mta.mail("<a@example.org>") == ("r", {})
        assert mta.mail("<off@example.org>") == ("r", {})
        assert mta.mail("<b@example.org>") == ("c", {})  # unregistered: the default, continue
    with m.mta() as mta:  # the next connection does not even ask for MAIL
        _, protocol = mta.negotiate()
        assert protocol & K.SMFIP_NOMAIL
        assert mta.helo("on") == ("c", {})
    with m.mta() as mta:
        _, protocol = mta.negotiate()
        assert not protocol & K.SMFIP_NOMAIL
        assert mta.mail("<c@example.org>") == ("r", {})
    assert m.stop() == 0
    assert m.results()["after-unregister"] == ""


def test_callbacks_registered_per_message_work_and_do_not_pile_up(tclrun):
    """Registering in a callback, once per message, as the manual allows: each registration made
    a new alias (two for body) that was never deleted, so a long-running milter kept growing. The
    callbacks registered so (also the one re-registering itself while it runs) work."""
    m = tclrun(TCL_HELPERS + r"""
        package require TclMilter
        proc from {ctx list} {
            milter register envfrom from          ;# itself, while it runs
            milter register body [list collect [lindex $list 0]]
            return SMFIS_CONTINUE
        }
        proc collect {sender ctx block} { R body "$sender [string length $block]"; return SMFIS_CONTINUE }
        milter register envfrom from
        milter register body {collect none}  ;# so that the MTA sends the body
        milter main
    """)
    with m.mta() as mta:
        mta.negotiate()
        for n in range(3):
            steps = mta.message(sender=f"<s{n}@example.org>", body="caf\u00e9\r\n".encode())
            assert steps["mail"] == ("c", {})
    assert m.stop() == 0
    assert [ln.rstrip() for ln in m.text.splitlines() if ln.startswith("R\tbody")] == [
        f"R\tbody\t<s{n}@example.org> 6" for n in range(3)]


def test_replaced_and_unregistered_callbacks_leave_no_command_behind(tcl_host) -> None:
    host = tcl_host
    host.child_call("proc", "cb", "args", "return SMFIS_CONTINUE")

    def aliases() -> int:
        return len(host.tk.splitlist(host.tk.call("interp", "aliases", "")))

    before = aliases()
    for n in range(200):
        host.child_call("milter", "register", "body", f"cb {n}")
        host.child_call("milter", "register", "eom", "cb")
    assert aliases() == before + 3  # the body callback's two, the eom callback's one
    host.child_call("milter", "register", "body", "")
    host.child_call("milter", "register", "eom", "")
    assert aliases() == before


# ---------------------------------------------------------------------------- errors


def test_callback_error_is_logged_with_errorinfo_and_tempfailed(tclrun):
    m = tclrun(r"""
        package require TclMilter
        proc inner {x} { error "boom $x" }
        proc helo {ctx host} {
            inner 42
            return SMFIS_CONTINUE
        }
        milter register helo helo
        milter main
    """)
    with m.mta() as mta:
        mta.negotiate()
        assert mta.helo() == ("t", {})
    with m.mta() as mta:  # the milter is still serving
        mta.negotiate()
        assert mta.helo() == ("t", {})
    assert m.stop() == 0
    out = m.text
    at = out.index("boom 42")
    info = out[at:]
    # (errorInfo's lines follow the line, indented: logline.escape_lines)
    for piece in ['while executing\n  "error "boom $x"', '(procedure "inner" line 1)', 'invoked from within\n  "inner 42"',
                  '(procedure "helo" line 2)']:
        assert piece in info, (piece, info)
    assert "helo" in out[:at].splitlines()[-1]  # the log line names the callback


def test_a_callback_that_takes_too_few_arguments_is_named_in_tcls_wrong_args_as_registered(tclrun):
    """A callback registered while serving (no start-time check sees it) whose proc takes fewer
    arguments than its event passes: Tcl's message named the alias pytclmilter calls it through,
    `should be "::tclmilter::cb3 ctx"`, a command in no script; tclsh, and TclMilter 1.0 calling
    the callback itself, name it as the script registered it."""
    m = tclrun(r"""
        package require TclMilter
        proc from {ctx list} { return SMFIS_CONTINUE }
        proc short {ctx} { return SMFIS_CONTINUE }
        proc prefixed {word ctx} { return SMFIS_CONTINUE }
        proc helo {ctx host} { milter register envfrom $host; return SMFIS_CONTINUE }
        milter register envfrom from
        milter register helo helo
        milter main
    """)
    for registered in ("short", "prefixed X"):
        with m.mta() as mta:
            mta.negotiate()
            assert mta.helo(registered) == ("c", {})
            assert mta.mail("<a@example.org>") == ("t", {})
    assert m.stop() == 0
    failed = [ln for ln in m.text.splitlines() if "failed (" in ln]
    assert len(failed) == 2, m.text
    assert 'envfrom callback short failed (wrong # args: should be "short ctx")' in failed[0]
    assert 'envfrom callback prefixed X failed (wrong # args: should be "prefixed X ctx")' in failed[1]
    assert '\n  wrong # args: should be "short ctx"\n' in m.text  # errorInfo's first line too
    assert "::tclmilter::cb" not in m.text


def test_a_callback_failing_the_same_way_for_every_message_logs_its_trace_once(tclrun):
    """A callback whose database is down failed for every message with the same ten lines of
    errorInfo each time: a flood under load. Each failure keeps its line (its own message and
    answer); the trace of the same place is logged once and referred to after that; another
    place, or another callback, gets its own."""
    m = tclrun(r"""
        package require TclMilter
        proc lookup {who} { error "db down for $who" }
        proc helo {ctx host} {
            if {$host eq "other"} { error "elsewhere" }
            lookup $host
        }
        milter register helo helo
        milter main
    """)
    for host in ("a.example", "b.example", "other", "c.example"):
        with m.mta() as mta:
            mta.negotiate()
            assert mta.helo(host) == ("t", {})
    assert m.stop() == 0
    out = m.text
    assert out.count('(procedure "lookup" line 1)') == 1, out
    assert out.count('while executing\n  "error "elsewhere"') == 1, out
    first = re.search(r"ERROR: (conn#\d+): helo callback helo failed \(db down for a.example\), answering "
                      r"SMFIS_TEMPFAIL:\n  db down for a.example\n    while executing", out)
    assert first, out
    for host, conn in (("b.example", 2), ("c.example", 4)):
        assert re.search(rf"ERROR: conn#{conn}: helo callback helo failed \(db down for {host}\), answering "
                         rf"SMFIS_TEMPFAIL \(the same trace as {first.group(1)}'s at \d\d:\d\d:\d\d\)\n", out), out


def test_onerror_chooses_the_answer_to_a_failed_callback(tclrun):
    m = tclrun(r"""
        package require TclMilter
        milter configure -onerror SMFIS_CONTINUE
        proc helo {ctx host} {
            if {$host eq "switch"} { milter configure -onerror SMFIS_REJECT; return SMFIS_CONTINUE }
            error "failing on purpose"
        }
        milter register helo helo
        milter main
    """)
    with m.mta() as mta:
        mta.negotiate()
        assert mta.helo("a") == ("c", {})
        assert mta.helo("switch") == ("c", {})
        assert mta.helo("b") == ("r", {})
    assert m.stop() == 0
    assert m.text.count("failing on purpose") >= 2


def test_modifications_made_before_an_eom_error_go_with_an_onerror_that_keeps_the_message(tclrun):
    """docs/tcl-reference.md: the modifications an eom callback made before its Tcl error are sent
    when -onerror is continue or accept (libmilter sends each as it is made), dropped with tempfail."""
    m = tclrun(r"""
        package require TclMilter
        proc eom {ctx} {
            $ctx addheader X-Before-Error yes
            milter configure -onerror [$ctx getpriv onerror]
            error "failing on purpose"
        }
        proc from {ctx argv} { $ctx setpriv onerror [string trim [lindex $argv 0] <>]; return SMFIS_CONTINUE }
        milter register envfrom from
        milter register eom eom
        milter main
    """)
    header = ("h", b"X-Before-Error\0yes\0")
    for onerror, replies in (("SMFIS_CONTINUE", [header, ("c", b"")]), ("SMFIS_ACCEPT", [header, ("a", b"")]),
                             ("SMFIS_TEMPFAIL", [("t", b"")])):
        with m.mta() as mta:
            mta.negotiate()
            assert mta.mail(f"<{onerror}>") == ("c", {})
            assert mta.eom() == replies, onerror
    assert m.stop() == 0
    assert m.text.count("eom callback eom failed (failing on purpose)") == 3, m.text


def test_uncaught_script_error_exits_1_with_errorinfo(tclrun):
    m = tclrun(r"""
        package require TclMilter
        proc setup {} { no_such_command here }
        setup
    """, wait=False)
    assert m.wait_exit() == 1
    assert 'invalid command name "no_such_command"' in m.text
    assert '(procedure "setup" line 1)' in m.text


def test_verdict_does_not_silence_the_next_message(tclrun):
    """Every message gets its callbacks, also when the filter has no envfrom callback.

    Bug: the engine resets its per-message state (``_done``, deferred verdict)
    only on MAIL or ABORT. A filter without an envfrom callback asks the MTA to
    skip MAIL, and an MTA that sends no ABORT after a finished message
    (Sendmail) then gets every later message on the connection continued
    without any callback: after one reject, the rest of the session is not
    filtered at all.
    """
    m = tclrun(r"""
        package require TclMilter
        proc eom {ctx} {
            set n [expr {[catch {$ctx getpriv n} v] ? 1 : $v + 1}]
            $ctx setpriv n $n
            if {$n == 1} { return SMFIS_REJECT }
            $ctx addheader X-Message $n
            return SMFIS_CONTINUE
        }
        milter register eom eom
        milter main
    """)
    with m.mta() as mta:
        _, protocol = mta.negotiate()
        assert protocol & K.SMFIP_NOMAIL
        assert mta.message()["eom"] == [("r", b"")]
        assert mta.message()["eom"] == [("h", b"X-Message\x002\0"), ("c", b"")]
        assert mta.message()["eom"] == [("h", b"X-Message\x003\0"), ("c", b"")]
    assert m.stop() == 0


# ---------------------------------------------------------------------------- exit, argv, event loop


def test_exit_in_a_callback_ends_the_process_with_its_code(tclrun):
    m = tclrun(r"""
        package require TclMilter
        proc helo {ctx host} { exit 7 }
        milter register helo helo
        milter main
        puts "not reached"
    """)
    with m.mta() as mta:
        mta.negotiate()
        mta.send_raw("H", z("bye.example.net"))
        assert mta.eof()
    assert m.wait_exit() == 7
    assert "not reached" not in m.text


def test_exit_after_main_and_argv(tclrun):
    m = tclrun(r"""
        package require TclMilter
        puts "argv0=$argv0"
        puts "argc=$argc"
        set i 0
        foreach a $argv { puts "argv[incr i]=<$a>" }
        milter main
        puts "main returned"
        exit 3
    """, args=["two words", "-x", "--connection", "unix:/tmp/not-this.sock"], name="argv-script.tcl")
    assert m.spec.startswith("inet:")  # script arguments are not options
    assert m.stop() == 3
    out = m.text
    (script,) = [a for a in m.argv if a.endswith("argv-script.tcl")]
    assert f"argv0={script}\n" in out
    assert "argc=4" in out
    assert "argv1=<two words>\nargv2=<-x>\nargv3=<--connection>\nargv4=<unix:/tmp/not-this.sock>" in out
    assert "main returned" in out


def test_tcl_event_loop_runs_during_main(tclrun):
    m = tclrun(r"""
        package require TclMilter
        set ::ticks 0
        proc tick {} { incr ::ticks; after 10 tick }
        after 10 tick
        proc accept {chan addr port} {
            fconfigure $chan -buffering line -translation lf
            fileevent $chan readable [list got $chan]
        }
        proc got {chan} {
            if {[gets $chan line] >= 0} { set ::line $line; puts $chan "echo $line" } else { close $chan }
        }
        set srv [socket -server accept -myaddr 127.0.0.1 0]
        puts "TCLPORT [lindex [fconfigure $srv -sockname] 2]"
        proc helo {ctx host} {
            after 20 {set ::flag done}
            vwait ::flag
            $ctx setreply 550 5.7.1 "ticks=[expr {$::ticks > 0}] flag=$::flag line=$::line"
            return SMFIS_REJECT
        }
        milter register helo helo
        milter main
    """)
    port = int(m.wait_for(r"TCLPORT (\d+)", since=0).group(1))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:  # fileevent while milter main runs
        s.sendall(b"hello tcl\n")
        assert s.makefile("rb").readline() == b"echo hello tcl\n"
    with m.mta() as mta:
        mta.negotiate()
        assert mta.helo() == ("y", {"smtpcode": "550", "space": " ", "text": "5.7.1 ticks=1 flag=done line=hello tcl"})
    assert m.stop() == 0


def test_callback_commands_are_called_through_a_resolved_tcl_object(tcl_host) -> None:
    """A Tcl callback is invoked through a Tcl object that caches its command look-up (Tcl's
    cmdName type): tkinter passes it on as it is instead of making a string object per call."""
    from pytclmilter.tcl.callbacks import command_object

    host = tcl_host
    obj = command_object(host.tk, "::set")
    assert getattr(obj, "typename", None) == "cmdName" and str(obj) == "::set"
    assert host.tk.call(obj, "::x", "42") == "42"  # and it calls the command
    assert command_object(host.tk, "::no_such_command") == "::no_such_command"  # unresolvable: the name
    assert not host.tk.call("info", "exists", "::tclmilter::py::cmdobj")  # no variable left behind


BACKGROUND_ERRORS = r"""
package require TclMilter
proc boom {} { error "boom\nERROR: forged line" }
after 50 boom
after 200 {
    proc ::bgerror {message} { puts "script's bgerror: $message" }
    after 10 {error handled}
}
after 400 {
    proc ::bgerror {message} { error "bgerror broke" }
    after 10 {error unhandled}
}
after 600 {milter stop}
milter main
"""


FAILING_LOOP = r"""
package require TclMilter
proc tick {} { after 20 tick; error "boom [incr ::n]" }
after 20 tick
proc other {} { error "other" }
after 300 other
after 1500 {puts "ticked $::n times"; milter stop}
milter main
"""


def test_a_timer_that_fails_over_and_over_is_logged_once_not_flooded(tclrun):
    """A timer that failed and rescheduled itself logged each failure with its errorInfo (47
    ERROR lines in 3 s); now the first is logged whole and the same failure again is counted,
    its count logged at most once a minute (unit: test_logs.py), and at the latest at stop: it
    was told only by the next failure after the minute, and a script stopped (or fixed by a
    reload) before that never said how often it had failed. Another place is logged too."""
    m = tclrun(FAILING_LOOP)
    assert m.wait_exit(15) == 0, m.output
    text = m.text.replace("\r\n", "\n")
    ticks = int(re.search(r"ticked (\d+) times", text).group(1))
    assert ticks > 20, text
    errors = re.findall(r"ERROR: .*", text)
    assert errors[:2] == ["ERROR: error in an event handler of the script (after, fileevent): boom 1",
                          "ERROR: error in an event handler of the script (after, fileevent): other"], text
    assert len(errors) == 3, text
    told = re.fullmatch(r"ERROR: error in an event handler of the script \(after, fileevent\): boom (\d+) \(repeated "
                        r"(\d+) times since its last line with the trace; logged once a minute\)", errors[2])
    assert told, text
    # (a tick may come between the puts and the stop)
    assert int(told.group(1)) in (ticks, ticks + 1) and int(told.group(2)) == int(told.group(1)) - 1, text
    assert ("boom 1\n  boom 1\n    while executing\n  \"error \"boom [incr ::n]\" \"\n"
            "    (procedure \"tick\" line 1)\n") in text, text  # its errorInfo, once
    assert text.count('(procedure "tick" line 1)') == 1, text


def test_errors_of_timers_go_to_the_log_or_to_the_scripts_bgerror(tclrun):
    """An error in an `after` (or `fileevent`) handler is logged escaped, with its errorInfo,
    where Tcl printed it raw on stderr (a forged log line with it); a script's own bgerror proc
    gets it first, as in Tcl, and its own error is logged with the original one."""
    m = tclrun(BACKGROUND_ERRORS)
    assert m.wait_exit(15) == 0, m.output
    text = m.text.replace("\r\n", "\n")
    assert "ERROR: error in an event handler of the script (after, fileevent): boom\\nERROR: forged line\n" \
           "  boom\n  ERROR: forged line\n    while executing\n" in text, text
    assert "\nERROR: forged line" not in text
    assert "script's bgerror: handled" in text
    assert "error in an event handler of the script (after, fileevent): bgerror failed to handle a background " \
           "error: bgerror broke (the error: unhandled)\n  bgerror broke\n" in text, text



CHILD_BACKGROUND_ERRORS = r"""
package require TclMilter
interp create kid
kid eval {after 0 [list error "from <a\x1b\[2J@b>\nERROR: forged line"]}
kid eval {
    interp create grandchild
    grandchild eval {after 0 {error "in the grandchild"}}
    interp create own
    own eval {proc bgerror {message} { puts "own bgerror: $message" }; after 0 {error "handled"}}
}
interp create -safe safe
safe eval {after 0 {error "a safe interpreter's, dropped by Tcl"}}
after 300 {milter stop}
milter main
"""


def test_errors_of_timers_in_the_scripts_own_interpreters_are_logged(tclrun):
    """An `after` handler's error in an interpreter the script created (`interp create`, and in
    those) was printed by Tcl raw on stderr: an MTA's text in it forged a journal line. Now it
    is logged as the script's own handlers' errors are, after the interpreter's own bgerror."""
    m = tclrun(CHILD_BACKGROUND_ERRORS)
    assert m.wait_exit(15) == 0, m.output
    text = m.text
    what = "ERROR: error in an event handler of the script (after, fileevent): "
    assert what + "from <a\\x1b[2J@b>\\nERROR: forged line\n  from <a\\x1b[2J@b>\n  ERROR: forged line\n" in text, text
    assert "\x1b" not in text and "\nERROR: forged" not in text, text
    assert what + "in the grandchild\n  in the grandchild\n    while executing\n" in text, text
    assert "own bgerror: handled" in text and "safe interpreter" not in text, text


#: The growth's thresholds lowered and its counts made every 0.05 s (5 s in production).
LOW_GROWTH_THRESHOLDS = """
from pytclmilter.tcl import growth


def setup(milter):
    growth.AFTER_EVENTS, growth.THREADS, growth.POOLS, growth.CHECK_EVERY = 10, 3, 3, 0.05
"""


def _connections(m, count: int) -> None:
    """``count`` MTA connections, one after the other, each through its connect callback."""
    for _ in range(count):
        with m.mta() as mta:
            mta.negotiate()
            assert mta.connect() == ("c", {})


def test_after_events_that_keep_growing_are_told_once_then_when_they_double(tclrun):
    """A timer set at every connection and never cancelled grew without a word until memory ran
    out. Now one warning when their number reaches the threshold (10 here, 1000 by default),
    not one a connection nor one a count, and the next only when it has doubled."""
    m = tclrun(r"""
        package require TclMilter
        proc connect {ctx host addr} { after 3600000 {set ::late 1}; after 3600000 {set ::late 2}; return SMFIS_CONTINUE }
        milter register connect connect
        milter main
    """, python=[LOW_GROWTH_THRESHOLDS])
    told = r"WARNING: the script has (\d+) pending `after` events: a timer set at every connection or message"
    _connections(m, 8)  # 16 events: told once, and no more until 2 x what was told (20 or more)
    first = int(m.wait_for(told).group(1))
    assert 10 <= first <= 16
    time.sleep(0.15)  # three counts more
    _connections(m, 12)  # 40 events
    second = int(m.wait_for(told).group(1))  # (the cursor is past the first)
    assert 2 * first <= second <= 40
    time.sleep(0.15)
    assert m.stop() == 0
    assert len(re.findall(told, m.text)) == 2, m.text
    assert "`after cancel`" in m.text and "threads of the Thread package" not in m.text, m.text


#: In the script's interpreter: ::listed counts the `after info` that list every pending event
#: (by Tcl's own `after`, which the milter calls: prelude.py's OWN_AFTER).
COUNT_AFTER_INFO = r"""
set ::listed 0
proc listed {command op} { if {[lrange $command 1 end] eq "info"} { incr ::listed } }
trace add execution ::tclmilter::py::after enter listed
"""


def test_the_idle_check_does_not_list_the_pending_after_events_at_every_tick(tcl_host, monkeypatch) -> None:
    """The tick asked `quiet` every 20 ms, and `quiet` lists every pending `after` event (Tcl 8.6
    has no cheaper way to know there is one): 33 ms of CPU a tick at 100 000 events, more than
    the tick. Now a tick that found something pending polls for a while (RECHECK_AFTER) without
    asking again; a quiet script is asked at every tick, so its first timer fires at the next."""
    from pytclmilter.tcl import interp

    monkeypatch.setattr(interp, "RECHECK_AFTER", 0.25)
    host = tcl_host
    host.child_call("eval", COUNT_AFTER_INFO)

    def ticks(count: int) -> int:
        """`after info` listings over ``count`` ticks."""
        host.child_call("set", "::listed", 0)
        for _ in range(count):
            host.service_events()
        return int(host.child_call("set", "::listed"))

    assert ticks(5) == 5  # quiet: asked at every tick
    host.child_call("after", 0, "set ::fired first")
    host.service_events()
    assert host.child_call("set", "::fired") == "first"  # the quiet script's first timer, at the next tick
    host.child_call("eval", "for {set i 0} {$i < 500} {incr i} { after 3600000 {} }")
    host.child_call("after", 0, "set ::fired second")
    assert ticks(20) <= 2  # (one more on a machine that stalls past RECHECK_AFTER): was 20
    assert host.child_call("set", "::fired") == "second"  # and a due one still fires within a tick
    host.child_call("eval", "foreach id [after info] { after cancel $id }")
    time.sleep(0.25)
    assert ticks(5) == 5  # quiet again: asked at every tick, nothing polled


@pytest.mark.parametrize("redefine", [
    "rename after _after; proc after args { incr ::ran; _after {*}$args }",
    "proc after args { incr ::ran }",  # (replaced: Tcl's own is gone for the script)
], ids=["renamed", "replaced"])
def test_the_idle_check_and_the_growth_count_call_tcls_own_after_not_the_scripts(tcl_host, redefine, caplog) -> None:
    """The milter's idle check and growth count called `after info` by name in the script's
    interpreter, so a script's own `after` proc ran there, outside the callbacks' time limit:
    one that looped hung every connection. Now they call Tcl's own, which still sees the events
    the script set before and after, and the script's `after` is as it made it."""
    from pytclmilter.tcl import growth

    host = tcl_host
    host.child_call("eval", f"set ::ran 0; after 3600000 {{}}; {redefine}")
    assert host.tk.splitlist(host.child_call("::tcl::info::procs", "after")) == ("after",)
    with pytest.MonkeyPatch.context() as patch, caplog.at_level("WARNING", "pytclmilter"):
        patch.setattr(growth, "AFTER_EVENTS", 1)
        host.service_events()  # (the first tick counts: no count is due before it)
    assert int(host.child_call("expr", "$::ran")) == 0
    assert "the script has 1 pending `after` events" in caplog.text
    host.child_call("after", 0, "set ::fired 1")  # the script's own, called by the script
    assert int(host.child_call("expr", "$::ran")) == 1


def test_namespace_import_autoloads_as_tcls_after_the_own_commands_are_kept(tcl_host) -> None:
    """Keeping Tcl's own `after` and `fconfigure` (prelude.py's kept_own) holds Tcl's `auto_import`
    aside while it imports them, and puts it back: without it, `namespace import` of a command the
    autoloader knows but has not loaded failed, `unknown namespace in import pattern`, where
    tclsh imports it (here ::safe::interpCreate, from Tcl's own tclIndex), in the script's
    interpreter and in one it creates."""
    host = tcl_host
    imported = "namespace import ::safe::interpCreate; namespace origin interpCreate"
    assert host.child_call("eval", imported) == "::safe::interpCreate"
    assert host.child_call("eval", f"interp create c; c eval {{{imported}}}") == "::safe::interpCreate"


def test_a_safe_interpreter_is_made_though_it_has_no_fconfigure(tcl_host) -> None:
    """An interpreter the script creates gets the escaping `puts` and, where it has one, Tcl's own
    `fconfigure` kept (prelude.py's kept_own). A safe one has none (hidden): nothing is kept
    there, and it is made as Tcl makes it (keeping a missing command failed its making, `can't
    rename "::fconfigure"`, and the script with it)."""
    host = tcl_host
    assert str(host.child_call("eval", "interp create -safe s; s eval {expr {6 * 7}}")) == "42"
    assert str(host.child_call("s", "eval", "info commands fconfigure")) == ""


def test_the_flush_at_stop_calls_tcls_own_fconfigure_not_the_scripts(tcl_host, tmp_path) -> None:
    """At a stop the milter makes the script's channels non-blocking before flushing them. It
    called `fconfigure` by name in the script's interpreter, so a script's own `fconfigure` proc
    ran there, outside the callbacks' time limit (one that looped hung the stop). Now it calls
    Tcl's own, and the channel is still made non-blocking."""
    host = tcl_host
    path = str(tmp_path / "out.txt")
    host.child_call("eval", "set ::ran 0; rename fconfigure _fconfigure; "
                    "proc fconfigure args { incr ::ran; _fconfigure {*}$args }")
    channel = host.child_call("open", path, "w")
    host.child_call("puts", "-nonewline", channel, "held")
    host.flush_channels(True)
    assert int(host.child_call("expr", "$::ran")) == 0
    assert host.child_call("_fconfigure", channel, "-blocking") in ("0", 0)
    assert (tmp_path / "out.txt").read_text() == "held"
