"""A fleet behind a balancer: Postfix -> HAProxy (scripts/haproxy.cfg) -> two pytclmilter instances.

Postfix's smtpd_milters is a chain, not a pool, so a pool of milter instances sits behind HAProxy in
TCP mode, whose health check speaks milter (an OPTNEG, then the start of the reply). The private
HAProxy runs the shipped configuration (tests/support/haproxy.py); each instance stamps every
message with its name and process id, so the sink shows which instance filtered what.
"""

from __future__ import annotations

import signal
import smtplib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from support.haproxy import TEMPLATE, haproxy_factory
from support.loopback import LoopbackServer
from support.postfix import PrivatePostfix, SinkMessage, free_port, wait_until
from support.tclrun import Mta, TclRun, tclrun_factory, warnings

pytestmark = [pytest.mark.postfix, pytest.mark.haproxy]

haproxy = pytest.fixture(haproxy_factory, name="haproxy")
tclrun = pytest.fixture(tclrun_factory, name="tclrun")

ROOT = Path(__file__).resolve().parents[1]
STAMP = "X-Fleet-Instance"

# The instance's identity: its name (the script's argument) and its process id.
FLEET_TCL = r"""
milter configure -name Fleet
proc fleet_eom {ctx} {
    $ctx addheader X-Fleet-Instance "[lindex $::argv 0] [pid]"
    return SMFIS_CONTINUE
}
milter register eom fleet_eom
milter main
"""


def instance(tclrun: Callable[..., TclRun], name: str, port: int = 0) -> TclRun:
    return tclrun(FLEET_TCL, connection=f"inet:{port}@127.0.0.1", args=[name], name=f"{name}.tcl")


def identity(run: TclRun, name: str) -> str:
    return f"{name} {run.child.pid}"


def message(subject: str) -> bytes:
    return (f"From: fleet@example.org\r\nTo: rcpt@example.com\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject.replace(' ', '.')}@fleet.test>\r\n\r\nHello.\r\n").encode()


class MailFlow:
    """SMTP clients sending numbered messages through Postfix until stopped.

    A message answered 4xx, or whose connection drops, is sent again, as a sending MTA's queue
    would: with Postfix's milter_default_action = tempfail, a milter that fails mid-session costs a
    retry, never a message. A 5xx, or no success within ``patience`` seconds, is a failure.
    """

    def __init__(self, pf: PrivatePostfix, clients: int = 3, patience: float = 20.0) -> None:
        self.pf, self.patience = pf, patience
        self.accepted: list[str] = []
        self.retries: list[tuple[str, str]] = []
        self.failed: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(k,), daemon=True) for k in range(clients)]

    def __enter__(self) -> MailFlow:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(self.patience + 10)

    def _client(self, k: int) -> None:
        i = 0
        while not self._stop.is_set():
            self.deliver(f"fleet {k}-{i}")
            i += 1

    def deliver(self, subject: str) -> None:
        deadline = time.monotonic() + self.patience
        while True:
            result = self.pf.send("fleet@example.org", ["rcpt@example.com"], message(subject), timeout=20)
            final = result.final
            with self._lock:
                if result.accepted:
                    self.accepted.append(subject)
                    return
                if final is None or final.permanent or time.monotonic() > deadline:
                    self.failed.append((subject, str(result)))
                    return
                self.retries.append((subject, str(final)))
            time.sleep(0.05)

    def count(self) -> int:
        with self._lock:
            return len(self.accepted)


def stamps(msgs: list[SinkMessage]) -> set[str]:
    return {v for m in msgs for v in m.headers(STAMP)}


def wait_for_stamp(pf: PrivatePostfix, stamp: str, timeout: float = 15.0) -> None:
    wait_until(lambda: stamp in stamps(pf.sink_messages()), timeout, interval=0.1,
               message=lambda: f"no message stamped {stamp!r}; stamps so far: {stamps(pf.sink_messages())}")


def test_pool_survives_a_killed_instance_and_takes_it_back(postfix, haproxy, tclrun) -> None:
    a = instance(tclrun, "a", free_port())  # restarted on its port below: one no bind(0) or connect() takes
    b = instance(tclrun, "b")
    port_a = a.port
    hap = haproxy({"a": f"127.0.0.1:{a.port}", "b": f"127.0.0.1:{b.port}"})
    hap.wait_status("a", "UP")
    hap.wait_status("b", "UP")
    pf = postfix(milter=hap.milter)  # milter_default_action = tempfail (the harness's default)
    assert pf.postconf("milter_default_action") == "tempfail"

    # One SMTP session whose milter connection is certainly on a: b takes no new sessions meanwhile.
    hap.set_state("b", "drain")
    with pf.smtp_session() as held:
        wait_until(lambda: hap.stats()["a"]["scur"] == "1", 5, message=lambda: str(hap.stats()))
        hap.set_state("b", "ready")
        assert held.ehlo("held.example")[0] == 250
        assert held.mail("fleet@example.org")[0] == 250
        assert held.rcpt("rcpt@example.com")[0] == 250

        with MailFlow(pf) as flow:
            first_a, first_b = identity(a, "a"), identity(b, "b")
            wait_for_stamp(pf, first_a)
            wait_for_stamp(pf, first_b)

            wait_until(lambda: int(hap.stats()["a"]["scur"]) >= 2, 10, message="no flow session on a")
            assert a.stop(signal.SIGKILL) == -signal.SIGKILL  # mid-run: sessions are open on a

            try:
                code = held.data(message("held on a"))[0]
            except smtplib.SMTPDataError as exc:
                code = exc.smtp_code
            assert 400 <= code < 500, f"the session on the killed instance got {code}, not a tempfail"

            hap.wait_status("a", "DOWN", timeout=5)
            during = flow.count()
            wait_until(lambda: flow.count() >= during + 10, 15, message="mail stopped flowing without a")

            a = instance(tclrun, "a", port_a)  # restarted: same address, a new process
            hap.wait_status("a", "UP", timeout=10)
            wait_for_stamp(pf, identity(a, "a"))
    flow.deliver("held on a")  # what the sending MTA does with the tempfailed message

    sent = sorted(flow.accepted)
    print(f"accepted {len(sent)}, retried {len(flow.retries)}: {flow.retries[:5]}")
    assert not flow.failed, flow.failed[:5]
    msgs = pf.wait_for_sink(len(sent), timeout=20)
    delivered = sorted(m.message["Subject"] for m in msgs)
    assert delivered == sent, "a message was lost or delivered twice"
    unfiltered = [(m.message["Subject"], m.headers(STAMP)) for m in msgs if len(m.headers(STAMP)) != 1]
    assert not unfiltered, f"messages without exactly one stamp: {unfiltered[:5]}"
    assert {first_a, first_b, identity(a, "a")} <= stamps(msgs)
    assert "Server pytclmilter/a is DOWN" in hap.log_text()
    assert "Server pytclmilter/a is UP" in hap.log_text()


# ---------------------------------------------------------------------------- the health check


class SilentServer(LoopbackServer):
    """Accepts TCP connections and reads them; answers nothing, or ``greeting`` once."""

    def __init__(self, greeting: bytes = b"") -> None:
        self.greeting = greeting
        super().__init__(self._greet)

    def _greet(self, conn: socket.socket) -> None:
        if self.greeting:
            conn.sendall(self.greeting)
        while conn.recv(4096):
            pass


@pytest.fixture
def silent_servers() -> Iterator[Callable[[bytes], SilentServer]]:
    made: list[SilentServer] = []

    def make(greeting: bytes = b"") -> SilentServer:
        made.append(SilentServer(greeting))
        return made[-1]

    yield make
    for s in made:
        s.close()


def test_health_check_speaks_milter(haproxy, tclrun, silent_servers) -> None:
    """A server that accepts TCP but does not answer milter is DOWN; only the milter gets sessions."""
    milter = instance(tclrun, "m")
    silent, smtp = silent_servers(b""), silent_servers(b"220 mx.example ESMTP\r\n")
    hap = haproxy({"milter": f"127.0.0.1:{milter.port}", "silent": f"127.0.0.1:{silent.port}",
                   "smtp": f"127.0.0.1:{smtp.port}"})
    for name in ("silent", "smtp"):
        row = hap.wait_status(name, "DOWN", timeout=10)
        # ("* L7TOUT": HAProxy marks the last check's result with "* " while the next one runs)
        assert row["check_status"].removeprefix("* ") in ("L7TOUT", "L7RSP"), row
    assert silent.accepted and smtp.accepted  # they were reached: TCP alone would have passed
    row = hap.wait_status("milter", "UP")
    assert row["check_status"].removeprefix("* ") == "L7OK", row
    assert "milter OPTNEG reply" in hap.log_text()  # the failed step, as HAProxy names it

    for _ in range(4):  # every session through the balancer reaches the milter
        with Mta(hap.port) as mta:
            mta.negotiate()
            eom = mta.message()["eom"]
            assert ("h", f"{STAMP}\0{identity(milter, 'm')}\0".encode()) in eom, eom
    assert milter.alive()


def test_health_checks_with_send_proxy_make_one_warning_a_minute(haproxy, tclrun) -> None:
    """docs/deployment.md: no send-proxy. With it every health check (each second, every 250 ms
    while the instance goes down) began with a PROXY header and failed: the milter logged a
    WARNING and an INFO line for each, ten a minute, and a count. Now one line a minute."""
    milter = tclrun(FLEET_TCL, "--log-level", "debug", args=["m"])  # debug: a line per connection
    hap = haproxy({"milter": f"127.0.0.1:{milter.port} send-proxy"})
    hap.wait_status("milter", "DOWN")
    wait_until(lambda: milter.text.count(": connection from ") >= 6, 15, interval=0.1,
               message=lambda: milter.text)
    assert len(warnings(milter.text)) == 1, milter.text
    assert "(it began with a PROXY protocol header, which a milter does not speak: remove send-proxy from " \
           "HAProxy's server lines; docs/deployment.md, HAProxy), closing the connection: unknown command 'Y' " \
           "(said at most once a minute)\n" in milter.text, milter.text
    assert "closed (protocol error)" not in milter.text, milter.text
    assert milter.stop() == 0


def test_docs_show_the_tested_configuration() -> None:
    """docs/deployment.md quotes scripts/haproxy.cfg, the file the tests run, so the two cannot drift."""
    doc = (ROOT / "docs" / "deployment.md").read_text()
    assert TEMPLATE.read_text() in doc
