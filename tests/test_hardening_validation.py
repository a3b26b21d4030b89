"""Validation of what filters send: every malformed reply code, header or address is an error in the
callback that asked for it (a Tcl error with a clear message), and nothing malformed reaches the wire.

What tests/test_engine_api.py and tests/test_tcl_commands.py already cover (2xx codes, short and long
codes, CR/LF in a reply, 33 lines, a space in a header name, an unfolded LF, an empty recipient) is
extended here to the whole table: extended-code format and class, the lone %, exactly 32 lines,
colons and control characters in header names, CR alone and NUL in values, CR/LF in addresses and
ESMTP arguments, header indexes, for the Python API and for Tcl scripts, plus the wire bytes.
"""

from __future__ import annotations

import pytest

from pytclmilter import CONTINUE, MilterError
from pytclmilter.context import Context
from pytclmilter.protocol.macros import MacroStore
from support.engine import ALL_PROTO, F_ADDHDRS, make_milter, serving, z
from support.tclrun import TCL_HELPERS, ok, tclrun_factory
from miltertest import constants as K

tclrun = pytest.fixture(tclrun_factory, name="tclrun")


def eom_context() -> Context:
    ctx = Context(1, MacroStore())
    ctx.stage = "eom"
    return ctx


# (call, words the error message must contain)
INVALID = {
    "rcode-999": (lambda c: c.setreply("999", None, "x"), ['"999"', "4xx or 5xx"]),
    "rcode-250": (lambda c: c.setreply("250", None, "x"), ['"250"', "4xx or 5xx"]),
    "rcode-letters": (lambda c: c.setreply("5xx", None, "x"), ['"5xx"']),
    "rcode-space": (lambda c: c.setreply(" 550", None, "x"), ['" 550"']),
    "rcode-empty": (lambda c: c.setreply("", None, "x"), ['""']),
    "rcode-trailing-newline": (lambda c: c.setreply("550\n", None, "x"), ["4xx or 5xx"]),
    "xcode-two-parts": (lambda c: c.setreply("550", "5.7", "x"), ['"5.7"', "like 5.7.1"]),
    "xcode-four-parts": (lambda c: c.setreply("550", "5.7.1.1", "x"), ['"5.7.1.1"']),
    "xcode-long-part": (lambda c: c.setreply("550", "5.1000.1", "x"), ['"5.1000.1"']),
    "xcode-class-3": (lambda c: c.setreply("550", "3.7.1", "x"), ['"3.7.1"']),
    "xcode-class-mismatch-5-4": (lambda c: c.setreply("550", "4.7.1", "x"), ['"4.7.1"', '"550"', "match"]),
    "xcode-class-mismatch-4-5": (lambda c: c.setreply("451", "5.7.1", "x"), ['"5.7.1"', '"451"', "match"]),
    "xcode-class-2": (lambda c: c.setreply("550", "2.0.0", "x"), ['"2.0.0"', "match"]),
    "text-crlf": (lambda c: c.setreply("550", "5.7.1", "a\r\nb"), ["CR, LF"]),
    "text-lf": (lambda c: c.setreply("550", "5.7.1", "a\nb"), ["CR, LF"]),
    "text-cr": (lambda c: c.setreply("550", "5.7.1", "a\rb"), ["CR, LF"]),
    "text-nul": (lambda c: c.setreply("550", "5.7.1", "a\0b"), ["NUL"]),
    "text-lone-percent": (lambda c: c.setreply("550", "5.7.1", "100% spam"), ["lone %", "%%"]),
    "text-percent-s": (lambda c: c.setreply("550", None, "%s"), ["lone %"]),
    "text-three-percents": (lambda c: c.setreply("550", "5.7.1", "a %%% b"), ["lone %"]),
    "text-too-long": (lambda c: c.setreply("550", "5.7.1", "x" * 981), ["980"]),
    "ml-33-lines": (lambda c: c.setmlreply("550", "5.7.1", *["l"] * 33), ["32", "33"]),
    "ml-no-lines": (lambda c: c.setmlreply("550", "5.7.1"), ["1 to 32"]),
    "ml-crlf-line": (lambda c: c.setmlreply("550", "5.7.1", "ok", "a\r\nb"), ["CR, LF"]),
    "ml-lone-percent": (lambda c: c.setmlreply("550", "5.7.1", "ok", "50%"), ["lone %"]),
    "ml-class-mismatch": (lambda c: c.setmlreply("450", "5.7.1", "x"), ["match"]),
    "ml-rcode": (lambda c: c.setmlreply("650", None, "x"), ["4xx or 5xx"]),
    "hdr-name-colon": (lambda c: c.addheader("X-A:B", "v"), ['"X-A:B"', "colon"]),
    "hdr-name-trailing-colon": (lambda c: c.addheader("Subject:", "v"), ['"Subject:"']),
    "hdr-name-space": (lambda c: c.addheader("X A", "v"), ['"X A"']),
    "hdr-name-tab": (lambda c: c.addheader("X\tA", "v"), ["invalid header name"]),
    "hdr-name-ctl": (lambda c: c.addheader("X\x01A", "v"), ["invalid header name"]),
    "hdr-name-del": (lambda c: c.addheader("X\x7fA", "v"), ["invalid header name"]),
    "hdr-name-lf": (lambda c: c.addheader("X\nA", "v"), ["invalid header name"]),
    "hdr-name-nul": (lambda c: c.addheader("X\0A", "v"), ["invalid header name"]),
    "hdr-name-empty": (lambda c: c.addheader("", "v"), ['""']),
    "ins-name-colon": (lambda c: c.insheader("X:A", "v", 0), ['"X:A"']),
    "chg-name-space": (lambda c: c.chgheader("X A", "v", 1), ['"X A"']),
    "hdr-value-lf": (lambda c: c.addheader("X-A", "a\nb"), ["CR and LF are allowed only to fold a line"]),
    "hdr-value-crlf": (lambda c: c.addheader("X-A", "a\r\nb"), ["fold"]),
    "hdr-value-cr": (lambda c: c.addheader("X-A", "a\rb"), ["CR and LF are allowed only to fold a line"]),
    "hdr-value-trailing-lf": (lambda c: c.addheader("X-A", "a\n"), ["fold"]),
    "hdr-value-nul": (lambda c: c.addheader("X-A", "a\0b"), ["X-A"]),
    "ins-value-cr": (lambda c: c.insheader("X-A", "a\rb", 0), ["CR and LF are allowed only to fold a line"]),
    "chg-value-lf": (lambda c: c.chgheader("X-A", "a\nb", 1), ["fold"]),
    "chg-index-negative": (lambda c: c.chgheader("X-A", "v", -1), ["-1"]),
    "ins-index-negative": (lambda c: c.insheader("X-A", "v", -1), ["-1"]),
    "addrcpt-empty": (lambda c: c.addrcpt(""), ["recipient", "non-empty"]),
    "addrcpt-crlf": (lambda c: c.addrcpt("<a@example.com>\r\nRCPT TO:<b@example.com>"), ["recipient", "CR"]),
    "addrcpt-nul": (lambda c: c.addrcpt("<a@exa\0mple.com>"), ["recipient", "NUL"]),
    "addrcpt-args-lf": (lambda c: c.addrcpt("<a@example.com>", "NOTIFY=NEVER\nX"), ["ESMTP"]),
    "delrcpt-lf": (lambda c: c.delrcpt("<a@example.com>\n"), ["recipient"]),
    "delrcpt-empty": (lambda c: c.delrcpt(""), ["recipient"]),
    "chgfrom-empty": (lambda c: c.chgfrom(""), ["sender"]),
    "chgfrom-cr": (lambda c: c.chgfrom("<a@example.org>\r"), ["sender"]),
    "chgfrom-args-nul": (lambda c: c.chgfrom("<a@example.org>", "RET=HDRS\0"), ["ESMTP"]),
    "quarantine-empty": (lambda c: c.quarantine(""), ["reason"]),
    "quarantine-nul": (lambda c: c.quarantine("a\0b"), ["NUL"]),
    # RFC 5322 field names only: no UTF-8, no byte that was not UTF-8 (shown escaped)
    "hdr-name-utf8": (lambda c: c.addheader("X-Ünï", "v"), ['"X-Ünï"', "ASCII"]),
    "hdr-name-8bit-byte": (lambda c: c.addheader("X-\udcff", "v"), [r'"X-\xff"']),
    "hdr-name-esc-shown-escaped": (lambda c: c.addheader("X\x1b[2J", "v"), [r'"X\x1b[2J"']),
    # controls in values: only tab, and a newline that folds
    "hdr-value-esc": (lambda c: c.addheader("X-A", "a\x1b[2Jb"), ['"X-A"', r"control character \x1b"]),
    "hdr-value-del": (lambda c: c.addheader("X-A", "a\x7fb"), [r"\x7f"]),
    "hdr-value-soh": (lambda c: c.addheader("X-A", "a\x01b"), [r"\x01"]),
    "hdr-value-vt": (lambda c: c.insheader("X-A", "a\x0bb", 0), [r"\x0b"]),
    "hdr-value-folded-then-esc": (lambda c: c.addheader("X-A", "a\n b\x1b"), [r"\x1b"]),
    "chg-value-esc": (lambda c: c.chgheader("X-A", "\x1b", 1), [r"\x1b"]),
    "quarantine-lf": (lambda c: c.quarantine("held\nINFO: forged"), ["reason", "LF"]),
    "quarantine-cr": (lambda c: c.quarantine("held\r"), ["reason"]),
    "quarantine-esc": (lambda c: c.quarantine("held\x1b[2J"), ["reason", "control"]),
    "quarantine-del": (lambda c: c.quarantine("held\x7f"), ["reason"]),
    "addrcpt-esc": (lambda c: c.addrcpt("<a\x1b@example.com>"), ["recipient", "control", r"\x1b"]),
    "chgfrom-args-esc": (lambda c: c.chgfrom("<a@example.org>", "RET=\x1bHDRS"), ["ESMTP"]),
    # packets larger than the MTA accepts (65535 bytes of data when no MDS bit is negotiated):
    # refused at the call, as libmilter does (mi_wr_cmd), not sent to an MTA that would close
    "hdr-too-big": (lambda c: c.addheader("X-Big", "x" * 65529), ["addheader", "65536", "65535"]),
    "hdr-1mb": (lambda c: c.addheader("X-Big", "x" * 1_000_000), ["addheader", "65535"]),
    "hdr-utf8-too-big": (lambda c: c.addheader("X-Big", "€" * 21843), ["65536", "65535"]),
    "hdr-name-too-long": (lambda c: c.addheader("N" * 65533, "v"), ["addheader", "65536", "65535"]),
    "ins-too-big": (lambda c: c.insheader("X-Big", "x" * 65525, 0), ["insheader", "65536"]),
    "chg-too-big": (lambda c: c.chgheader("X-Big", "x" * 65525, 1), ["chgheader", "65536"]),
    "addrcpt-too-big": (lambda c: c.addrcpt("<" + "a" * 70_000 + ">"), ["addrcpt", "65535"]),
    "addrcpt-args-too-big": (lambda c: c.addrcpt("<a@b>", "X=" + "y" * 70_000), ["addrcpt", "65535"]),
    "delrcpt-too-big": (lambda c: c.delrcpt("<" + "a" * 70_000 + ">"), ["delrcpt", "65535"]),
    "chgfrom-too-big": (lambda c: c.chgfrom("<a@b>", "X=" + "y" * 70_000), ["chgfrom", "65535"]),
    "quarantine-too-big": (lambda c: c.quarantine("r" * 65535), ["quarantine", "65536", "65535"]),
    # a reply line is at most 980 bytes (libmilter's strlen), so that 32 of them always fit a packet
    "text-980-chars-of-3-bytes": (lambda c: c.setreply("550", "5.7.1", "€" * 327), ["980 bytes"]),
    "ml-32-lines-of-3-byte-chars": (lambda c: c.setmlreply("550", "5.7.1", *["€" * 980] * 32), ["980 bytes"]),
    # a text without an extended code follows the reply code, where MTAs look for one: Postfix 3.7
    # calls "550 4 apples" malformed and answers the client 451 4.3.5 Server configuration problem
    "text-digit-no-xcode": (lambda c: c.setreply("550", None, "4 apples left"),
                            ['"4 apples left"', "starts with a digit", "like 5.0.0"]),
    "text-digit-empty-xcode": (lambda c: c.setreply("451", "", "5 retries"), ['"5 retries"', "like 4.0.0"]),
    "text-digit-same-class": (lambda c: c.setreply("550", None, "5 apples"), ["starts with a digit"]),
    "text-digit-partial-xcode": (lambda c: c.setreply("550", None, "5.7 go away"), ["starts with a digit"]),
    "text-digit-xcode-glued": (lambda c: c.setreply("550", None, "5.7.1go away"), ["starts with a digit"]),
    "text-xcode-class-mismatch": (lambda c: c.setreply("550", None, "4.7.1 go away"),
                                  ['extended code "4.7.1" does not match reply code "550"']),
    # an extended code given and opening the text too: one code, so two different ones are refused
    "text-opens-with-other-xcode": (lambda c: c.setreply("550", "5.7.1", "5.1.1 no such user"),
                                    ['reply text "5.1.1 no such user" opens with the extended code 5.1.1, '
                                     "but the reply's is 5.7.1: give one"]),
    "ml-line-opens-with-other-xcode": (lambda c: c.setmlreply("550", None, "5.7.1 go", "5.1.1 away"),
                                       ["opens with the extended code 5.1.1", "the reply's is 5.7.1"]),
    "ml-first-line-xcode-class": (lambda c: c.setmlreply("550", None, "4.7.1 later"),
                                  ['extended code "4.7.1" does not match reply code "550"']),
    # libmilter sends these; Postfix and Sendmail pass them on to the SMTP client as they are
    "escape-in-reply": (lambda c: c.setreply("550", None, "a\x1bb"), ["other control characters (\\x1b)"]),
    "del-in-ml-reply": (lambda c: c.setmlreply("550", None, "ok", "b\x7f"), ["other control characters (\\x7f)"]),
    # C1 controls too: a terminal acts on U+009B (CSI) as on ESC [, and U+0085 is a line break to some
    "c1-csi-in-reply": (lambda c: c.setreply("550", None, "a\x9b31mb"), ["other control characters (\\u009b)"]),
    "c1-nel-in-ml-reply": (lambda c: c.setmlreply("550", None, "ok", "b\x85c"), ["other control characters (\\u0085)"]),
}

VALID = {
    "rcode-4xx": (lambda c: c.setreply("451", "4.7.1", "later"), "451 4.7.1 later"),
    "xcode-three-digits": (lambda c: c.setreply("550", "5.123.456", "x"), "550 5.123.456 x"),
    "double-percent": (lambda c: c.setreply("550", "5.7.1", "100%% spam"), "550 5.7.1 100%% spam"),
    "four-percents": (lambda c: c.setreply("550", None, "%%%%"), "550 %%%%"),
    "980-chars": (lambda c: c.setreply("550", "5.7.1", "x" * 980), "550 5.7.1 " + "x" * 980),
    "ml-32-lines": (lambda c: c.setmlreply("550", "5.7.1", *[f"l{i}" for i in range(32)]),
                    "\r\n".join(f"550{'-' if i < 31 else ' '}5.7.1 l{i}" for i in range(32))),
    "ml-percent": (lambda c: c.setmlreply("450", None, "a %% b"), "450 4.0.0 a %% b"),
    "980-bytes-of-utf8": (lambda c: c.setreply("550", "5.7.1", "€" * 326 + "xx"), "550 5.7.1 " + "€" * 326 + "xx"),
    "tab-in-reply": (lambda c: c.setreply("550", None, "a\tb"), "550 a\tb"),  # RFC 5321's reply text allows it
    "utf8-next-to-c1-in-reply": (lambda c: c.setreply("550", None, "\xa0d\xe9j\xe0 \u20ac"), "550 \xa0d\xe9j\xe0 \u20ac"),
    # after an extended code the text is free; a text may open with the extended code itself
    "digit-after-xcode": (lambda c: c.setreply("550", "5.7.1", "4 apples left"), "550 5.7.1 4 apples left"),
    "xcode-in-text": (lambda c: c.setreply("550", None, "5.7.1 go away"), "550 5.7.1 go away"),
    "xcode-alone-in-text": (lambda c: c.setreply("451", None, "4.3.2"), "451 4.3.2"),
    "ml-digit-lines": (lambda c: c.setmlreply("451", None, "5 retries", "4 apples"),
                       "451-4.0.0 5 retries\r\n451 4.0.0 4 apples"),
    # the extended code once, where the script gave it twice or setmlreply's lines carry it
    "xcode-given-and-in-text": (lambda c: c.setreply("550", "5.7.1", "5.7.1 go away"), "550 5.7.1 go away"),
    "ml-xcode-of-first-line": (lambda c: c.setmlreply("550", None, "5.7.1 go", "away", "5.7.1 now"),
                               "550-5.7.1 go\r\n550-5.7.1 away\r\n550 5.7.1 now"),
    "ml-xcode-given-and-in-lines": (lambda c: c.setmlreply("451", "4.7.1", "4.7.1 later"), "451 4.7.1 later"),
}


@pytest.mark.parametrize("name", sorted(INVALID))
def test_python_context_refuses_with_a_clear_message(name):
    call, words = INVALID[name]
    ctx = eom_context()
    ctx.reply_text = "kept"
    with pytest.raises(MilterError) as info:
        call(ctx)
    message = str(info.value)
    for word in words:
        assert word in message, (name, message)
    assert ctx.reply_text == "kept" and ctx.actions == [] and ctx.body is None, "nothing stored"


@pytest.mark.parametrize("name", sorted(VALID))
def test_python_context_accepts_the_limits(name):
    call, text = VALID[name]
    ctx = eom_context()
    call(ctx)
    assert ctx.reply_text == text


def test_folded_header_values_are_accepted_and_sent_with_lf():
    ctx = eom_context()
    ctx.addheader("X-Folded", "first\r\n\tsecond\n third")
    ctx.insheader("X-Top", "a\r\n b", 0)
    ctx.chgheader("Subject", "new\n\tsubject", 1)
    assert [a.value for a in ctx.actions] == ["first\n\tsecond\n third", "a\n b", "new\n\tsubject"]


def test_packets_of_exactly_the_limit_are_accepted():
    """65535 bytes of data (the default packet size): a header's name, value and their NULs (and
    the index of insheader/chgheader); a tab and 8-bit text in a value are fine."""
    ctx = eom_context()
    ctx.addheader("X-Big", "x" * 65528)
    ctx.insheader("X-Big", "x" * 65524, 0)
    ctx.chgheader("X-Big", "€" * 21841 + "x", 1)  # 65524 bytes of UTF-8
    ctx.addheader("N" * 65532, "v")
    ctx.quarantine("r" * 65534)
    ctx.addheader("X-Tab", "a\tb \udcff")
    assert len(ctx.actions) == 6


# ---------------------------------------------------------------- through Tcl, with the wire checked

TCL_CASES = {
    # key: (Tcl script, words of the error)
    "rcode-999": (r"$ctx setreply 999 x", ['"999"', "4xx or 5xx"]),
    "rcode-250": (r"$ctx setreply 250 2.0.0 ok", ['"250"']),
    "xcode-bad": (r"$ctx setreply 550 5.7 x", ['"5.7"']),
    "xcode-class": (r"$ctx setreply 550 4.7.1 x", ["match"]),
    "text-crlf": (r"$ctx setreply 550 5.7.1 a\r\nb", ["CR, LF"]),
    "text-cr": (r"$ctx setreply 550 5.7.1 a\rb", ["CR, LF"]),
    "text-nul": (r"$ctx setreply 550 5.7.1 a\0b", ["NUL"]),
    "lone-percent": (r"$ctx setreply 550 5.7.1 {100% sure}", ["lone %", "%%"]),
    "ml-33": (r"$ctx setmlreply 550 5.7.1 {*}[lrepeat 33 line]", ["32"]),
    "ml-crlf": (r"$ctx setmlreply 550 5.7.1 ok a\nb", ["CR, LF"]),
    "ml-percent": (r"$ctx setmlreply 550 5.7.1 ok {50%}", ["lone %"]),
    "name-colon": (r"$ctx addheader X-A:B v", ['"X-A:B"']),
    "name-space": (r"$ctx addheader {X A} v", ['"X A"']),
    "name-ctl": (r"$ctx addheader X\x01A v", ["invalid header name"]),
    "name-tab": (r"$ctx insheader X\tA v", ["invalid header name"]),
    "name-empty": (r"$ctx chgheader {} 1 v", ["invalid header name"]),
    "value-lf": (r"$ctx addheader X-A a\nb", ["fold"]),
    "value-cr": (r"$ctx addheader X-A a\rb", ["fold"]),
    "value-crlf": (r"$ctx chgheader X-A a\r\nb", ["fold"]),
    "value-nul": (r"$ctx insheader X-A a\0b", ["X-A"]),
    "index-neg": (r"$ctx chgheader X-A -1 v", ["-1"]),
    "index-word": (r"$ctx insheader X-A one v", ['expected integer but got "one"']),
    "rcpt-empty": (r"$ctx addrcpt {}", ["recipient"]),
    "rcpt-crlf": (r"$ctx addrcpt <a@example.com>\r\n", ["recipient"]),
    "rcpt-args": (r"$ctx addrcpt <a@example.com> NOTIFY=NEVER\n", ["ESMTP"]),
    "delrcpt-lf": (r"$ctx delrcpt <a@example.com>\n", ["recipient"]),
    "from-cr": (r"$ctx chgfrom <s@example.org>\r", ["sender"]),
    "from-args": (r"$ctx chgfrom <s@example.org> RET=HDRS\n", ["ESMTP"]),
    "quarantine-empty": (r"$ctx quarantine {}", ["reason"]),
    "name-utf8": (r"$ctx addheader X-Ünï v", ['"X-Ünï"', "ASCII"]),
    "value-esc": (r"$ctx addheader X-A a\x1b\[2Jb", ['"X-A"', r"control character \x1b"]),
    "value-del": (r"$ctx insheader X-A 0 a\x7fb", [r"\x7f"]),
    "value-soh": (r"$ctx chgheader X-A a\x01b", [r"\x01"]),
    "quarantine-lf": (r"$ctx quarantine held\nx", ["reason"]),
    "quarantine-esc": (r"$ctx quarantine held\x1b", ["reason"]),
    "header-too-big": (r"$ctx addheader X-Big [string repeat x 65529]", ["addheader", "65536", "65535"]),
    "name-too-long": (r"$ctx addheader [string repeat N 65533] v", ["addheader", "65536", "65535"]),
    "quarantine-too-big": (r"$ctx quarantine [string repeat r 65535]", ["quarantine", "65536"]),
    "reply-bytes": (r"$ctx setreply 550 5.7.1 [string repeat € 327]", ["980 bytes"]),
    "index-u32": (r"$ctx chgheader X-A 4294967296 v", ["bad index 4294967296: must be 0 to 4294967295"]),
    "text-digit": (r"$ctx setreply 550 {4 apples left}", ['reply text "4 apples left" starts with a digit, '
                                                          "which MTAs read as an extended code: "
                                                          "give the extended code too, like 5.0.0"]),
    "text-digit-empty-xcode": (r"$ctx setreply 451 {} {5 retries}", ['"5 retries" starts with a digit']),
    "text-other-xcode": (r"$ctx setreply 550 5.7.1 {5.1.1 no such user}", ["opens with the extended code 5.1.1"]),
}

TCL_VALID = r"""
    T ok-percent {$ctx setreply 550 5.7.1 {100%% sure}}
    T ok-digit-after-xcode {$ctx setreply 550 5.7.1 {4 apples left}}
    T ok-xcode-in-text {$ctx setreply 550 {5.7.1 go away}}
    T ok-ml-digit {$ctx setmlreply 550 {} {4 apples} {5 pears}}
    T ok-ml32 {$ctx setmlreply 451 4.7.1 {*}[lrepeat 32 wait]}
    T ok-fold {$ctx addheader X-Folded "first\r\n\tsecond"}
    T ok-rcpt {$ctx addrcpt <new@example.com> NOTIFY=NEVER}
"""


def test_tcl_errors_are_clear_and_nothing_malformed_reaches_the_wire(tclrun):
    cases = "\n".join(f"    T {key} {{{script}}}" for key, (script, _) in TCL_CASES.items())
    m = tclrun(TCL_HELPERS + r"""
package require TclMilter
proc eom {ctx} {
""" + cases + TCL_VALID + r"""
    if {[catch {$ctx setreply 999 x} msg]} { R catch-example $msg }
    return SMFIS_TEMPFAIL
}
proc eom2 {ctx} { return SMFIS_CONTINUE }
milter register eom eom
milter main
""")
    with m.mta() as mta:
        mta.negotiate()
        assert ok(mta.connect())
        final = mta.message()["eom"]
    assert m.stop() == 0  # the whole output is read
    r = m.results()
    assert r["catch-example"] == 'invalid reply code "999": must be 4xx or 5xx'
    for key, (script, words) in TCL_CASES.items():
        assert r[key].startswith("ERR "), (key, script, r[key])
        for word in words:
            assert word in r[key], (key, r[key])
    for key in ("ok-percent", "ok-ml32", "ok-fold", "ok-rcpt", "ok-digit-after-xcode", "ok-xcode-in-text",
                "ok-ml-digit"):
        assert r[key] == "OK ", (key, r[key])
    # the last good setmlreply goes out with the tempfail; nothing of the refused calls does
    # (modifications are dropped with a tempfail verdict)
    text = "\r\n".join(f"451{'-' if i < 31 else ' '}4.7.1 wait" for i in range(32))
    assert final == [("y", z(text))], final


def test_tcl_valid_modifications_go_out_exactly_and_refused_ones_do_not(tclrun):
    m = tclrun(TCL_HELPERS + r"""
package require TclMilter
proc eom {ctx} {
    catch {$ctx addheader Bad:Name v}
    $ctx addheader X-Folded "first\r\n\tsecond"
    catch {$ctx addheader X-B "a\nb"}
    catch {$ctx addrcpt "<x@example.com>\r\nDATA"}
    $ctx addrcpt <new@example.com> NOTIFY=NEVER
    catch {$ctx chgfrom ""}
    catch {$ctx insheader X-C -5 v}
    $ctx insheader X-C 0 v
    return SMFIS_CONTINUE
}
milter register eom eom
milter main
""")
    with m.mta() as mta:
        mta.negotiate()
        final = mta.message()["eom"]
    assert final == [
        ("h", b"X-Folded\0first\n\tsecond\0"),
        ("2", b"<new@example.com>\0NOTIFY=NEVER\0"),
        ("i", b"\0\0\0\0X-C\0v\0"),
        ("c", b""),
    ], final
    assert m.stop() == 0


# ---------------------------------------------------------------- gaps found (these fail until fixed)


def test_chgheader_delete_validates_the_header_name():
    """``chgheader name ""`` (delete) skips the name check (context.py: check_header only when the value
    is not empty), so a name with a colon, space, CR/LF goes on the wire, and one with a NUL makes the
    engine tempfail the whole message at end of message instead of failing the call."""
    for name in ("Bad Name", "X-A:B", "X\r\nInjected", "X\0Y", ""):
        ctx = eom_context()
        with pytest.raises(MilterError):
            ctx.chgheader(name, "", 1)
        assert ctx.actions == [], name


def test_header_index_beyond_32_bits_is_refused_in_the_call():
    """An index that does not fit the protocol's u32 is accepted by chgheader/insheader and only fails
    when the end-of-message reply is encoded: the whole message is tempfailed instead of the call
    raising. (insheader 4294967296 ...)"""
    for call in (lambda c: c.chgheader("X-A", "v", 2**32), lambda c: c.insheader("X-A", "v", 2**40)):
        ctx = eom_context()
        with pytest.raises(MilterError):
            call(ctx)
        assert ctx.actions == []


def test_a_bad_delete_does_not_tempfail_the_message_on_the_wire():
    """The same gap seen by the MTA: a filter that catches nothing and deletes a header with a NUL in
    its name gets its whole message tempfailed (LocalProtocolError at encoding), not an error in the
    callback."""
    m = make_milter()
    errors = []

    @m.register("eom")
    def eom(ctx):
        try:
            ctx.chgheader("X\0Y", "", 1)
        except MilterError as exc:
            errors.append(str(exc))
        ctx.addheader("X-Filtered", "yes")
        return CONTINUE

    with serving(m) as srv, srv.raw() as mta:
        mta.envelope()
        final = mta.eom()
    assert errors, "the call should have failed"
    assert final == [(b"h", z("X-Filtered", "yes")), (b"c", b"")], final


# ---------------------------------------------------------------- what the MTA negotiated, checked at the call

P_MDS_1M = 0x20000000
MDS_1M = 1048575


def test_a_modification_the_mta_did_not_grant_fails_at_the_call_naming_the_flag():
    """An MTA that grants only SMFIF_ADDHDRS (as one configured so would): every other
    modification raises MilterError in the callback, naming the flag; the message is not
    tempfailed at end of message, and what was granted goes out."""
    m = make_milter()
    errors = {}

    @m.register("eom")
    def eom(ctx):
        for what, call in [
            ("chgheader", lambda: ctx.chgheader("Subject", "x")),
            ("addrcpt", lambda: ctx.addrcpt("<new@example.com>")),
            ("addrcpt-par", lambda: ctx.addrcpt("<new@example.com>", "NOTIFY=NEVER")),
            ("delrcpt", lambda: ctx.delrcpt("<b@example.com>")),
            ("chgfrom", lambda: ctx.chgfrom("<new@example.org>")),
            ("quarantine", lambda: ctx.quarantine("held")),
            ("replacebody", lambda: ctx.replacebody(b"new body")),
        ]:
            try:
                call()
            except MilterError as exc:
                errors[what] = str(exc)
        ctx.insheader("X-Top", "1", 0)
        ctx.addheader("X-Filtered", "yes")
        return CONTINUE

    with serving(m) as srv, srv.raw(actions=F_ADDHDRS) as mta:
        mta.envelope()
        final = mta.eom()
    assert final == [(b"i", b"\0\0\0\0" + z("X-Top", "1")), (b"h", z("X-Filtered", "yes")), (b"c", b"")], final
    flags = {"chgheader": "CHGHDRS", "addrcpt": "ADDRCPT", "addrcpt-par": "ADDRCPT_PAR", "delrcpt": "DELRCPT",
             "chgfrom": "CHGFROM", "quarantine": "QUARANTINE", "replacebody": "CHGBODY"}
    assert set(errors) == set(flags), errors
    for what, flag in flags.items():
        assert errors[what] == (f"{what.split('-')[0]} needs the SMFIF_{flag} action, which the MTA did not "
                                "grant in option negotiation"), errors[what]


def test_the_packet_size_is_the_one_negotiated():
    """A 200 kB header value: refused at the call when the MTA takes the default 65535 bytes, sent
    as one packet when it agreed to 1 MB (SMFIP_MDS_1M); a body of any size is split as before."""
    big = "x" * 200_000
    m = make_milter(max_data_size=MDS_1M)
    errors = []

    @m.register("eom")
    def eom(ctx):
        try:
            ctx.addheader("X-Big", big)
        except MilterError as exc:
            errors.append(str(exc))
        ctx.replacebody(b"y" * 150_000)
        return CONTINUE

    with serving(m) as srv:
        with srv.raw() as mta:  # no MDS bit offered
            mta.envelope()
            default = mta.eom()
        with srv.raw(protocol=ALL_PROTO | P_MDS_1M) as mta:
            assert mta.negotiated[2] & P_MDS_1M
            mta.envelope()
            one_mb = mta.eom()
    assert errors == ["addheader: a packet of 200007 bytes of data, more than the 65535 the MTA accepts"]
    assert [code for code, _ in default] == [b"b", b"b", b"b", b"c"], [c for c, _ in default]
    assert one_mb[0] == (b"h", z("X-Big", big)) and [code for code, _ in one_mb[1:]] == [b"b", b"b", b"b", b"c"]


TCL_NOT_GRANTED = TCL_HELPERS + r"""
package require TclMilter
proc eom {ctx} {
    T chgfrom {$ctx chgfrom <new@example.org>}
    T quarantine {$ctx quarantine held}
    T replacebody {$ctx replacebody x}
    T chgheader {$ctx chgheader Subject x}
    T big {$ctx addheader X-Big [string repeat x 1000000]}
    if {[catch {$ctx addrcpt <new@example.com>} msg]} { R caught $msg }
    $ctx addheader X-Ok yes
    return SMFIS_CONTINUE
}
milter register eom eom
milter main
"""


def test_tcl_gets_a_catchable_error_for_an_action_not_granted_or_a_packet_too_big(tclrun):
    m = tclrun(TCL_NOT_GRANTED)
    with m.mta() as mta:
        mta.negotiate(actions=K.SMFIF_ADDHDRS)
        final = mta.message()["eom"]
    assert m.stop() == 0
    r = m.results()
    not_granted = "needs the SMFIF_{} action, which the MTA did not grant in option negotiation"
    assert r["chgfrom"] == "ERR chgfrom " + not_granted.format("CHGFROM")
    assert r["quarantine"] == "ERR quarantine " + not_granted.format("QUARANTINE")
    assert r["replacebody"] == "ERR replacebody " + not_granted.format("CHGBODY")
    assert r["chgheader"] == "ERR chgheader " + not_granted.format("CHGHDRS")
    assert r["caught"] == "addrcpt " + not_granted.format("ADDRCPT")
    assert r["big"] == "ERR addheader: a packet of 1000007 bytes of data, more than the 65535 the MTA accepts"
    assert final == [("h", b"X-Ok\0yes\0"), ("c", b"")], final


#: The recipient picks what eom does: a script's runaway loop of header changes or of body
#: chunks, or a legitimate new body of 40 MB with 1 000 headers.
RUNAWAY = r"""
package require TclMilter
set ::chunk [string repeat x 4000000]
proc rcpt {ctx to args} { $ctx setpriv to $to; return SMFIS_CONTINUE }
proc eom {ctx} {
    switch -- [$ctx getpriv to] {
        <headers@example.org> { while 1 { $ctx addheader X-Loop [string repeat v 100] } }
        <body@example.org> { while 1 { $ctx replacebody $::chunk } }
        default {
            for {set i 0} {$i < 1000} {incr i} { $ctx addheader X-N $i }
            for {set i 0} {$i < 10} {incr i} { $ctx replacebody $::chunk }
        }
    }
    return SMFIS_CONTINUE
}
milter register envrcpt rcpt
milter register eom eom
milter main
"""


def _eom_for(m, rcpt: str) -> list[tuple[str, bytes]]:
    with m.mta() as mta:
        mta.negotiate()
        steps = mta.message(rcpts=[rcpt])
        assert all(ok(r) for r in steps["rcpt"]), steps
        return steps["eom"]


@pytest.mark.parametrize(("rcpt", "error"), [
    ("<headers@example.org>", r"addheader: this message has 100000 modifications already, the most one may have "
                              r"\(a loop in the script\?\)"),
    ("<body@example.org>", r"replacebody: this message's modifications would pass 1024 MiB, the most they may "
                           r"hold \(1072000000 bytes queued already; a loop in the script\?\)"),
])
def test_a_scripts_runaway_modifications_fail_the_message_not_the_process(tclrun, rcpt: str, error: str) -> None:
    """A loop of addheader (or replacebody) at eom queued 150 MB a second until -calltimeout
    (60 s) stopped it: the process ran out of memory first, and every connection with it. Now
    the call past the bound is a Tcl error: the message gets -onerror (tempfail) and no
    modification, one line says why, and the next message with a legitimate 40 MB body is served."""
    m = tclrun(RUNAWAY)
    eom = _eom_for(m, rcpt)
    assert [cmd for cmd, _ in eom] == ["t"], [cmd for cmd, _ in eom]
    m.wait_for(rf"ERROR: conn#1: eom callback eom failed \({error}\), answering SMFIS_TEMPFAIL")
    eom = _eom_for(m, "<fine@example.org>")
    cmds = [cmd for cmd, _ in eom]
    assert cmds.count("h") == 1000 and cmds[-1] == "c", cmds[-5:]
    assert sum(len(data) for cmd, data in eom if cmd == "b") == 40_000_000
    assert m.stop() == 0
    assert m.text.count(" ERROR: ") == 1, m.text


# ---------------------------------------------------------------- surrogates that are no byte

#: A lone surrogate that is not one of the bytes rule's U+DC80..U+DCFF (JSON's "\ud800", half of a
#: pair): it has no UTF-8, so it cannot be sent as the character it is.
LONE = "a\ud800b"
LONE_CALLS = {
    "addheader": lambda c: c.addheader("X-A", LONE),
    "chgheader": lambda c: c.chgheader("X-A", LONE, 1),
    "insheader": lambda c: c.insheader("X-A", LONE, 0),
    "addrcpt": lambda c: c.addrcpt(f"<{LONE}@example.com>"),
    "addrcpt_par": lambda c: c.addrcpt("<a@example.com>", f"X={LONE}"),
    "delrcpt": lambda c: c.delrcpt(f"<{LONE}@example.com>"),
    "chgfrom": lambda c: c.chgfrom(f"<{LONE}@example.org>"),
    "chgfrom-args": lambda c: c.chgfrom("<a@example.org>", f"X={LONE}"),
    "quarantine": lambda c: c.quarantine(LONE),
    "replacebody": lambda c: c.replacebody(LONE),
    "setreply": lambda c: c.setreply("550", "5.7.1", LONE),
    "setmlreply": lambda c: c.setmlreply("550", "5.7.1", "ok", LONE),
    "low-surrogate": lambda c: c.addheader("X-A", "\udfff"),
    "pair-as-two": lambda c: c.addheader("X-A", "\ud83d\ude00"),  # a Python str holds the character, not a pair
}


def test_python_modifications_with_a_lone_surrogate_are_refused_and_nothing_is_sent():
    """Such a character was sent as U+FFFD (codec.wire's fallback): the mail silently altered.
    Now each call is a MilterError naming it, as an oversize packet is, and nothing goes out; an
    escaped byte (U+DCFF) beside it is still its byte."""
    m = make_milter()
    errors: dict[str, str] = {}

    def negotiate(ctx, version, actions, protocol):
        try:
            ctx.setsymlist("connect", f"j {{{LONE}}}")
        except MilterError as exc:
            errors["setsymlist"] = str(exc)
        return CONTINUE

    @m.register("eom")
    def eom(ctx):
        for name, call in LONE_CALLS.items():
            try:
                call(ctx)
            except MilterError as exc:
                errors[name] = str(exc)
        ctx.addheader("X-Ok", "\udcff")
        return CONTINUE

    m.register("negotiate", negotiate)
    with serving(m) as srv, srv.raw(negotiate=False) as mta:
        _, _, _, macros = mta.optneg(6, None, ALL_PROTO)
        mta.envelope()
        final = mta.eom()
    assert macros == {}
    assert final == [(b"h", b"X-Ok\0\xff\0"), (b"c", b"")], final
    assert set(errors) == {*LONE_CALLS, "setsymlist"}, errors
    for name, message in errors.items():
        assert "U+D" in message and "surrogate" in message, (name, message)
    assert r'"a\ud800b"' in errors["addheader"], errors["addheader"]


TCL_LONE = TCL_HELPERS + r"""
package require TclMilter
proc eom {ctx} {
    set lone a[format %c 0xD800]b
    T addheader {$ctx addheader X-A $lone}
    T escape {$ctx addheader X-A "a\ud800b"}
    T low {$ctx insheader X-A 0 [format %c 0xDFFF]}
    T chgheader {$ctx chgheader X-A 1 $lone}
    T addrcpt {$ctx addrcpt <$lone@example.com>}
    T addrcpt_par {$ctx addrcpt <a@example.com> X=$lone}
    T delrcpt {$ctx delrcpt <$lone@example.com>}
    T chgfrom {$ctx chgfrom <$lone@example.org>}
    T quarantine {$ctx quarantine $lone}
    T setreply {$ctx setreply 550 5.7.1 $lone}
    T setmlreply {$ctx setmlreply 550 5.7.1 ok $lone}
    T replacebody {$ctx replacebody "body $lone"}
    T replacebody-big {$ctx replacebody "[string repeat x 70000]$lone"}
    $ctx addheader X-Pair [format %c 0xD83D][format %c 0xDE00]
    $ctx addheader X-Byte [encoding convertfrom identity \xed\xb3\xbf]
    return SMFIS_CONTINUE
}
milter register eom eom
milter main
"""


def test_tcl_modifications_with_a_lone_surrogate_are_refused_and_a_pair_is_its_character(tclrun):
    """Tcl keeps a surrogate as its CESU-8 bytes (ED A0 80 for U+D800), which went to the MTA as
    they were: not UTF-8, and read back as three bytes, not the script's one character. Now it
    is a Tcl error at the call; a surrogate pair is the character beyond U+FFFF, sent as its
    4-byte UTF-8, and an escaped byte (U+DCFF) as that byte."""
    m = tclrun(TCL_LONE)
    with m.mta() as mta:
        mta.negotiate()
        final = mta.message()["eom"]
    assert m.stop() == 0
    r = m.results()
    assert final == [("h", z("X-Pair", "\U0001f600")), ("h", b"X-Byte\0\xff\0"), ("c", b"")], final
    for key in ("addheader", "escape", "low", "chgheader", "addrcpt", "addrcpt_par", "delrcpt", "chgfrom",
                "quarantine", "setreply", "setmlreply", "replacebody", "replacebody-big"):
        assert r[key].startswith("ERR ") and "surrogate" in r[key], (key, r[key])
    assert r["addheader"] == (r'ERR "a\ud800b" holds U+D800, a surrogate that is no byte (those are '
                              "U+DC80..U+DCFF): it has no UTF-8 to send"), r["addheader"]
    assert "U+DFFF" in r["low"], r["low"]
