"""The greylist example on its shared store (tclmilter/examples/greylist_store.py).

``pytclmilter run greylist.tcl --python greylist_store.py`` as a user runs it, the MTA side played
over real sockets (tests/support/tclrun.py: miltertest), the store real: a SQLite file shared by
``--workers``, and a private redis-server (tests/support/redis.py) shared by two instances,
stopped and started again mid-run. What is asserted is what the SMTP client would get (the
replies to RCPT) and what the admin reads (the log lines, the store's rows).
"""

from __future__ import annotations

import gc
import importlib.util
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from pytclmilter import repeats

from support.loopback import LoopbackServer
from support.postfix import free_port
from support.redis import RedisServer, tls_files
from support.tclrun import TclRun, tclrun_factory

EXAMPLES = Path(__file__).resolve().parents[1] / "tclmilter" / "examples"
GREYLIST = EXAMPLES / "greylist.tcl"
STORE_PY = EXAMPLES / "greylist_store.py"

tclrun = pytest.fixture(tclrun_factory, name="tclrun")

GREYLISTED = re.compile(r"4\.7\.1 Greylisted, please try again in (\d+) seconds?")
UNAVAILABLE = "4.3.0 Greylisting temporarily unavailable, please try again later"


def serving(server: RedisServer) -> Iterator[RedisServer]:
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    yield from serving(RedisServer(tmp_path))


@pytest.fixture
def tls_redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server on its TLS port only, its certificate (for 127.0.0.1) signed by a CA of its own."""
    yield from serving(RedisServer(tmp_path, tls=tls_files(tmp_path / "ca")))


def greylist(tclrun: Callable[..., TclRun], store: str, *options: str, args: tuple[str, ...] = ()) -> TclRun:
    return tclrun(GREYLIST, "--python", str(STORE_PY), *options, args=("-store", store, *args))


def rcpt_reply(m: TclRun, n: int, *, whole: bool = False) -> Any:
    """Triplet ``n`` (client 192.0.2.N%250, sender sN@example.org, rcpt rN@example.com) on a new
    connection: the reply to RCPT, or with ``whole`` that of the whole message (so that an
    accepted one has its verdict line, with the pid of the worker that served it)."""
    with m.mta() as mta:
        mta.negotiate()
        mta.connect(address=f"192.0.2.{n % 250 + 1}")
        if whole:
            steps = mta.message(sender=f"<s{n}@example.org>", rcpts=[f"<r{n}@example.com>"])
            return steps["rcpt"][0], steps["eom"][-1][0]
        assert mta.mail(f"<s{n}@example.org>") == ("c", {})
        return mta.rcpt(f"<r{n}@example.com>")


def greylisted(reply: Any) -> int | None:
    """The seconds of a "Greylisted" 451, else None."""
    if isinstance(reply, tuple) and reply[0] == "y" and reply[1]["smtpcode"] == "451":
        m = GREYLISTED.fullmatch(reply[1]["text"])
        return int(m.group(1)) if m else None
    return None


def load_store_module(name: str = "greylist_store") -> Any:
    """greylist_store.py imported as its own module (it is a hooks file, not a package's)."""
    spec = importlib.util.spec_from_file_location(name, STORE_PY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def redis_greylist(redis_server: RedisServer, retry: float,
                   step: float = 0.0) -> tuple[Any, Any, Callable[[int, bool], Any], list[float]]:
    """In this process: the example's module, a Greylist on ``redis_server`` whose clock is the
    list's one number, and check(n, down), a check of triplet n (sender s{n}) with Redis failing
    it (at its maxmemory) when ``down``, the clock moved on by ``step`` first."""
    store = load_store_module()
    greylist = store.Greylist(store.Settings(store=redis_server.url, delay=0, retry=retry))
    now = [1000.0]
    greylist.clock = lambda: now[0]

    def check(n: int, down: bool) -> Any:
        redis_server.command("CONFIG", "SET", "maxmemory", "1" if down else "0")
        now[0] += step
        return greylist.check("192.0.2.1", f"s{n}@example.org", "r@example.com")

    return store, greylist, check, now


def unavailable(reply: Any) -> bool:
    return isinstance(reply, tuple) and reply[0] == "y" and reply[1] == {
        "smtpcode": "451", "space": " ", "text": UNAVAILABLE}


def served_by(m: TclRun, verdict: str) -> dict[int, int]:
    """Triplet number -> pid of the process that logged its verdict (``tempfail at envrcpt``...)."""
    rx = re.compile(rf"pytclmilter\[(\d+)\] INFO: conn#\d+: verdict {verdict} client=\S+ from=<s(\d+)@")
    return {int(n): int(pid) for pid, n in rx.findall(m.text)}


# ---------------------------------------------------------------------------- one host, SQLite


def test_workers_share_sqlite_every_retry_after_the_delay_is_accepted(tclrun: Callable[..., TclRun],
                                                                       tmp_path: Path) -> None:
    """--workers 2: 200 triplets first seen (451) and, after the delay, retried on new
    connections: every retry accepted, whichever worker took the first attempt or the retry."""
    db = tmp_path / "greylist.sqlite"
    delay = 2
    m = greylist(tclrun, f"sqlite:{db}", "--workers", "2", args=("-delay", str(delay)))
    triplets = range(200)
    with ThreadPoolExecutor(8) as pool:  # concurrent connections: both workers accept some
        first = list(pool.map(lambda n: rcpt_reply(m, n), triplets))
        started = time.monotonic()
        assert [greylisted(r) for r in first] == [delay] * 200, first
        assert sqlite3.connect(db).execute("SELECT count(*), max(seen) FROM triplets").fetchone() == (200, 1)
        time.sleep(max(0.0, delay + 0.2 - (time.monotonic() - started)))
        retries = list(pool.map(lambda n: rcpt_reply(m, n, whole=True), triplets))
    assert retries == [(("c", {}), "c")] * 200, [r for r in retries if r != (("c", {}), "c")][:5]

    deadline = time.monotonic() + 10  # each worker logs a verdict after its reply went out
    while len(served_by(m, "accept at eom")) < 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    firsts, accepts = served_by(m, "tempfail at envrcpt"), served_by(m, "accept at eom")
    missing = sorted(set(triplets) - set(firsts)) + sorted(set(triplets) - set(accepts))
    assert not missing, (missing, [l for l in m.text.splitlines() if any(f"<s{n}@" in l for n in missing[:3])])
    workers = set(accepts.values())
    assert len(workers) == 2 and m.child.pid not in workers, workers  # both workers served retries
    moved = [n for n in triplets if firsts[n] != accepts[n]]
    assert moved, "no retry reached the other worker than its first attempt"
    assert "unavailable" not in m.text and "Traceback" not in m.text
    assert m.stop() == 0


# ---------------------------------------------------------------------------- several hosts, Redis


def test_two_instances_sharing_redis_accept_a_retry_the_other_one_greylisted(
        tclrun: Callable[..., TclRun], redis_server: RedisServer) -> None:
    a = greylist(tclrun, redis_server.url, args=("-delay", "1"))
    b = greylist(tclrun, redis_server.url, args=("-delay", "1"))
    triplets = range(20)
    assert [greylisted(rcpt_reply(a, n)) for n in triplets] == [1] * 20
    assert redis_server.command("DBSIZE") == b":20"
    ttl = int(redis_server.command("TTL", "greylist:192.0.2.1\0s0@example.org\0r0@example.com")[1:])
    assert 3024000 - 5 <= ttl <= 3024000  # forgotten after -maxage (35 days) unseen
    time.sleep(1.1)
    assert [rcpt_reply(b, n, whole=True) for n in triplets] == [(("c", {}), "c")] * 20
    assert [rcpt_reply(a, n) for n in triplets] == [("c", {})] * 20  # and A agrees
    # a triplet first seen at B is greylisted at A too, then passes there
    assert greylisted(rcpt_reply(b, 500)) == 1
    assert greylisted(rcpt_reply(a, 500)) in (0, 1)
    time.sleep(1.1)
    assert rcpt_reply(a, 500) == ("c", {})
    assert a.stop() == 0 and b.stop() == 0


def test_redis_stopped_mid_run_tempfails_logs_once_and_recovers_by_itself(
        tclrun: Callable[..., TclRun], redis_server: RedisServer) -> None:
    m = greylist(tclrun, redis_server.url, args=("-delay", "1", "-retry", "1"))
    assert greylisted(rcpt_reply(m, 1)) == 1
    time.sleep(1.1)
    assert rcpt_reply(m, 1) == ("c", {})

    redis_server.stop()
    outage = [rcpt_reply(m, n) for n in (1, 2, 3)]
    time.sleep(1.2)  # past -retry: the next check tries Redis again, and finds it still down
    outage += [rcpt_reply(m, n) for n in (1, 4)]
    assert all(unavailable(r) for r in outage), outage
    line = m.wait_for(r"WARNING: greylist store (\S+) unavailable \((.*)\): answering tempfail, "
                      r"trying again every 1 s\r?\n")
    assert line.group(1) == redis_server.url and "ConnectionError" in line.group(2)
    assert len(re.findall(r"greylist store \S+ unavailable", m.text)) == 1

    redis_server.start()  # empty: no persistence
    time.sleep(1.1)  # past -retry
    assert greylisted(rcpt_reply(m, 1)) == 1  # the store answers again (it forgot, being new)
    back = m.wait_for(r"WARNING: greylist store (\S+) is back after ([\d.]+) s; "
                      r"(\d+) recipients were answered tempfail meanwhile\r?\n")
    assert back.group(1) == redis_server.url and float(back.group(2)) >= 1.2
    assert int(back.group(3)) == 5
    time.sleep(1.1)
    assert rcpt_reply(m, 1) == ("c", {})
    assert len(re.findall(r"greylist store \S+ unavailable", m.text)) == 1
    assert m.alive() and "Traceback" not in m.text
    assert m.stop() == 0


def test_a_restarted_servers_port_lies_below_the_ephemeral_range() -> None:
    """Between stop() and start() above, Redis's port is free: with a port from bind(0) an
    outgoing connection or bind(0) of the other xdist worker could take it, and the restart
    failed with "Address already in use". Below the kernel's range no automatic choice goes."""
    start = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = [free_port() for _ in range(20)]
    assert all(10000 <= port < start for port in ports), ports
    assert len(set(ports)) > 1, ports


def test_an_unresponsive_redis_costs_one_timeout_per_retry_interval_not_one_per_message(
        tclrun: Callable[..., TclRun], redis_server: RedisServer) -> None:
    """A frozen server (SIGSTOP: connections hang, like a host gone from the network): the check
    that meets it waits for the 0.3 s timeout; the next ones, within -retry, answer at once."""
    m = greylist(tclrun, redis_server.url, args=("-delay", "0", "-retry", "30", "-unavailable", "accept"))
    assert greylisted(rcpt_reply(m, 1)) == 0
    assert redis_server.proc is not None
    redis_server.proc.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        assert rcpt_reply(m, 2) == ("c", {})  # -unavailable accept
        first = time.monotonic() - started
        started = time.monotonic()
        assert [rcpt_reply(m, n) for n in range(3, 13)] == [("c", {})] * 10
        ten = time.monotonic() - started
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
    assert first >= 0.25, first
    assert ten < 1.0, ten  # without the pause, 10 * 0.3 s at least
    line = m.wait_for(r"greylist store \S+ unavailable \((.*)\): answering accept \(not greylisted\)")
    assert "Timeout" in line.group(1)
    assert m.stop() == 0


class NotRedis(LoopbackServer):
    """A TCP server on loopback that is no Redis: it answers whatever it reads with ``answer``
    (once per read), then with ``trickle`` one byte every 0.1 s (a server that never finishes)."""

    def __init__(self, answer: bytes, trickle: bytes = b"") -> None:
        self.answer, self.trickle = answer, trickle
        super().__init__(self._answer)
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def _answer(self, conn: socket.socket) -> None:
        while conn.recv(65536):
            conn.sendall(self.answer)
            for byte in self.trickle:
                conn.sendall(bytes([byte]))
                time.sleep(0.1)


@pytest.fixture
def not_redis() -> Iterator[Callable[..., NotRedis]]:
    made: list[NotRedis] = []

    def make(answer: bytes, trickle: bytes = b"") -> NotRedis:
        made.append(NotRedis(answer, trickle))
        return made[-1]

    yield make
    for server in made:
        server.close()


def triplet_key(n: int) -> str:
    """The Redis key of triplet ``n`` of rcpt_reply."""
    return f"greylist:192.0.2.{n % 250 + 1}\0s{n}@example.org\0r{n}@example.com"


def test_a_triplet_key_holding_what_the_greylist_never_wrote_is_a_first_sight_not_an_outage(
        tclrun: Callable[..., TclRun], redis_server: RedisServer) -> None:
    """A key of the greylist's that holds something else (a string another program SET there,
    a hash whose fields are no numbers): Redis answered the check's script with an error
    (WRONGTYPE, "hash value is not an integer"), taken for an outage of the whole store: every
    recipient tempfailed for -retry seconds, and two warnings each time the client retried that
    triplet. Now such a key is that triplet's first sight, and nothing else notices."""
    m = greylist(tclrun, redis_server.url, args=("-delay", "1", "-retry", "30"))
    redis_server.command("SET", triplet_key(1), "junk")
    redis_server.command("HSET", triplet_key(2), "first", "soon", "last", "x", "seen", "1")
    redis_server.command("HSET", triplet_key(3), "first", "1", "last", "1", "seen", "many")
    redis_server.command("HSET", triplet_key(4), "first", "inf", "last", "inf", "seen", "1")
    assert [greylisted(rcpt_reply(m, n)) for n in range(1, 6)] == [1] * 5
    time.sleep(1.1)
    assert [rcpt_reply(m, n) for n in range(1, 6)] == [("c", {})] * 5
    ttl = int(redis_server.command("TTL", triplet_key(1))[1:])
    assert 3024000 - 5 <= ttl <= 3024000
    assert "unavailable" not in m.text and "Traceback" not in m.text, m.text
    assert m.stop() == 0


@pytest.mark.parametrize("first", ["a day ahead", "1e300"])
@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_a_first_sight_recorded_in_the_future_waits_one_delay_not_until_then(
        tclrun: Callable[..., TclRun], tmp_path: Path, kind: str, first: str) -> None:
    """A triplet whose first sight the store holds as later than now: written by a host whose
    clock ran ahead (a day, before NTP set it), or a number no greylist wrote. The reply said the
    whole distance ("try again in 86401 seconds"; for 1e300, a 301-digit number in the SMTP
    reply), every sight renewed the triplet and none passed before then: that sender's mail to
    that recipient bounced once its MTA gave up retrying. A first sight is never later than now:
    one -delay, then it passes."""
    server: RedisServer | None = None
    if kind == "redis":
        server = RedisServer(tmp_path)
        server.start()
    try:
        store = server.url if server is not None else f"sqlite:{tmp_path / 'greylist.sqlite'}"
        m = greylist(tclrun, store, args=("-delay", "1", "-retry", "30"))
        assert greylisted(rcpt_reply(m, 1)) == 1
        future = repr(time.time() + 86400) if first == "a day ahead" else first
        if server is not None:
            server.command("HSET", triplet_key(1), "first", future)
        else:
            with sqlite3.connect(tmp_path / "greylist.sqlite") as db:
                db.execute("UPDATE triplets SET first_seen = ?", (float(future),))
        assert greylisted(rcpt_reply(m, 1)) == 1  # (before: 86401, or 10**300)
        time.sleep(1.1)
        assert rcpt_reply(m, 1) == ("c", {})
        assert "unavailable" not in m.text and "Traceback" not in m.text, m.text
        assert m.stop() == 0
    finally:
        if server is not None:
            server.close()


def test_a_store_failing_and_answering_by_turns_logs_one_outage_a_minute(
        tclrun: Callable[..., TclRun], redis_server: RedisServer) -> None:
    """Redis at its maxmemory refuses writes, answers again once keys expire, refuses again: each
    outage made its "unavailable" and "is back" lines, two every -retry seconds per process, for
    as long as it went on. Now the first outage is logged, the next ones of the minute counted;
    every recipient still gets its answer, the store's or -unavailable's."""
    m = greylist(tclrun, redis_server.url, args=("-delay", "60", "-retry", "0.1"))
    replies = []
    for n in range(5):
        redis_server.command("CONFIG", "SET", "maxmemory", "1")  # noeviction: every write refused (OOM)
        replies.append(rcpt_reply(m, n))
        redis_server.command("CONFIG", "SET", "maxmemory", "0")
        time.sleep(0.15)  # past -retry
        replies.append(rcpt_reply(m, n))
    assert [unavailable(r) for r in replies[::2]] == [True] * 5, replies
    assert [greylisted(r) for r in replies[1::2]] == [60] * 5, replies
    m.wait_for(r"greylist store \S+ unavailable \(OutOfMemoryError: .*\): answering tempfail, trying again every "
               r"0\.1 s\r?\n")
    m.wait_for(r"greylist store \S+ is back after [\d.]+ s; 1 recipients were answered tempfail meanwhile")
    assert len(re.findall(r"greylist store \S+ unavailable", m.text)) == 1, m.text
    assert len(re.findall(r"greylist store \S+ is back", m.text)) == 1, m.text
    assert m.stop() == 0


def four_outages(m: TclRun, redis_server: RedisServer) -> None:
    """Four outages of a store that fails and answers by turns, each past -retry 0.1: the first
    logged, the other three counted (one recipient answered without the store in each)."""
    for n in range(4):
        redis_server.command("CONFIG", "SET", "maxmemory", "1")  # noeviction: every write refused (OOM)
        assert unavailable(rcpt_reply(m, n))
        redis_server.command("CONFIG", "SET", "maxmemory", "0")
        time.sleep(0.15)  # past -retry
        assert greylisted(rcpt_reply(m, n)) == 60


def test_the_outages_counted_and_not_told_are_told_at_the_stop(tclrun: Callable[..., TclRun],
                                                               redis_server: RedisServer) -> None:
    """A store failing by turns, then a stop within the minute: the outages counted since the
    last line were told by the next line or check, which never came, so lost (3 outages, 3
    recipients answered without the store, said nowhere). Now the stop tells them, once; and
    the outage still under way then, without a line of its own, with them (it was left out:
    counted only as it ended, which it never did)."""
    m = greylist(tclrun, redis_server.url, args=("-delay", "60", "-retry", "0.1"))
    four_outages(m, redis_server)
    redis_server.command("CONFIG", "SET", "maxmemory", "1")  # a fifth outage, under way at the stop
    assert [unavailable(rcpt_reply(m, n)) for n in (4, 5)] == [True, True]
    assert m.stop() == 0
    told = re.findall(r"WARNING: greylist store \S+: (\d+) more outages since the last line about it, (\d+) "
                      r"recipients answered tempfail in them(.*?) \((.*?)\)", m.text)
    assert told == [("4", "5", ", the last one still under way", "told as the milter stops")], m.text  # (once)


#: A --python file whose helo callback, for `HELO hold`, is held in C code no grace can stop.
HELD_AT_HELO = """
import os

def setup(milter):
    def helo(ctx, name):
        if name == "hold":
            os.system("sleep 30")
        return milter.CONTINUE
    milter.register("helo", helo)
"""


def test_the_outages_counted_and_not_told_are_told_when_a_stop_gives_up(
        tclrun: Callable[..., TclRun], redis_server: RedisServer, tmp_path: Path) -> None:
    """The same, but the stop gives up on a callback held past the grace (overdue.py): the
    process ends by os._exit, which runs no atexit, so the store's finalizer never told the
    count (3 outages, 3 recipients, said nowhere). The count is now held where repeats.py tells
    counts at such ends (tell_counts_unlocked at the give-up, tell_counts at a worker's exit)."""
    hold = tmp_path / "hold.py"
    hold.write_text(HELD_AT_HELO)
    m = greylist(tclrun, redis_server.url, "--python", str(hold), "--grace", "1",
                 args=("-delay", "60", "-retry", "0.1"))
    four_outages(m, redis_server)
    with m.mta() as mta:
        mta.negotiate()
        mta.connect(address="192.0.2.99")
        mta.send_raw("H", b"hold\0")
        time.sleep(0.5)
        assert m.stop(timeout=60) == 1, m.text
    m.wait_for(r"exiting without it, exit status 1", since=0)
    told = re.findall(r"WARNING: greylist store \S+: 3 more outages since the last line about it, 3 recipients "
                      r"answered tempfail in them \((.*?)\)", m.text)
    assert told == ["told as the milter stops"], m.text[-3000:]


def test_the_outages_of_a_minute_not_logged_are_counted_in_the_next_line(redis_server: RedisServer,
                                                                         caplog: Any) -> None:
    """The count of the outages that had no line: told once their minute is over, by the first
    check the store answers, or by the next outage line. (In-process: the minute is the clock's.)"""
    store, greylist, check, now = redis_greylist(redis_server, retry=1, step=2)  # (2: past -retry)
    caplog.set_level("WARNING", logger="pytclmilter.greylist")
    assert [check(n, down) for n in range(3) for down in (True, False)] == ["unavailable", ("wait", 0)] * 3
    assert len(caplog.records) == 2  # the first outage's two lines
    now[0] += store.OUTAGE_LINES_EVERY
    assert check(3, False) == ("wait", 0)
    assert caplog.records[-1].getMessage().endswith(
        ": 2 more outages since the last line about it, 2 recipients answered tempfail in them "
        "(logged at most once a minute)")
    assert [check(4, True), check(5, False)] == ["unavailable", ("wait", 0)]
    assert len(caplog.records) == 3  # (that line began a minute too)
    now[0] += store.OUTAGE_LINES_EVERY
    assert check(6, True) == "unavailable"
    assert caplog.records[-1].getMessage().endswith(
        "trying again every 1 s; 1 more outages since the last such line, 1 recipients answered tempfail in them "
        "(logged at most once a minute)")
    assert check(7, False) == ("wait", 0)
    assert len(caplog.records) == 5  # and its end
    assert check(8, True) == "unavailable"
    now[0] += store.OUTAGE_LINES_EVERY
    assert check(9, True) == "unavailable"  # a counted outage that lasts: logged once its minute is over
    assert caplog.records[-1].getMessage().endswith("trying again every 1 s; down for 62.0 s")
    assert check(10, False) == ("wait", 0)
    assert "is back after 64.0 s; 2 recipients were answered tempfail" in caplog.records[-1].getMessage()
    assert len(caplog.records) == 7
    greylist.store.close()


def test_an_outage_under_way_without_a_line_is_told_as_the_store_is_closed(redis_server: RedisServer,
                                                                           caplog: Any) -> None:
    """A reload (or another -store) drops the Greylist while an outage counted, not logged,
    is under way: the closing count left it out (it was counted only as it ended), so its
    recipients answered without the store were said nowhere."""
    store = load_store_module()
    greylist = store.Greylist(store.Settings(store=redis_server.url, delay=0, retry=0))

    def check(n: int, down: bool) -> Any:
        redis_server.command("CONFIG", "SET", "maxmemory", "1" if down else "0")
        return greylist.check("192.0.2.1", f"s{n}@example.org", "r@example.com")

    caplog.set_level("WARNING", logger="pytclmilter.greylist")
    assert [check(0, True), check(1, False)] == ["unavailable", ("wait", 0)]  # logged: its two lines
    assert [check(2, True), check(3, True)] == ["unavailable"] * 2  # within the minute: counted
    assert len(caplog.records) == 2
    del greylist
    gc.collect()
    assert [r.getMessage().partition(": ")[2] for r in caplog.records[2:]] == [
        "1 more outages since the last line about it, 2 recipients answered tempfail in them, the last one "
        "still under way (told as the store is closed)"]


def test_an_outage_under_way_after_its_line_is_told_at_an_end_and_as_the_store_is_closed(
        redis_server: RedisServer, caplog: Any) -> None:
    """A reload (or another -store) drops the Greylist, or the process ends, while an outage that
    had its line is under way: its "is back" line, which tells how many recipients it answered,
    never comes, so those recipients were said nowhere. At an end with no atexit (a worker's
    os._exit) repeats.py's end hook tells them; a close after it only what came since."""
    store = load_store_module()
    greylist = store.Greylist(store.Settings(store=redis_server.url, delay=0, retry=0))
    redis_server.command("CONFIG", "SET", "maxmemory", "1")
    caplog.set_level("WARNING", logger="pytclmilter.greylist")
    try:
        assert [greylist.check("192.0.2.1", f"s{n}@example.org", "r@example.com") for n in range(2)] == [
            "unavailable"] * 2
        assert len(caplog.records) == 1  # its line
        repeats.tell_counts(ended_only=False)
        repeats.tell_counts(ended_only=False)
        assert greylist.check("192.0.2.1", "s2@example.org", "r@example.com") == "unavailable"
    finally:
        redis_server.command("CONFIG", "SET", "maxmemory", "0")
    del greylist
    gc.collect()
    assert [r.getMessage().partition(": ")[2] for r in caplog.records[1:]] == [
        "still unavailable, 2 recipients answered tempfail since the last line about it (told as the milter stops)",
        "still unavailable, 1 recipients answered tempfail since the last line about it (told as the store is closed)"]


def test_an_outage_told_as_the_milter_stops_counts_its_recipients_once_when_the_store_is_back(
        redis_server: RedisServer, caplog: Any) -> None:
    """A stop tells the recipients of an outage under way (its "is back" line may never come); if
    the store answers in the grace period after all, that line told the outage's whole count
    again, with or without a line of its own before: it tells those since the last line."""
    store, greylist, check, now = redis_greylist(redis_server, retry=0)
    caplog.set_level("WARNING", logger="pytclmilter.greylist")
    try:
        assert [check(0, True), check(1, False)] == ["unavailable", ("wait", 0)]  # logged: its two lines
        assert [check(2, True), check(3, True)] == ["unavailable"] * 2  # within the minute: counted
        repeats.tell_counts(ended_only=False)
        assert [check(4, True), check(5, False)] == ["unavailable", ("wait", 0)]
        now[0] += store.OUTAGE_LINES_EVERY
        assert [check(6, True), check(7, True)] == ["unavailable"] * 2  # its line
        repeats.tell_counts(ended_only=False)
        assert [check(8, True), check(9, False)] == ["unavailable", ("wait", 0)]
    finally:
        redis_server.command("CONFIG", "SET", "maxmemory", "0")
    told = [r.getMessage() for r in caplog.records[2:]]
    assert [told[0].partition(": ")[2], told[1].partition("; ")[2], told[3].partition(": ")[2],
            told[4].partition("; ")[2]] == [
        "1 more outages since the last line about it, 2 recipients answered tempfail in them, the last one "
        "still under way (told as the milter stops)",
        "1 recipients were answered tempfail since the last line about it",
        "still unavailable, 2 recipients answered tempfail since the last line about it (told as the milter stops)",
        "1 recipients were answered tempfail since the last line about it"], told
    assert len(told) == 5, told
    greylist.store.close()


@pytest.mark.parametrize("answer, mode", [(b"*2\r\n$3\r\nabc\r\n$3\r\nxyz\r\n", "tempfail"), (b":1\r\n", "accept")])
def test_a_store_that_answers_what_no_redis_answers_is_an_outage_not_an_error_per_message(
        tclrun: Callable[..., TclRun], not_redis: Callable[..., NotRedis], answer: bytes, mode: str) -> None:
    """-store pointed at a service that speaks Redis's syntax but is no Redis (another service
    behind the port, a proxy answering for it): redis-py takes its answers for Redis's and fails
    on them with AttributeError or ValueError. That was a Tcl error in every check: an ERROR with
    a traceback per recipient, the generic tempfail (-unavailable accept ignored), and the store
    tried again at every message."""
    server = not_redis(answer)
    m = greylist(tclrun, server.url, args=("-retry", "30", "-unavailable", mode))
    replies = [rcpt_reply(m, n) for n in range(3)]
    if mode == "accept":
        assert replies == [("c", {})] * 3, replies
    else:
        assert all(unavailable(r) for r in replies), replies
    line = m.wait_for(r"WARNING: greylist store \S+ unavailable \((.*)\): answering ")
    assert line.group(1).startswith("StoreError: an answer no Redis gives ("), line.group(1)
    assert len(re.findall(r"greylist store \S+ unavailable", m.text)) == 1
    assert "ERROR" not in m.text and "Traceback" not in m.text
    assert m.stop() == 0


def test_a_store_that_trickles_its_answer_is_given_up_on_not_waited_for_until_the_call_timeout(
        tclrun: Callable[..., TclRun], not_redis: Callable[..., NotRedis]) -> None:
    """redis-py's socket timeout bounds each read, not an answer: a server that sends a byte
    every 0.1 s never trips it. Each check then held the milter's only thread until -calltimeout
    (60 s by default, longer than Postfix waits) stopped the callback, message after message,
    as no outage was noticed. Now one check gets REDIS_DEADLINE in all."""
    server = not_redis(b"$100000\r\n", b"x" * 1000)
    m = greylist(tclrun, server.url, "--call-timeout", "5", args=("-retry", "30"))
    replies = [rcpt_reply(m, n) for n in range(2)]
    assert all(unavailable(r) for r in replies), replies
    line = m.wait_for(r"WARNING: greylist store \S+ unavailable \((.*)\): answering tempfail")
    assert line.group(1).startswith("TimeoutError"), line.group(1)
    assert "ERROR" not in m.text and "callback stopped" not in m.text
    assert m.stop() == 0


class TricklingTls(LoopbackServer):
    """A TLS server that never finishes its handshake: to the ClientHello it answers the header
    of a 16 KB handshake record, then that record one byte every 0.2 s (some 55 minutes, and no
    certificate needed). ``hellos``: the ClientHellos it read (a TLS record starts 0x16)."""

    def __init__(self) -> None:
        self.hellos = 0
        self.stopped = False
        super().__init__(self._trickle)
        self.url = f"rediss://127.0.0.1:{self.port}/0"

    def _trickle(self, conn: socket.socket) -> None:
        if conn.recv(65536)[:1] == b"\x16":
            self.hellos += 1
        conn.sendall(b"\x16\x03\x03\x40\x00")  # handshake, TLS 1.2, 16384 bytes
        while not self.stopped:
            conn.sendall(b"\x02")
            time.sleep(0.2)

    def close(self) -> None:
        self.stopped = True
        super().close()


def timed_rcpt_reply(m: TclRun, n: int) -> tuple[Any, float]:
    """rcpt_reply(m, n) and the seconds it took (the check held the milter's only thread so long)."""
    started = time.monotonic()
    reply = rcpt_reply(m, n)
    return reply, time.monotonic() - started


def assert_one_timeout_then_answered_at_once(m: TclRun, n: int, reason: str, least: float = 0.25,
                                             most: float = 1.0) -> None:
    """Triplet n meets the store's timeout, not before ``least`` and within ``most`` (less than
    REDIS_DEADLINE, 1 s: docs/deployment.md, section 7, or that and the milter's round trips);
    n + 1, within -retry, is answered at once; one outage line, saying ``reason``."""
    (first, held), (second, then) = timed_rcpt_reply(m, n), timed_rcpt_reply(m, n + 1)
    assert unavailable(first) and unavailable(second), (first, second)
    assert least <= held < most, held
    assert then < 0.2, then
    line = m.wait_for(r"WARNING: greylist store \S+ unavailable \((.*)\): answering tempfail")
    assert line.group(1) == reason, line.group(1)
    assert len(re.findall(r"greylist store \S+ unavailable", m.text)) == 1
    assert "callback stopped" not in m.text and "ERROR" not in m.text
    assert m.stop() == 0


def test_a_rediss_store_whose_tls_handshake_trickles_is_given_up_on_within_the_check_bound(
        tclrun: Callable[..., TclRun]) -> None:
    """redis-py's SSLConnection does its TLS handshake in _connect, before the greylist wraps the
    socket in its deadline: only socket_connect_timeout (0.3 s) is left over the handshake. Python's
    ssl takes a socket's timeout as the handshake's in all (not per read, since 3.5), so a server
    that trickles its handshake is given up on at 0.3 s, within the check's 1 s; a per-read
    timeout would have held the thread until -calltimeout (5 s here), at every reconnect."""
    server = TricklingTls()
    try:
        m = greylist(tclrun, server.url, "--call-timeout", "5", args=("-retry", "30"))
        assert_one_timeout_then_answered_at_once(m, 1, "TimeoutError: Timeout connecting to server")
    finally:
        server.close()
    assert server.hellos == 1, server.hellos  # the handshake was under way, once (none within -retry)


@pytest.mark.parametrize("slow", ["handshake", "connect"])
def test_timeouts_in_a_redis_url_cannot_hold_a_check_past_its_one_second(
        tclrun: Callable[..., TclRun], full_backlog: socket.socket, slow: str) -> None:
    """redis-py lets a URL's query set its timeouts, over the greylist's own: with
    ?socket_connect_timeout=3 a trickled TLS handshake, or a connect whose SYN-ACK does not
    come, held the milter's only thread 3 s at every reconnect (the check's deadline bounded
    only what came after the connect). A URL's timeouts may shorten the bounds; the check's 1 s
    in all now covers the connect and the handshake as well."""
    server = TricklingTls()
    url = server.url if slow == "handshake" else f"redis://127.0.0.1:{full_backlog.getsockname()[1]}/0"
    try:
        m = greylist(tclrun, f"{url}?socket_connect_timeout=3&socket_timeout=3", "--call-timeout", "10",
                     args=("-retry", "30"))
        assert_one_timeout_then_answered_at_once(m, 1, "TimeoutError: Timeout connecting to server", least=0.9,
                                                 most=1.25)
    finally:
        server.close()


@pytest.fixture
def full_backlog() -> Iterator[socket.socket]:
    """A listening socket on loopback whose backlog is full (one connection, never accepted): the
    kernel drops a next SYN, and the connect waits for its retransmission, a second or more."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=0)
    filler = socket.create_connection(listener.getsockname())
    try:
        yield listener
    finally:
        filler.close()
        listener.close()


@pytest.mark.parametrize("scheme", ["redis", "rediss"])
def test_a_store_whose_tcp_connect_hangs_is_given_up_on_within_the_check_bound(
        tclrun: Callable[..., TclRun], full_backlog: socket.socket, scheme: str) -> None:
    """The connect is redis-py's too, before any deadline of the greylist's: socket_connect_timeout
    (0.3 s) bounds it, on a host whose SYN-ACK never comes as on a TLS one."""
    port = full_backlog.getsockname()[1]
    m = greylist(tclrun, f"{scheme}://127.0.0.1:{port}/0", "--call-timeout", "5", args=("-retry", "30"))
    assert_one_timeout_then_answered_at_once(m, 1, "TimeoutError: Timeout connecting to server")


def test_a_unix_socket_store_whose_backlog_is_full_is_an_outage_at_once(
        tclrun: Callable[..., TclRun], tmp_path: Path) -> None:
    """A unix socket's connect does not wait for a full backlog (EAGAIN): an outage at once."""
    path = tmp_path / "redis.sock"
    with socket.socket(socket.AF_UNIX) as listener, socket.socket(socket.AF_UNIX) as filler:
        listener.bind(str(path))
        listener.listen(0)
        filler.connect(str(path))
        m = greylist(tclrun, f"unix://{path}?db=0", "--call-timeout", "5", args=("-retry", "30"))
        assert_one_timeout_then_answered_at_once(
            m, 1, f"ConnectionError: Error 11 connecting to {path}. Resource temporarily unavailable.",
            least=0.0)


# ---------------------------------------------------------------------------- import of the old file


def run_import(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(STORE_PY), "import", *args], capture_output=True, text=True,
                          timeout=30)


def old_file(path: Path) -> Path:
    """The old greylist.tcl's state file: ip sender rcpt first-seen last-seen, one Tcl list a line."""
    now = int(time.time())
    path.write_text(
        f"192.0.2.1 s0@example.org r0@example.com {now - 7200} {now - 3600}\n"  # waited long enough
        f"192.0.2.2 s1@example.org r1@example.com {now - 100} {now - 100}\n"  # 200 s of 300 to go
        f"192.0.2.3 s2@example.org r2@example.com {now - 90 * 86400} {now - 40 * 86400}\n"  # too old
        "this line is no entry\n"
        f"192.0.2.4 {{odd sender@example.org}} r4@example.com {now - 7200} {now - 3600}\n")  # braced word
    return path


def test_import_of_the_old_state_file_into_sqlite(tclrun: Callable[..., TclRun], tmp_path: Path) -> None:
    db = tmp_path / "greylist.sqlite"
    done = run_import(str(old_file(tmp_path / "greylist.db")), f"sqlite:{db}")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"imported 3 triplets into sqlite:{db} (2 lines skipped or expired)\n"
    rows = sqlite3.connect(db).execute("SELECT ip, sender, rcpt FROM triplets ORDER BY ip").fetchall()
    assert rows == [("192.0.2.1", "s0@example.org", "r0@example.com"),
                    ("192.0.2.2", "s1@example.org", "r1@example.com"),
                    ("192.0.2.4", "odd sender@example.org", "r4@example.com")]

    m = greylist(tclrun, f"sqlite:{db}")
    assert rcpt_reply(m, 0) == ("c", {})  # 192.0.2.1: its delay passed before the import
    wait = greylisted(rcpt_reply(m, 1))  # 192.0.2.2: first seen 100 s ago, the delay is 300 s
    assert wait is not None and 195 <= wait <= 201, wait
    assert greylisted(rcpt_reply(m, 2)) == 300  # 192.0.2.3: expired, not imported: first sight
    assert m.stop() == 0

    again = run_import(str(tmp_path / "greylist.db"), f"sqlite:{db}")  # merging again changes nothing
    assert again.returncode == 0 and "imported 3 triplets" in again.stdout
    assert sqlite3.connect(db).execute("SELECT count(*) FROM triplets").fetchone() == (4,)


def test_import_run_by_a_python_without_pytclmilter_says_which_python_to_use(tmp_path: Path) -> None:
    """Bug: the documented `python3 greylist_store.py import ...`, run by the system's python3
    beside a pytclmilter installed in a venv, ended in a ModuleNotFoundError traceback. (-S: a
    python3 that cannot see the venv's packages.)"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-S", str(STORE_PY), "import", str(old_file(tmp_path / "old.db")),
                           f"sqlite:{tmp_path / 'new.sqlite'}"], capture_output=True, text=True, timeout=30, env=env)
    assert done.returncode == 1
    assert done.stderr == ("greylist_store.py: No module named 'pytclmilter': run it with the python3 pytclmilter is "
                           "installed in, the one next to the pytclmilter program (e.g. /opt/pytclmilter/bin/python3)\n")
    assert not (tmp_path / "new.sqlite").exists()


def test_a_store_url_with_an_upper_case_scheme_is_the_same_store(redis_server: RedisServer, tmp_path: Path) -> None:
    """A URL's scheme is case-insensitive (RFC 3986, 3.1), and redis-py reads REDIS://... as
    redis://...; -store refused it as no store at all ("-store must be sqlite:PATH or redis://...")."""
    url = "REDIS" + redis_server.url.removeprefix("redis")
    done = run_import(str(old_file(tmp_path / "greylist.db")), url)
    assert done.returncode == 0, done.stderr
    assert "imported 3 triplets" in done.stdout
    assert redis_server.command("DBSIZE") == b":3"


def test_import_into_redis_and_its_errors(redis_server: RedisServer, tmp_path: Path) -> None:
    old = old_file(tmp_path / "greylist.db")
    done = run_import(str(old), redis_server.url)
    assert done.returncode == 0, done.stderr
    assert "imported 3 triplets" in done.stdout
    assert redis_server.command("DBSIZE") == b":3"

    assert run_import(str(tmp_path / "missing.db"), f"sqlite:{tmp_path / 'x.sqlite'}").returncode == 1
    bad = run_import(str(old), "mysql://somewhere")
    assert bad.returncode == 64 and "-store must be sqlite:PATH or redis://HOST:PORT/DB" in bad.stderr
    redis_server.stop()
    down = run_import(str(old), redis_server.url)
    assert down.returncode == 1 and f"import: {redis_server.url}: ConnectionError" in down.stderr
    assert "Traceback" not in down.stderr


# ---------------------------------------------------------------------------- root and the SQLite file


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (the milter starts as root)")
def test_as_root_the_file_opens_only_in_roots_own_directory_and_never_through_a_link(
        tclrun: Callable[..., TclRun], tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # like /tmp: anyone could plant a link there
    m = greylist(tclrun, f"sqlite:{shared}/greylist.sqlite")
    assert unavailable(rcpt_reply(m, 1))
    m.wait_for(rf"unavailable \(StoreError: refusing to open it as root in {re.escape(str(shared))}, "
               r"which others may write \(run with --user, or give root the directory\)\)")
    assert list(shared.iterdir()) == []

    own = tmp_path / "own"
    own.mkdir(mode=0o700)
    (own / "greylist.sqlite-wal").symlink_to(tmp_path / "victim")
    m = greylist(tclrun, f"sqlite:{own}/greylist.sqlite")
    assert unavailable(rcpt_reply(m, 1))
    m.wait_for(r"refusing to open it as root through the symbolic link \S+/greylist.sqlite-wal")
    assert not (tmp_path / "victim").exists() and not (own / "greylist.sqlite").exists()


def test_a_store_slower_than_retry_is_still_left_alone_between_tries(tclrun: Callable[..., TclRun],
                                                                      tmp_path: Path) -> None:
    """The next try was due -retry seconds after the failed one began: a try that took longer
    (SQLite waiting 0.5 s for a lock another process holds, Redis its 1 s) left none due
    later, and every check waited the whole timeout again on the milter's only thread. Now
    -retry counts from the failure: the checks in between answer at once."""
    db = tmp_path / "greylist.sqlite"
    m = greylist(tclrun, f"sqlite:{db}", args=("-delay", "0", "-retry", "0.4"))
    assert greylisted(rcpt_reply(m, 1)) == 0
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # (an admin's sqlite3 session, a long import)
    try:
        took = []
        for n in (2, 3, 4):
            started = time.monotonic()
            assert unavailable(rcpt_reply(m, n))
            took.append(time.monotonic() - started)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert took[0] >= 0.45 and max(took[1:]) < 0.45, took  # (the fault: 0.5 each, the lock's wait)
    time.sleep(0.5)
    assert greylisted(rcpt_reply(m, 2)) == 0  # the store answers again: triplet 2's first sight
    m.wait_for(r"greylist store \S+ is back after")
    assert m.stop() == 0


def test_the_housekeeping_timer_forgets_every_expired_triplet_not_a_batch_a_tick(
        tclrun: Callable[..., TclRun], tmp_path: Path) -> None:
    """`greydb expire` removed at most one batch of 1000 rows (so as not to hold SQLite's write
    lock long), and the timer runs it once every -interval (60 s): past 16 new triplets a second
    (a busy site, or a spammer's random senders) the file grew on disk for ever. Now a tick removes
    batch after batch until none is left (or its time is up): 20 000 expired rows go at the first
    one, the triplet seen within -maxage stays."""
    db = tmp_path / "greylist.sqlite"
    with sqlite3.connect(db, isolation_level=None) as setup:
        setup.executescript(load_store_module().SqliteStore._SCHEMA)
        setup.execute("BEGIN")
        setup.executemany("INSERT INTO triplets VALUES (?, 'old@example.org', 'r@example.com', 1, 1, 1)",
                          ((f"192.0.{n >> 8}.{n & 255}",) for n in range(20_000)))
        setup.execute("INSERT INTO triplets VALUES ('192.0.2.1', 'new@example.org', 'r@example.com', ?, ?, 1)",
                      (time.time(), time.time()))
        setup.execute("COMMIT")
    setup.close()
    m = greylist(tclrun, f"sqlite:{db}", args=("-interval", "1"))
    left = None
    for _ in range(40):  # the first tick comes after 1 s; four seconds allow four ticks
        time.sleep(0.1)
        with sqlite3.connect(db) as reader:
            left = reader.execute("SELECT sender, count(*) FROM triplets GROUP BY sender ORDER BY sender").fetchall()
        reader.close()
        if left == [("new@example.org", 1)]:
            break
    assert left == [("new@example.org", 1)], left
    assert m.stop() == 0


@pytest.mark.parametrize("kind", ["a directory", "a FIFO"])
def test_a_store_path_that_is_no_file_is_unavailable_saying_what_it_is(tclrun: Callable[..., TclRun],
                                                                       tmp_path: Path, kind: str) -> None:
    """-store sqlite:PATH naming a directory or a FIFO (a typo, a path meant for something else)
    was "readable by others (mode 0755): chmod 0600 it", then SQLite's "unable to open database
    file" or "disk I/O error". The outage line now says what the path is."""
    path = tmp_path / "store"
    if kind == "a directory":
        path.mkdir(mode=0o755)
    else:
        os.mkfifo(path, 0o644)
    m = greylist(tclrun, f"sqlite:{path}")
    assert unavailable(rcpt_reply(m, 1))
    m.wait_for(re.escape(f"unavailable (StoreError: {path} is {kind}, not a database file)"))
    assert "readable by others" not in m.text, m.text
    assert m.stop() == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (the milter starts as root)")
@pytest.mark.parametrize("theirs", ["writable by others", "another user's"])
def test_as_root_the_file_opens_only_below_directories_no_other_user_may_change(
        tclrun: Callable[..., TclRun], theirs: str) -> None:
    """Root's own directory in one another user may change was taken: only the last directory
    was checked, and SQLite opens the file again by its path (and its -wal and -shm). That user
    renamed the directory and put a link to any other in its place between the check and
    SQLite's open (a loop of four renames won the race in 0.08 s): root made and wrote the
    database there. Now every directory on the way must be root's, as for the script."""
    nobody = pwd.getpwnam("nobody")
    base = Path(tempfile.mkdtemp(prefix="greylist-store-"))
    try:
        base.chmod(0o755)
        middle = base / "middle"
        middle.mkdir(mode=0o777 if theirs == "writable by others" else 0o755)
        middle.chmod(0o777 if theirs == "writable by others" else 0o755)
        if theirs == "another user's":
            os.chown(middle, nobody.pw_uid, nobody.pw_gid)
        directory = middle / "greylist"
        directory.mkdir(mode=0o755)
        m = greylist(tclrun, f"sqlite:{directory}/greylist.sqlite")
        assert unavailable(rcpt_reply(m, 1))
        why = (f"{middle} is writable by its group and others, who could change what runs as root "
               f"(chmod go-w {middle})"
               if theirs == "writable by others" else
               f"{middle} is owned by uid {nobody.pw_uid}, not root: that user could change what runs as root "
               f"(chown root {middle})")
        m.wait_for(re.escape(f"unavailable (StoreError: refusing to open it as root in {directory}: {why})"))
        assert list(directory.iterdir()) == []
        assert m.stop() == 0
    finally:
        shutil.rmtree(base)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (to drop privileges)")
def test_with_user_the_file_is_opened_after_the_privilege_drop(tclrun: Callable[..., TclRun]) -> None:
    nobody = pwd.getpwnam("nobody")
    base = Path(tempfile.mkdtemp(prefix="greylist-store-"))
    try:
        base.chmod(0o755)
        directory = base / "greylist"
        directory.mkdir(mode=0o700)
        os.chown(directory, nobody.pw_uid, nobody.pw_gid)  # as deployment.md says: the user's directory
        m = greylist(tclrun, f"sqlite:{directory}/greylist.sqlite", "--user", "nobody", "--workers", "2")
        assert greylisted(rcpt_reply(m, 1)) == 300
        for name in ("greylist.sqlite", "greylist.sqlite-wal", "greylist.sqlite-shm"):
            assert (directory / name).stat().st_uid == nobody.pw_uid, name
        assert m.stop() == 0
    finally:
        shutil.rmtree(base)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (to drop privileges)")
def test_with_user_a_link_to_a_file_not_made_yet_is_made_private_there(tclrun: Callable[..., TclRun]) -> None:
    """A store named by a link to where the file is to be (-store sqlite:/var/lib/greylist/g.sqlite,
    a link to another disk), as the --user: SQLite made the file there. The private creation
    (O_EXCL, the name exists) then read the mode through the link, found nothing, and the store
    was "unavailable (No such file or directory)" for good. The file is made there, 0600."""
    nobody = pwd.getpwnam("nobody")
    base = Path(tempfile.mkdtemp(prefix="greylist-store-"))
    try:
        base.chmod(0o755)
        directory = base / "greylist"
        (directory / "data").mkdir(mode=0o700, parents=True)
        (directory / "greylist.sqlite").symlink_to("data/greylist.sqlite")
        for path in (directory, directory / "data"):
            os.chown(path, nobody.pw_uid, nobody.pw_gid)
        m = greylist(tclrun, f"sqlite:{directory}/greylist.sqlite", "--user", "nobody")
        assert greylisted(rcpt_reply(m, 1)) == 300
        assert m.stop() == 0
        assert "unavailable" not in m.text, m.text
        assert (directory / "data" / "greylist.sqlite").stat().st_mode & 0o777 == 0o600
    finally:
        shutil.rmtree(base)


def test_the_file_and_its_wal_and_shm_are_made_private_and_an_old_readable_one_is_told(
        tclrun: Callable[..., TclRun], tmp_path: Path) -> None:
    """SQLite made the store 0644 under the usual umask 022, and its -wal and -shm alike: who
    mails whom, readable by every local user. Now 0600, all three; a file made before (0644) is
    left as it is, and said once."""
    old = os.umask(0o022)  # (what the milter inherits: a daemon's usual umask)
    try:
        m = greylist(tclrun, f"sqlite:{tmp_path}/greylist.sqlite")
        kept = greylist(tclrun, f"sqlite:{tmp_path}/kept.sqlite")
    finally:
        os.umask(old)
    (tmp_path / "kept.sqlite").touch(mode=0o644)
    (tmp_path / "kept.sqlite").chmod(0o644)
    assert greylisted(rcpt_reply(m, 1)) == 300
    modes = {name: oct((tmp_path / f"greylist.sqlite{name}").stat().st_mode & 0o777) for name in ("", "-wal", "-shm")}
    assert modes == {"": "0o600", "-wal": "0o600", "-shm": "0o600"}, modes
    assert m.stop() == 0
    assert "readable by others" not in m.text, m.text
    assert greylisted(rcpt_reply(kept, 1)) == 300 and greylisted(rcpt_reply(kept, 2)) == 300
    assert kept.stop() == 0
    assert kept.text.count(f"WARNING: greylist store sqlite:{tmp_path}/kept.sqlite is readable by others (mode "
                           "0644): the addresses in it are theirs to read; chmod 0600 it and its -wal and -shm") == 1, \
        kept.text
    assert (tmp_path / "kept.sqlite").stat().st_mode & 0o777 == 0o644


# ---------------------------------------------------------------------------- set up again (a reload)


RACER = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("greylist_store", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
from pytclmilter.milter import Milter
start, folder = float(sys.argv[2]), sys.argv[3]
for n in range(int(sys.argv[4])):
    milter = Milter()
    module.setup(milter)
    greydb = next(iter(milter.tcl_commands)).func
    greydb("configure", "-store", f"sqlite:{folder}/{n}.sqlite")
    while time.time() < start + 0.25 * n:  # both processes open file n at the same moment
        pass
    print(greydb("check", "192.0.2.1", "a@example.org", "b@example.com"), flush=True)
"""


def test_workers_opening_a_new_sqlite_file_at_once_both_greylist(tmp_path: Path) -> None:
    """Two workers' first checks on a new file: SQLite refused one of the two `PRAGMA
    journal_mode=WAL` at once ("database is locked", its busy handler not asked), so a worker
    started its life with an outage and answered 4.3.0 for -retry seconds (half of the starts)."""
    trials = 16
    start = str(time.time() + 2)
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(STORE_PY), start, str(tmp_path), str(trials)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [racer.communicate(timeout=60) for racer in racers]
    for out, err in outputs:  # (the second sighting may be 300 s plus the clocks' last digits away)
        assert [re.sub(r"\d+", "N", line) for line in out.splitlines()] == ["('wait', N)"] * trials, err


def test_setup_again_in_the_same_process_has_its_own_connection_closed_with_it(tmp_path: Path) -> None:
    """A reload imports the hooks file again and calls setup() on a new milter: the second
    store object shares nothing with the first, and the first's connection closes once it is
    garbage."""
    from pytclmilter.milter import Milter

    db = tmp_path / "greylist.sqlite"
    milters, commands = [], []
    for n in (1, 2):
        spec = importlib.util.spec_from_file_location(f"greylist_store_{n}", STORE_PY)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        milter = Milter()
        module.setup(milter)
        greydb = next(iter(milter.tcl_commands)).func
        greydb("configure", "-store", f"sqlite:{db}", "-delay", "0")
        milters.append(milter)
        commands.append(greydb)
    assert commands[0]("check", "192.0.2.1", "a@example.org", "b@example.com") == ("wait", 0)
    assert commands[1]("check", "192.0.2.1", "a@example.org", "b@example.com") == "pass"
    first, second = (_connection(greydb) for greydb in commands)
    assert first is not second  # one connection each
    del milters[0], commands[0]
    gc.collect()
    with pytest.raises(sqlite3.ProgrammingError, match="closed database"):
        first.execute("SELECT 1")
    assert commands[0]("check", "192.0.2.1", "a@example.org", "b@example.com") == "pass"


def test_reloads_keep_the_triplets_and_close_each_replaced_generations_connection(
        tclrun: Callable[..., TclRun], tmp_path: Path) -> None:
    """SIGUSR1 ten times, a message between each: a triplet first seen before the reloads passes
    after them (it is in the store), and the process holds the file open once, for the generation
    serving, not once per generation it ever had (no descriptor leak)."""
    db = tmp_path / "greylist.sqlite"
    m = greylist(tclrun, f"sqlite:{db}", args=("-delay", "1"))
    assert greylisted(rcpt_reply(m, 1)) == 1
    started = time.monotonic()

    def store_fds() -> list[str]:
        fds, targets = Path(f"/proc/{m.child.pid}/fd"), []
        for fd in os.listdir(fds):
            try:
                targets.append(os.readlink(fds / fd))
            except FileNotFoundError:  # (the listing's own descriptor, closed by now)
                pass
        return sorted(t for t in targets if t.startswith(str(db)))

    serving = store_fds()
    assert serving, "the first check opened the store"
    for n in range(2, 12):
        mark = m.mark()
        m.child.kill(signal.SIGUSR1)
        m.wait_for(rf"generation {n - 1} is gone", since=mark)
        assert greylisted(rcpt_reply(m, 100 + n)) == 1
    time.sleep(max(0.0, 1.1 - (time.monotonic() - started)))
    assert rcpt_reply(m, 1) == ("c", {})
    assert store_fds() == serving
    assert "locked" not in m.text and "Traceback" not in m.text
    assert m.stop() == 0


def _connection(greydb: Callable[..., Any]) -> sqlite3.Connection:
    """The SQLite connection behind a greydb command (its closure holds the Greylist)."""
    greylist = next(c.cell_contents for c in greydb.__closure__ or () if hasattr(c.cell_contents, "store"))
    db = greylist.store._db
    assert isinstance(db, sqlite3.Connection)
    return db


def test_the_outage_line_escapes_the_store_spec(tclrun: Callable[..., TclRun], tmp_path: Path) -> None:
    """The spec comes from the script's arguments: a line feed in it stays inside the one line."""
    m = greylist(tclrun, f"sqlite:{tmp_path}/no\nsuch/greylist.sqlite")
    assert unavailable(rcpt_reply(m, 1))
    line = m.wait_for(r"WARNING: greylist store (.*) unavailable \((.*)\): answering tempfail")
    assert line.group(1) == f"sqlite:{tmp_path}/no\\nsuch/greylist.sqlite", line.group(0)
    assert m.alive() and m.stop() == 0


def test_a_sender_and_recipient_beyond_u_ffff_are_greylisted_not_a_crash(
        tclrun: Callable[..., TclRun], tmp_path: Path) -> None:
    """SMTPUTF8 addresses with an emoji: the script's `string tolower` once killed the process
    (Tcl 8.6 crashes on a character beyond U+FFFF in 4-byte UTF-8, the form it was given)."""
    db = tmp_path / "greylist.sqlite"
    m = greylist(tclrun, f"sqlite:{db}")
    with m.mta() as mta:
        mta.negotiate()
        mta.connect(address="192.0.2.9")
        assert mta.mail("<Gr\u00fc\u00dfe\U0001F600@example.org>") == ("c", {})
        assert greylisted(mta.rcpt("<R\U0001F600@Example.com>")) == 300
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT ip, sender, rcpt FROM triplets").fetchall()
    assert rows == [("192.0.2.9", "gr\u00fc\u00dfe\U0001F600@example.org", "r\U0001F600@example.com")]
    assert m.alive() and m.stop() == 0


@pytest.mark.parametrize("secret_at", ["authority", "query"])
def test_the_outage_line_holds_no_redis_password(tclrun: Callable[..., TclRun], secret_at: str) -> None:
    """Docs: "a password in the URL is not logged" -- also one with an unencoded "@" (redis-py
    reads it so) and one given as ?password=, both of which the log once showed."""
    port = free_port()  # nothing listens: the first check starts an outage
    url = (f"redis://:hunter2@pw@127.0.0.1:{port}/0" if secret_at == "authority"
           else f"redis://127.0.0.1:{port}/0?password=hunter2&db=0")
    m = greylist(tclrun, url)
    assert unavailable(rcpt_reply(m, 1))
    line = m.wait_for(r"WARNING: greylist store (\S*) unavailable")
    assert line.group(1) == f"redis://127.0.0.1:{port}/0" + ("?db=0" if secret_at == "query" else "")
    assert m.alive() and m.stop() == 0
    assert "hunter2" not in m.text


def test_a_redis_refusing_the_password_says_so_in_words_of_passwords(
        tclrun: Callable[..., TclRun], redis_server: RedisServer) -> None:
    """A Redis that wants a password, given none: redis-py 8 opens with RESP3's HELLO, and the
    outage line read "HELLO must be called with the client already authenticated, otherwise the
    HELLO AUTH <user> <pass> option can be used to authenticate the client and select the RESP
    protocol version ...". The greylist speaks RESP2 now (all it sends is a script), and the line
    says what is wrong; a wrong password as before. Every recipient gets -unavailable's answer."""
    redis_server.command("CONFIG", "SET", "requirepass", "sekret")
    host = f"127.0.0.1:{redis_server.port}/0"
    for url, why in ((f"redis://{host}", "Authentication required."),
                     (f"redis://:wrong@{host}", "invalid username-password pair or user is disabled.")):
        m = greylist(tclrun, url)
        assert [unavailable(rcpt_reply(m, n)) for n in (1, 2)] == [True, True]
        line = m.wait_for(r"WARNING: greylist store \S+ unavailable \((.*)\): answering tempfail")
        assert line.group(1) == f"AuthenticationError: {why}", line.group(1)
        assert m.stop() == 0
        assert len(re.findall(r"greylist store \S+ unavailable", m.text)) == 1 and "HELLO" not in m.text, m.text
    m = greylist(tclrun, f"redis://:sekret@{host}", args=("-delay", "7"))
    assert greylisted(rcpt_reply(m, 1)) == 7
    assert m.stop() == 0


def test_the_try_command_of_the_docs_greylists_also_as_root(tmp_path: Path) -> None:
    """docs/cli.md's example, run as written (an admin tries it as root): its store must be one
    root may open, not a file in the world-writable /tmp, which root refuses (-> "unavailable")."""
    from support.tclrun import _pytclmilter_command, child_env

    doc = (EXAMPLES.parents[1] / "docs" / "cli.md").read_text()
    found = re.search(r"`pytclmilter (try tclmilter/examples/greylist\.tcl [^`]*)`", doc)
    assert found, "the greylist example of try is gone from docs/cli.md"
    command = " ".join([*map(shlex.quote, _pytclmilter_command()), *found.group(1).split()])
    out = subprocess.run(["/bin/sh", "-c", command], cwd=EXAMPLES.parents[1], env=child_env({"HOME": str(tmp_path)}),
                         capture_output=True, text=True, timeout=60)
    assert "451 4.7.1 Greylisted, please try again in 300 seconds" in out.stdout, out.stdout + out.stderr
    assert out.returncode == 2


def test_the_housekeeping_timer_does_not_report_a_stopped_redis_back(
        tclrun: Callable[..., TclRun], redis_server: RedisServer) -> None:
    """Redis forgets triplets by itself, so the timer's `greydb expire` sends it nothing; that
    must not count as Redis answering: the log once said "is back" at each tick of a long
    outage (and "unavailable" again at the next message), its count of answers reset."""
    m = greylist(tclrun, redis_server.url, args=("-retry", "0.2", "-interval", "1"))
    assert greylisted(rcpt_reply(m, 1)) == 300
    redis_server.stop()
    assert unavailable(rcpt_reply(m, 2))
    m.wait_for(r"greylist store \S+ unavailable")
    time.sleep(2.5)  # two ticks of the timer, each past -retry
    assert unavailable(rcpt_reply(m, 3))
    assert "is back" not in m.text
    assert len(re.findall(r"greylist store \S+ unavailable", m.text)) == 1

    redis_server.start()
    time.sleep(0.3)  # past -retry
    assert greylisted(rcpt_reply(m, 4)) == 300
    back = m.wait_for(r"greylist store \S+ is back after [\d.]+ s; (\d+) recipients were answered tempfail")
    assert back.group(1) == "2"
    assert m.stop() == 0


def test_a_redis_on_its_unix_socket_is_a_store(tclrun: Callable[..., TclRun], tmp_path: Path) -> None:
    """docs/deployment.md: a filter user in group redis "reaches Redis's socket"; the greylist
    refused any -store but sqlite: and redis(s)://, so that socket could not be its store."""
    sock = tmp_path / "redis.sock"
    server = subprocess.Popen([shutil.which("redis-server") or "/usr/bin/redis-server", "--port", "0",
                               "--unixsocket", str(sock), "--unixsocketperm", "700", "--save", "",
                               "--appendonly", "no", "--dir", str(tmp_path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert server.poll() is None and time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
        m = greylist(tclrun, f"unix://{sock}?db=0", args=("-delay", "1"))
        assert greylisted(rcpt_reply(m, 1)) == 1
        time.sleep(1.1)
        assert rcpt_reply(m, 1) == ("c", {})  # the retry after the delay: Redis kept the triplet
        server.terminate()
        server.wait(10)
        assert unavailable(rcpt_reply(m, 2))
        line = m.wait_for(r"WARNING: greylist store (\S+) unavailable")
        assert line.group(1) == f"unix://{sock}?db=0"
        assert m.stop() == 0
    finally:
        server.kill()
        server.wait(10)


# ---------------------------------------------------------------------------- a Redis host by name


SLOW_DNS = """
import socket, time
_real = socket.getaddrinfo

def getaddrinfo(host, port, *args, **kwargs):
    # a DNS that takes 2 s for redis.test (then 127.0.0.1), never answers for hang.test,
    # and knows no nxdomain.test
    if host == "redis.test":
        time.sleep(2)
        return _real("127.0.0.1", port, *args, **kwargs)
    if host == "hang.test":
        time.sleep(600)
    if host == "nxdomain.test":
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    return _real(host, port, *args, **kwargs)

socket.getaddrinfo = getaddrinfo

def setup(milter):
    pass
"""


def test_a_redis_host_name_is_resolved_once_at_load_never_while_serving(
        tclrun: Callable[..., TclRun], redis_server: RedisServer) -> None:
    """A slow DNS (2 s an answer) holds the load, where waiting is harmless, and never a check:
    the store connected by name at each (re)connect, holding the whole milter 2 s each time."""
    url = f"redis://redis.test:{redis_server.port}/0"
    m = tclrun(GREYLIST, "--python", str(STORE_PY), python=[SLOW_DNS], args=("-store", url, "-retry", "0.2"))

    def timed(n: int) -> tuple[Any, float]:
        started = time.monotonic()
        reply = rcpt_reply(m, n)
        return reply, time.monotonic() - started

    reply, took = timed(1)
    assert greylisted(reply) == 300 and took < 1.0, (reply, took)
    redis_server.stop()
    reply, took = timed(2)
    assert unavailable(reply) and took < 1.0, (reply, took)
    line = m.wait_for(r"WARNING: greylist store (\S+) unavailable")
    assert line.group(1) == url  # the log names the store as the admin wrote it
    redis_server.start()
    time.sleep(0.3)  # past -retry: the next check connects again
    reply, took = timed(3)
    assert greylisted(reply) == 300 and took < 1.0, (reply, took)
    m.wait_for(r"greylist store \S+ is back")
    assert m.stop() == 0


@pytest.mark.parametrize(("host", "reason"), [
    ("hang.test", 'cannot resolve the Redis host "hang.test": no answer within 5 s'),
    ("nxdomain.test", 'cannot resolve the Redis host "nxdomain.test": .*Name or service not known'),
    ("name.test", r'-store rediss:// needs an IP address, not the host name "name.test"'),
])
def test_a_redis_host_name_that_does_not_resolve_fails_the_load_in_bounded_time(
        tclrun: Callable[..., TclRun], host: str, reason: str) -> None:
    scheme = "rediss" if host == "name.test" else "redis"
    started = time.monotonic()
    m = tclrun(GREYLIST, "--python", str(STORE_PY), python=[SLOW_DNS], wait=False,
               args=("-store", f"{scheme}://{host}:6379/0"))
    assert m.wait_exit(timeout=20) == 1
    assert time.monotonic() - started < 15
    assert re.search(reason, m.text), m.text
    assert "listening" not in m.text


@pytest.mark.parametrize("options, error", [
    (("-maxage", "1e17"), '-maxage must be a number of seconds from 1 to 3153600000 (100 years), not "1e17"'),
    (("-delay", "600", "-maxage", "300"), "-maxage (300 s) must be longer than -delay (600 s): a retry after the "
                                          "delay would find its triplet forgotten, greylisted again for ever"),
])
def test_a_maxage_no_store_can_keep_fails_the_load_not_every_check(
        tclrun: Callable[..., TclRun], redis_server: RedisServer, options: tuple[str, ...], error: str) -> None:
    """-maxage beyond what Redis's EXPIRE takes loaded, and every check was then an outage
    ("ResponseError: invalid expire time in 'expire' command") for as long as the filter ran;
    one shorter than -delay greylisted every triplet for ever (forgotten before its retry could
    pass), silently. Both are refused when the script loads."""
    m = tclrun(GREYLIST, "--python", str(STORE_PY), wait=False, args=("-store", redis_server.url, *options))
    assert m.wait_exit(timeout=20) == 1
    assert error in m.text, m.text
    assert "listening" not in m.text


def test_the_module_docstring_shows_the_import_usage_the_command_prints() -> None:
    """The docstring showed `import OLDFILE [STORE]`, though the command takes MAXAGE too."""
    import ast

    done = run_import()
    assert done.returncode == 64
    usage = done.stderr.splitlines()[0].removeprefix("usage: ")
    docstring = ast.get_docstring(ast.parse(STORE_PY.read_text()))
    assert docstring and f"python3 {usage}\n" in docstring, (usage, docstring)


@pytest.mark.skipif(os.geteuid() != 0, reason="the checks are root's")
@pytest.mark.parametrize("directory", ["others may write", "the socket owner's"])
def test_as_root_a_redis_unix_socket_is_reached_only_where_no_other_user_could_swap_it(
        tclrun: Callable[..., TclRun], roots_dir: Path, nobodys_redis: Callable[[Path], None], directory: str) -> None:
    """The SQLite store checks the directories of its file as root; the Redis store connected to
    a unix:// socket by its path with no check: in a directory others may write, any user could
    put their own socket there, a fake Redis that greylists nothing. The socket's directory may
    be the Redis user's (/run/redis): that user runs the server anyway."""
    nobody = pwd.getpwnam("nobody")
    where = roots_dir / "redis"
    where.mkdir()
    where.chmod(0o777 if directory == "others may write" else 0o755)
    os.chown(where, nobody.pw_uid, nobody.pw_gid)
    sock = where / "redis.sock"
    nobodys_redis(sock)
    m = greylist(tclrun, f"unix://{sock}?db=0")
    if directory == "others may write":
        assert unavailable(rcpt_reply(m, 1))
        m.wait_for(re.escape(f"unavailable (StoreError: refusing to connect to it as root in {where}, which "
                             f"others may write (chmod go-w {where}, or run with --user))"))
    else:
        assert greylisted(rcpt_reply(m, 1)) == 300  # the store answered: a first sighting
    assert m.stop() == 0


@pytest.fixture
def roots_dir() -> Iterator[Path]:
    """A directory of root's, 0755, in /tmp (pytest's tmp_path has 0700 parents: nobody reaches
    no socket there); removed after."""
    base = Path(tempfile.mkdtemp(prefix="greylist-root-"))
    try:
        base.chmod(0o755)
        yield base
    finally:
        shutil.rmtree(base)


@pytest.fixture
def nobodys_redis() -> Iterator[Callable[[Path], None]]:
    """Starts a redis-server run by nobody on a unix socket only (any user may connect); killed after."""
    servers: list[subprocess.Popen[bytes]] = []

    def start(sock: Path) -> None:
        servers.append(subprocess.Popen([shutil.which("redis-server") or "/usr/bin/redis-server", "--port", "0",
                                         "--unixsocket", str(sock), "--unixsocketperm", "777", "--save", "",
                                         "--appendonly", "no", "--dir", str(sock.parent)], user="nobody",
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert servers[-1].poll() is None and time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)

    yield start
    for server in servers:
        server.kill()
        server.wait(10)


def _way_back_through_their_link(base: Path) -> tuple[Path, Path]:
    """In a sticky directory of root's (/tmp's kind), root's directory ``roots`` and another user's
    link ``link`` to a directory of theirs below one of theirs holding a ``roots`` of its own:
    ``link/../roots`` names root's by its text, theirs to the kernel (and SQLite, redis-py).
    ``link`` and their ``roots``."""
    nobody = pwd.getpwnam("nobody")
    sticky, theirs = base / "sticky", base / "theirs"
    sticky.mkdir()
    sticky.chmod(0o1777)
    (sticky / "roots").mkdir(mode=0o755)
    (theirs / "sub").mkdir(parents=True)
    (theirs / "roots").mkdir()
    for made in (theirs, theirs / "sub", theirs / "roots"):
        os.chown(made, nobody.pw_uid, nobody.pw_gid)
    link = sticky / "link"
    link.symlink_to(theirs / "sub")
    os.lchown(link, nobody.pw_uid, nobody.pw_gid)
    return link, theirs / "roots"


@pytest.mark.skipif(os.geteuid() != 0, reason="the checks are root's")
@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_as_root_a_dot_dot_after_another_users_link_is_walked_as_the_kernel_walks_it(
        tclrun: Callable[..., TclRun], roots_dir: Path, nobodys_redis: Callable[[Path], None], store: str) -> None:
    """The checks walked the path made absolute by os.path.abspath, which drops ``link/..`` as
    text; SQLite and redis-py then open the path as written, and the kernel follows the link
    first, its ``..`` the parent of where the link points: another user's link in /tmp sent
    root's database (or its connection) into a directory of theirs, past checks of root's."""
    link, their_roots = _way_back_through_their_link(roots_dir)
    if store == "sqlite":
        m = greylist(tclrun, f"sqlite:{link}/../roots/greylist.sqlite")
    else:
        nobodys_redis(their_roots / "redis.sock")
        m = greylist(tclrun, f"unix://{link}/../roots/redis.sock?db=0")
    assert unavailable(rcpt_reply(m, 1))
    doing = "open it" if store == "sqlite" else "connect to it"
    m.wait_for(re.escape(f"unavailable (StoreError: refusing to {doing} as root in {link}/../roots: the "
                         f"symbolic link {link} is in a directory others may write; refusing to follow it)"))
    if store == "sqlite":
        assert list(their_roots.iterdir()) == []
    assert m.stop() == 0


@pytest.mark.parametrize(("spec", "host"), [("unix://run/redis/redis.sock?db=0", "run"),
                                            ("unix://redis.sock?db=0", "redis.sock")])
def test_a_unix_url_with_a_host_part_fails_the_load_saying_so(tclrun: Callable[..., TclRun], spec: str,
                                                             host: str) -> None:
    """redis-py reads a unix:// URL's path alone: unix://run/redis/redis.sock (two slashes, a path
    written relative) loaded and connected to /redis/redis.sock, unix://redis.sock to no path at
    all, the host part dropped in silence. Refused at load, and by the import, naming it."""
    said = (f'-store {spec}: a unix:// URL names the socket by its absolute path, after three slashes '
            f'(unix:///run/redis/redis-server.sock?db=0); "{host}" would be dropped')
    m = tclrun(GREYLIST, "--python", str(STORE_PY), wait=False, args=("-store", spec))
    assert m.wait_exit(timeout=20) == 1
    assert said in m.text, m.text
    assert "listening" not in m.text
    bad = run_import("/nonexistent/greylist.db", spec)
    assert bad.returncode == 64 and said in bad.stderr, bad.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="the checks are root's")
@pytest.mark.parametrize("at", ["the socket's name", "its directory's name"])
def test_as_root_a_redis_socket_is_not_reached_through_a_symbolic_link_at_its_name(
        tclrun: Callable[..., TclRun], roots_dir: Path, nobodys_redis: Callable[[Path], None], at: str) -> None:
    """The socket's directory was checked, but a link at the socket's name was left to redis-py to
    follow: one of root's to a socket in a directory others may write reached whatever socket was
    there, a fake Redis that greylists nothing. The SQLite store refuses a link at its name; so
    does the Redis one now, as the docs said it did ("held to the same rule"). A link at the
    directory's name was refused, but as "cannot reach its directory ...: Not a directory"."""
    theirs = roots_dir / "anyones"
    theirs.mkdir()
    theirs.chmod(0o777)
    nobodys_redis(theirs / "redis.sock")
    if at == "the socket's name":
        link = sock = roots_dir / "redis.sock"
        link.symlink_to(theirs / "redis.sock")
    else:
        link, sock = roots_dir / "redis", roots_dir / "redis" / "redis.sock"
        link.symlink_to(theirs)
    m = greylist(tclrun, f"unix://{sock}?db=0")
    assert unavailable(rcpt_reply(m, 1))
    m.wait_for(re.escape(f"unavailable (StoreError: refusing to connect to it as root through the symbolic link "
                         f"{link} (name the socket itself, or run with --user))"))
    assert m.stop() == 0


OPTIONS_ACCEPTED = ("must be db, username, password, client_name, socket_timeout, socket_connect_timeout, "
                    "health_check_interval, socket_keepalive, protocol, max_connections, retry_on_timeout, "
                    "socket_read_size")


@pytest.mark.parametrize(("spec", "said"), [
    ("redis://127.0.0.1:6379/0?foo=bar", f'unknown option "foo" in its query: {OPTIONS_ACCEPTED}'),
    ("redis://127.0.0.1:6379/0?timeout=5", f'unknown option "timeout" in its query (socket_timeout?): {OPTIONS_ACCEPTED}'),
    ("redis://127.0.0.1:6379/0?socket_timout=1",
     f'unknown option "socket_timout" in its query (socket_timeout?): {OPTIONS_ACCEPTED}'),
    ("unix:///run/redis/redis.sock?db=0&socket_timout=1", 'unknown option "socket_timout"'),
    ("redis://127.0.0.1:6379/0?ssl_ca_certs=/etc/ca.pem",
     'unknown option "ssl_ca_certs" in its query (TLS options are for rediss:// only)'),
    ("redis://127.0.0.1:6379/0?socket_timeout=abc", 'socket_timeout must be a number of seconds > 0, not "abc"'),
    ("redis://127.0.0.1:6379/0?socket_timeout=-1", 'socket_timeout must be a number of seconds > 0, not "-1"'),
    ("redis://127.0.0.1:6379/0?socket_connect_timeout=nan",
     'socket_connect_timeout must be a number of seconds > 0, not "nan"'),
    ("redis://127.0.0.1:6379/0?db=x", 'db must be a database number (0, 1, ...), not "x"'),
    ("redis://127.0.0.1:6379/0?db=-1", 'db must be a database number (0, 1, ...), not "-1"'),
    ("redis://127.0.0.1:6379/x", 'the database after the port must be a number (/0, /1, ...), not "/x"'),
    ("redis://127.0.0.1:6379/0?db=1&db=2", 'option "db" given twice'),
    ("redis://127.0.0.1:6379/0?protocol=4", 'protocol must be 2 or 3, not "4"'),
    ("redis://127.0.0.1:6379/0?health_check_interval=-1", 'health_check_interval must be a whole number >= 0, not "-1"'),
    ("rediss://127.0.0.1:6379/0?ssl_cert_reqs=bogus",
     'ssl_cert_reqs must be none, optional or required, not "bogus"'),
    ("rediss://127.0.0.1:6379/0?ssl_cert_reqs=NONE",  # (redis-py's words are lower case: an outage per check)
     'ssl_cert_reqs must be none, optional or required, not "NONE"'),
    ("rediss://127.0.0.1:6379/0?ssl_check_hostname=bogus", 'ssl_check_hostname must be true or false, not "bogus"'),
])
def test_a_bad_option_in_a_redis_url_fails_the_load_naming_it(tclrun: Callable[..., TclRun], spec: str,
                                                               said: str) -> None:
    """A misspelled option (?socket_timout=1) loaded, and every check was then an outage blaming
    the server, "an answer no Redis gives (TypeError: ... unexpected keyword argument
    'socket_timout'): is it a Redis server?", for as long as the filter ran; a bad value of an
    option redis-py checks only as it connects (?ssl_cert_reqs=bogus) or not at all
    (?ssl_check_hostname=bogus is true to it, /x after the port database 0) likewise or silently.
    Refused at load, and by the import, naming the option."""
    m = tclrun(GREYLIST, "--python", str(STORE_PY), wait=False, args=("-store", spec))
    assert m.wait_exit(timeout=20) == 1
    assert f"-store {spec}: {said}" in m.text, m.text
    assert "listening" not in m.text
    bad = run_import("/nonexistent/greylist.db", spec)
    assert bad.returncode == 64 and said in bad.stderr, bad.stderr


CONFIGURE_LINE = "greydb configure -store $store -delay $delay -maxage $max_age -unavailable $unavailable -retry $retry"


@pytest.mark.parametrize(("args", "said"), [
    (("-maxage", "abc"), '-maxage must be a number of seconds from 1 to 3153600000 (100 years), not "abc"'),
    (("-store", "unix://redis.sock?db=0"),
     '-store unix://redis.sock?db=0: a unix:// URL names the socket by its absolute path, after three slashes '
     '(unix:///run/redis/redis-server.sock?db=0); "redis.sock" would be dropped'),
    (("-store", "redis://127.0.0.1:6379/0?socket_timout=1"),
     '-store redis://127.0.0.1:6379/0?socket_timout=1: unknown option "socket_timout" in its query '
     f"(socket_timeout?): {OPTIONS_ACCEPTED}"),
])
def test_a_setting_greydb_refuses_is_one_tcl_error_under_check_and_run_not_a_traceback(
        tmp_path: Path, args: tuple[str, ...], said: str) -> None:
    """An admin's typo in a setting (-maxage abc) failed the load with the message, then the
    Python traceback of greylist_store.py through configured() and _seconds() down to the raise,
    under `check` and in `run`'s log: a crash of the example to read, not a setting to mend. It is
    Tcl's error now, as a Tcl script's typo shows: the message once, then Tcl's frames."""
    from support.tclrun import _pytclmilter_command, child_env

    message = f"greydb configure: {said}"
    line = GREYLIST.read_text().splitlines().index(CONFIGURE_LINE) + 1
    frames = ["    invoked from within", f'"{CONFIGURE_LINE}"', f'    (file "{GREYLIST}" line {line})']
    for command in ("check", "run"):
        extra = ["--connection", f"unix:{tmp_path}/g.sock"] if command == "run" else []
        done = subprocess.run([*_pytclmilter_command(), command, str(GREYLIST), "--python", str(STORE_PY), *extra,
                               "--", *args], env=child_env(), capture_output=True, text=True, timeout=30)
        out = done.stdout + done.stderr
        assert done.returncode == 1, out
        assert "Traceback" not in out and "greylist_store.py" not in out, out
        # the log's form, for both: the lines after the first indented, as far as they are not already
        assert "\n".join([message, *(f if f.startswith(" ") else "  " + f for f in frames)]) in out, out
        if command == "check":
            assert f"{GREYLIST}:{line}: error: {message}\n  {message}\n" in out, out  # (below its line)
        assert "listening" not in out


def test_a_wrong_greydb_call_is_tcls_usage_error_not_a_traceback(tmp_path: Path) -> None:
    """`greydb check` with two words, or `greydb nosuch`, was a PYTHON ValueError whose errorInfo
    opened with the traceback of greylist_store.py: a script's slip shown as the command's fault."""
    from support.tclrun import _pytclmilter_command, child_env

    script = tmp_path / "calls.tcl"
    script.write_text("package require TclMilter\n"
                      "foreach call {{greydb check 192.0.2.1 a@b} {greydb nosuch}} {\n"
                      "    catch $call m o\n"
                      "    puts \"CALL [list $m [dict get $o -errorcode] [string map {\\n |} [dict get $o -errorinfo]]]\"\n"
                      "}\nmilter main\n")
    done = subprocess.run([*_pytclmilter_command(), "check", str(script), "--python", str(STORE_PY)],
                          env=child_env(), capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    said = [line.removeprefix("CALL ") for line in done.stdout.splitlines() if line.startswith("CALL ")]
    assert said == [
        '{wrong # args: should be "greydb check ip sender rcpt"} {TCL WRONGARGS} {wrong # args: should be "greydb '
        'check ip sender rcpt"|    invoked from within|"greydb check 192.0.2.1 a@b"}',
        '{bad subcommand "nosuch": must be check, configure or expire} {TCL LOOKUP SUBCOMMAND nosuch} {bad '
        'subcommand "nosuch": must be check, configure or expire|    invoked from within|"greydb nosuch"}',
    ], done.stdout


@pytest.mark.parametrize(("spec", "said"), [
    ("redis://127.0.0.1:99999/0", '-store redis://127.0.0.1:99999/0: the port must be a number from 1 to 65535, '
                                  'not "99999"'),
    ("redis://127.0.0.1:abc/0", '-store redis://127.0.0.1:abc/0: the port must be a number from 1 to 65535, not "abc"'),
    ("redis://u:secret@127.0.0.1:0/0", '-store redis://127.0.0.1:0/0: the port must be a number from 1 to 65535, '
                                       'not "0"'),
    ("redis://u:secret@[::1/0", "-store redis://...: not a URL (Invalid IPv6 URL)"),
    # (scripts/fuzz --target url: the port read after the last "]", "6379", where Python's urllib
    # and redis-py read it after the first: a ValueError under a traceback at load)
    ("redis://[::1]:1]:6379/0", '-store redis://[::1]:1]:6379/0: the port must be a number from 1 to 65535, '
                                'not "1]:6379"'),
])
def test_a_redis_url_with_a_bad_port_or_no_url_fails_the_load_saying_so(tclrun: Callable[..., TclRun], spec: str,
                                                                       said: str) -> None:
    """A port out of range or no number, or a URL urlsplit cannot read, failed the load in
    Python's words ("Port out of range 0-65535", "Invalid IPv6 URL") under its traceback, from
    deep in pinned_url; port 0 loaded, and every check was an outage. Refused as a setting, naming
    it (its password left out), at load and by the import."""
    m = tclrun(GREYLIST, "--python", str(STORE_PY), wait=False, args=("-store", spec))
    assert m.wait_exit(timeout=20) == 1
    assert f"greydb configure: {said}\n" in m.text, m.text
    assert "Traceback" not in m.text and "secret" not in m.text and "listening" not in m.text, m.text
    bad = run_import("/nonexistent/greylist.db", spec)
    assert bad.returncode == 64 and bad.stderr == f"import: {said}\n", bad.stderr


@pytest.mark.parametrize(("spec", "secrets"), [
    ("redis://:Zm9vYmFy/c2VjcmV0+dA==@127.0.0.1:6379/0", ("Zm9vYmFy", "c2VjcmV0")),  # base64: "/" and "+"
    ("redis://:2024/spring@127.0.0.1:6379/0", (":2024", "spring")),  # its "port" a number: the path refused
    ("redis://u:pa55#w0rd@127.0.0.1:6379/0", ("pa55", "w0rd")),
    ("redis://u:86420?sekrit@127.0.0.1:6379/0", ("u:86420", "sekrit")),  # its tail an unknown option
    ("redis://:6380#sekrit@127.0.0.1:6379/0", (":6380#", "sekrit")),  # host "", port 6380: it loaded
])
def test_a_password_with_an_unencoded_slash_hash_or_question_mark_is_not_shown(
        tclrun: Callable[..., TclRun], spec: str, secrets: tuple[str, ...]) -> None:
    """A password's "/", "?" or "#" (base64 ones have "/") ends the URL's host part there: the
    password's head read as the port, its tail as the path, the query or a fragment. The refusal
    then quoted the URL as it read it, the password in it: "-store redis://:Zm9vYmFy/c2VjcmV0+dA==@
    127.0.0.1:6379/0: the port must be ..., not "Zm9vYmFy"". Refused without a word of it, at
    load and by the import, saying how to write one."""
    said = ('-store redis://...: not shown, as a password in it may have been read as its port, path '
            'or query: a password\'s "/", "?", "#" or "@" must be written %2F, %3F, %23, %40')
    m = tclrun(GREYLIST, "--python", str(STORE_PY), wait=False, args=("-store", spec))
    assert m.wait_exit(timeout=20) == 1
    assert f"greydb configure: {said}\n" in m.text, m.text
    bad = run_import("/nonexistent/greylist.db", spec)
    assert bad.returncode == 64 and bad.stderr == f"import: {said}\n", bad.stderr
    for secret in secrets:
        assert secret not in m.text and secret not in bad.stderr, (secret, m.text)


@pytest.mark.parametrize(("spec", "said"), [
    ("rediss://127.0.0.1:6379/0?ssl_password=Pw7Secr3tQz&bogus=1", '-store rediss://127.0.0.1:6379/0?bogus=1: unknown '
                                                                  'option "bogus" in its query'),
    ("rediss://127.0.0.1:6379/0?ssl_keyfile=/k.pem&ssl%5Fpassword=Pw7Secr3tQz&protocol=4",
     '-store rediss://127.0.0.1:6379/0?ssl_keyfile=/k.pem&protocol=4: protocol must be 2 or 3, not "4"'),
])
def test_the_tls_keys_passphrase_in_a_rediss_url_is_not_shown(tclrun: Callable[..., TclRun], spec: str,
                                                             said: str) -> None:
    """scripts/fuzz --target url: a rediss:// URL's ?ssl_password= (its key file's passphrase)
    was quoted whole by every refusal of the URL, and by the outage lines, while ?password= and
    ?username= were left out: "-store rediss://...?ssl_password=Pw7Secr3tQz&bogus=1: unknown
    option ...". Left out as they are, at load and by the import."""
    m = tclrun(GREYLIST, "--python", str(STORE_PY), wait=False, args=("-store", spec))
    assert m.wait_exit(timeout=20) == 1
    assert f"greydb configure: {said}" in m.text, m.text
    bad = run_import("/nonexistent/greylist.db", spec)
    assert bad.returncode == 64 and bad.stderr.startswith(f"import: {said}"), bad.stderr
    assert "Pw7Secr3tQz" not in m.text + bad.stderr, m.text + bad.stderr


def refused_at_load(tclrun: Callable[..., TclRun], spec: str, said: str) -> str:
    """The greylist with ``-store spec`` fails its load saying ``said``, and the import exits 64
    saying it: what both printed."""
    m = tclrun(GREYLIST, "--python", str(STORE_PY), wait=False, args=("-store", spec))
    assert m.wait_exit(timeout=20) == 1
    assert f"greydb configure: {said}\n" in m.text, m.text
    bad = run_import("/nonexistent/greylist.db", spec)
    assert bad.returncode == 64 and bad.stderr == f"import: {said}\n", bad.stderr
    return m.text + bad.stderr


@pytest.mark.parametrize("spec", ["REDIS:/:Pw7Secr3tQz@127.0.0.1:6379/0", "redis:/:Pw7Secr3tQz@127.0.0.1:6379/0",
                                  "redis//u:Pw7Secr3tQz@127.0.0.1:6379/0", "u:Pw7Secr3tQz@127.0.0.1",
                                  "redis:/127.0.0.1:6379/0?password=Pw7Secr3tQz"])
def test_a_spec_that_is_no_url_is_not_quoted_when_it_may_hold_a_password(tclrun: Callable[..., TclRun],
                                                                          spec: str) -> None:
    """scripts/fuzz --target url: a Redis URL mistyped (a slash short, its scheme in capitals or
    not) is no spec at all, and the refusal quoted it whole, password and all: "-store must be
    sqlite:PATH or redis://HOST:PORT/DB ..., not "redis:/:Pw7Secr3tQz@...". One with an "@" is
    now named by its head alone, at load and by the import. (Redis://, whole, is a store URL:
    test_a_store_url_with_an_upper_case_scheme_is_the_same_store.)"""
    said = ('-store must be sqlite:PATH or redis://HOST:PORT/DB (or unix://SOCKET?db=DB), not '
            f'"{"" if spec.startswith("u:") else spec[:5]}..." (the rest not shown: a password may be in it, before '
            'an "@" or in its query)')
    assert "Pw7Secr3tQz" not in refused_at_load(tclrun, spec, said)


@pytest.mark.parametrize("spec", ["redis://:Pw7[Secr3t]Qz@127.0.0.1:6379/0", "redis://u:[Secr3t]@127.0.0.1:6379/0"])
def test_a_password_with_brackets_is_not_quoted_by_the_refusal_of_the_url(tclrun: Callable[..., TclRun],
                                                                          spec: str) -> None:
    """scripts/fuzz --target url: a password with "[" and "]" is no URL to Python's urlsplit,
    whose error, quoted as the reason, quoted what stood between them: "-store redis://...: not a
    URL ('Secr3t' does not appear to be an IPv4 or IPv6 address)". With an "@" in the URL, the
    reason is now how to write them."""
    said = '-store redis://...: not a URL (a password\'s "[" or "]" must be written %5B, %5D)'
    assert "Secr3t" not in refused_at_load(tclrun, spec, said)


DIGITS = "1" * 5000  # (past Python's 4300 digits for int(): a ValueError)


@pytest.mark.parametrize(("spec", "said"), [  # (the log clips a line of 800 characters: the number's head)
    (f"redis://127.0.0.1:{DIGITS}/0", '-store redis://127.0.0.1:1111'),
    (f"redis://127.0.0.1:6379/0?max_connections={DIGITS}",
     '-store redis://127.0.0.1:6379/0?max_connections=1111'),
    (f"redis://127.0.0.1:6379/0?db={DIGITS}", '-store redis://127.0.0.1:6379/0?db=1111'),
    (f"redis://127.0.0.1:6379/{DIGITS}", "-store redis://127.0.0.1:6379/1111"),
])
def test_a_number_of_thousands_of_digits_in_a_redis_url_is_refused_as_a_setting(
        tclrun: Callable[..., TclRun], spec: str, said: str) -> None:
    """Seen while writing scripts/fuzz --target url: a port or a count of 5000 digits failed the load with Python's
    "ValueError: Exceeds the limit (4300 digits) for integer string conversion" under a
    traceback (int() of it), and ?db= or /DB of 5000 digits loaded, which redis-py then refused at
    every check (?db=: "Invalid value for 'db'") or read as database 0 (/DB). Refused as a
    setting, naming it, at load and by the import."""
    m = tclrun(GREYLIST, "--python", str(STORE_PY), wait=False, args=("-store", spec))
    assert m.wait_exit(timeout=20) == 1
    assert f"greydb configure: {said}" in m.text, m.text[-2000:]
    assert "Traceback" not in m.text and "listening" not in m.text, m.text[-2000:]
    bad = run_import("/nonexistent/greylist.db", spec)
    assert bad.returncode == 64 and bad.stderr.startswith(f"import: {said}"), bad.stderr[-2000:]
    assert bad.stderr.endswith(f'{DIGITS}"\n') and bad.stderr.count("\n") == 1, bad.stderr[-300:]


def test_the_options_a_redis_url_may_take_still_load_and_reach_redis(tclrun: Callable[..., TclRun],
                                                                     redis_server: RedisServer) -> None:
    """The checks refuse no option the docs list: a store with each of the plain ones greylists."""
    url = (f"redis://127.0.0.1:{redis_server.port}/3?socket_timeout=0.5&socket_connect_timeout=0.5"
           "&client_name=greylist")
    m = greylist(tclrun, url)
    assert greylisted(rcpt_reply(m, 1)) == 300
    assert (redis_server.command("DBSIZE", db=3), redis_server.command("DBSIZE")) == (b":1", b":0")
    assert m.stop() == 0


def test_the_options_of_redis_py_that_worked_before_the_checks_still_load(tclrun: Callable[..., TclRun],
                                                                          redis_server: RedisServer) -> None:
    """Options redis-py's URL parser reads that a URL may well carry (its docs suggest
    health_check_interval; protocol=3 is RESP3) greylisted before the query was checked, and
    then failed the load as "unknown option": an upgrade that stopped a working filter."""
    url = (f"redis://127.0.0.1:{redis_server.port}/0?health_check_interval=30&socket_keepalive=true"
           "&protocol=3&max_connections=4&retry_on_timeout=true&socket_read_size=65536")
    m = greylist(tclrun, url)
    assert greylisted(rcpt_reply(m, 1)) == 300
    assert redis_server.command("DBSIZE") == b":1"
    assert m.stop() == 0


def test_a_rediss_store_greylists_over_tls_and_a_certificate_no_trusted_ca_signed_is_an_outage(
        tclrun: Callable[..., TclRun], tls_redis_server: RedisServer, tmp_path: Path) -> None:
    """rediss:// had never met a TLS server. A redis-server on its TLS port only (--port 0), the
    CA given as ?ssl_ca_certs=: first sights greylisted, retries passed, the keys in Redis. Then
    restarted with a certificate another CA signed (a server the filter must not trust): an outage,
    logged once, saying why; restarted with its own again: the store is back."""
    server = tls_redis_server
    url, trusted = server.url, server.tls
    m = greylist(tclrun, url, args=("-delay", "1", "-retry", "0.3"))
    assert [greylisted(rcpt_reply(m, n)) for n in (1, 2)] == [1, 1]
    assert server.command("DBSIZE") == b":2"
    time.sleep(1.1)
    assert [rcpt_reply(m, n, whole=True) for n in (1, 2)] == [(("c", {}), "c")] * 2

    server.stop()
    server.tls = tls_files(tmp_path / "another-ca")
    server.start()
    outage = [rcpt_reply(m, n) for n in (1, 3)]
    time.sleep(0.4)  # past -retry: tried again, refused again
    outage.append(rcpt_reply(m, 4))
    assert all(unavailable(r) for r in outage), outage
    line = m.wait_for(r"WARNING: greylist store (\S+) unavailable \((.*)\): answering tempfail")
    assert line.group(1) == url, line.group(0)  # as written: ?ssl_ca_certs=/tmp/..., not %2Ftmp%2F...
    assert "ConnectionError" in line.group(2) and "certificate verify failed" in line.group(2), line.group(0)
    assert len(re.findall(r"greylist store \S+ unavailable", m.text)) == 1
    assert server.command("DBSIZE") == b":0"  # (a new server: no check reached it)

    server.stop()
    server.tls = trusted
    server.start()
    time.sleep(0.4)
    assert greylisted(rcpt_reply(m, 1)) == 1  # (a new server, without persistence: a first sight again)
    m.wait_for(r"WARNING: greylist store \S+ is back after [\d.]+ s; 3 recipients were answered tempfail")
    assert server.command("DBSIZE") == b":1"
    assert m.stop() == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="the checks are root's")
@pytest.mark.parametrize("option", ["ssl_ca_certs", "ssl_certfile"])
def test_as_root_a_tls_file_is_read_only_where_no_other_user_could_swap_it(
        tclrun: Callable[..., TclRun], tls_redis_server: RedisServer, roots_dir: Path, option: str) -> None:
    """Without --user, redis-py reads ?ssl_ca_certs= (and a client certificate and key) as root,
    by the path, following links: a CA file in a directory others may write could be swapped for
    another user's CA, whose fake Redis would then be trusted, greylisting nothing. Held to the
    rule of the SQLite file: refused, an outage that says so."""
    server = tls_redis_server
    assert server.tls is not None
    anyones = roots_dir / "anyones"
    anyones.mkdir()
    anyones.chmod(0o777)
    shutil.copy(server.tls.ca, anyones / "ca.pem")
    shutil.copy(server.tls.cert, anyones / "client.pem")  # (any certificate will do: it is refused unread)
    shutil.copy(server.tls.key, anyones / "client.key")
    url = (f"{server.url.split('?')[0]}?ssl_ca_certs={anyones / 'ca.pem'}" if option == "ssl_ca_certs" else
           f"{server.url}&ssl_certfile={anyones / 'client.pem'}&ssl_keyfile={anyones / 'client.key'}")
    m = greylist(tclrun, url)
    assert unavailable(rcpt_reply(m, 1))
    path = anyones / ("ca.pem" if option == "ssl_ca_certs" else "client.pem")
    m.wait_for(re.escape(f"unavailable (StoreError: {option} {path}: refusing to open it as root in {anyones}: "
                         f"{anyones} is writable by its group and others, who could change what runs as root "
                         f"(chmod go-w {anyones})): answering tempfail"))
    assert m.stop() == 0
