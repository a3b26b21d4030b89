"""`pytclmilter run --metrics inet:PORT@HOST`: Prometheus metrics over HTTP, after known traffic.

The traffic comes from the MTA side of tests/support/tclrun.py (miltertest and raw frames), the
scrape is a plain HTTP GET with urllib, and the text is read with prometheus_client's own parser.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import socket
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pytclmilter.metrics import PUBLISH_EVERY
from support.postfix import tcp_listeners
from support.tclrun import NOREPLY, Mta, TclRun, children_of, ipv6_loopback, link_local, ok, tclrun_factory

tclrun = pytest.fixture(tclrun_factory, name="tclrun")

NO_IPV6 = ipv6_loopback()

SCRIPT = r"""
package require TclMilter 1.0
milter configure -calltimeout 0.5
proc ef {ctx list} {
    switch -glob -- [lindex $list 0] {
        *spam@*  { $ctx setreply 550 5.7.1 "spam from [pid]"; return SMFIS_REJECT }
        *bug@*   { error "no such table" }
        *slow@*  { while 1 {} }
    }
    return SMFIS_CONTINUE
}
proc eom {ctx} { $ctx addheader X-Checked [pid]; return SMFIS_CONTINUE }
milter register envfrom ef
milter register eom eom
milter main
"""

HOOKS = """
def setup(milter):
    milter.register("helo", lambda ctx, name: "continue")
"""

METRICS = re.compile(r"metrics at (http://127\.0\.0\.1:\d+/metrics)")


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the endpoint: (name, sorted labels) -> value."""
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    """The sample's value; AssertionError if the endpoint does not export it."""
    key = (name, tuple(sorted(labels.items())))
    assert key in samples, f"{name}{labels} not exported"
    return samples[key]


def value_or_zero(samples: dict[Any, float], name: str, **labels: str) -> float:
    """The sample's value, 0 where it is not exported (a label set that was never counted)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def message(mta: Mta, sender: str) -> tuple[str, Any]:
    """One message from ``sender``: how its envelope sender was answered, and at the end of
    message what came back (or None when the sender was refused)."""
    mta.negotiate()
    assert ok(mta.connect()) and ok(mta.helo())
    reply = mta.mail(sender)
    if not ok(reply):
        return reply[0], None
    assert ok(mta.rcpt("<rcpt@example.com>")) and ok(mta.data()) and ok(mta.eoh())
    return "c", mta.eom()


def session(m: TclRun, sender: str) -> tuple[str, Any]:
    """:func:`message` on a connection of its own, ended as an MTA ends it (QUIT)."""
    with m.mta() as mta:
        result = message(mta, sender)
        mta.quit()
        assert mta.eof()
        return result


def worker_pid(eom: list[tuple[str, bytes]]) -> int:
    """The pid in the script's X-Checked header."""
    assert eom[0][0] == "h" and eom[0][1].startswith(b"X-Checked\0"), eom
    return int(eom[0][1].split(b"\0")[1])


def protocol_error(m: TclRun) -> None:
    with m.mta() as mta:
        mta.negotiate()
        mta.sock.sendall(b"\0\0\0\0H")  # a packet of length 0 (and a byte after it)
        assert mta.eof()


def wait_value(url: str, name: str, want: float, **labels: str) -> dict[Any, float]:
    """Scrape until a value is reached: a connection's end is counted just after the MTA's last read."""
    deadline = time.monotonic() + 10
    while True:
        samples = scrape(url)
        if samples.get((name, tuple(sorted(labels.items())))) == want or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


def test_metrics_count_verdicts_callbacks_errors_and_connections(tclrun) -> None:
    m = tclrun(SCRIPT, "--metrics", "inet:0@127.0.0.1", python=[HOOKS])
    url = m.wait_for(METRICS, since=0).group(1)

    assert session(m, "<spam@example.org>")[0] == "y"  # the script's reply code
    eom = session(m, "<good@example.org>")[1]
    assert eom[-1] == ("c", b"") and worker_pid(eom) == m.child.pid
    assert session(m, "<bug@example.org>")[0] == "t"  # a Tcl error: -onerror's default, tempfail
    assert session(m, "<slow@example.org>")[0] == "t"  # stopped by -calltimeout
    protocol_error(m)

    s = wait_value(url, "pytclmilter_connections_open", 0)
    assert value(s, "pytclmilter_connections_total") == 5
    assert value(s, "pytclmilter_connections_open") == 0
    assert value(s, "pytclmilter_connections_closed_total", reason="quit") == 4
    assert value(s, "pytclmilter_connections_closed_total", reason="protocol error") == 1
    assert value(s, "pytclmilter_protocol_errors_total") == 1
    verdicts = {(dict(k[1])["verdict"], dict(k[1])["stage"], dict(k[1])["dry_run"]): v
                for k, v in s.items() if k[0] == "pytclmilter_verdicts_total"}
    assert verdicts == {("reject", "envfrom", "false"): 1, ("accept", "eom", "false"): 1,
                        ("tempfail", "envfrom", "false"): 2}, verdicts
    assert value(s, "pytclmilter_modifications_total", action="addheader", dry_run="false") == 1
    assert value(s, "pytclmilter_callback_errors_total", event="envfrom", language="tcl") == 2
    assert value(s, "pytclmilter_callback_time_limit_overruns_total", event="envfrom", language="tcl") == 1
    # durations: every envfrom callback (the failed ones too), the Python helo hook as python
    assert value(s, "pytclmilter_callback_duration_seconds_count", event="envfrom", language="tcl") == 4
    assert value(s, "pytclmilter_callback_duration_seconds_bucket", event="envfrom", language="tcl", le="+Inf") == 4
    assert value(s, "pytclmilter_callback_duration_seconds_bucket", event="envfrom", language="tcl", le="0.25") == 3
    # in seconds: the callback stopped at 0.5 s, the others in no time (not in ms, nor ns)
    assert 0.5 <= value(s, "pytclmilter_callback_duration_seconds_sum", event="envfrom", language="tcl") < 30
    assert value(s, "pytclmilter_callback_duration_seconds_count", event="helo", language="python") == 4
    assert value(s, "pytclmilter_callback_duration_seconds_count", event="eom", language="tcl") == 1
    # No reload can happen yet: the fields the reload sets are exported as they stand.
    assert value(s, "pytclmilter_reloads_total", result="ok") == 0
    assert value(s, "pytclmilter_reloads_total", result="failed") == 0
    assert value(s, "pytclmilter_generation") == 1
    assert value(s, "pytclmilter_workers_alive") == 1

    # A scrape job may ask for some families only (`params: name[]: [...]`): it got an empty page
    # (the collector described no names, so prometheus_client's filter dropped them all).
    only = scrape(url + "?name[]=pytclmilter_generation&name[]=pytclmilter_connections_total")
    assert {k[0] for k in only} == {"pytclmilter_generation", "pytclmilter_connections_total"}, only
    assert value(only, "pytclmilter_connections_total") == 5

    # Only /metrics is served; a scraper is answered by prometheus_client's exposition.
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(url.replace("/metrics", "/"), timeout=10)
    assert err.value.code == 404
    assert m.stop() == 0
    assert "verdicts: accept=1, reject=1, tempfail=2, callback errors=2" in m.text


HEADER_SCRIPT = r"""
package require TclMilter 1.0
proc hdr {ctx name value} { if {$name eq "X-Bad"} { return SMFIS_REJECT }; return SMFIS_CONTINUE }
proc eoh {ctx} { return SMFIS_CONTINUE }
milter register header hdr
milter register eoh eoh
milter main
"""


def test_a_deferred_verdict_counts_at_its_stage_and_a_reset_as_an_error(tclrun) -> None:
    """A header's verdict answered at end of headers (NR_HDR) is the header's, as its log line
    says ("reject at header (answered at eoh)"); a connection reset is closed for an error."""
    import socket
    import struct

    m = tclrun(HEADER_SCRIPT, "--metrics", "inet:0@127.0.0.1")
    url = m.wait_for(METRICS, since=0).group(1)
    with m.mta() as mta:
        mta.negotiate()
        assert ok(mta.connect()) and ok(mta.helo()) and ok(mta.mail("<a@example.org>"))
        assert ok(mta.rcpt("<b@example.com>")) and ok(mta.data())
        assert mta.header("X-Bad", "yes") == NOREPLY
        assert mta.eoh()[0] == "r"
        mta.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s = wait_value(url, "pytclmilter_connections_open", 0)
    assert value(s, "pytclmilter_verdicts_total", verdict="reject", stage="header", dry_run="false") == 1
    assert value(s, "pytclmilter_connections_closed_total", reason="error") == 1
    assert m.stop() == 0


def test_metrics_with_two_workers_report_the_sum_and_keep_a_dead_workers_counts(tclrun) -> None:
    m = tclrun(SCRIPT, "--workers", "2", "--metrics", "inet:0@127.0.0.1")
    url = m.wait_for(METRICS, since=0).group(1)
    m.wait_for("2 workers serving")
    # Which worker accepts is the kernel's choice: send until both have answered.
    pids: list[int] = []
    deadline = time.monotonic() + 30
    while len(set(pids)) < 2:
        assert time.monotonic() < deadline, pids
        pids.append(worker_pid(session(m, "<good@example.org>")[1]))
    assert session(m, "<spam@example.org>")[0] == "y"
    assert session(m, "<bug@example.org>")[0] == "t"
    s = wait_value(url, "pytclmilter_connections_total", len(pids) + 2)
    assert value(s, "pytclmilter_verdicts_total", verdict="accept", stage="eom", dry_run="false") == len(pids)
    assert value(s, "pytclmilter_verdicts_total", verdict="reject", stage="envfrom", dry_run="false") == 1
    assert value(s, "pytclmilter_verdicts_total", verdict="tempfail", stage="envfrom", dry_run="false") == 1
    assert value(s, "pytclmilter_callback_errors_total", event="envfrom", language="tcl") == 1
    assert value(s, "pytclmilter_connections_total") == len(pids) + 2
    assert value(s, "pytclmilter_workers_alive") == 2

    # A worker killed with a connection open: what it counted stays, its open connection does not.
    held = m.mta()
    victim = worker_pid(message(held, "<good@example.org>")[1])
    s = wait_value(url, "pytclmilter_connections_open", 1)
    assert value(s, "pytclmilter_connections_open") == 1
    os.kill(victim, signal.SIGKILL)
    m.wait_for(rf"worker \d \(pid {victim}\) died \(signal 9\); starting a new one")
    held.close()
    assert session(m, "<spam@example.org>")[0] == "y"
    s = wait_value(url, "pytclmilter_verdicts_total", 2, verdict="reject", stage="envfrom", dry_run="false")
    assert value(s, "pytclmilter_verdicts_total", verdict="reject", stage="envfrom", dry_run="false") == 2
    assert value(s, "pytclmilter_verdicts_total", verdict="accept", stage="eom", dry_run="false") == len(pids) + 1
    assert value(s, "pytclmilter_connections_total") == len(pids) + 4
    assert value(s, "pytclmilter_connections_open") == 0
    assert value(s, "pytclmilter_workers_alive") == 2
    assert m.stop() == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_metrics_go_on_counting_across_reloads(tclrun, tmp_path, workers: int) -> None:
    """A failed reload and a good one are counted, the generation follows, and what both
    generations counted adds up (with --workers, the old set's counts outlive its workers)."""
    script = tmp_path / "filter.tcl"
    script.write_text(SCRIPT)
    m = tclrun(script, "--workers", str(workers), "--metrics", "inet:0@127.0.0.1")
    url = m.wait_for(METRICS, since=0).group(1)
    assert session(m, "<spam@example.org>")[0] == "y"
    assert session(m, "<good@example.org>")[1][-1] == ("c", b"")

    script.write_text("nosuchcommand\n" + SCRIPT)
    m.child.kill(signal.SIGUSR1)
    m.wait_for("reload: generation 2 not loaded")
    s = scrape(url)  # (the two counts apart: equal at the end)
    assert value(s, "pytclmilter_reloads_total", result="failed") == 1
    assert value(s, "pytclmilter_reloads_total", result="ok") == 0
    script.write_text(SCRIPT.replace("milter main", "# edited\nmilter main"))
    m.child.kill(signal.SIGUSR1)
    m.wait_for(r"reload: generation 1 is gone \(its last session is over\); generation 2 serves")
    assert session(m, "<spam@example.org>")[0] == "y"
    assert session(m, "<bug@example.org>")[0] == "t"

    s = wait_value(url, "pytclmilter_connections_total", 4)
    assert value(s, "pytclmilter_reloads_total", result="ok") == 1
    assert value(s, "pytclmilter_reloads_total", result="failed") == 1
    assert value(s, "pytclmilter_generation") == 2
    assert value(s, "pytclmilter_connections_total") == 4
    assert value(s, "pytclmilter_verdicts_total", verdict="reject", stage="envfrom", dry_run="false") == 2
    assert value(s, "pytclmilter_verdicts_total", verdict="accept", stage="eom", dry_run="false") == 1
    assert value(s, "pytclmilter_verdicts_total", verdict="tempfail", stage="envfrom", dry_run="false") == 1
    assert value(s, "pytclmilter_callback_errors_total", event="envfrom", language="tcl") == 1
    assert value(s, "pytclmilter_workers_alive") == workers
    assert m.stop() == 0


def listening_inode(url: str) -> str:
    """The socket inode of the endpoint's listening TCP socket (/proc/net/tcp)."""
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    inodes = [inode for _, lport, inode in tcp_listeners() if lport == port]
    assert inodes, f"nothing listens on port {port}"
    return inodes[0]


def sockets_of(pid: int) -> set[str]:
    """The inodes of ``pid``'s sockets; a descriptor closed while they are read is not one."""
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                found.add(link[len("socket:["):-1])
    return found


def test_a_worker_past_the_metrics_slots_is_logged_and_holds_no_metrics_socket(tclrun, tmp_path) -> None:
    """With --workers 2 the metrics have 8 slots. Sessions held open on both workers of each
    generation keep them finishing, so after three reloads every slot is taken: the fourth
    reload's workers are not counted, the supervisor says so once, and no worker keeps the
    endpoint's socket open (which would outlive the supervisor)."""
    script = tmp_path / "filter.tcl"
    script.write_text(SCRIPT)
    # (a grace longer than the test: no held session may be closed, freeing its slot)
    m = tclrun(script, "--workers", "2", "--metrics", "inet:0@127.0.0.1", "--grace", "300")
    url = m.wait_for(METRICS, since=0).group(1)
    m.wait_for("2 workers serving")
    inode = listening_inode(url)
    held: dict[int, Mta] = {}  # worker pid -> the session held on it
    try:
        for generation in range(1, 6):
            if generation > 1:
                m.child.kill(signal.SIGUSR1)
                m.wait_for(rf"reload: loading generation {generation} ")
            new = hold_both_workers(m, held)
            assert not [pid for pid in new if inode in sockets_of(pid)], generation
        m.wait_for("the metrics do not count new workers: all 8 slots are held by workers of earlier reloads")
        # The supervisor serves on, counting the workers that have a slot: not the fifth generation's
        wait_value(url, "pytclmilter_connections_open", len(held) - 2)
        time.sleep(3 * PUBLISH_EVERY)  # (time for an uncounted worker to publish, were it counted)
        assert value(scrape(url), "pytclmilter_connections_open") == len(held) - 2
        assert m.text.count("the metrics do not count new workers") == 1
    finally:
        for mta in held.values():
            mta.close()
    assert m.stop() == 0


def scrape_inode(url: str, client: socket.socket) -> str:
    """The inode of the endpoint's end of ``client``'s connection, once the endpoint accepted it
    (/proc/net/tcp: a connection still in the accept queue has inode 0)."""
    port, peer = int(url.rsplit(":", 1)[1].split("/")[0]), client.getsockname()[1]
    deadline = time.monotonic() + 5
    while True:
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if (int(fields[1].rsplit(":", 1)[1], 16), int(fields[2].rsplit(":", 1)[1], 16)) == (port, peer) \
                    and fields[9] != "0":
                return fields[9]
        assert time.monotonic() < deadline, "the endpoint did not accept the scrape"
        time.sleep(0.02)


def test_a_worker_forked_while_scrapes_are_open_holds_none_of_their_sockets(tclrun, tmp_path) -> None:
    """A worker forked (here by a reload) while the supervisor answered scrapes kept a copy of
    each scrape's socket (up to MAX_SCRAPES a fork) until it exited. It holds none now."""
    from pytclmilter.metrics import MAX_SCRAPES

    script = tmp_path / "filter.tcl"
    script.write_text(SCRIPT)
    m = tclrun(script, "--workers", "2", "--metrics", "inet:0@127.0.0.1")
    url = m.wait_for(METRICS, since=0).group(1)
    m.wait_for("2 workers serving")
    supervisor = m.child.pid
    old = children_of(supervisor)
    where = url.split("/")[2].split(":")
    clients = [socket.create_connection((where[0], int(where[1])), timeout=5) for _ in range(MAX_SCRAPES)]
    try:
        for c in clients:
            c.send(b"G")  # (a request begun: each holds a thread of the supervisor)
        inodes = {scrape_inode(url, c) for c in clients}
        assert inodes <= sockets_of(supervisor)
        m.child.kill(signal.SIGUSR1)
        m.wait_for("reload: loading generation 2 ")
        deadline = time.monotonic() + 10
        while len(children_of(supervisor) - old) < 2:
            assert time.monotonic() < deadline, "no workers of generation 2"
            time.sleep(0.02)
        # A worker closes its copies just after the fork (Exporter.forget): right after it shows in
        # /proc it may not have yet, on a loaded machine. Before the fix they stayed until it exited.
        for new in children_of(supervisor) - old:
            while inodes & sockets_of(new):
                assert time.monotonic() < deadline, f"worker {new} still holds the scrapes' sockets"
                time.sleep(0.02)
    finally:
        for c in clients:
            c.close()
    assert m.stop() == 0


@pytest.mark.parametrize("spec", ["inet:0@127.0.0.1",
                                  pytest.param("inet6:0@::1", marks=pytest.mark.skipif(bool(NO_IPV6), reason=str(NO_IPV6)))])
def test_a_worker_forked_between_a_scrapes_accept_and_its_record_holds_no_copy(spec: str) -> None:
    """The metrics thread records a scrape's socket (for a forked worker to close its copy) only
    once accept() has returned it: a fork in between (the thread waiting for the GIL with the
    descriptor already made) left the worker a copy no list named, held until it exited. Here
    the test accepts, as that thread would, and forks before any record. Over IPv6 too, whose
    socket addresses have four fields, not two."""
    from pytclmilter.meter import CELLS
    from pytclmilter.metrics import Exporter
    from pytclmilter.shared import Stats

    exporter = Exporter(spec, lambda: [0] * CELLS, Stats(), lambda: 1)
    server = exporter._server
    server.shutdown()  # (its thread accepts no more: the test does)
    client = socket.create_connection(server.server_address[:2], timeout=5)
    accepted, _ = server.socket.accept()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            exporter.forget()
            os.fstat(client.fileno())  # (the client's end, whose own port is another: kept)
            try:
                os.fstat(accepted.fileno())
                os.write(w, b"held")
            except OSError:
                os.write(w, b"closed")
        except BaseException as exc:  # (what the worker would die of, for the assertion)
            os.write(w, repr(exc).encode())
        finally:
            os._exit(0)
    os.close(w)
    try:
        with os.fdopen(r, "rb") as out:
            said = out.read()
    finally:
        os.waitpid(pid, 0)
        accepted.close()
        client.close()
        exporter.close()
    assert said == b"closed", said


@pytest.mark.skipif(bool(NO_IPV6), reason=str(NO_IPV6))
@pytest.mark.parametrize("workers", ["1", "2"])
def test_metrics_on_the_ipv6_loopback_with_and_without_workers(tclrun, workers: str) -> None:
    """`--metrics inet6:PORT@::1`, the milter on ::1 as well: the URL logged is one a scraper
    takes (the address bracketed), a session is counted, and with --workers 2 both workers
    serve: each, just forked, looks for scrapes' sockets among its IPv6 ones (Exporter.forget),
    whose addresses have four fields; none may fail there."""
    m = tclrun(SCRIPT, "--workers", workers, "--metrics", "inet6:0@::1", connection="inet6:0@::1")
    url = m.wait_for(r"metrics at (http://\S+)", since=0).group(1)
    assert re.fullmatch(r"http://\[::1\]:\d+/metrics", url), url
    m.wait_for(f"{workers} workers serving" if workers == "2" else "listening on inet6:", since=0)
    with m.mta(host="::1") as mta:
        eom = message(mta, "<good@example.org>")[1]
        mta.quit()
        assert mta.eof()
    assert eom[-1] == ("c", b"")
    s = wait_value(url, "pytclmilter_connections_total", 1)
    assert value(s, "pytclmilter_connections_total") == 1
    assert value(s, "pytclmilter_verdicts_total", verdict="accept", stage="eom", dry_run="false") == 1
    assert value(s, "pytclmilter_workers_alive") == int(workers)
    assert " failed" not in m.text and "died" not in m.text, m.text
    assert m.stop() == 0


def hold_both_workers(m: TclRun, held: dict[int, Mta]) -> list[int]:
    """Sessions until two workers not in ``held`` have answered, each then held open there."""
    new: list[int] = []
    deadline = time.monotonic() + 20
    while len(new) < 2:  # which worker accepts is the kernel's choice; an old one may, too
        assert time.monotonic() < deadline, held
        mta = m.mta()
        pid = worker_pid(message(mta, "<good@example.org>")[1])
        if pid in held:
            mta.close()
        else:
            held[pid] = mta
            new.append(pid)
    return new


def test_clients_that_trickle_bytes_cannot_hold_the_scrape_slots(tclrun) -> None:
    """MAX_SCRAPES clients each sending a byte of a request line every 2 s (never 10 s of
    silence) held every slot for as long as they liked: each scrape was closed unanswered. A
    scrape now has SCRAPE_TIMEOUT in all; then its connection is shut down, and scrapes work.
    Meanwhile a scrape beyond MAX_SCRAPES is closed at once (the bound on answering threads)."""
    import contextlib
    import select
    import socket
    from urllib.parse import urlsplit

    from pytclmilter.metrics import MAX_SCRAPES, SCRAPE_TIMEOUT

    m = tclrun(SCRIPT, "--metrics", "inet:0@127.0.0.1")
    url = m.wait_for(METRICS, since=0).group(1)
    where = urlsplit(url)
    tricklers = [socket.create_connection((where.hostname, where.port), timeout=5) for _ in range(MAX_SCRAPES)]
    try:
        for s in tricklers:
            s.send(b"G")
        time.sleep(0.5)  # each in a slot of its own by now
        with pytest.raises(ConnectionError):  # one scrape more: closed unanswered, and said once
            scrape(url)
        m.wait_for(rf"WARNING: metrics: {MAX_SCRAPES} scrapes at once already; 1 connection\(s\) closed unanswered")
        open_ = list(tricklers)
        deadline = time.monotonic() + 3 * SCRAPE_TIMEOUT
        while open_ and time.monotonic() < deadline:
            for s in open_:
                s.send(b"G")
            ended, _, _ = select.select(open_, [], [], 2)  # EOF (or a reset): the filter shut it down
            for s in ended:
                with contextlib.suppress(OSError):
                    assert s.recv(1) == b""
                open_.remove(s)
        assert not open_, f"{len(open_)} trickling clients still hold their scrape slots"
        while True:  # (a slot is free once its thread has ended, just after the client saw EOF)
            try:
                assert value(scrape(url), "pytclmilter_generation") == 1
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, "no scrape answered after the slots were freed"
                time.sleep(0.1)
    finally:
        for s in tricklers:
            s.close()
    assert m.stop() == 0


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_session_of_a_reloaded_script_past_its_grace_counts_as_milter_reloaded(tclrun, tmp_path, workers) -> None:
    """A session the replaced generation still holds when its -grace runs out is closed; the docs'
    table of reasons names the label it is counted under, and the log line says the same. With
    --workers the replaced workers were stopped as by SIGTERM: "received SIGTERM: stopping" and
    "closed (milter stopped)" in the log of a reload, counted as a stop."""
    script = tmp_path / "filter.tcl"
    script.write_text(SCRIPT)
    m = tclrun(script, "--grace", "1", "--metrics", "inet:0@127.0.0.1", "--workers", workers)
    url = m.wait_for(METRICS, since=0).group(1)
    with m.mta() as mta:
        mta.negotiate()
        assert ok(mta.connect())
        m.child.kill(signal.SIGUSR1)
        m.wait_for(r"reload: generation 1 is gone")
        assert mta.eof()
    m.wait_for(r"conn#1: closed \(milter reloaded\)", since=0)
    s = wait_value(url, "pytclmilter_connections_closed_total", 1, reason="milter reloaded")
    assert value(s, "pytclmilter_connections_closed_total", reason="milter reloaded") == 1
    table = (Path(__file__).resolve().parents[1] / "docs" / "deployment.md").read_text()
    closed_row = next(line for line in table.splitlines() if line.startswith("| `pytclmilter_connections_closed_total"))
    assert "`milter reloaded`" in closed_row
    # and the reload's promise says which sessions it keeps (it said "not one" was tempfailed)
    reload_section = table.split("## 6. Reloading a script", 1)[1]
    promise = reload_section[:reload_section.index("1. ")]
    assert "without refusing, resetting or tempfailing" in promise and "`-grace`" in promise, promise
    assert "milter stopped" not in m.text and "received SIGTERM" not in m.text, m.text
    if workers == "2":
        assert "replaced by a reload: no new connections; 1 open" in m.text, m.text
    assert m.stop() == 0


def test_a_scrape_waiting_while_out_of_descriptors_is_one_warning_and_no_busy_loop(caplog) -> None:
    """accept() failing with EMFILE (the MTA's connections hold every descriptor) while a scrape
    waits: socketserver returned quietly and its loop called accept() again at once, for ever
    (a core's worth of CPU in the metrics thread, nothing logged). Now each failure waits
    ACCEPT_RETRY before the next, and one warning says so."""
    import errno
    import logging

    from pytclmilter.connspec import parse_metrics
    from pytclmilter.metrics import ACCEPT_RETRY, _Server

    class NoDescriptors:
        def __init__(self) -> None:
            self.accepts = 0

        def accept(self) -> Any:
            self.accepts += 1
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    server = _Server(parse_metrics("inet:0@127.0.0.1"))
    real, fake = server.socket, NoDescriptors()
    waits: list[float] = []
    server._pause = waits.append
    server.socket = fake
    try:
        with caplog.at_level(logging.WARNING, logger="pytclmilter"):
            for _ in range(100):  # what serve_forever does while the listening socket is readable
                server._handle_request_noblock()
    finally:
        server.socket = real
        server.server_close()
    assert fake.accepts == 100
    assert waits == [ACCEPT_RETRY] * 100
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "metrics: cannot accept a scrape: Too many open files" in warnings[0], warnings


def test_clients_that_go_away_or_send_garbage_leave_no_traceback_in_the_log(tclrun) -> None:
    """A port scanner or a TLS probe at the metrics port: a request cut short by a reset, or
    bytes that are no request, made socketserver print a 20-line traceback on stderr for each
    connection ("Exception occurred during processing of request from ..."), outside the log's
    format: anyone who could reach the port filled the journal. Now such a client leaves no
    line, a request it cannot serve still gets its answer (405), and scrapes go on."""
    import socket
    import struct
    from urllib.parse import urlsplit

    m = tclrun(SCRIPT, "--metrics", "inet:0@127.0.0.1")
    url = m.wait_for(METRICS, since=0).group(1)
    where = urlsplit(url)
    for request in [b"GARBAGE\r\n\r\n", b"GET /metr", b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03"] * 10:
        s = socket.create_connection((where.hostname, where.port), timeout=5)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = reset
        s.sendall(request)
        s.close()
    deadline = time.monotonic() + 10
    while True:  # (the last ones may still hold the scrape slots a moment)
        with socket.create_connection((where.hostname, where.port), timeout=5) as s:
            s.sendall(b"BREW /metrics HTTP/1.0\r\n\r\n")
            status = s.makefile("rb").readline()
        if status or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert status.startswith(b"HTTP/1.0 405 "), status
    while True:  # (so may they a moment longer: a scrape past the slots is closed unanswered)
        try:
            samples = scrape(url)
            break
        except (http.client.RemoteDisconnected, ConnectionResetError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    assert value(samples, "pytclmilter_generation") == 1
    assert m.stop() == 0
    assert "Traceback" not in m.text and "Exception occurred" not in m.text, m.text


def test_a_scrape_prometheus_client_fails_on_is_a_warning_a_minute_not_a_traceback(tclrun) -> None:
    """`Accept: application/openmetrics-text; version=abc`, which any client may send, makes
    prometheus_client raise (it compares the version's "abc" with an int). wsgiref caught that
    itself and printed a 15-line traceback on stderr for every such request, outside the log's
    format and its once-a-minute limit. Now: 500 at once, the documented warning once a minute
    (the others counted, told at stop), and scrapes go on. The warning comes with the first
    failure (a scrape that fails once is told), and the next ones in the minute add no line."""
    import socket
    from urllib.parse import urlsplit

    m = tclrun(SCRIPT, "--metrics", "inet:0@127.0.0.1")
    url = m.wait_for(METRICS, since=0).group(1)
    where = urlsplit(url)
    request = b"GET /metrics HTTP/1.0\r\nAccept: application/openmetrics-text; version=abc\r\n\r\n"
    warning = (r"WARNING: metrics: a scrape from 127\.0\.0\.1 failed: TypeError: [^\r\n]* "
               r"\(warned at most once a minute\)")
    for attempt in range(3):
        with socket.create_connection((where.hostname, where.port), timeout=5) as s:
            s.sendall(request)
            status = s.makefile("rb").readline()
        assert status.startswith(b"HTTP/1.0 500 "), status
        if attempt == 0:
            m.wait_for(warning)
    assert value(scrape(url), "pytclmilter_generation") == 1
    assert m.stop() == 0
    assert "Traceback" not in m.text, m.text
    assert len(re.findall(warning, m.text)) == 1, m.text
    assert "metrics: 2 more scrapes failed with TypeError since the last warning" in m.text, m.text


def test_a_request_line_without_a_version_is_refused_at_once(tclrun) -> None:
    """`GET /metrics` alone (HTTP/0.9, or a person typing into nc): http.server read on for
    headers HTTP/0.9 has none of, and the client waited the whole SCRAPE_TIMEOUT (10 s) for a
    closed connection and nothing else. Now it gets 505 at once, and scrapes go on."""
    import socket
    from urllib.parse import urlsplit

    from pytclmilter.metrics import SCRAPE_TIMEOUT

    m = tclrun(SCRIPT, "--metrics", "inet:0@127.0.0.1")
    url = m.wait_for(METRICS, since=0).group(1)
    where = urlsplit(url)
    for line in (b"GET /metrics\r\n", b"GET /metrics\n"):
        with socket.create_connection((where.hostname, where.port), timeout=SCRAPE_TIMEOUT / 2) as s:
            s.sendall(line)
            answer = s.makefile("rb").read()  # (socket.timeout, before: nothing came until the cut)
        assert answer.startswith(b"HTTP/1.0 505 HTTP Version Not Supported\r\n"), answer
        assert b"GET /metrics HTTP/1.0" in answer, answer
    assert value(scrape(url), "pytclmilter_generation") == 1
    assert m.stop() == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_a_reload_a_stop_abandoned_is_not_counted_as_failed(tclrun, tmp_path, workers: int) -> None:
    """SIGTERM while a reload loads: the load is abandoned and the milter stops. It was counted as
    reloads_total{result="failed"}, which an alert on failed reloads took for a broken script.
    Now it has its own result, scraped here while an open session holds the stop's grace."""
    script = tmp_path / "filter.tcl"
    script.write_text(SCRIPT.replace("-calltimeout 0.5", "-calltimeout 0"))
    m = tclrun(script, "--workers", str(workers), "--grace", "20", "--metrics", "inet:0@127.0.0.1")
    url = m.wait_for(METRICS, since=0).group(1)
    with m.mta() as mta:
        mta.negotiate()
        assert ok(mta.connect())
        script.write_text("puts loading; flush stdout\nwhile 1 {}\n" + SCRIPT)
        m.child.kill(signal.SIGUSR1)
        m.wait_for(r"\nloading\r*\n")
        m.child.kill(signal.SIGTERM)
        m.wait_for(r"WARNING: reload: generation 2 abandoned: received SIGTERM while it loaded; stopping")
        s = scrape(url)
        assert value(s, "pytclmilter_reloads_total", result="abandoned") == 1
        assert value(s, "pytclmilter_reloads_total", result="failed") == 0
        assert value(s, "pytclmilter_reloads_total", result="ok") == 0
    assert m.wait_exit(timeout=30) == 0, m.text


@pytest.mark.skipif(link_local() is None, reason="no IPv6 link-local address here")
@pytest.mark.parametrize("how", ["option", "script", "bracketed"])
def test_metrics_listen_on_a_link_local_address_with_its_interface(tclrun, how: str) -> None:
    """`--metrics inet6:PORT@fe80::...%eth0` (or the script's -metrics) bound without the
    interface, as the milter's own listener did before it kept it: 'cannot listen: Invalid
    argument'. The interface is kept, and the logged URL is one a browser takes (RFC 6874:
    the zone's % written %25)."""
    found = link_local()
    assert found is not None
    addr, interface = found
    where = f"inet6:0@[{addr}%{interface}]" if how == "bracketed" else f"inet6:0@{addr}%{interface}"
    if how != "script":
        m = tclrun(SCRIPT, "--metrics", where)
    else:
        m = tclrun(SCRIPT.replace("-calltimeout 0.5", f"-calltimeout 0.5 -metrics {where}"))
    said = m.wait_for(r"metrics at (http://\S+)|cannot listen.*", since=0)
    assert said.group(1) is not None, m.text
    url = re.fullmatch(rf"http://\[{re.escape(addr)}%25{re.escape(interface)}\]:(\d+)/metrics", said.group(1))
    assert url is not None, said.group(1)
    with socket.create_connection((f"{addr}%{interface}", int(url.group(1))), timeout=10) as sock:
        sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        answer = b"".join(iter(lambda: sock.recv(65536), b""))
    assert answer.startswith(b"HTTP/1.0 200 ") and b"pytclmilter_connections_total 0.0" in answer, answer[:300]
