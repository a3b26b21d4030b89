"""Bytes between the MTA and Tcl: 8-bit bodies, non-UTF-8 headers and addresses, non-ASCII script text.

The contract: body blocks reach Tcl so that ``replacebody`` of their
concatenation sends back exactly the original bytes (8-bit, NUL, invalid
UTF-8, across 65535-byte chunks); header values and addresses that are not
valid UTF-8 survive unchanged; non-ASCII text written in a script goes out as
UTF-8. Everything 8-bit is sent and read as raw frames (miltertest decodes
payloads as UTF-8).
"""

from __future__ import annotations

import random

import pytest

from support.tclrun import NOREPLY, TCL_HELPERS, tclrun_factory, z

tclrun = pytest.fixture(tclrun_factory, name="tclrun")

CHUNK = 65535

ECHO_BODY = r"""
package require TclMilter
proc from {ctx list} { $ctx setpriv body ""; $ctx setpriv blocks 0; set ::acc($ctx) ""; return SMFIS_CONTINUE }
proc body {ctx block} {
    # The manual's advice: build the body in the private data ...
    $ctx setpriv body "[$ctx getpriv body]$block"
    $ctx setpriv blocks [expr {[$ctx getpriv blocks] + 1}]
    # ... or in a Tcl variable.
    append ::acc($ctx) $block
    return SMFIS_CONTINUE
}
proc eom {ctx} {
    $ctx replacebody [$ctx getpriv body]
    $ctx addheader X-Blocks [$ctx getpriv blocks]
    $ctx addheader X-Same [string equal $::acc($ctx) [$ctx getpriv body]]
    unset ::acc($ctx)
    return SMFIS_CONTINUE
}
milter register envfrom from
milter register body body
milter register eom eom
milter main
"""


def send_body(m, body: bytes) -> list[tuple[str, bytes]]:
    with m.mta() as mta:
        mta.negotiate()
        assert mta.mail("<a@example.org>") == ("c", {})
        replies = mta.body(body)
        assert replies == [("c", b"")] * len(replies)
        return mta.eom()


def replaced(eom: list[tuple[str, bytes]]) -> bytes:
    return b"".join(p for c, p in eom if c == "b")


def filler(n: int, seed: int) -> bytes:
    """Pseudo-random 8-bit data without the bytes C0 and ED (see the next test for those)."""
    rnd = random.Random(seed)
    return bytes(b if b not in (0xC0, 0xED) else b + 1 for b in rnd.randbytes(n))


def test_8bit_body_is_byte_exact_across_chunks(tclrun):
    """All 256 byte values, NULs, invalid UTF-8, and characters split by the 65535-byte chunking."""
    head = (bytes(range(256)) + b"\0\0\0 NUL run\r\n" + "Grüße aus Köln\r\n".encode("latin-1")
            + "UTF-8: Grüße € 😀\r\n".encode() + b"invalid: \xff\xfe \x80\xbf \xe2\x82 \xc1\xbf \xf8\x88\x80\x80\x80 "
            + b"\xed\xb2\x80 \xf4\x90\x80\x80\r\n")
    euro, emoji = "€".encode(), "😀".encode()
    first = head + filler(CHUNK - len(head) - 1, 1) + euro[:1]  # the euro sign is split 1 | 2 ...
    second = euro[1:] + filler(CHUNK - len(euro[1:]) - 2, 2) + emoji[:2]  # ... the emoji 2 | 2
    body = first + second + emoji[2:] + filler(70000, 3) + b"\r\nend\r\n"
    assert len(first) == CHUNK and len(first + second) == 2 * CHUNK

    m = tclrun(ECHO_BODY)
    eom = send_body(m, body)
    assert m.stop() == 0
    assert ("h", b"X-Blocks\x004\0") in eom  # one callback per MTA chunk
    assert ("h", b"X-Same\x001\0") in eom
    new = replaced(eom)
    assert len(new) == len(body)
    assert new == body
    assert [len(p) for c, p in eom if c == "b"] == [CHUNK, CHUNK, CHUNK, len(body) - 3 * CHUNK]
    assert eom[-1] == ("c", b"")


@pytest.mark.parametrize("case", ["c0-80", "cesu-pair", "c0-80-split-by-chunking", "random", "ascii-with-nul"])
def test_body_bytes_tcl_would_misread_are_byte_exact(tclrun, case):
    """Invalid UTF-8 that happens to be Tcl's own internal encoding must not be decoded.

    Bug: body blocks go to Tcl as surrogate-escaped ``str``; tkinter writes
    those as the raw bytes into Tcl's internal (modified UTF-8) string, where
    ``C0 80`` *is* NUL and ``ED A0 BD ED B8 80`` *is* a surrogate pair, so on the
    way back they become ``00`` and ``F0 9F 98 80``: the replaced body is
    shorter than the original. Chunking can create ``C0 80`` out of a C0 at the
    end of one block and an 80 at the start of the next, and random binary data
    (attachments sent 8-bit) contains these pairs every 64 KiB or so.
    """
    if case == "c0-80":
        body = b"before \xc0\x80 after\r\n"
    elif case == "cesu-pair":
        body = b"before \xed\xa0\xbd\xed\xb8\x80 after\r\n"
    elif case == "c0-80-split-by-chunking":
        body = b"x" * (CHUNK - 1) + b"\xc0" + b"\x80" + b"y\r\n"
    elif case == "ascii-with-nul":  # ASCII but for its NULs, which Tcl keeps as C0 80
        body = b"plain text\0with NULs\0\r\n" * 100
    else:
        body = random.Random(4).randbytes(3 * CHUNK + 1000)
    m = tclrun(ECHO_BODY)
    eom = send_body(m, body)
    assert m.stop() == 0
    new = replaced(eom)
    assert (len(new), new) == (len(body), body)


HEADER_ECHO = TCL_HELPERS + r"""
package require TclMilter
proc from {ctx list} {
    $ctx setpriv from [lindex $list 0]
    $ctx setpriv fromargs [join [lrange $list 1 end] " "]
    return SMFIS_CONTINUE
}
proc rcpt {ctx list} { $ctx setpriv rcpt [lindex $list 0]; return SMFIS_CONTINUE }
proc header {ctx name value} {
    set n [expr {[llength [dict keys [$ctx getpriv] h.*]] + 1}]
    $ctx setpriv h.$n [list $name $value]
    R len-$name [string length $value]
    return SMFIS_CONTINUE
}
proc eom {ctx} {
    foreach key [lsort [dict keys [$ctx getpriv] h.*]] {
        lassign [$ctx getpriv $key] name value
        if {[catch {$ctx addheader X-Copy-$name $value} msg]} { R error-$name $msg }
    }
    $ctx chgheader Subject 1 [lindex [$ctx getpriv h.1] 1]
    $ctx insheader X-Ins 0 [lindex [$ctx getpriv h.1] 1]
    $ctx chgfrom [$ctx getpriv from] [$ctx getpriv fromargs]
    $ctx addrcpt [$ctx getpriv rcpt]
    $ctx delrcpt [$ctx getpriv rcpt]
    return SMFIS_CONTINUE
}
milter register envfrom from
milter register envrcpt rcpt
milter register header header
milter register eom eom
milter main
"""


def run_header_echo(m, headers: list[tuple[bytes, bytes]], sender: bytes, args: bytes, rcpt: bytes):
    with m.mta() as mta:
        mta.negotiate()
        assert mta.event_raw("M", z(sender, args)) == ("c", b"")
        assert mta.event_raw("R", z(rcpt)) == ("c", b"")
        for name, value in headers:
            assert mta.event_raw("L", z(name, value)) in (("c", b""), NOREPLY)
        return mta.eom()


def test_non_utf8_header_values_and_addresses_survive(tclrun):
    latin1 = "Café für Jürgen".encode("latin-1")
    broken = b"\xff\xfe raw \x80 and \xe2\x82 truncated"
    utf8 = "héllo".encode()
    sender, args, rcpt = "<élève@exemplé.org>".encode("latin-1"), b"X-ARG=\xfe\xff", b"<r\xf6\xdf@example.com>"
    m = tclrun(HEADER_ECHO)
    eom = run_header_echo(m, [(b"Subject", latin1), (b"X-Broken", broken), (b"X-Utf8", utf8)], sender, args, rcpt)
    assert m.stop() == 0
    assert eom == [
        ("h", b"X-Copy-Subject\0" + latin1 + b"\0"),
        ("h", b"X-Copy-X-Broken\0" + broken + b"\0"),
        ("h", b"X-Copy-X-Utf8\0" + utf8 + b"\0"),
        ("m", b"\0\0\0\x01Subject\0" + latin1 + b"\0"),
        ("i", b"\0\0\0\0X-Ins\0" + latin1 + b"\0"),
        ("e", sender + b"\0" + args + b"\0"),
        ("+", rcpt + b"\0"),
        ("-", rcpt + b"\0"),
        ("c", b""),
    ]
    assert m.results()["len-X-Utf8"] == "5"  # valid UTF-8 is text to Tcl: five characters


def test_header_and_address_bytes_tcl_would_misread_survive(tclrun):
    """Same bug as the body's: ``C0 80`` in a header value comes back as NUL (addheader then fails),
    a CESU-8 surrogate pair in an address comes back as one 4-byte character."""
    value = b"before \xc0\x80 after"
    sender = b"<\xed\xa0\xbd\xed\xb8\x80@example.org>"
    m = tclrun(HEADER_ECHO)
    eom = run_header_echo(m, [(b"Subject", value)], sender, b"SIZE=1", b"<r@example.com>")
    assert m.stop() == 0
    assert ("h", b"X-Copy-Subject\0" + value + b"\0") in eom, (eom, m.results())
    assert ("e", sender + b"\0SIZE=1\0") in eom, eom


NON_ASCII = r"""
package require TclMilter
proc rcpt {ctx list} {
    if {[lindex $list 0] eq "<deny@example.com>"} {
        $ctx setreply 550 5.7.1 "Zugriff verweigert – nö"
        return SMFIS_REJECT
    }
    return SMFIS_CONTINUE
}
proc eom {ctx} {
    $ctx addheader X-Greeting "Grüße aus Köln €"
    $ctx chgheader Subject "naïve café"
    $ctx insheader X-Smile 0 "😀 ok"
    $ctx addrcpt <jürgen@exämple.org>
    $ctx quarantine "für Prüfung"
    $ctx replacebody "Größe: 5 €\r\n"
    return SMFIS_CONTINUE
}
milter register envrcpt rcpt
milter register eom eom
milter main
"""

NON_ASCII_EXPECTED = [
    ("h", "X-Greeting\0Grüße aus Köln €\0".encode()),  # (a header name is ASCII: test_hardening_validation)
    ("m", b"\0\0\0\x01" + "Subject\0naïve café\0".encode()),
    ("i", b"\0\0\0\0" + "X-Smile\0😀 ok\0".encode()),
    ("+", "<jürgen@exämple.org>\0".encode()),
    ("q", "für Prüfung\0".encode()),
    ("b", "Größe: 5 €\r\n".encode()),
    ("c", b""),
]


def run_non_ascii(m):
    with m.mta() as mta:
        mta.negotiate()
        deny = mta.event_raw("R", z("<deny@example.com>"))
        assert mta.rcpt("<ok@example.com>") == ("c", {})
        return deny, mta.eom()


def test_non_ascii_script_text_goes_out_as_utf8(tclrun):
    m = tclrun(NON_ASCII)
    deny, eom = run_non_ascii(m)
    assert m.stop() == 0
    assert deny == ("y", "550 5.7.1 Zugriff verweigert – nö\0".encode())
    assert eom == NON_ASCII_EXPECTED


def test_non_ascii_script_text_is_utf8_in_any_locale(tclrun):
    """A UTF-8 script must not depend on the locale of the process that runs it.

    Bug: the script is sourced in Tcl's system encoding, which follows the
    locale: under ``LC_ALL=C`` (cron, many init scripts and containers) it is
    iso8859-1, the UTF-8 script is misread and every non-ASCII string goes out
    double-encoded ("GrÃ¼ÃŸe").
    """
    m = tclrun(NON_ASCII, env={"LC_ALL": "C", "LANG": "C"})
    deny, eom = run_non_ascii(m)
    assert m.stop() == 0
    assert deny == ("y", "550 5.7.1 Zugriff verweigert – nö\0".encode())
    assert eom == NON_ASCII_EXPECTED
