"""Sendmail's time limits (`T=` of INPUT_MAIL_FILTER) against a script whose callback is slow.

A private Sendmail 8.17 (tests/support/sendmail.py) with a short `R:` (the wait for each reply)
drives a script whose envrcpt callback outlasts it. What the client sees, what the filter logs and
what happens to the rest of the SMTP session are asserted here and documented in
docs/deployment.md (Sendmail) and docs/protocol.md (§10.16).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from support.sendmail import milter_socket_path, sendmail_factory
from support.tclrun import tclrun_factory

pytestmark = pytest.mark.sendmail

sendmail = pytest.fixture(sendmail_factory, name="sendmail")
milter = pytest.fixture(tclrun_factory, name="milter")
socket_path = pytest.fixture(milter_socket_path, name="socket_path")

#: Sendmail waits 2 s for each reply (not 1 s: Sendmail counts whole seconds, and under R:1s a
#: reply of a millisecond that crosses a second's boundary is late, see the last test); the first
#: recipient of a session takes the script 3.5 s.
TIMEOUTS = "S:10s;R:2s;E:5m"

SLOW_FIRST_RCPT = r"""
package require TclMilter 1.0
proc envrcpt {ctx rcpt} {
    puts stderr "envrcpt $rcpt"
    if {[incr ::rcpts] == 1} { after 3500 }
    return SMFIS_CONTINUE
}
proc eom {ctx} { $ctx addheader X-Filtered yes; return SMFIS_CONTINUE }
proc abort {ctx} { puts stderr "abort ran"; return SMFIS_CONTINUE }
proc close {ctx} { puts stderr "close ran"; return SMFIS_CONTINUE }
foreach event {envrcpt eom abort close} { milter register $event $event }
milter main
"""


def message(subject: str) -> bytes:
    return f"From: a@client.test\r\nTo: b@example.com\r\nSubject: {subject}\r\n\r\nHello.\r\n".encode()


def test_sendmail_giving_up_on_a_unix_socket_is_an_eof_not_an_error(sendmail, milter, socket_path: Path) -> None:
    """Sendmail closes the filter's connection when `R:` runs out; the slow callback's reply then
    goes to a closed unix socket, whose write fails with EPIPE. That is the MTA's end of the
    session, as the EOF read on TCP is (docs/troubleshooting.md, "Timeouts"): `closed (eof)` at
    debug, after the abort and close callbacks. Before, the same end was logged at info as a
    connection fault, `closed (error: [Errno 32] Broken pipe)`, on a unix socket only."""
    m = milter(SLOW_FIRST_RCPT, "--log-level", "debug", connection=f"unix:{socket_path}")
    sm = sendmail(f"unix:{socket_path}", timeouts=TIMEOUTS).start()
    result = sm.send("a@client.test", ["b@example.com"], message("slow"))
    assert result.rcpt["b@example.com"].code == 451, result  # F=T
    m.wait_for(r"conn#1: closed \(eof\)")
    text = m.text
    assert "Broken pipe" not in text and "closed (error" not in text, text
    assert text.index("envrcpt <b@example.com>") < text.index("abort ran") < text.index("close ran"), text
    assert sm.sink_messages() == []


@pytest.mark.parametrize(("flags", "first", "later"), [
    ("T", "451 4.3.2 Please try again later", "451 4.3.2 Please try again later"),
    ("R", "550 5.7.1 <b@example.com>... Command rejected", "550 5.7.1 <a@client.test>... Command rejected"),
    ("", "250 2.1.5 <b@example.com>... Recipient ok", "250 2.1.0 <a@client.test>... Sender ok"),
])
def test_after_a_timeout_sendmail_drops_the_filter_for_the_rest_of_the_smtp_session(
        sendmail, milter, socket_path: Path, flags: str, first: str, later: str) -> None:
    """The recipient whose reply came too late gets F='s answer (none: accepted unfiltered), and
    so does every later MAIL of that SMTP session, at MAIL, without a word to the filter (F=T:
    451 at each MAIL; F=R: 550, a permanent refusal for a slow filter; none: the mail passes
    unfiltered). Only a new SMTP session connects to the filter again, and is filtered."""
    m = milter(SLOW_FIRST_RCPT, connection=f"unix:{socket_path}")
    sm = sendmail(f"unix:{socket_path}", flags=flags, timeouts=TIMEOUTS).start()
    with sm.smtp_session() as smtp:
        smtp.ehlo("client.test")
        smtp.mail("a@client.test")
        code, text = smtp.rcpt("b@example.com")
        assert f"{code} {text.decode()}" == first
        smtp.rset()
        for _ in range(2):
            code, text = smtp.mail("a@client.test")
            assert f"{code} {text.decode()}" == later
            if code == 250:
                assert smtp.rcpt("b@example.com")[0] == 250
                assert smtp.data(message("unfiltered"))[0] == 250
            smtp.rset()
    m.wait_for("close ran")  # the script's one thread is free again (troubleshooting.md, Timeouts)
    assert sm.send("a@client.test", ["b@example.com"], message("next session")).accepted
    msgs = sm.wait_for_sink(3 if flags == "" else 1)
    assert sorted((x.message["Subject"], x.headers("X-Filtered")) for x in msgs) == \
        [("next session", ["yes"])] + [("unfiltered", [])] * (len(msgs) - 1)
    # The filter saw the slow recipient and the next session's, nothing of the messages between.
    assert re.findall(r"envrcpt <[^>]*>", m.text) == ["envrcpt <b@example.com>"] * 2, m.text


PROGRESS_EVERY = r"""
package require TclMilter 1.0
proc eom {ctx} {
    for {set i 0} {$i < $::argv} {incr i} { after 1950; $ctx progress }
    $ctx addheader X-Filtered yes
    return SMFIS_CONTINUE
}
milter register eom eom
milter main
"""


@pytest.mark.parametrize(("read_limit", "progresses", "code"), [(3, 2, 250), (2, 5, 451)])
def test_sendmail_counts_its_read_limit_in_whole_seconds(
        sendmail, milter, socket_path: Path, read_limit: int, progresses: int, code: int) -> None:
    """`progress` restarts Sendmail's `R:` wait, but Sendmail measures every wait in whole seconds
    of the clock (milter.c, milter_read: `curtime() - readstart >= to` once the reply's header is
    read): a reply 1.95 s after the wait began counts as 2 s whenever the wait began in the last
    0.95 s of a second, so an end of message kept alive by progress every 1.95 s is tempfailed
    under `R:2s` (5 waits all starting early enough: about 1 in 3 million), and passes under
    `R:3s`. Any reply later than `R:` minus 1 s may be taken as too late."""
    milter(PROGRESS_EVERY, connection=f"unix:{socket_path}", args=[str(progresses)])
    sm = sendmail(f"unix:{socket_path}", timeouts=f"S:10s;R:{read_limit}s;E:5m").start()
    result = sm.send("a@client.test", ["b@example.com"], message("kept alive"))
    assert result.data is not None and result.data.code == code, result
    if code == 250:
        (msg,) = sm.wait_for_sink(1)
        assert msg.headers("X-Filtered") == ["yes"]
