"""The example filters of tclmilter/examples/, run as their header comments say (`pytclmilter
run X.tcl -- options`) behind the real private Postfix: what reaches the sink is what each
comment promises."""

from __future__ import annotations

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
        child = pexpect.spawn(sys.executable, argv, cwd=str(tmp_path), encoding="utf-8", timeout=20)
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


def sent(pf, messages: dict[str, bytes], sender: str = "a@example.org"):  # type: ignore[no-untyped-def]
    """Sends each message, returns what reached the sink by subject."""
    for subject, data in messages.items():
        assert pf.send(sender, ["b@example.com"], data).accepted, subject
    return {m.message["Subject"]: m for m in pf.wait_for_sink(len(messages))}


# ---------------------------------------------------------------------------- sizepolicy.tcl


def test_sizepolicy_finds_attachment_names_in_every_form_of_the_parameters(postfix, example) -> None:
    """The names of name= and filename=, in the message's own header and in MIME part headers,
    folded, quoted, nested, in RFC 2231 form. Bug: a name split into RFC 2231 sections
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
