"""`pytclmilter run --dry-run` (and `milter configure -dryrun 1`): the callbacks run, the MTA gets
continue and no modification, and what would have been sent is logged and counted as "would ...".

The MTA side is tests/support/tclrun.py (miltertest and raw frames), over real sockets.
"""

from __future__ import annotations

import pytest

from support.tclrun import TCL_HELPERS, ok, tclrun_factory
from test_metrics import METRICS, message, value, value_or_zero, wait_value

tclrun = pytest.fixture(tclrun_factory, name="tclrun")

SCRIPT = TCL_HELPERS + r"""
package require TclMilter 1.0
R dryrun [milter configure -dryrun]
proc ef {ctx list} {
    if {[string match *spam@* [lindex $list 0]]} {
        $ctx setreply 550 5.7.1 "no spam\tplease"
        return SMFIS_REJECT
    }
    return SMFIS_CONTINUE
}
proc eom {ctx} {
    $ctx addheader X-Filter "checked\n\tby \u202eus"
    $ctx quarantine "held for review"
    return SMFIS_CONTINUE
}
milter register envfrom ef
milter register eom eom
milter main
"""


def test_dry_run_answers_continue_without_modifications_and_logs_what_would_have_been_sent(tclrun) -> None:
    m = tclrun(SCRIPT, "--dry-run", "--metrics", "inet:0@127.0.0.1")
    url = m.wait_for(METRICS, since=0).group(1)
    assert m.results()["dryrun"] == "1"

    with m.mta() as mta:  # a rejected sender: the MTA hears continue all the way, and accepts
        mta.negotiate()
        assert ok(mta.connect()) and ok(mta.helo())
        assert ok(mta.mail("<spam@example.org>"))
        assert ok(mta.rcpt("<rcpt@example.com>")) and ok(mta.data()) and ok(mta.eoh())
        assert mta.eom() == [("c", b"")]
        mta.quit()
    with m.mta() as mta:  # a message the script changes: no modification reaches the MTA
        assert message(mta, "<good@example.org>") == ("c", [("c", b"")])
        mta.quit()

    m.wait_for(r'conn#1: verdict would reject at envfrom client=\S+ from=<spam@example\.org> '
               r'reply="550 5\.7\.1 no spam\\tplease"')
    # the header's fold and its right-to-left override, from the script, are escaped in the log line
    m.wait_for(r"conn#2: would addheader X-Filter: checked\\n\\tby \\u202eus\r?\n")
    m.wait_for(r"conn#2: would quarantine held for review\r?\n")
    m.wait_for(r"conn#2: verdict would accept at eom ")
    assert "would addheader" not in m.text.split("conn#2")[0]  # the rejected message's eom never ran

    s = wait_value(url, "pytclmilter_connections_open", 0)
    assert value(s, "pytclmilter_verdicts_total", verdict="reject", stage="envfrom", dry_run="true") == 1
    assert value(s, "pytclmilter_verdicts_total", verdict="accept", stage="eom", dry_run="true") == 1
    assert not [k for k in s if k[0] == "pytclmilter_verdicts_total" and ("dry_run", "false") in k[1]]
    assert value(s, "pytclmilter_modifications_total", action="addheader", dry_run="true") == 1
    assert value(s, "pytclmilter_modifications_total", action="quarantine", dry_run="true") == 1
    assert value_or_zero(s, "pytclmilter_modifications_total", action="addheader", dry_run="false") == 0
    assert m.stop() == 0
    assert ("verdicts: would accept=1, would addheader=1, would quarantine=1, would reject=1, "
            "callback errors=0") in m.text


def test_dryrun_is_a_milter_configure_option(tclrun) -> None:
    script = SCRIPT.replace("R dryrun [milter configure -dryrun]",
                            "R before [milter configure -dryrun]\n"
                            "milter configure -dryrun yes\n"
                            "R after [milter configure -dryrun]\n"
                            "R bad [catch {milter configure -dryrun maybe} msg] \n R msg $msg")
    m = tclrun(script)
    r = m.results()
    assert (r["before"], r["after"], r["bad"]) == ("0", "1", "1")
    assert r["msg"] == 'expected boolean value but got "maybe"'
    with m.mta() as mta:
        mta.negotiate()
        assert ok(mta.connect()) and ok(mta.helo()) and ok(mta.mail("<spam@example.org>"))
    m.wait_for(r"conn#1: verdict would reject at envfrom ")
    assert m.stop() == 0


# What a script may write for a boolean option: Tcl's own words, and Tcl's refusals
BOOLEAN_FORMS = ["0", "1", "t", "TR", "true", "f", "Fals", "y", "Ye", "n", "NO", "on", "of", "OFF",
                 "o", "", "00", "2", "-1", " 1", "1 ", "yess", "0x1", "1.0", "maybe", "no" * 40]


def test_dryrun_takes_the_booleans_tcl_takes(tcl_host):
    """`milter configure -dryrun` parses as Tcl's own option parsers do (Tcl_GetBoolean), judged
    against this very Tcl: prefixes such as `t` or `of` are booleans, `2` or ` 1` are not."""
    import tkinter

    tk = tkinter.Tcl().tk
    host = tcl_host
    host.child_call("package", "require", "TclMilter")
    for form in BOOLEAN_FORMS:
        try:
            expected: object = "1" if tk.getboolean(form) else "0"
        except tkinter.TclError as exc:
            expected = str(exc)
        try:
            host.child_call("milter", "configure", "-dryrun", form)
            got: object = host.child_call("milter", "configure", "-dryrun")
        except tkinter.TclError as exc:
            got = str(exc)
        assert str(got) == expected, form


def test_dry_run_failure_line_says_continue_went_to_the_mta(tclrun) -> None:
    """A failing callback under -dryrun: the MTA gets continue, and the error line says so (it
    used to say "answering SMFIS_REJECT", the -onerror answer that was never sent)."""
    script = SCRIPT.replace("package require TclMilter 1.0",
                            "package require TclMilter 1.0\nmilter configure -dryrun 1 -onerror SMFIS_REJECT")
    script = script.replace("if {[string match", "if {[string match *boom@* [lindex $list 0]]} {error kaboom}\n"
                                                  "    if {[string match")
    m = tclrun(script)
    with m.mta() as mta:
        mta.negotiate()
        assert ok(mta.connect()) and ok(mta.helo()) and ok(mta.mail("<boom@example.org>"))
    m.wait_for(r"conn#1: verdict would reject at envfrom ")
    line = next(s for s in m.text.splitlines() if "envfrom callback ef failed" in s)
    assert line.endswith("(kaboom), would answer SMFIS_REJECT; answering continue:")
    assert m.stop() == 0
