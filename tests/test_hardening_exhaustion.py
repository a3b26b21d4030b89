"""What one peer of the milter's socket can make ``pytclmilter run`` hold: raw frames over a real
socket against a separate process, whose memory is read from /proc (docs/hardening.md,
"Resource exhaustion from the MTA side")."""

from __future__ import annotations

import re
import signal
import socket
import struct
import urllib.request

import pytest

from support.tclrun import frame, tclrun_factory, warnings, z

tclrun = pytest.fixture(tclrun_factory, name="tclrun")

OPTNEG = frame("O", struct.pack("!III", 6, 0x1FF, 0x1FFFFF))

# Reads a macro no packet has (every stage's pairs are searched) and one at the end of a big
# packet, after the same name as a value: a wrong answer is a reject that says what it got.
MACROS = r"""
package require TclMilter
proc from {ctx args} {
    $ctx getsymval {{nosuch}}
    set got [$ctx getsymval NAME]
    if {$got eq "found"} { return SMFIS_CONTINUE }
    $ctx setreply 550 5.7.1 "got <$got>"
    return SMFIS_REJECT
}
milter register envfrom from
milter main
"""


#: The name read, and a packet's pairs before and after its 3-byte ones: {target} as a value on
#: the way, then last; or a one-letter name in both its forms, the first one's value the answer
#: (which the pairs are walked in order to tell).
BIG_PACKETS = {
    "{target}": ([b"x\0{target}\0"], [z("{target}", "found")]),
    "t": ([b"x\0t\0", z("{t}", "found")], [z("t", "second")]),
}


def _big_macros(stage: bytes, seed: int, name: str = "{target}") -> bytes:
    """A 64 KiB macro packet of 3-byte pairs (BIG_PACKETS)."""
    first, last = BIG_PACKETS[name]
    pairs = list(first)
    size = len(stage) + sum(map(len, first + last))
    i = 0
    while size + 8 < 65000:
        pair = b"%x\0\0" % (seed * 100000 + i)
        pairs.append(pair)
        size += len(pair)
        i += 1
    pairs.extend(last)
    return frame("D", stage + b"".join(pairs))


def _reply(sock: socket.socket) -> bytes:
    head = b""
    while len(head) < 4:
        head += sock.recv(4 - len(head))
    (length,) = struct.unpack("!I", head)
    data = b""
    while len(data) < length:
        data += sock.recv(length - len(data))
    return data


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


@pytest.mark.parametrize("name", BIG_PACKETS)
def test_big_macro_packets_are_kept_as_they_came_not_decoded(tclrun, name):
    """40 peers, each 64 KiB of macro pairs for connect, HELO and MAIL, read by getsymval: before,
    each packet was kept as a dict of 8 000 strings (some 2.4 MB a connection, 100 MB in all).
    A one-letter name has its pairs walked in order, which decodes the packet: not kept either."""
    m = tclrun(MACROS.replace("NAME", "{" + name + "}"))
    pid = m.child.pid
    before = _rss_kb(pid)
    peers = []
    for n in range(40):
        sock = socket.create_connection(("127.0.0.1", m.port), timeout=10)
        peers.append(sock)
        sock.sendall(OPTNEG)
        assert _reply(sock)[:1] == b"O"
        sock.sendall(_big_macros(b"C", n, name) + frame("C", z("client.example") + b"4" + struct.pack("!H", 25) + z("192.0.2.1")))
        assert _reply(sock) == b"c"
        sock.sendall(_big_macros(b"H", n, name) + frame("H", z("helo.example")))
        assert _reply(sock) == b"c"
        sock.sendall(_big_macros(b"M", n, name) + frame("M", z("<a@example.org>")))
        assert _reply(sock) == b"c", "getsymval found the wrong value"
    grown = _rss_kb(pid) - before
    for sock in peers:
        sock.close()
    assert grown < 30_000, f"RSS grew by {grown} kB for 40 peers sending 7.8 MB of macros"
    assert m.stop() == 0


NULL = r"""
package require TclMilter
proc rcpt {ctx args} { return SMFIS_CONTINUE }
milter register envrcpt rcpt
milter main
"""


def test_a_peer_that_reads_no_replies_is_closed_with_one_line_that_says_so(tclrun):
    """It is pushed back (not read while its replies wait) and closed at --timeout; the line said
    "no data for 1s", which sent an admin looking for an MTA that had sent 5 MB of commands."""
    m = tclrun(NULL, "--timeout", "1")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", m.port))
    sock.sendall(OPTNEG)
    assert _reply(sock)[:1] == b"O"
    sock.sendall(frame("M", z("<a@example.org>")))
    assert _reply(sock) == b"c"
    sock.settimeout(0.5)
    batch = frame("R", z("<rcpt@example.org>")) * 1000
    try:
        while True:
            sock.sendall(batch)
    except (TimeoutError, socket.timeout):
        pass  # pushed back
    m.wait_for(r"closing\r?\n", timeout=10)
    assert "conn#1: replies unread by the peer (its receive buffer full: nothing more was read from it) for 1s, " \
           "closing" in m.text, m.text
    assert len(warnings(m.text)) == 1, m.text
    sock.close()
    assert m.stop() == 0


PROGRESS = r"""
package require TclMilter
proc eom {ctx} {
    for {set i 0} {$i < 2000000} {incr i} { $ctx progress }
    puts stderr "progress sent $i times"
    return SMFIS_CONTINUE
}
milter register eom eom
milter main
"""


def test_progress_in_a_loop_to_a_peer_that_reads_nothing_queues_no_more_than_it_has_room_for(tclrun):
    """A progress packet was queued for the peer at each call: a script's loop around `progress`
    (or its call per body line) held 1.5 MB a second more for an MTA that did not read, until
    -calltimeout (60 s by default; never with 0), and uvloop cut the connection with EINVAL once
    a million writes waited: the MTA never got its answer. Now a progress is not queued while
    replies wait unread (the MTA has one to read already): memory stays flat, the MTA gets
    progress and then the answer."""
    m = tclrun(PROGRESS, "--call-timeout", "60")
    pid = m.child.pid
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", m.port))
    sock.sendall(OPTNEG)
    assert _reply(sock)[:1] == b"O"
    before = _rss_kb(pid)
    sock.sendall(frame("E"))
    m.wait_for(r"progress sent 2000000 times", timeout=60)
    grown = _rss_kb(pid) - before
    progress, answer = frame("p"), frame("c")
    sock.settimeout(30)
    received = bytearray()
    while not received.endswith(answer):
        chunk = sock.recv(1 << 20)
        if not chunk:  # (uvloop cut the connection at a queue of a million writes: EINVAL)
            break
        received += chunk
    assert received == progress * (len(received) // len(progress) - 1) + answer, received[-20:]
    assert grown < 3_000, f"RSS grew by {grown} kB for 2 000 000 progress calls the peer did not read"
    sock.close()
    assert m.stop() == 0


#: "unknown command '\x1b'": a packet no MTA sends (ESC, which the line must show escaped).
GARBLED = frame("\x1b")
#: The window of the fault lines cut to 4 s (60 s in production), through the one object that
#: counts them, so that the minute's summary shows within the test.
SHORT_WINDOW = """
def setup(milter):
    if hasattr(milter.shared, "faults"):  # (the test fails by its log, not here, on a build without it)
        milter.shared.faults.seconds = 4.0
"""


def _bad_connections(port: int, count: int, data: bytes = GARBLED, reset: bool = False) -> None:
    """``count`` connections that each send ``data`` and close (with a reset: RST, not FIN)."""
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(data)
        if reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()


def test_a_burst_of_bad_connections_logs_ten_lines_of_each_kind_and_a_count(tclrun):
    """Every connection that broke the protocol made a WARNING and an INFO line: a local user
    opening garbled connections as fast as it can decided the log's size. Now the first 10 of a
    kind in the window are logged whole, the rest counted and told in one line."""
    m = tclrun(NULL, python=[SHORT_WINDOW])
    _bad_connections(m.port, 500)
    m.wait_for(r"WARNING: 490 more connections closed for the same reason, not logged one by one \(the first 10 "
               r"in 4 s are\): protocol error: unknown command '\.\.\.'\r?\n", timeout=15)
    text = m.text
    assert text.count("closing the connection: unknown command '\\x1b'\n") == 10, text
    assert text.count("closed (protocol error)") == 10, text
    assert text.count("more connections closed") == 1, text
    with m.mta() as mta:  # served meanwhile, as ever
        mta.negotiate()
        assert mta.rcpt("<b@example.org>") == ("c", {})
    # a new window: 10 lines again; a kind of its own (resets) counted apart; the counts at stop
    _bad_connections(m.port, 30)
    _bad_connections(m.port, 30, OPTNEG, reset=True)
    m.wait_for(r"(closed \(error: \[Errno 104\] Connection reset by peer\)\r?\n.*){10}", timeout=15)
    # Served after the bursts: every connection of theirs has been accepted (the listen queue is
    # first in, first out), so the stop waits for it. On a loaded machine the last reset could
    # still wait in the queue at the stop, which closes the listener: never the milter's to count.
    with m.mta() as mta:
        mta.negotiate()
    assert m.stop() == 0
    text = m.text
    assert text.count("closing the connection: unknown command '\\x1b'\n") == 20, text
    assert len(re.findall(r"conn#\d+: closed \(error: ", text)) == 10, text
    assert "WARNING: 20 more connections closed for the same reason, not logged one by one (the first 10 in 4 s " \
           "are): protocol error: unknown command '...'\n" in text, text
    assert "WARNING: 20 more connections closed for the same reason, not logged one by one (the first 10 in 4 s " \
           "are): closed (error: [Errno N] Connection reset by peer)\n" in text, text


def test_one_connection_past_the_ten_is_told_as_one(tclrun):
    """The count's line reads right for one: one more connection, not "1 more connections"."""
    m = tclrun(NULL, python=[SHORT_WINDOW])
    _bad_connections(m.port, 11)
    m.wait_for(r"WARNING: 1 more connection closed for the same reason, not logged one by one \(the first 10 in 4 s "
               r"are\): protocol error: unknown command '\.\.\.'\r?\n", timeout=15)
    assert m.stop() == 0
    assert m.text.count("closing the connection: unknown command '\\x1b'\n") == 10, m.text


def _served(mta) -> None:
    """One message's envelope through the milter (what a held connection does meanwhile)."""
    assert mta.mail("<a@example.org>") in (("c", {}), "skipped")
    assert mta.rcpt("<b@example.org>") == ("c", {})


def _refused_total(m) -> str:
    """pytclmilter_connections_refused_total as the metrics endpoint gives it."""
    url = m.wait_for(r"metrics at (http://127\.0\.0\.1:\d+/metrics)", since=0).group(1)
    with urllib.request.urlopen(url, timeout=10) as r:
        found = re.search(r"^pytclmilter_connections_refused_total (\S+)$", r.read().decode(), re.M)
    assert found, "pytclmilter_connections_refused_total not exported"
    return found.group(1)


def test_connections_past_the_limit_are_closed_at_once_with_one_warning(tclrun):
    """Nothing bounded the connections open but the open-files limit, which `run` lifts to 65536 or
    more (each may hold ~0.5 MB of packets). With --max-connections 3, of 5 connections the 2 past
    the limit are closed at once (the MTA then applies its default action), the 3 served; one
    warning says the limit is reached, one that it no longer is, with the count. Crossing it
    again within the minute adds no line: its count is told at stop."""
    m = tclrun(NULL, "--max-connections", "3", "--metrics", "inet:0@127.0.0.1")
    held = [m.mta() for _ in range(3)]
    for mta in held:
        mta.negotiate()
    late = [m.mta() for _ in range(2)]
    for mta in late:
        assert mta.eof(), "a connection past the limit was not closed"
    m.wait_for(r"WARNING: connection limit reached: 3 connections open \(--max-connections 3\); new connections "
               r"are closed at once, and the MTA applies its default action to them \(Postfix: "
               r"milter_default_action\), until one closes\r?\n")
    for mta in held:
        _served(mta)
    assert _refused_total(m) == "2.0"
    for mta in held + late:
        mta.close()
    m.wait_for(r"WARNING: below the connection limit again: 2 connections open \(--max-connections 3\); 2 "
               r"connections closed at the limit in \d+\.\d s\r?\n")
    with m.mta() as mta:
        mta.negotiate()
        _served(mta)
        # at the limit again at once, and below it: counted, no line
        again = [m.mta() for _ in range(2)]
        for other in again:
            other.negotiate()
        with m.mta() as past:
            assert past.eof()
        _served(mta)
        for other in again:
            other.close()
    assert m.stop() == 0
    text = m.text
    assert text.count("connection limit reached") == 1, text
    assert text.count("below the connection limit again") == 1, text
    assert "WARNING: 1 connection closed at the connection limit since the last line about it\n" in text, text
    assert "protocol error" not in text and "ERROR" not in text, text


#: The connection limit's window cut to 3 s (60 s in production), so that its end comes within the test.
SHORT_LIMIT_WINDOW = """
from pytclmilter import accept


def setup(milter):
    accept.LIMIT_REPEAT = 3.0
"""


def _quit(mta) -> None:
    """End a session as the MTA does, and wait until the milter has closed it: a connection opened
    next is not at the limit (the milter's count goes down before the socket closes)."""
    mta.quit()
    assert mta.eof()
    mta.close()


def test_connections_closed_at_the_limit_between_warnings_are_told_when_the_window_ends(tclrun):
    """Connections closed at the limit within the minute after its last warning were told only by
    the next warning, maybe hours later, or at stop. Now their count is told once the window is
    over: in a line of its own if the limit is no longer reached, else in the warning that it is."""
    m = tclrun(NULL, "--max-connections", "1", python=[SHORT_LIMIT_WINDOW])

    def cross(*, stay: bool = False):
        """At the limit (one connection closed at it) and, unless ``stay``, below it again."""
        held = m.mta()
        held.negotiate()
        with m.mta() as past:
            assert past.eof(), "a connection past the limit was not closed"
        if not stay:
            _quit(held)
        return held

    cross()
    m.wait_for(r"WARNING: below the connection limit again: 0 connections open \(--max-connections 1\); 1 "
               r"connection closed at the limit in \d+\.\d s\r?\n")
    cross()  # within the window: counted, no line
    m.wait_for(r"WARNING: 1 connection closed at the connection limit since the last line about it\r?\n", timeout=10)
    cross()  # a window later: the pair again
    held = cross(stay=True)  # within its window, and at the limit when it ends
    m.wait_for(r"WARNING: connection limit reached: 1 connection open \(--max-connections 1\); new connections are "
               r"closed at once, and the MTA applies its default action to them \(Postfix: milter_default_action\), "
               r"until one closes; 1 more was closed at it since the last line about it\r?\n", timeout=10)
    with m.mta() as past:
        assert past.eof()
    _quit(held)
    m.wait_for(r"WARNING: below the connection limit again: 0 connections open \(--max-connections 1\); 1 "
               r"connection closed at the limit in \d+\.\d s\r?\n")
    assert m.stop() == 0
    text = m.text
    assert text.count("connection limit reached") == 3, text
    assert text.count("below the connection limit again") == 3, text
    assert text.count("closed at the connection limit since the last line about it") == 1, text


def test_the_limit_lifted_at_a_reload_while_it_is_reached_is_said_so(tclrun, tmp_path):
    """`-maxconnections 0` (no limit) by a reload while the limit was reached: the line at the
    next close said "below the connection limit again ... (--max-connections 0)", a limit of 0."""
    script = tmp_path / "limit.tcl"
    script.write_text("milter configure -maxconnections 1\n" + NULL)
    m = tclrun(script)
    held = m.mta()
    held.negotiate()
    with m.mta() as past:
        assert past.eof(), "a connection past the limit was not closed"
    m.wait_for(r"WARNING: connection limit reached: 1 connection open \(--max-connections 1\)")
    script.write_text("milter configure -maxconnections 0\n" + NULL)
    m.child.kill(signal.SIGUSR1)
    m.wait_for(r"reload: loading generation 2")
    _quit(held)
    m.wait_for(r"WARNING: connection limit lifted: 0 connections open \(--max-connections 0: no limit\); 1 "
               r"connection closed at the limit in \d+\.\d s\r?\n")
    assert m.stop() == 0
    assert "below the connection limit" not in m.text and "--max-connections 0)" not in m.text, m.text
