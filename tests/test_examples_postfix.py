"""The example filters of tclmilter/examples/, run as their header comments say (`pytclmilter
run X.tcl -- options`) behind the real private Postfix: what reaches the sink is what each
comment promises."""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path
from typing import Callable, Iterator

import pexpect
import pytest

pytestmark = pytest.mark.postfix

EXAMPLES = Path(__file__).resolve().parents[1] / "tclmilter" / "examples"
PARTS = b"""--BB\r
Content-Type: text/plain\r
\r
See attached.\r
--BB\r
%s\r
TVqQAAMAAAAEAAAA\r
--BB--\r
"""


@pytest.fixture
def example(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """Starts `pytclmilter run EXAMPLE --connection inet:0@127.0.0.1 OPTIONS -- ARGS`; each call
    returns Postfix's address for that filter. Every filter must stop cleanly (exit 0)."""
    children: list[pexpect.spawn] = []

    def start(script: str, *options: str, args: tuple[str, ...] = ()) -> str:
        argv = ["-m", "pytclmilter.cli", "run", str(EXAMPLES / script), "--connection", "inet:0@127.0.0.1",
                *options, *(("--", *args) if args else ())]
        child = pexpect.spawn(sys.executable, argv, cwd=str(tmp_path), encoding="utf-8", timeout=20, use_poll=True)
        children.append(child)
        child.expect(r"listening on inet:(\d+)@127\.0\.0\.1")
        return f"inet:127.0.0.1:{child.match.group(1)}"

    yield start
    for child in children:
        child.kill(15)
        child.expect(pexpect.EOF)
        child.wait()
        assert child.exitstatus == 0, child.before


def message(subject: str, headers: bytes = b"", body: bytes = b"Hello.\r\n") -> bytes:
    return (f"From: a@example.org\r\nTo: Sales <sales@example.com>\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject.replace(' ', '.')}@test>\r\n").encode() + headers + b"\r\n" + body


def with_attachment(subject: str, part_headers: bytes) -> bytes:
    return message(subject, b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="BB"\r\n',
                   PARTS % part_headers)


def sent(pf, messages: dict[str, bytes], sender: str = "a@example.org"):
    """Sends each message, returns what reached the sink by subject."""
    for subject, data in messages.items():
        assert pf.send(sender, ["b@example.com"], data).accepted, subject
    return {m.message["Subject"]: m for m in pf.wait_for_sink(len(messages))}


# ---------------------------------------------------------------------------- sizepolicy.tcl


def test_sizepolicy_finds_attachment_names_in_every_form_of_the_parameters(postfix, example) -> None:
    """The names of name= and filename=, in the message's own header and in MIME part headers,
    folded, quoted, nested, in RFC 2231 form, quoted RFC 2047 encoded words (as Outlook and
    Gmail write non-ASCII names; before, "=?UTF-8?B?aW52b2ljZS5leGU=?=" let an invoice.exe
    through). Bug: a name split into RFC 2231 sections
    (filename*0="invoice"; filename*1=".exe", as mail clients write long names) or a quoted
    name holding ";" was not seen, and the .exe reached the recipient; a name holding a control
    character made the notice's header invalid, and every attempt ended in a tempfail."""
    pf = postfix(milter=example("sizepolicy.tcl"))
    part = b"Content-Type: application/octet-stream\r\nContent-Disposition: attachment;"
    nested = (b'--BB\r\nContent-Type: multipart/alternative; boundary="CC"\r\n\r\n--CC\r\n'
              b'Content-Type: text/plain\r\n\r\nx\r\n--CC\r\nContent-Type: application/x-msdownload;\r\n'
              b' name="deep.scr"\r\nContent-Transfer-Encoding: base64\r\n\r\nTVqQ\r\n--CC--\r\n--BB--\r\n')
    messages = {
        "quoted": with_attachment("quoted", part + b' filename="invoice.exe"\r\n'),
        "folded": with_attachment("folded", part + b'\r\n\tfilename="folded.exe"\r\n'),
        "name upper": with_attachment("name upper", b'Content-Type: application/octet-stream; name="X.EXE"\r\n'),
        "rfc2231": with_attachment("rfc2231", part + b" filename*=UTF-8''inv%C3%A9.exe\r\n"),
        "sections": with_attachment("sections", part + b'\r\n filename*0="invoice";\r\n filename*1=".exe"\r\n'),
        "encoded sections": with_attachment(
            "encoded sections", part + b"\r\n filename*0*=UTF-8''inv%C3%A9;\r\n filename*1*=%2Eexe\r\n"),
        "semicolon": with_attachment("semicolon", part + b' filename="a;b.exe"\r\n'),
        "control": with_attachment("control", part + b' filename="a\x1bb.exe"\r\n'),
        "rfc2047": with_attachment("rfc2047", part + b' filename="=?UTF-8?B?aW52b2ljZS5leGU=?="\r\n'),
        "rfc2047 words": with_attachment(
            "rfc2047 words", b'Content-Type: application/octet-stream;\r\n name="=?ISO-8859-1?Q?R=E9sum=E9?=\r\n'
            b' =?UTF-8?Q?_final=2Escr?="\r\n'),
        "nested": message("nested", b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="BB"\r\n', nested),
        "own header": message("own header", b'MIME-Version: 1.0\r\nContent-Type: application/octet-stream;\r\n'
                              b'\tname="own.exe"\r\nContent-Transfer-Encoding: base64\r\n', b"TVqQAAMAAAAEAAAA\r\n"),
        "pdf": with_attachment("pdf", b'Content-Type: application/pdf; name="report.pdf"\r\n'),
    }
    got = sent(pf, messages)
    removed = {subject: m.headers("X-Size-Policy") for subject, m in got.items()}
    assert removed == {
        "quoted": ['body removed (attachment "invoice.exe" is not allowed)'],
        "folded": ['body removed (attachment "folded.exe" is not allowed)'],
        "name upper": ['body removed (attachment "X.EXE" is not allowed)'],
        "rfc2231": ['body removed (attachment "inv?.exe" is not allowed)'],
        "sections": ['body removed (attachment "invoice.exe" is not allowed)'],
        "encoded sections": ['body removed (attachment "inv?.exe" is not allowed)'],
        "semicolon": ['body removed (attachment "a;b.exe" is not allowed)'],
        "control": ['body removed (attachment "a?b.exe" is not allowed)'],
        "rfc2047": ['body removed (attachment "invoice.exe" is not allowed)'],
        "rfc2047 words": ['body removed (attachment "R?sum? final.scr" is not allowed)'],
        "nested": ['body removed (attachment "deep.scr" is not allowed)'],
        "own header": ['body removed (attachment "own.exe" is not allowed)'],
        "pdf": [],
    }
    for subject, msg in got.items():
        if subject == "pdf":
            assert msg.body == messages["pdf"].split(b"\r\n\r\n", 1)[1].replace(b"\r", b"")
            continue
        assert msg.headers("Content-Type") == ["text/plain; charset=us-ascii"], subject
        assert msg.headers("Content-Transfer-Encoding") == [], subject
        assert msg.body.startswith(b"This message was changed by the mail system's size and attachment policy.\n")
        assert b"TVqQ" not in msg.body, subject


def test_sizepolicy_options_maxsize_forbid_and_footer(postfix, example) -> None:
    """-maxsize: a body of exactly that many bytes passes, one byte more is removed; -forbid
    replaces the list of patterns; -footer: a plain-text message gets the original bytes (8-bit,
    invalid UTF-8, a character split between 64 KiB body blocks) and then the footer, while
    other messages are left as they are."""
    limit = 200_000
    pf = postfix(milter=example("sizepolicy.tcl", args=("-maxsize", str(limit), "-forbid", "*.zip *.ISO",
                                                         "-footer", "Scanned by sizepolicy")))
    line = b"x" * 98 + b"\r\n"
    at_limit = line * (limit // len(line))
    eight_bit = b"\xff\xfe\xc3\r\n" + b"a" * 7 + b"\r\n" + ("\u20ac" * 300).encode() + b"\r\n"
    eight_bit = eight_bit * 100 + bytes(range(0x80, 0x100)) + b"\r\n"
    messages = {
        "at limit": message("at limit", body=at_limit),
        "over limit": message("over limit", body=at_limit + b"y"),  # "y" and the CRLF smtplib ends it with
        "eight bit": message("eight bit", b"Content-Type: text/plain; charset=utf-8\r\n", eight_bit),
        "exe allowed": with_attachment("exe allowed", b'Content-Type: application/octet-stream; name="a.exe"\r\n'),
        "zip": with_attachment("zip", b'Content-Disposition: attachment; filename="archive.zip"\r\n'),
        "iso": with_attachment("iso", b'Content-Disposition: attachment; filename="disk.iso"\r\n'),
        "html": message("html", b"Content-Type: text/html\r\n", b"<p>hi</p>\r\n"),
    }
    got = sent(pf, messages)
    footer = b"\n-- \nScanned by sizepolicy\n"
    original = {subject: data.split(b"\r\n\r\n", 1)[1].replace(b"\r", b"") for subject, data in messages.items()}
    assert len(at_limit) == limit
    assert got["at limit"].headers("X-Size-Policy") == []
    assert got["at limit"].body == original["at limit"] + footer
    assert got["over limit"].headers("X-Size-Policy") == [f"body removed (body of {limit + 3} bytes over the "
                                                          f"limit of {limit})"]
    assert got["eight bit"].body == original["eight bit"] + footer
    assert got["zip"].headers("X-Size-Policy") == ['body removed (attachment "archive.zip" is not allowed)']
    assert got["iso"].headers("X-Size-Policy") == ['body removed (attachment "disk.iso" is not allowed)']
    for subject in ("exe allowed", "html"):
        assert got[subject].headers("X-Size-Policy") == [] and got[subject].body == original[subject], subject


# ---------------------------------------------------------------------------- rcptrewrite.tcl


def test_rcptrewrite_rewrites_an_address_given_with_a_quoted_local_part(postfix, example) -> None:
    """Bug: RCPT TO:<"sales"@example.com>, which Postfix delivers to sales@example.com, was not
    found in the map and reached the old address; the sender likewise kept its old address.
    (Postfix gives the milter "in\\fo" as "info": delrcpt takes that form.)"""
    pf = postfix(milter=example("rcptrewrite.tcl"))
    result = pf.send('"noreply"@legacy.example.com', ['"sales"@example.com', '"in\\fo"@Example.com'],
                     message("quoted"))
    assert result.accepted, result
    (msg,) = pf.wait_for_sink(1)
    assert (msg.mail_from, msg.recipients) == (
        "noreply@example.com", ["alice@example.com", "bob@example.com", "team-sales@example.com"])
    assert msg.headers("X-Rcpt-Rewritten") == ['<"sales"@example.com> -> <team-sales@example.com>',
                                               '<"info"@Example.com> -> <alice@example.com>, <bob@example.com>']
    assert msg.headers("X-Sender-Rewritten") == ["<noreply@legacy.example.com> -> <noreply@example.com>"]


def test_rcptrewrite_changes_the_envelope_from_its_map_and_a_map_file(postfix, example, tmp_path: Path) -> None:
    """Recipients compared without case, given with ESMTP parameters, one mapped to several, one
    read from -map; the sender from sender_map; a header says what was done, To: stays."""
    rewrite_map = tmp_path / "rcptrewrite.map"
    rewrite_map.write_text("# old            new ...\nBob@Example.com  robert@example.com bobby@example.net  # moved\n")
    pf = postfix(milter=example("rcptrewrite.tcl", args=("-map", str(rewrite_map))))
    cases = [
        ("upper", "a@example.org", ["SALES@EXAMPLE.COM"], ()),
        ("esmtp", "a@example.org", ["sales@example.com"], ("NOTIFY=SUCCESS,FAILURE",)),
        ("several", "a@example.org", ["info@example.com", "carol@example.com"], ()),
        ("map file", "a@example.org", ["bob@example.com"], ()),
        ("sender", "NoReply@Legacy.Example.com", ["carol@example.com"], ()),
    ]
    for subject, sender, rcpts, options in cases:
        assert pf.send(sender, rcpts, message(subject), rcpt_options=options).accepted, subject
    got = {m.message["Subject"]: m for m in pf.wait_for_sink(len(cases))}
    envelopes = {subject: (m.mail_from, m.recipients, m.headers("X-Rcpt-Rewritten"), m.headers("X-Sender-Rewritten"))
                 for subject, m in got.items()}
    assert envelopes == {
        "upper": ("a@example.org", ["team-sales@example.com"],
                  ["<SALES@EXAMPLE.COM> -> <team-sales@example.com>"], []),
        "esmtp": ("a@example.org", ["team-sales@example.com"], ["<sales@example.com> -> <team-sales@example.com>"], []),
        "several": ("a@example.org", ["alice@example.com", "bob@example.com", "carol@example.com"],
                    ["<info@example.com> -> <alice@example.com>, <bob@example.com>"], []),
        "map file": ("a@example.org", ["robert@example.com", "bobby@example.net"],
                     ["<bob@example.com> -> <robert@example.com>, <bobby@example.net>"], []),
        "sender": ("noreply@example.com", ["carol@example.com"], [],
                   ["<noreply@legacy.example.com> -> <noreply@example.com>"]),
    }
    assert {m.message["To"] for m in got.values()} == {"Sales <sales@example.com>"}


# ---------------------------------------------------------------------------- stamp.tcl


def test_stamp_adds_its_header_with_postfixs_macros(postfix, example) -> None:
    """j and {daemon_name} (Postfix's $myhostname for both) and the queue id i, and the client
    the connect callback saw, folded onto a second line."""
    pf = postfix(milter=example("stamp.tcl"))
    result = pf.send("a@example.org", ["b@example.com"], message("stamp me"))
    assert result.accepted
    (msg,) = pf.wait_for_sink(1)
    (stamp,) = msg.headers("X-Filtered-By")
    assert stamp.startswith(f"Stamp on harness.test (daemon harness.test); queue-id {result.queue_id};\n"
                            " client localhost [127.0.0.1] port "), stamp
    assert stamp.rsplit(" ", 1)[1].isdigit(), stamp


def test_stamp_writes_unknown_for_the_macros_postfix_was_told_not_to_send(postfix, example) -> None:
    no_macros = {f"milter_{stage}_macros": "" for stage in ("connect", "mail", "rcpt", "data", "end_of_header",
                                                            "end_of_data")}
    pf = postfix(milter=example("stamp.tcl"), settings=no_macros)
    assert pf.send("a@example.org", ["b@example.com"], message("no macros")).accepted
    (msg,) = pf.wait_for_sink(1)
    (stamp,) = msg.headers("X-Filtered-By")
    assert stamp.startswith("Stamp on unknown (daemon unknown); queue-id unknown;\n client localhost [127.0.0.1]"), stamp


# ---------------------------------------------------------------------------- greylist.tcl


def test_greylist_refuses_each_new_triplet_until_its_delay_has_passed(postfix, example, tmp_path: Path) -> None:
    store = tmp_path / "greylist.sqlite"
    pf = postfix(milter=example("greylist.tcl", "--python", str(EXAMPLES / "greylist_store.py"),
                                args=("-store", f"sqlite:{store}", "-delay", "600")))
    grey = "4.7.1 Greylisted, please try again in 600 seconds"
    first = pf.send("Alice@Example.org", ["b@example.com", "c@example.com"], message("first"))
    assert {rcpt: (r.code, r.text) for rcpt, r in first.rcpt.items()} == {
        "b@example.com": (451, grey), "c@example.com": (451, grey)}
    early = pf.send("alice@example.org", ["b@example.com"], message("too early"))
    assert early.rcpt["b@example.com"].code == 451
    with sqlite3.connect(store) as db:  # the delay has passed for b's triplet only
        db.execute("UPDATE triplets SET first_seen = first_seen - 600 WHERE rcpt = 'b@example.com'")
    retry = pf.send("alice@example.org", ["b@example.com", "c@example.com"], message("retry"))
    assert retry.rcpt["b@example.com"].code == 250 and retry.rcpt["c@example.com"].code == 451, retry
    assert retry.accepted
    other = pf.send("mallory@example.org", ["b@example.com"], message("other sender"))
    assert other.rcpt["b@example.com"].code == 451
    (msg,) = pf.wait_for_sink(1)
    assert msg.recipients == ["b@example.com"] and msg.message["Subject"] == "retry"
