"""End to end through a real Postfix: SMTP client -> Postfix -> our milter -> Postfix -> smtp-sink.

The Python engine and the TclMilter blacklist example, each behind a private
Postfix instance (see tests/support/postfix.py), as a mail admin would deploy them.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pexpect
import pytest

from pytclmilter import CONTINUE, REJECT, Milter, MilterError

pytestmark = pytest.mark.postfix

ROOT = Path(__file__).resolve().parents[1]
BLACKLIST = ROOT / "tclmilter" / "examples" / "blacklist.tcl"


def message(sender: str, subject: str, body: bytes = b"Hello.\r\n") -> bytes:
    return (
        f"From: {sender}\r\nTo: rcpt@example.com\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject.replace(' ', '.')}@test>\r\n\r\n"
    ).encode() + body


def run_in_thread(milter: Any) -> threading.Thread:
    """Serve ``milter`` from a thread of its own; back once it listens."""
    thread = threading.Thread(target=milter.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while milter.listening is None:
        assert time.monotonic() < deadline, "milter did not start"
        time.sleep(0.01)
    return thread


def served(milter: Milter) -> Iterator[Milter]:
    """A fixture's body: ``milter`` served from its own thread, stopped at teardown."""
    thread = run_in_thread(milter)
    yield milter
    milter.stop()
    thread.join(10)
    assert not thread.is_alive()


@pytest.fixture
def python_milter() -> Iterator[Milter]:
    """A Python filter: rejects one sender, stamps and rewrites marked mail, quarantines another."""
    milter = Milter(name="e2e", connection="inet:0@127.0.0.1", grace=1)

    @milter.register("envfrom")
    def envfrom(ctx, args):
        if args[0].lower() == "<bad@example.org>":
            ctx.setreply("550", "5.7.1", "sender blocked by e2e")
            return REJECT
        return CONTINUE

    @milter.register("header")
    def header(ctx, name, value):
        if name.lower() == "subject":
            ctx.setpriv("subject", value)

    @milter.register("body")
    def body(ctx, chunk):
        ctx.setpriv("body", ctx.getpriv("body", b"") + chunk)

    @milter.register("eom")
    def eom(ctx):
        subject = ctx.getpriv("subject", "")
        ctx.addheader("X-E2E", f"seen {ctx.getsymval('i') or 'no-queue-id'}")
        if "rewrite" in subject:
            ctx.replacebody(b"Replaced by the milter.\r\n")
        if "hold" in subject:
            ctx.quarantine("held by e2e")
        ctx.unsetpriv("body")

    yield from served(milter)


def test_rejected_sender_gets_5xx_at_mail_from(postfix, python_milter: Milter) -> None:
    pf = postfix(milter=python_milter.listening.postfix())
    result = pf.send("bad@example.org", ["rcpt@example.com"], message("bad@example.org", "spam"))
    assert result.mail is not None and result.mail.code == 550, result
    assert "5.7.1 sender blocked by e2e" in result.mail.text
    assert not result.accepted


def test_added_header_and_replaced_body_arrive(postfix, python_milter: Milter) -> None:
    pf = postfix(milter=python_milter.listening.postfix())
    plain = pf.send("good@example.org", ["rcpt@example.com"], message("good@example.org", "plain"))
    rewritten = pf.send("good@example.org", ["rcpt@example.com"],
                        message("good@example.org", "please rewrite", b"Original body.\r\n"))
    assert plain.accepted and rewritten.accepted
    delivered = {m.message["Subject"]: m for m in pf.wait_for_sink(2)}
    stamp = delivered["plain"].message["X-E2E"]
    assert stamp.startswith("seen ") and stamp != "seen no-queue-id"  # Postfix's queue id via macro i
    assert delivered["plain"].body.rstrip() == b"Hello."
    assert delivered["please rewrite"].body.rstrip() == b"Replaced by the milter."
    assert delivered["please rewrite"].message["X-E2E"].startswith("seen ")


def test_quarantine_puts_message_on_hold(postfix, python_milter: Milter) -> None:
    pf = postfix(milter=python_milter.listening.postfix())
    result = pf.send("good@example.org", ["rcpt@example.com"], message("good@example.org", "hold me"))
    assert result.accepted
    held = pf.wait_for_queue("hold", 1)
    assert held[0]["sender"] == "good@example.org"
    assert pf.sink_messages() == []


def test_eight_bit_body_passes_unchanged(postfix, python_milter: Milter) -> None:
    """A filter that only reads the body must not alter a byte of it (smtp-sink drops CRs: compare LFs)."""
    # Lines stay under SMTP's 998-byte limit (Postfix would fold longer ones); > 64 KiB spans chunks.
    body = bytes(range(0x80, 0x100)) + b"\r\ncaf\xc3\xa9 \xff\xfe invalid utf-8\r\n" + (b"x" * 78 + b"\r\n") * 1000
    pf = postfix(milter=python_milter.listening.postfix())
    result = pf.send("good@example.org", ["rcpt@example.com"], message("good@example.org", "binary", body))
    assert result.accepted
    (msg,) = pf.wait_for_sink(1)
    assert msg.body.rstrip(b"\n") == body.replace(b"\r", b"").rstrip(b"\n")


@pytest.fixture
def blacklist_milter(tmp_path: Path) -> Iterator[str]:
    """The manual's example, unmodified, run on a test port; yields Postfix's address for it."""
    child = pexpect.spawn(
        sys.executable,
        ["-m", "pytclmilter.cli", "run", str(BLACKLIST), "--connection", "inet:0@127.0.0.1"],
        cwd=str(tmp_path), encoding="utf-8", timeout=20, use_poll=True
    )
    child.expect(r"Blacklist listening on inet:(\d+)@127\.0\.0\.1")
    port = int(child.match.group(1))
    yield f"inet:127.0.0.1:{port}"
    child.kill(15)
    child.expect(pexpect.EOF)
    child.wait()
    assert child.exitstatus == 0, child.before


def test_blacklist_example_behind_postfix(postfix, blacklist_milter: str) -> None:
    pf = postfix(milter=blacklist_milter)
    by_envelope = pf.send("spammer@spamdomain.com", ["rcpt@example.com"],
                          message("spammer@spamdomain.com", "from a spammer"))
    assert by_envelope.mail is not None and by_envelope.mail.code // 100 == 5, by_envelope
    by_header = pf.send("innocent@example.org", ["rcpt@example.com"],
                        message("friend@public.com", "header from friend"))
    assert not by_header.accepted and by_header.data is not None and by_header.data.code // 100 == 5
    fine = pf.send("innocent@example.org", ["rcpt@example.com"], message("innocent@example.org", "fine"))
    assert fine.accepted, fine
    (msg,) = pf.wait_for_sink(1)
    assert msg.message["Subject"] == "fine"
    assert re.search(r"milter-reject", pf.log_text())


def test_a_digit_right_after_the_reply_code_is_a_malformed_reply_to_postfix(postfix) -> None:
    """Why setreply refuses a text that starts with a digit when no extended code comes first
    (docs/protocol.md 6.5): Postfix 3.7 reads the character after the code's space as the start of
    an extended code, so "550 4 apples left" is a malformed reply and the client gets 451 4.3.5;
    with the extended code given, or opening the text, the digit passes."""
    milter = Milter(name="digits", connection="inet:0@127.0.0.1", grace=1)
    refused: list[str] = []

    @milter.register("envfrom")
    def envfrom(ctx, args):
        local = args[0].strip("<>").split("@")[0]
        if local == "bare":
            try:
                ctx.setreply("550", None, "4 apples left")
            except MilterError as exc:
                refused.append(str(exc))
            ctx.reply_text = "550 4 apples left"  # what setreply used to send
        elif local == "given":
            ctx.setreply("550", "5.7.1", "4 apples left")
        elif local == "opening":
            ctx.setreply("550", None, "5.7.1 go away")
        return REJECT

    thread = run_in_thread(milter)
    try:
        pf = postfix(milter=milter.listening.postfix())
        replies = {local: pf.send(f"{local}@example.org", ["rcpt@example.com"],
                                  message(f"{local}@example.org", local)).mail
                   for local in ("bare", "given", "opening")}
    finally:
        milter.stop()
        thread.join(10)
    assert refused == ['reply text "4 apples left" starts with a digit, which MTAs read as an extended code: '
                       "give the extended code too, like 5.0.0"]
    assert str(replies["bare"]).startswith("451 4.3.5"), replies
    assert "malformed reply: 550 4 apples left" in pf.maillog_path.read_text(errors="replace")
    assert str(replies["given"]) == "550 5.7.1 4 apples left", replies
    assert str(replies["opening"]) == "550 5.7.1 go away", replies


def reply_lines(smtp: Any, command: str) -> list[str]:
    """The reply to ``command`` as the client reads it, every line with its codes (smtplib strips them)."""
    smtp.send(command + "\r\n")
    lines: list[str] = []
    while not lines or lines[-1][3:4] == "-":
        lines.append(smtp.file.readline().decode().rstrip("\r\n"))
    return lines


def test_an_extended_code_given_twice_reaches_the_client_once(postfix) -> None:
    """A script that gives the extended code and also opens its text with it, or gives setmlreply
    none and opens a line with one, asked for one code: libmilter would put both (its setmlreply
    adds 5.0.0 when none is given) and Postfix passes the text on as it is (docs/protocol.md 6.5)."""
    milter = Milter(name="codes", connection="inet:0@127.0.0.1", grace=1)
    calls: dict[str, Any] = {
        "twice": lambda ctx: ctx.setreply("550", "5.7.1", "5.7.1 go away"),
        "mlopening": lambda ctx: ctx.setmlreply("550", None, "5.7.1 go away", "see the policy"),
        "mltwice": lambda ctx: ctx.setmlreply("550", "5.7.1", "5.7.1 go away", "5.7.1 see the policy"),
        "bare": lambda ctx: ctx.setreply("550", None, "go away"),
    }

    @milter.register("envfrom")
    def envfrom(ctx, args):
        calls[args[0].strip("<>").split("@")[0]](ctx)
        return REJECT

    thread = run_in_thread(milter)
    try:
        pf = postfix(milter=milter.listening.postfix())
        with pf.smtp_session() as smtp:
            smtp.ehlo("client.example")
            replies = {local: reply_lines(smtp, f"MAIL FROM:<{local}@example.org>") for local in calls}
    finally:
        milter.stop()
        thread.join(10)
    assert replies == {
        "twice": ["550 5.7.1 go away"],
        "mlopening": ["550-5.7.1 go away", "550 5.7.1 see the policy"],
        "mltwice": ["550-5.7.1 go away", "550 5.7.1 see the policy"],
        "bare": ["550 go away"],  # as set: Postfix adds no extended code (Sendmail adds 5.0.0)
    }


@pytest.fixture
def state_milter() -> Iterator[tuple[Milter, list[str]]]:
    """Callbacks for envrcpt, data, header, unknown, helo, envfrom and eom, none for eoh: the
    headers may be answered late (NR_HDR) and end of headers is skipped (NOEOH)."""
    milter = Milter(name="states", connection="inet:0@127.0.0.1", grace=1)
    calls: list[str] = []

    def record(event: str, verdict: Any = CONTINUE) -> Any:
        def callback(ctx: Any, *args: Any) -> Any:
            first = args[0] if args else ""
            calls.append(f"{event} {first[0] if isinstance(first, list) else first}".strip())
            return verdict(*args) if callable(verdict) else verdict
        return callback

    milter.register("helo", record("helo", lambda name: REJECT if name == "bad.example" else CONTINUE))
    milter.register("envfrom", record("envfrom", lambda args: REJECT if "spam" in args[0] else CONTINUE))
    for event in ("envrcpt", "data", "header", "unknown", "eom"):
        milter.register(event, record(event))
    thread = run_in_thread(milter)
    yield milter, calls
    milter.stop()
    thread.join(10)


def test_an_unknown_command_and_a_headerless_message_are_filtered_behind_postfix(postfix, state_milter) -> None:
    """Postfix passes a client's unknown command between RCPT and DATA on, and sends no header
    for a message without one (it hides its own Received:): both used to end the filter's
    session as a protocol error, and Postfix tempfailed the mail. Postfix passes the command's
    first word only (docs/tcl-reference.md; Sendmail, the whole line)."""
    milter, calls = state_milter
    pf = postfix(milter=milter.listening.postfix())
    with pf.smtp_session() as smtp:
        smtp.ehlo("client.example")
        assert smtp.mail("a@example.org")[0] == 250 and smtp.rcpt("b@example.com")[0] == 250
        assert smtp.docmd("XFOO some {args}")[0] == 500
        assert smtp.data(message("a@example.org", "after an unknown command"))[0] == 250
        assert smtp.mail("a@example.org")[0] == 250 and smtp.rcpt("b@example.com")[0] == 250
        assert smtp.data(b"\r\nNo header at all.\r\n")[0] == 250
    assert len(pf.wait_for_sink(2)) == 2
    assert calls.count("eom") == 2 and "unknown XFOO" in calls


def test_an_ehlo_after_a_rejected_mail_is_checked_behind_postfix(postfix, state_milter) -> None:
    """A verdict at MAIL is the message's: the next EHLO must still reach the helo callback."""
    milter, calls = state_milter
    pf = postfix(milter=milter.listening.postfix())
    with pf.smtp_session() as smtp:
        assert smtp.ehlo("client.example")[0] == 250
        assert smtp.mail("spam@example.org")[0] == 550
        assert smtp.ehlo("bad.example")[0] == 250  # Postfix answers a rejected EHLO at MAIL (protocol.md 10.6)
        assert smtp.mail("a@example.org")[0] == 550
    assert calls == ["helo client.example", "envfrom <spam@example.org>", "helo bad.example"]


def test_a_header_line_with_an_8bit_name_ends_the_header_section(postfix) -> None:
    """Why chgheader takes only RFC 5322 names (docs/python-api.md): Postfix 3.7's is_header()
    refuses 8-bit bytes, so such a line opens the body; the filter sees the headers before it
    only, and the line is delivered as the body's first, unchanged."""
    milter = Milter(name="e2e", connection="inet:0@127.0.0.1", grace=1)
    names: list[str] = []
    milter.register("header", lambda ctx, name, value: names.append(name) or CONTINUE)
    thread = run_in_thread(milter)
    try:
        pf = postfix(milter=milter.listening.postfix())
        raw = b"From: a@example.org\r\nX-\xe9t\xe9: one\r\nSubject: s\r\n\r\nbody\r\n"
        assert pf.send("a@example.org", ["rcpt@example.com"], raw).accepted
        (msg,) = pf.wait_for_sink(1)
    finally:
        milter.stop()
        thread.join(10)
    assert names == ["From"], names
    assert msg.body.startswith(b"X-\xe9t\xe9: one\nSubject: s\n\nbody"), msg.raw


@pytest.fixture
def deleting_milter() -> Iterator[Milter]:
    """A filter whose eom deletes each recipient its X-Delete headers name, as written there."""
    milter = Milter(name="delrcpt", connection="inet:0@127.0.0.1", grace=1)

    @milter.register("header")
    def header(ctx, name, value):
        if name.lower() == "x-delete":
            ctx.setpriv("delete", [*ctx.getpriv("delete", []), value.strip()])

    @milter.register("eom")
    def eom(ctx):
        for rcpt in ctx.getpriv("delete", []):
            ctx.delrcpt(rcpt)
        ctx.unsetpriv("delete")

    yield from served(milter)


def test_delrcpt_behind_postfix_matches_with_or_without_brackets_and_case_exactly(
        postfix, deleting_milter: Milter) -> None:
    """docs/tcl-reference.md said only "as envrcpt received it". Postfix's cleanup parses the
    address (so `<b@example.com>` and `b@example.com` are one) and compares it byte for byte with
    the recipient as the client gave it (`<B@example.com>`, `<b@EXAMPLE.COM>` delete nothing); deleting the only
    recipient still answers 250, and the message goes nowhere."""
    pf = postfix(milter=deleting_milter.listening.postfix())
    cases = {"brackets": "<b@example.com>", "bare": "b@example.com", "case": "<B@Example.com>",
             "user": "<B@example.com>", "domain": "<b@EXAMPLE.COM>"}
    for subject, delete in cases.items():
        body = message("a@example.org", subject).replace(b"\r\n\r\n", f"\r\nX-Delete: {delete}\r\n\r\n".encode(), 1)
        assert pf.send("a@example.org", ["b@example.com", "c@example.com"], body).accepted, subject
    got = {m.message["Subject"]: sorted(m.recipients) for m in pf.wait_for_sink(5)}
    both = ["b@example.com", "c@example.com"]
    assert got == {"brackets": ["c@example.com"], "bare": ["c@example.com"], "case": both, "user": both,
                   "domain": both}, got
    last = message("a@example.org", "last").replace(b"\r\n\r\n", b"\r\nX-Delete: <b@example.com>\r\n\r\n", 1)
    result = pf.send("a@example.org", ["b@example.com"], last)
    assert result.accepted and result.data is not None and result.data.code == 250, result
    pf.wait_for_log(rf"{result.queue_id}: removed")  # (after "nrcpt=1 (queue active)": no delivery, no bounce)
    assert len(pf.sink_messages()) == 5 and pf.queue() == []
