"""A hostile or quirky MTA against the live server: what tests/test_hardening_malformed.py's
sessions leave out (a peer that names itself with a log line of its own, a frame's length
written a byte at a time, a macro value without its NUL). Each bad connection is closed with
one escaped warning, and the connection beside it is served to its end."""

from __future__ import annotations

import logging
import socket
import struct
import time

from pytclmilter import CONTINUE
from support.engine import RawMTA, make_milter, serving, wait_for

LOG = "pytclmilter"


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_unix_peer_whose_socket_path_holds_a_newline_is_named_escaped(caplog, tmp_path):
    """A local peer names its own end of a unix socket (bind): a path with a line break in it
    made the warning two lines, the second the peer's own."""
    caplog.set_level(logging.INFO, logger=LOG)
    path = tmp_path / "m.sock"
    with serving(make_milter(connection=f"unix:{path}", timeout=5)):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(5)
        sock.bind(str(tmp_path / "x\nconn#99: forged"))
        sock.connect(str(path))
        mta = RawMTA(sock)
        mta.send(b"Z", b"garbage")
        mta.expect_eof()
        mta.close()
        wait_for(lambda: warnings_of(caplog))
    [line] = warnings_of(caplog)
    assert "\n" not in line, line
    assert "x\\nconn#99: forged" in line, line


def test_a_zero_length_written_a_byte_at_a_time_is_refused_at_once(caplog):
    """The length alone tells a zero-length packet (codec.FrameReader): told at once whether its
    four bytes come in one write or in several, not at the I/O timeout with nothing logged."""
    caplog.set_level(logging.INFO, logger=LOG)
    with serving(make_milter(timeout=30)) as srv:
        good = srv.raw()
        assert good.connect() == (b"c", b"")
        bad = srv.raw()
        assert bad.connect() == (b"c", b"")
        for byte in b"\0\0\0\0":
            bad.send_raw(bytes([byte]))
            time.sleep(0.05)
        assert bad.expect_eof(timeout=3) < 3
        bad.close()
        assert good.helo() == (b"c", b"")
        good.quit()
        good.expect_eof()
    [line] = warnings_of(caplog)
    assert line.endswith("closing the connection: zero-length packet"), line


def test_an_oversize_length_written_in_two_writes_is_refused_at_once(caplog):
    caplog.set_level(logging.INFO, logger=LOG)
    with serving(make_milter(timeout=30)) as srv:
        bad = srv.raw()
        assert bad.connect() == (b"c", b"")
        raw = struct.pack("!I", 65537)
        bad.send_raw(raw[:2])
        time.sleep(0.05)
        bad.send_raw(raw[2:])
        assert bad.expect_eof(timeout=3) < 3
        bad.close()
    [line] = warnings_of(caplog)
    assert line.endswith("packet of 65536 bytes exceeds the limit of 65535"), line


def test_a_macro_value_without_its_nul_is_no_value():
    """libmilter reads a macro packet's strings up to each NUL and drops what follows the last
    one: a last value without its NUL is no value. It was taken as one here, so a script saw a
    macro a libmilter filter never sees."""
    seen: list[tuple[str | None, str | None]] = []
    m = make_milter(timeout=5)

    def record(ctx, *args):
        seen.append((ctx.getsymval("j"), ctx.getsymval("k")))
        return CONTINUE

    m.register("connect", record)
    m.register("helo", record)
    with serving(m) as srv:
        mta = srv.raw()
        mta.send(b"D", b"Cj\0mx.example\0k\0unterminated")
        assert mta.connect() == (b"c", b"")
        mta.send(b"D", b"Cj\0unterminated")  # no whole pair: dropped, the slot stays (docs/protocol.md §5.3)
        assert mta.helo() == (b"c", b"")
        mta.quit()
        mta.expect_eof()
    assert seen == [("mx.example", None), ("mx.example", None)]
