"""The example filters and the command set behind a real Sendmail 8.17, TclMilter's home MTA.

Each test starts a private Sendmail (tests/support/sendmail.py: Debian's packages unpacked
privately, in its own network namespace) whose milter is ``pytclmilter run`` of a script, sends
mail over SMTP, and looks at the SMTP replies and at what reached the sink. What Sendmail does
differently from Postfix is asserted here and documented in docs/deployment.md.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from support.postfix import SendResult
from support.sendmail import PrivateSendmail, milter_socket_path, sendmail_factory
from support.tclrun import tclrun_factory

pytestmark = pytest.mark.sendmail

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "tclmilter" / "examples"
DATA = REPO / "tests" / "data"

sendmail = pytest.fixture(sendmail_factory, name="sendmail")
milter = pytest.fixture(tclrun_factory, name="milter")
# Not below the temp dir: see the DontBlameSendmail test in test_sendmail_e2e.py.
socket_path = pytest.fixture(milter_socket_path, name="socket_path")


def message(sender: str, subject: str, body: bytes = b"Hello.\r\n", extra: bytes = b"") -> bytes:
    return (f"From: {sender}\r\nTo: rcpt@example.com\r\nSubject: {subject}\r\n".encode()
            + extra + b"\r\n" + body)


def test_the_blacklist_example_runs_verbatim_behind_sendmail(sendmail, milter, socket_path: Path) -> None:
    run = milter(EXAMPLES / "blacklist.tcl", connection=f"unix:{socket_path}")
    sm = sendmail(f"unix:{socket_path}").start()
    by_envelope = sm.send("spammer@spamdomain.com", ["rcpt@example.com"], message("spammer@spamdomain.com", "x"))
    assert by_envelope.mail is not None and by_envelope.mail.code // 100 == 5, by_envelope
    by_header = sm.send("innocent@example.org", ["rcpt@example.com"], message("friend@public.com", "y"))
    assert by_header.data is not None and by_header.data.code // 100 == 5, by_header
    fine = sm.send("innocent@example.org", ["rcpt@example.com"], message("innocent@example.org", "fine"))
    assert fine.accepted, fine
    (msg,) = sm.wait_for_sink(1)
    assert msg.message["Subject"] == "fine"
    run.wait_for(r"verdict reject at envfrom .*from=<spammer@spamdomain\.com>")
    run.wait_for(r"verdict reject at header")


CONTENT_ONLY = r"""
package require TclMilter 1.0
proc header {ctx name value} {
    if {$name eq "Subject" && $value eq "spam"} { return SMFIS_REJECT }
    return SMFIS_CONTINUE
}
proc body {ctx block} { return SMFIS_CONTINUE }
proc eom {ctx} {
    $ctx addheader X-Filtered yes
    return SMFIS_CONTINUE
}
milter register header header
milter register body body
milter register eom eom
milter main
"""


def test_the_message_after_one_rejected_before_its_end_is_filtered(sendmail, milter, socket_path: Path) -> None:
    """A filter without envfrom and abort callbacks has MAIL skipped; Sendmail then sends no
    ABORT for a message decided before its end of message (here by a header verdict, answered at
    the first body chunk), only the next message's macros (docs/protocol.md §10.1). The next
    message of the SMTP session must still get every callback."""
    milter(CONTENT_ONLY, connection=f"unix:{socket_path}")
    sm = sendmail(f"unix:{socket_path}").start()
    with sm.smtp_session() as smtp:
        smtp.ehlo("client.test")
        replies = []
        for subject in ("spam", "ham"):
            assert smtp.mail("a@client.test")[0] == 250
            assert smtp.rcpt("b@example.com")[0] == 250
            replies.append(smtp.data(message("a@client.test", subject))[0])
    assert replies == [554, 250]  # Sendmail's default text for a reject at the body
    (msg,) = sm.wait_for_sink(1)
    assert msg.message["Subject"] == "ham"
    assert msg.headers("X-Filtered") == ["yes"]


def test_the_stamp_example_reads_sendmails_macros(sendmail, milter, socket_path: Path) -> None:
    milter(EXAMPLES / "stamp.tcl", connection=f"unix:{socket_path}")
    sm = sendmail(f"unix:{socket_path}").start()
    assert sm.send("a@client.test", ["b@example.com"], message("a@client.test", "stamp me")).accepted
    (msg,) = sm.wait_for_sink(1)
    stamp = " ".join(msg.headers("X-Filtered-By")[0].split())
    assert re.fullmatch(r"Stamp on mx\.sendmail\.test \(daemon MTA\); queue-id \w+; "
                        r"client localhost \[127\.0\.0\.1\] port \d+", stamp), stamp


SUBJECT_AND_PORT = r"""
package require TclMilter 1.0
proc neg {ctx version actions protocol} {
    if {$::argv eq "with-eoh"} { $ctx setsymlist eoh {{daemon_addr}} }
    $ctx setsymlist eom {{daemon_port}}
    return SMFIS_CONTINUE
}
proc eom {ctx} {
    $ctx addheader Subject "added by the filter"
    $ctx addheader X-Daemon-Port "port=[$ctx getsymval {{daemon_port}}]"
    return SMFIS_CONTINUE
}
milter register negotiate neg
milter register eom eom
milter main
"""


def test_addheader_of_a_name_already_present_goes_before_it(sendmail, milter, socket_path: Path) -> None:
    """Sendmail links an added header before an existing one of the same name; Postfix appends."""
    milter(SUBJECT_AND_PORT, connection=f"unix:{socket_path}")
    sm = sendmail(f"unix:{socket_path}").start()
    assert sm.send("a@client.test", ["b@example.com"], message("a@client.test", "original")).accepted
    (msg,) = sm.wait_for_sink(1)
    assert msg.headers("Subject") == ["added by the filter", "original"]


@pytest.mark.parametrize(("argv", "port"), [("eom-only", ""), ("with-eoh", "25")])
def test_an_end_of_message_symlist_is_used_only_with_an_end_of_headers_one(
        sendmail, milter, socket_path: Path, argv: str, port: str) -> None:
    """Sendmail sends the macros a filter asked for at end of message only if it asked for an
    end-of-headers list too ({daemon_port} is in no default list)."""
    milter(SUBJECT_AND_PORT, connection=f"unix:{socket_path}", args=[argv])
    sm = sendmail(f"unix:{socket_path}").start()
    assert sm.send("a@client.test", ["b@example.com"], message("a@client.test", "macros")).accepted
    (msg,) = sm.wait_for_sink(1)
    assert msg.headers("X-Daemon-Port") == [f"port={port}"]


EDITS = r"""
package require TclMilter 1.0
proc eom {ctx} {
    foreach edit $::argv { $ctx {*}$edit }
    return $::status
}
proc envfrom {ctx from} {
    if {[info exists ::env(PROGRESS_AT_ENVFROM)]} { $ctx progress }
    return SMFIS_CONTINUE
}
set status [expr {[info exists ::env(EOM_STATUS)] ? $::env(EOM_STATUS) : "SMFIS_CONTINUE"}]
milter register envfrom envfrom
milter register eom eom
milter main
"""


def edited(sendmail, milter, socket_path: Path, edits: list[str], extra: bytes = b"",
           env: dict[str, str] | None = None) -> tuple[PrivateSendmail, SendResult]:
    """Sendmail and its replies to a message (with ``extra`` after its Subject) whose eom callback
    made ``edits``: context subcommands with their arguments, as Tcl lists."""
    milter(EDITS, connection=f"unix:{socket_path}", args=edits, env=env)
    sm = sendmail(f"unix:{socket_path}").start()
    return sm, sm.send("a@client.test", ["b@example.com"], message("a@client.test", "first", extra=extra))


def edited_headers(sendmail, milter, socket_path: Path, edits: list[str], extra: bytes = b"") -> list[tuple[str, str]]:
    """The headers that reach the sink after an eom callback made ``edits``."""
    sm, result = edited(sendmail, milter, socket_path, edits, extra)
    assert result.accepted, result
    (msg,) = sm.wait_for_sink(1)
    return [(str(name), str(value)) for name, value in msg.message.items()]


def test_a_header_index_above_2147483647_means_past_the_last_header(sendmail, milter, socket_path: Path) -> None:
    """Sendmail reads the index as a signed int: 4294967295 would be -1, the first header, so an
    insheader meant for the end went to the top and a chgheader deleted the first Subject."""
    headers = edited_headers(sendmail, milter, socket_path,
                             ["insheader X-Last 4294967295 last", "chgheader Subject 4294967295 {}"],
                             extra=b"Subject: second\r\n")
    assert headers[-1] == ("X-Last", "last")
    assert [v for n, v in headers if n == "Subject"] == ["first", "second"]


def test_addheader_goes_before_its_own_earlier_one_and_replaces_a_default_header(
        sendmail, milter, socket_path: Path) -> None:
    """Sendmail links each added header before the first of its name, the filter's own included,
    so two addheader of one name arrive in reverse order; a Message-Id added to a message that
    had none replaces the one Sendmail made instead of adding a second."""
    headers = edited_headers(sendmail, milter, socket_path, [
        "addheader X-Note one", "addheader X-Note two", "addheader Message-Id <filter@example.org>",
        "insheader X-Top {at the top}",
    ])
    assert [v for n, v in headers if n == "X-Note"] == ["two", "one"]
    assert [v for n, v in headers if n == "Message-Id"] == ["<filter@example.org>"]
    assert headers[0] == ("X-Top", "at the top")  # above Sendmail's own Received:


@pytest.mark.parametrize(("edit", "subjects"), [
    ("chgheader subject changed", ["changed", "second"]),  # index 1, any case
    ("chgheader Subject 2 changed", ["first", "changed"]),
    ("chgheader Subject 0 zero", ["zero", "second"]),
    ("chgheader Subject 3 added", ["added", "first", "second"]),  # beyond the count: added, before the first
    ("chgheader SUBJECT 1 {}", ["second"]),
    ("chgheader X-Missing {}", ["first", "second"]),  # nothing to delete
])
def test_chgheader_behind_sendmail(sendmail, milter, socket_path: Path, edit: str, subjects: list[str]) -> None:
    headers = edited_headers(sendmail, milter, socket_path, [edit], extra=b"Subject: second\r\n")
    assert [v for n, v in headers if n.lower() == "subject"] == subjects
    assert "X-Missing" not in [n for n, _ in headers]


def test_chgheader_of_a_header_the_client_did_not_send_changes_sendmails_own(
        sendmail, milter, socket_path: Path) -> None:
    """The message has no Date: Sendmail's own is the one changed (or deleted)."""
    headers = edited_headers(sendmail, milter, socket_path, ["chgheader Date {}", "chgheader Message-Id 1 <c@x>"])
    assert "Date" not in [n for n, _ in headers]
    assert [v for n, v in headers if n == "Message-Id"] == ["<c@x>"]


@pytest.mark.parametrize(("edits", "status", "code", "text"), [
    (["setmlreply 550 5.7.1 one two"], "SMFIS_REJECT", 550, "5.7.1 one\n5.7.1 two"),
    (["setmlreply 451 {} later"], "SMFIS_TEMPFAIL", 451, "4.0.0 later"),
    (["setmlreply 550 {} {5.7.1 one} two"], "SMFIS_REJECT", 550, "5.7.1 one\n5.7.1 two"),  # not 5.0.0 5.7.1
    (["setreply 550 5.7.1 {5.7.1 once}"], "SMFIS_REJECT", 550, "5.7.1 once"),
    (["setreply 550 {no code}"], "SMFIS_REJECT", 550, "5.0.0 no code"),  # Sendmail's (Postfix adds none)
    (["setreply 451 4.7.1 {100%% sure}"], "SMFIS_TEMPFAIL", 451, "4.7.1 100% sure"),
    (["setreply 550 5.7.1 unused"], "SMFIS_TEMPFAIL", 451, "4.3.2 Please try again later"),  # not its class
    (["addheader X-Dropped yes"], "SMFIS_REJECT", 554, "5.7.1 Command rejected"),
    (["setreply 550 5.7.1 {caf\u00e9 \u20ac}"], "SMFIS_REJECT", 550, "5.7.1 cafC) b\x02,"),  # 8th bit cleared
])
def test_replies_at_end_of_message_reach_the_client(sendmail, milter, socket_path: Path, edits: list[str],
                                                    status: str, code: int, text: str) -> None:
    sm, result = edited(sendmail, milter, socket_path, edits, env={"EOM_STATUS": status})
    assert result.data is not None and (result.data.code, result.data.text) == (code, text), result
    assert sm.sink_messages() == []


def test_progress_at_end_of_message(sendmail, milter, socket_path: Path) -> None:
    sm, result = edited(sendmail, milter, socket_path, ["progress", "addheader X-Progress yes", "progress"])
    assert result.accepted, result
    (msg,) = sm.wait_for_sink(1)
    assert msg.headers("X-Progress") == ["yes"]


def test_progress_before_end_of_message_fails_the_filter(sendmail, milter, socket_path: Path) -> None:
    """Sendmail takes progress only while it waits for the end-of-message answer; anywhere else it
    is a "bogus response" that puts the filter in its error state (F=T: tempfail)."""
    sm, result = edited(sendmail, milter, socket_path, [], env={"PROGRESS_AT_ENVFROM": "1"})
    assert result.rcpt["b@example.com"].code == 451, result
    assert sm.sink_messages() == []


def test_recipients_with_esmtp_arguments_and_the_body(sendmail, milter, socket_path: Path) -> None:
    """addrcpt with ESMTP arguments (Sendmail parses them all), delrcpt as envrcpt received it,
    and a replaced body with bare LF line ends and no final line end."""
    sm, result = edited(sendmail, milter, socket_path, [
        "addrcpt <new@example.com> {NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b@example.com}",
        "delrcpt <b@example.com>", "replacebody {line one\nline two}",
    ])
    assert result.accepted, result
    (msg,) = sm.wait_for_sink(1)
    assert msg.rcpt_args == ("<new@example.com> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b@example.com",)
    assert msg.body.rstrip(b"\n") == b"line one\nline two"


@pytest.mark.parametrize("args", ["NOTIFY=BOGUS", "X-UNKNOWN=1"])
def test_addrcpt_with_an_argument_sendmail_refuses_loses_the_recipient_and_garbles_the_session(
        sendmail, milter, socket_path: Path, args: str) -> None:
    """Sendmail parses addrcpt's ESMTP arguments as it parses RCPT's: one it refuses (a keyword it
    does not know, a bad NOTIFY) drops that recipient without a word to the filter, and writes a
    stray line (`...olderrors=0, Errors=1`) to the SMTP client ahead of its reply to the message,
    which a client then reads as that reply (docs/tcl-reference.md, "Where Postfix and Sendmail
    differ"). Postfix ignores what it does not honour and adds the recipient."""
    sm, result = edited(sendmail, milter, socket_path, [f"addrcpt <new@example.com> {args}"])
    assert result.data is not None and result.data.code == -1 and "Errors=1" in result.data.text, result
    (msg,) = sm.wait_for_sink(1)
    assert msg.recipients == ["b@example.com"]


def test_chgfrom_with_empty_esmtp_arguments_keeps_the_mail_parameters(sendmail, milter, socket_path: Path) -> None:
    """An empty argument field made Sendmail reset the MAIL parameters and relay an empty AUTH=."""
    sm, result = edited(sendmail, milter, socket_path, ["chgfrom <new@example.org> {}"])
    assert result.accepted, result
    (msg,) = sm.wait_for_sink(1)
    assert msg.mail_args == "<new@example.org>"


def test_an_empty_replacement_body(sendmail, milter, socket_path: Path) -> None:
    sm, result = edited(sendmail, milter, socket_path, ["replacebody {}"])
    assert result.accepted, result
    (msg,) = sm.wait_for_sink(1)
    assert msg.body.strip(b"\n") == b""


def test_a_replaced_body_line_longer_than_990_bytes_is_broken_by_sendmail(sendmail, milter, socket_path: Path) -> None:
    """Sendmail's SMTP mailers (L=990) break a longer line into lines of 990 bytes, ending each
    but the last with `!` and starting the next with a space: a replacement body of one
    2 000-byte line reaches the next hop as three lines, its bytes otherwise intact (base64
    without line ends would be corrupted; deployment.md, Sendmail)."""
    sm, result = edited(sendmail, milter, socket_path, ["replacebody " + "a" * 2000])
    assert result.accepted, result
    (msg,) = sm.wait_for_sink(1)
    assert msg.body.rstrip(b"\n").split(b"\n") == [b"a" * 989 + b"!", b" " + b"a" * 988 + b"!", b" " + b"a" * 23]


MACROS = r"""
package require TclMilter 1.0
proc look {ctx stage} {
    foreach name {i {i} {{i}} j {daemon_name} {{daemon_name}} {{mail_addr}} {{msg_id}}} {
        $ctx setpriv "$stage $name" [$ctx getsymval $name]
    }
}
proc envfrom {ctx from} { look $ctx envfrom; return SMFIS_CONTINUE }
proc eom {ctx} {
    look $ctx eom
    foreach {key value} [$ctx getpriv] { $ctx addheader X-Macro "$key=$value" }
    return SMFIS_CONTINUE
}
milter register envfrom envfrom
milter register eom eom
milter main
"""


def test_macros_by_name_and_stage(sendmail, milter, socket_path: Path) -> None:
    """Sendmail's defaults: i and {mail_addr} with MAIL, {msg_id} at end of message, j and
    {daemon_name} with the connection; a letter finds its braced form and the reverse; a long
    name without its braces in the value finds nothing (deployment.md, tcl-reference.md)."""
    milter(MACROS, connection=f"unix:{socket_path}")
    sm = sendmail(f"unix:{socket_path}").start()
    assert sm.send("a@client.test", ["b@example.com"], message("a@client.test", "macros")).accepted
    (msg,) = sm.wait_for_sink(1)
    seen = dict(h.split("=", 1) for h in msg.headers("X-Macro"))
    queue_id = re.search(r"with ESMTP id (\w+)", msg.message["Received"]).group(1)
    for stage in ("envfrom", "eom"):
        assert [seen[f"{stage} {name}"] for name in ("i", "{i}", "j", "daemon_name", "{daemon_name}")] == \
            [queue_id, queue_id, "mx.sendmail.test", "", "MTA"]
        assert seen[f"{stage} {{mail_addr}}"] == "a@client.test"
    assert seen["envfrom {msg_id}"] == ""
    assert seen["eom {msg_id}"] == msg.message["Message-Id"]


def test_quarantine_holds_the_message_with_its_reason(sendmail, milter, socket_path: Path) -> None:
    milter("""
        package require TclMilter 1.0
        proc eom {ctx} { $ctx quarantine "held: suspicious"; return SMFIS_CONTINUE }
        milter register eom eom
        milter main
    """, connection=f"unix:{socket_path}")
    sm = sendmail(f"unix:{socket_path}").start()
    assert sm.send("a@client.test", ["b@example.com"], message("a@client.test", "hold me")).accepted
    (name, control), = sm.queue_files().items()
    assert name.startswith("hf")  # Sendmail's name for a quarantined control file
    assert "\nqheld: suspicious\n" in control
    assert sm.sink_messages() == []


def test_the_rcptrewrite_example_changes_the_envelope(sendmail, milter, socket_path: Path) -> None:
    milter(EXAMPLES / "rcptrewrite.tcl", connection=f"unix:{socket_path}")
    sm = sendmail(f"unix:{socket_path}").start()
    result = sm.send("noreply@legacy.example.com", ["info@example.com", "keep@example.com"],
                     message("noreply@legacy.example.com", "rewrite"))
    assert result.accepted, result
    (msg,) = sm.wait_for_sink(1)
    assert sorted(re.sub(r"[<>]", "", r) for r in msg.rcpt_args) == \
        ["alice@example.com", "bob@example.com", "keep@example.com"]
    assert msg.mail_from == "noreply@example.com"
    assert msg.headers("X-Rcpt-Rewritten")


def test_the_sizepolicy_example_replaces_an_exe_attachment(sendmail, milter, socket_path: Path) -> None:
    milter(EXAMPLES / "sizepolicy.tcl", connection=f"unix:{socket_path}")
    sm = sendmail(f"unix:{socket_path}").start()
    eml = (DATA / "exe.eml").read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    assert sm.send("billing@invoices.example.net", ["bob@example.com"], eml).accepted
    (msg,) = sm.wait_for_sink(1)
    assert msg.headers("X-Size-Policy") == ['body removed (attachment "invoice.exe" is not allowed)']
    assert b"invoice.exe" in msg.body and b"TVqQAAMAAAAEAAAA" not in msg.body


def test_an_8bit_body_collected_and_replaced_comes_back_byte_for_byte(sendmail, milter, socket_path: Path) -> None:
    """The manual's idiom (collect the body with setpriv, replacebody at eom) on Latin-1 and
    invalid UTF-8 spanning several 64 KiB body blocks."""
    milter("""
        package require TclMilter 1.0
        proc body {ctx block} {
            if {[catch {$ctx getpriv body} sofar]} { set sofar "" }
            $ctx setpriv body "$sofar$block"
            return SMFIS_CONTINUE
        }
        proc eom {ctx} { $ctx replacebody [$ctx getpriv body]; return SMFIS_CONTINUE }
        milter register body body
        milter register eom eom
        milter main
    """, connection=f"unix:{socket_path}")
    sm = sendmail(f"unix:{socket_path}").start()
    line = bytes(range(0xA0, 0x100)) + b" caf\xe9 \xff\xfe \xc3\xa9\r\n"
    body = line * (150_000 // len(line))
    assert sm.send("a@client.test", ["b@example.com"], message("a@client.test", "8-bit", body)).accepted
    (msg,) = sm.wait_for_sink(1)
    assert msg.body.rstrip(b"\n") == body.replace(b"\r", b"").rstrip(b"\n")  # the sink drops CRs


def test_a_socket_under_a_world_writable_directory_needs_dont_blame_sendmail(sendmail, milter, tmp_path: Path) -> None:
    """/tmp is world-writable (sticky): Sendmail refuses a milter socket below it unless
    DontBlameSendmail=TrustStickyBit."""
    sock = tmp_path / "milter.sock"  # pytest's tmp_path lies below /tmp
    milter(EXAMPLES / "stamp.tcl", connection=f"unix:{sock}")
    with pytest.raises(Exception, match="unsafe: World writable directory"):
        sendmail(f"unix:{sock}").start()
    sm = sendmail(f"unix:{sock}", mc=["define(`confDONT_BLAME_SENDMAIL', `TrustStickyBit')"]).start()
    assert sm.send("a@client.test", ["b@example.com"], message("a@client.test", "trusted")).accepted
    (msg,) = sm.wait_for_sink(1)
    assert msg.headers("X-Filtered-By")


def test_two_workers_on_an_inet_socket_serve_sendmail(sendmail, milter) -> None:
    """--workers 2 on TCP, the milter inside Sendmail's namespace; every message stamped."""
    sm = sendmail("inet:8891@127.0.0.1").start_namespace()
    run = milter(EXAMPLES / "stamp.tcl", "--workers", "2", connection="inet:8891@127.0.0.1", prefix=sm.nsenter())
    sm.start()
    for i in range(6):
        assert sm.send("a@client.test", ["b@example.com"], message("a@client.test", f"m{i}")).accepted
    msgs = sm.wait_for_sink(6)
    assert all(m.headers("X-Filtered-By") for m in msgs)
    assert run.stop() == 0


def test_a_header_line_with_an_8bit_name_ends_the_header_section(sendmail, milter, socket_path: Path) -> None:
    """Why chgheader takes only RFC 5322 names (docs/tcl-reference.md): Sendmail 8.17 ends the
    header section at such a line, which opens the body; the filter sees the headers before it
    only."""
    m = milter("""
        package require TclMilter 1.0
        proc header {ctx name value} { puts stderr "HEADER <$name>"; return SMFIS_CONTINUE }
        milter register header header
        milter main
    """, connection=f"unix:{socket_path}")
    sm = sendmail(f"unix:{socket_path}").start()
    raw = b"From: a@client.test\r\nX-\xe9t\xe9: one\r\nSubject: s\r\n\r\nbody\r\n"
    assert sm.send("a@client.test", ["b@example.com"], raw).accepted
    (msg,) = sm.wait_for_sink(1)
    assert re.findall(r"HEADER <[^>]*>", m.output) == ["HEADER <From>"], m.output
    assert msg.body.startswith(b"X-\xe9t\xe9: one\nSubject: s\n\nbody"), msg.raw


DELETES = r"""
package require TclMilter 1.0
proc header {ctx name value} {
    if {[string equal -nocase $name X-Delete]} { $ctx setpriv delete [string trim $value] }
    return SMFIS_CONTINUE
}
proc eom {ctx} {
    if {![catch {$ctx getpriv delete} rcpt]} { $ctx delrcpt $rcpt; $ctx unsetpriv delete }
    return SMFIS_CONTINUE
}
milter register header header
milter register eom eom
milter main
"""


def test_delrcpt_behind_sendmail_matches_with_or_without_brackets_and_case_exactly(
        sendmail, milter, socket_path: Path) -> None:
    """docs/tcl-reference.md said only "as envrcpt received it". Sendmail parses the address (so
    `<b@example.com>` and `b@example.com` are one) and compares user and domain case-sensitively
    (`<B@example.com>`, `<b@EXAMPLE.COM>` delete nothing); deleting the only recipient still
    answers 250, and the message goes nowhere: no delivery, nothing queued."""
    milter(DELETES, connection=f"unix:{socket_path}")
    sm = sendmail(f"unix:{socket_path}").start()
    cases = {"brackets": "<b@example.com>", "bare": "b@example.com", "case": "<B@Example.com>",
             "user": "<B@example.com>", "domain": "<b@EXAMPLE.COM>"}
    for subject, delete in cases.items():
        body = message("a@client.test", subject, extra=f"X-Delete: {delete}\r\n".encode())
        assert sm.send("a@client.test", ["b@example.com", "c@example.com"], body).accepted, subject
    got = {m.message["Subject"]: sorted(m.recipients) for m in sm.wait_for_sink(5)}
    both = ["b@example.com", "c@example.com"]
    assert got == {"brackets": ["c@example.com"], "bare": ["c@example.com"], "case": both, "user": both,
                   "domain": both}, got
    last = sm.send("a@client.test", ["b@example.com"], message("a@client.test", "last",
                                                               extra=b"X-Delete: <b@example.com>\r\n"))
    assert last.accepted and last.data is not None and last.data.code == 250, last
    assert sm.send("a@client.test", ["c@example.com"], message("a@client.test", "after")).accepted
    assert "after" in {m.message["Subject"] for m in sm.wait_for_sink(6)}
    assert [m.message["Subject"] for m in sm.sink_messages()].count("last") == 0 and sm.queue_files() == {}
