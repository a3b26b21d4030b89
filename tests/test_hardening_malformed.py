"""Hand-written malformed sessions against the live server (Python API and ``pytclmilter run``).

Each session of :data:`SESSIONS` is played on its own connection while
another connection is open in the middle of a message. A session that breaks
the protocol must close only its own connection with exactly one log line
(WARNING) naming it; a session that is odd but legal (10 000 headers, invalid
UTF-8 everywhere, an out-of-order ABORT) must be answered with no warning at
all. Either way the open connection finishes its message and the next
connection is served.

The engine's documented choices (src/pytclmilter/protocol/session.py): a command
that needs a reply and is not allowed even after libmilter's fall-back to the
HELO state closes the connection with a log line; an ABORT (or QUIT_NC) out of
order is ignored silently.
"""

from __future__ import annotations

import logging
import re
import socket
import struct
import time
from dataclasses import dataclass
from typing import Callable

import pytest

from pytclmilter import CONTINUE
from support.engine import P_NR_HDR, RawMTA, frame, make_milter, serving, wait_for, z
from support.tclrun import tclrun_factory

LOG = "pytclmilter"
tclrun = pytest.fixture(tclrun_factory, name="tclrun")

BAD = b"\xff\xfe\xc3\x28\xed\xa0\x80\xf0\x28\x8c\x28\x80"  # invalid UTF-8: lone bytes, bad sequences, a surrogate
OK = (b"c", b"")


# ---------------------------------------------------------------- the MTA side of each session


def connect_payload(host: bytes = b"client.example", family: bytes = b"4", port: int = 4321,
                    address: bytes = b"192.0.2.1") -> bytes:
    return host + b"\0" + family + (struct.pack("!H", port) + address + b"\0" if family != b"U" else b"")


def expect(mta: RawMTA, code: bytes, payload: bytes = b"") -> None:
    mta.send(code, payload)
    assert mta.reply() == OK, (code, payload)


def to_rcpt(mta: RawMTA) -> None:
    expect(mta, b"C", connect_payload())
    expect(mta, b"H", z("client.example"))
    expect(mta, b"M", z("<a@example.org>"))
    expect(mta, b"R", z("<b@example.com>"))


def headers_replied(mta: RawMTA) -> bool:
    assert mta.negotiated is not None
    return not (mta.negotiated[2] & P_NR_HDR)


def to_body(mta: RawMTA) -> None:
    to_rcpt(mta)
    expect(mta, b"T")
    mta.send(b"L", z("Subject", "hello"))
    if headers_replied(mta):
        assert mta.reply() == OK
    expect(mta, b"N")


def eom(mta: RawMTA) -> list[tuple[bytes, bytes]]:
    mta.send(b"E")
    return mta.until_final()


@dataclass
class Session:
    """``play`` drives the connection after option negotiation (``negotiate=False``: before it)."""

    play: Callable[[RawMTA], None]
    closes: bool  # True: a protocol error, the filter closes; False: answered, no warning
    negotiate: bool = True


def s_zero_length(mta: RawMTA) -> None:
    expect(mta, b"C", connect_payload())
    mta.send_raw(b"\0\0\0\0H")


def s_zero_length_alone(mta: RawMTA) -> None:
    """Only the length, and the peer waits: the connection stayed open until the I/O timeout,
    with nothing logged, for want of a command byte that never came."""
    expect(mta, b"C", connect_payload())
    mta.send_raw(b"\0\0\0\0")


def s_oversize_length_alone(mta: RawMTA) -> None:
    expect(mta, b"C", connect_payload())
    mta.send_raw(struct.pack("!I", 65537))


def s_oversize(mta: RawMTA) -> None:
    expect(mta, b"C", connect_payload())
    mta.send_raw(struct.pack("!I", 65537) + b"B" + b"x" * 1000)


def s_oversize_huge(mta: RawMTA) -> None:
    to_body(mta)
    mta.send_raw(struct.pack("!I", 0xFFFFFFFF) + b"B")


def s_truncated_then_eof(mta: RawMTA) -> None:
    to_rcpt(mta)
    mta.send_raw(frame(b"T")[:3])
    mta.sock.shutdown(socket.SHUT_WR)


def s_truncated_payload(mta: RawMTA) -> None:
    mta.send(b"C", b"client.example\x004\x10")  # port cut short, no address


def s_unknown_command(mta: RawMTA) -> None:
    expect(mta, b"C", connect_payload())
    mta.send(b"Z", b"what is this")


def s_reply_code_as_command(mta: RawMTA) -> None:
    to_rcpt(mta)
    mta.send(b"c")


def s_body_before_mail(mta: RawMTA) -> None:
    expect(mta, b"C", connect_payload())
    expect(mta, b"H", z("client.example"))
    mta.send(b"B", b"body without a message\r\n")


def s_rcpt_before_mail(mta: RawMTA) -> None:
    expect(mta, b"C", connect_payload())
    mta.send(b"R", z("<b@example.com>"))


def s_eom_twice(mta: RawMTA) -> None:
    to_body(mta)
    expect(mta, b"B", b"Hello\r\n")
    assert eom(mta)[-1] == OK
    mta.send(b"E")


def s_header_without_nul(mta: RawMTA) -> None:
    to_rcpt(mta)
    expect(mta, b"T")
    mta.send(b"L", b"Subject: no NUL anywhere")


def s_header_without_value(mta: RawMTA) -> None:
    to_rcpt(mta)
    expect(mta, b"T")
    mta.send(b"L", b"Subject\0")


def s_header_empty_name(mta: RawMTA) -> None:
    to_rcpt(mta)
    expect(mta, b"T")
    mta.send(b"L", b"\0value\0")


def s_mail_without_nul(mta: RawMTA) -> None:
    expect(mta, b"C", connect_payload())
    mta.send(b"M", b"<a@example.org>")


def s_empty_body_chunk(mta: RawMTA) -> None:
    to_body(mta)
    mta.send(b"B")


def s_empty_macro(mta: RawMTA) -> None:
    mta.send(b"D")


def s_unknown_family(mta: RawMTA) -> None:
    mta.send(b"C", b"client.example\0X")


def s_optneg_twice(mta: RawMTA) -> None:
    mta.send(b"O", struct.pack("!III", 6, 0x1FF, 0x1FFFFF))


def s_connect_before_optneg(mta: RawMTA) -> None:
    mta.send(b"C", connect_payload())


def s_short_optneg(mta: RawMTA) -> None:
    mta.send(b"O", b"\0\0\0\x06\0\0")


def s_old_mta_version(mta: RawMTA) -> None:
    mta.send(b"O", struct.pack("!III", 1, 0x1FF, 0x1FFFFF))


def s_noise(mta: RawMTA) -> None:
    mta.send_raw(bytes(range(256)) * 4)


def s_ten_thousand_headers(mta: RawMTA) -> None:
    to_rcpt(mta)
    expect(mta, b"T")
    replied = headers_replied(mta)
    batch = b"".join(frame(b"L", z(f"X-H{i}", f"value {i}")) for i in range(10_000))
    mta.send_raw(batch)
    if replied:
        for _ in range(10_000):
            assert mta.reply() == OK
    expect(mta, b"N")
    expect(mta, b"B", b"Hello\r\n")
    final = eom(mta)
    assert (b"h", z("X-Headers", "10000")) in final and final[-1] == OK, final
    mta.quit()


def s_invalid_utf8_everywhere(mta: RawMTA) -> None:
    mta.send(b"D", b"Cj\0mx." + BAD + b"\0{daemon_name}\0" + BAD + b"\0")
    # (a unix path: an IP address with these bytes is no address, and ends the session, §2.1)
    expect(mta, b"C", connect_payload(b"host" + BAD, b"L", 0, b"/run/" + BAD))
    expect(mta, b"H", z(b"helo" + BAD))
    expect(mta, b"M", z(b"<" + BAD + b"@example.org>", b"X-ARG=" + BAD))
    expect(mta, b"R", z(b"<" + BAD + b"@example.com>"))
    expect(mta, b"U", z(b"XCMD " + BAD))
    expect(mta, b"T")
    mta.send(b"L", z(b"X-" + BAD, b"value " + BAD))
    if headers_replied(mta):
        assert mta.reply() == OK
    mta.send(b"L", z(b"Subject", BAD))
    if headers_replied(mta):
        assert mta.reply() == OK
    expect(mta, b"N")
    expect(mta, b"B", BAD * 3)
    final = eom(mta)
    # the filter echoes what it was given: the very bytes come back
    assert (b"h", z("X-Subject", BAD)) in final, final
    assert (b"h", z("X-Helo", b"helo" + BAD)) in final, final
    assert (b"h", z("X-Macro-J", b"mx." + BAD)) in final, final
    assert (b"b", BAD * 3) in final, final
    assert final[-1] == OK
    mta.quit()


def s_abort_out_of_order(mta: RawMTA) -> None:
    expect(mta, b"C", connect_payload())
    mta.send(b"A")  # before MAIL: ignored silently
    mta.send(b"A")
    expect(mta, b"H", z("client.example"))
    expect(mta, b"M", z("<a@example.org>"))
    expect(mta, b"R", z("<b@example.com>"))
    mta.send(b"A")  # in a message: the abort callback runs, no reply
    expect(mta, b"M", z("<a2@example.org>"))
    mta.quit()


def s_quit_inside_a_message(mta: RawMTA) -> None:
    to_body(mta)
    mta.quit()  # legal: abort and close callbacks run, the filter closes


def s_macro_for_unknown_stage(mta: RawMTA) -> None:
    mta.send(b"D", b"Zname\0value\0")
    mta.send(b"D", b"Codd\0")
    expect(mta, b"C", connect_payload())
    mta.quit()


SESSIONS: dict[str, Session] = {
    "zero-length-frame": Session(s_zero_length, True),
    "zero-length-alone": Session(s_zero_length_alone, True),
    "oversize-length-alone": Session(s_oversize_length_alone, True),
    "oversize-frame": Session(s_oversize, True),
    "oversize-huge-frame-in-body": Session(s_oversize_huge, True),
    "truncated-frame-then-eof": Session(s_truncated_then_eof, True),
    "truncated-connect-payload": Session(s_truncated_payload, True),
    "unknown-command": Session(s_unknown_command, True),
    "reply-code-as-command": Session(s_reply_code_as_command, True),
    "body-before-mail": Session(s_body_before_mail, True),
    "rcpt-before-mail": Session(s_rcpt_before_mail, True),
    "eom-twice": Session(s_eom_twice, True),
    "header-without-nul": Session(s_header_without_nul, True),
    "header-without-value": Session(s_header_without_value, True),
    "header-with-empty-name": Session(s_header_empty_name, True),
    "mail-without-nul": Session(s_mail_without_nul, True),
    "empty-body-chunk": Session(s_empty_body_chunk, True),
    "empty-macro": Session(s_empty_macro, True),
    "unknown-address-family": Session(s_unknown_family, True),
    "optneg-twice": Session(s_optneg_twice, True),
    "connect-before-optneg": Session(s_connect_before_optneg, True, negotiate=False),
    "short-optneg": Session(s_short_optneg, True, negotiate=False),
    "mta-version-1": Session(s_old_mta_version, True, negotiate=False),
    "noise": Session(s_noise, True),
    "ten-thousand-headers": Session(s_ten_thousand_headers, False),
    "invalid-utf8-everywhere": Session(s_invalid_utf8_everywhere, False),
    "abort-out-of-order": Session(s_abort_out_of_order, False),
    "quit-inside-a-message": Session(s_quit_inside_a_message, False),
    "macro-for-unknown-stage": Session(s_macro_for_unknown_stage, False),
}


def _peer_of(sock: socket.socket) -> str:
    """The server's name for the peer at the other end of our ``sock``."""
    if sock.family == socket.AF_UNIX:
        return "unix socket"
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"


def open_mta(address: tuple[int, object], negotiate: bool) -> RawMTA:
    family, addr = address
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(addr)
    mta = RawMTA(sock)
    if negotiate:
        mta.optneg()
    return mta


def finish_good(good: RawMTA) -> None:
    """The connection that was open during the bad one finishes its message."""
    expect(good, b"T")
    good.send(b"L", z("Subject", "still here"))
    if headers_replied(good):
        assert good.reply() == OK
    expect(good, b"N")
    expect(good, b"B", b"Hello\r\n")
    final = eom(good)
    assert (b"h", z("X-Headers", "1")) in final and final[-1] == OK, final
    good.quit()


# ---------------------------------------------------------------- the Python API server


def every_event_milter():
    m = make_milter(timeout=5)
    m.calls = []

    def rec(event):
        def cb(ctx, *args):
            m.calls.append((ctx.name, event))
            if event == "header":
                ctx.setpriv("headers", ctx.getpriv("headers", 0) + 1)
                if args[0] == "Subject":
                    ctx.setpriv("subject", args[1])
            elif event == "helo":
                ctx.setpriv("helo", args[0])
            elif event == "body":
                ctx.setpriv("body", ctx.getpriv("body", b"") + args[0])
            elif event == "eom":
                ctx.addheader("X-Headers", str(ctx.getpriv("headers", 0)))
                if "\udcff" in ctx.getpriv("subject", ""):
                    ctx.addheader("X-Subject", ctx.getpriv("subject"))
                    ctx.addheader("X-Helo", ctx.getpriv("helo"))
                    ctx.addheader("X-Macro-J", ctx.getsymval("j"))
                    ctx.replacebody(ctx.getpriv("body"))
                ctx.unsetpriv()
            if event in ("abort", "close"):
                return None
            return CONTINUE

        return cb

    for event in ("negotiate", "connect", "helo", "envfrom", "envrcpt", "data", "unknown", "header", "eoh", "body",
                  "eom", "abort", "close"):
        if event == "negotiate":
            m.register(event, lambda ctx, v, a, p: CONTINUE)
        else:
            m.register(event, rec(event))
    return m


def conn_name(records: list[logging.LogRecord], sock: socket.socket) -> str | None:
    port = sock.getsockname()[1]
    for r in records:
        found = re.match(rf"(conn#\d+): connection from 127\.0\.0\.1:{port}$", r.getMessage())
        if found:
            return found.group(1)
    return None


@pytest.mark.parametrize("name", sorted(SESSIONS))
def test_malformed_session_against_the_python_api(caplog, name):
    caplog.set_level(logging.DEBUG, logger=LOG)  # "connection from" names the bad connection
    session = SESSIONS[name]
    m = every_event_milter()
    with serving(m) as srv:
        good = open_mta(srv.address, True)
        to_rcpt(good)
        bad = open_mta(srv.address, session.negotiate)
        bad_name = wait_for(lambda: conn_name(caplog.records, bad.sock))
        peer = _peer_of(bad.sock)  # named in the warning: a TCP milter's admin must tell who sent garbage
        session.play(bad)
        bad.expect_eof(timeout=10)
        wait_for(lambda: any(r.getMessage() == f"{bad_name}: closed" or
                             r.getMessage().startswith(f"{bad_name}: closed (") for r in caplog.records))
        finish_good(good)
        good.expect_eof()
        nxt = open_mta(srv.address, True)
        to_rcpt(nxt)
        finish_good(nxt)
        nxt.expect_eof()
        bad.close()
    about_bad = [r for r in caplog.records if r.getMessage().startswith(bad_name + ":")]
    problems = [r.getMessage() for r in about_bad if r.levelno >= logging.WARNING]
    if session.closes:
        assert len(problems) == 1, problems
        assert (f"protocol error from {peer}" in problems[0] or
                f"negotiation with {peer} failed" in problems[0]), problems
    else:
        assert problems == [], problems
    others = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r not in about_bad]
    assert others == [], others
    # the bad connection's context got exactly one close callback
    assert [e for c, e in m.calls if c == bad_name].count("close") == 1


# ---------------------------------------------------------------- the same sessions against `pytclmilter run`

TCL_EVERY_EVENT = r"""
package require TclMilter
proc on_connect {ctx host addr} { return SMFIS_CONTINUE }
proc on_helo {ctx name} { $ctx setpriv helo $name; return SMFIS_CONTINUE }
proc on_envfrom {ctx args} { return SMFIS_CONTINUE }
proc on_envrcpt {ctx args} { return SMFIS_CONTINUE }
proc on_data {ctx} { return SMFIS_CONTINUE }
proc on_unknown {ctx line} { return SMFIS_CONTINUE }
proc on_header {ctx name value} {
    $ctx setpriv headers [expr {[$ctx getpriv headers] + 1}]
    if {$name eq "Subject"} { $ctx setpriv subject $value }
    return SMFIS_CONTINUE
}
proc on_eoh {ctx} { return SMFIS_CONTINUE }
proc on_body {ctx chunk} { $ctx setpriv body "[$ctx getpriv body]$chunk"; return SMFIS_CONTINUE }
proc on_eom {ctx} {
    $ctx addheader X-Headers [$ctx getpriv headers]
    if {[string first \udcff [$ctx getpriv subject]] >= 0} {
        $ctx addheader X-Subject [$ctx getpriv subject]
        $ctx addheader X-Helo [$ctx getpriv helo]
        $ctx addheader X-Macro-J [$ctx getsymval j]
        $ctx replacebody [$ctx getpriv body]
    }
    $ctx setpriv headers 0
    $ctx setpriv body ""
    $ctx setpriv subject ""
    return SMFIS_CONTINUE
}
proc on_abort {ctx} { $ctx setpriv headers 0; $ctx setpriv body ""; $ctx setpriv subject "" }
proc on_close {ctx} { puts "CLOSE $ctx" }
proc on_start {ctx} { $ctx setpriv headers 0; $ctx setpriv body ""; $ctx setpriv subject ""; $ctx setpriv helo "" }
proc on_negotiate {ctx version actions protocol} { return SMFIS_CONTINUE }
foreach e {helo envfrom envrcpt data unknown header eoh body eom abort close negotiate} {
    milter register $e on_$e
}
milter register connect {apply {{ctx host addr} { on_start $ctx; return SMFIS_CONTINUE }}}
milter main
"""


def test_malformed_sessions_against_pytclmilter_run(tclrun):
    """Every session, one after the other, against one `pytclmilter run` process with a callback per event."""
    m = tclrun(TCL_EVERY_EVENT, "--timeout", "5", "--log-level", "debug")  # debug: "connection from"
    address = (socket.AF_INET, ("127.0.0.1", m.port))
    for name, session in SESSIONS.items():
        mark = m.mark()
        good = open_mta(address, True)
        to_rcpt(good)
        bad = open_mta(address, session.negotiate)
        port = bad.sock.getsockname()[1]
        bad_name = m.wait_for(rf"(conn#\d+): connection from 127\.0\.0\.1:{port}\r?\n", since=mark,
                              advance=False).group(1)
        try:
            session.play(bad)
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from exc
        bad.expect_eof(timeout=10)
        m.wait_for(rf"{bad_name}: closed", since=mark, advance=False)
        finish_good(good)
        good.expect_eof()
        nxt = open_mta(address, True)
        to_rcpt(nxt)
        finish_good(nxt)
        nxt.expect_eof()
        bad.close()
        lines = re.sub(r"\r+\n", "\n", m.output[mark:]).splitlines()
        problems = [ln for ln in lines if re.search(r" (WARNING|ERROR): ", ln)]
        mine = [ln for ln in problems if f"{bad_name}:" in ln]
        if session.closes:
            assert len(mine) == 1, (name, mine)
        else:
            assert mine == [], (name, mine)
        assert problems == mine, (name, problems)
        assert sum(1 for ln in lines if ln == f"CLOSE ::tclmilter::ctx{bad_name[5:]}") == 1, (name, lines)
    assert m.stop() == 0


def test_connect_before_option_negotiation_is_logged_as_such(caplog):
    """A CONNECT as the first packet (no OPTNEG): the one log line says what happened, not
    "after HELO" (the state libmilter falls back to), and the connection is closed."""
    caplog.set_level(logging.DEBUG, logger=LOG)
    with serving(every_event_milter()) as srv:
        bad = open_mta(srv.address, False)
        bad_name = wait_for(lambda: conn_name(caplog.records, bad.sock))
        peer = _peer_of(bad.sock)  # named in the warning: a TCP milter's admin must tell who sent garbage
        bad.send(b"C", connect_payload())
        bad.expect_eof()
        bad.close()
    problems = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert problems == [f"{bad_name}: protocol error from {peer}, closing the connection: "
                        "command 'C' is not allowed before option negotiation"], problems


# ---------------------------------------------------------------- HAProxy's send-proxy

OPTNEG = frame(b"O", struct.pack("!III", 6, 0x1FF, 0x1FFFFF))
PROXY_V1 = b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 8891\r\n"
PROXY_V2 = b"\r\n\r\n\x00\r\nQUIT\n" + b"\x21\x11\x00\x0c" + bytes([192, 0, 2, 7, 127, 0, 0, 1]) + b"\x9c\x40\x22\xbb"
HINT = ("(it began with a PROXY protocol header, which a milter does not speak: remove send-proxy from "
        "HAProxy's server lines; docs/deployment.md, HAProxy)")


def send_then_eof(address: tuple[int, object], *pieces: bytes, pause: float = 0.05) -> str:
    """Send ``pieces`` (a pause between them) as the first bytes of a connection; its peer name."""
    bad = open_mta(address, False)
    for piece in pieces:
        bad.send_raw(piece)
        time.sleep(pause)
    bad.expect_eof()
    peer = _peer_of(bad.sock)
    bad.close()
    return peer


@pytest.mark.parametrize("pieces, hinted", [
    ((PROXY_V1 + OPTNEG,), True),  # send-proxy: "unknown command 'Y'"
    ((PROXY_V2 + OPTNEG,), True),  # send-proxy-v2
    ((b"PROX", PROXY_V1[4:] + OPTNEG), True),  # in pieces: the length "PROX" is refused alone
    ((b"\r\n", PROXY_V2[2:] + OPTNEG), True),
    ((b"POST / HTTP/1.0\r\n\r\n",), False),  # other garbage: no hint
    ((b"PROXIMA\r\n",), False),  # like it, but not it, by its fifth byte
    ((b"PR", b"IMA\r\n"), False),  # its start alike, in a piece too short to be refused
])
def test_a_proxy_protocol_header_is_named_in_the_protocol_error(caplog, pieces, hinted):
    """HAProxy with send-proxy: the one warning said only "unknown command 'Y'" (the "Y" of
    "PROXY"), which sent admins looking at the MTA rather than at HAProxy's configuration."""
    caplog.set_level(logging.WARNING, logger=LOG)
    with serving(every_event_milter()) as srv:
        peer = send_then_eof(srv.address, *pieces)
        nxt = open_mta(srv.address, True)  # the next connection is served as ever
        to_rcpt(nxt)
        finish_good(nxt)
        nxt.expect_eof()
    problems = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(problems) == 1, problems
    assert f"protocol error from {peer}" in problems[0], problems
    assert (f"protocol error from {peer} {HINT}, closing the connection: " in problems[0]) == hinted, problems


def test_pytclmilter_run_names_a_proxy_protocol_header(tclrun):
    m = tclrun(TCL_EVERY_EVENT)
    peer = send_then_eof((socket.AF_INET, ("127.0.0.1", m.port)), PROXY_V1 + OPTNEG)
    line = m.wait_for(r"WARNING: (conn#\d+: protocol error from [^\r\n]*)\r?\n")
    assert line.group(1).endswith(f"protocol error from {peer} {HINT}, closing the connection: unknown command 'Y' "
                                  "(said at most once a minute)")
    assert m.stop() == 0


def test_proxy_headers_as_health_checks_send_them_make_one_line_a_minute_with_a_count(caplog):
    """HAProxy's send-proxy puts the header on its health checks too: a connection a second per
    instance (four a second while it is DOWN), each failing alike. Each made a WARNING and an
    INFO line, the first 10 a minute, and a count: 21 lines a minute saying one thing. Now one
    line, and the count of the others once the minute is over, even if none comes after it
    (HAProxy fixed: the last minute's count was never told), or at stop."""
    caplog.set_level(logging.INFO, logger=LOG)
    m = every_event_milter()

    def proxy_lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == LOG and "PROXY" in r.getMessage()]

    with serving(m) as srv:
        for header in [PROXY_V1, PROXY_V2] * 15:
            send_then_eof(srv.address, header + OPTNEG, pause=0)
        lines = [r.getMessage() for r in caplog.records if r.name == LOG]
        assert len(lines) == 1 and lines[0].endswith(f"{HINT}, closing the connection: unknown command 'Y' "
                                                     "(said at most once a minute)"), lines
        m.shared.proxied.seconds = 0  # the minute is over, and no such connection comes after it
        wait_for(lambda: len(proxy_lines()) == 2, timeout=10)
        m.shared.proxied.seconds = 60
        for _ in range(3):  # within the same minute: counted, told at stop
            send_then_eof(srv.address, PROXY_V2 + OPTNEG, pause=0)
        nxt = open_mta(srv.address, True)  # served as ever meanwhile
        to_rcpt(nxt)
        finish_good(nxt)
        nxt.expect_eof()
    assert proxy_lines()[1:] == [
        "29 more connections that began with a PROXY header closed with a protocol error since the last such line "
        "(said at most once a minute)",
        "3 more connections that began with a PROXY header closed with a protocol error since the last such line "
        "(said at most once a minute)"], proxy_lines()
