"""Running out of file descriptors: more MTA connections than the open-files limit allows.

The filter is a real ``pytclmilter run`` process whose RLIMIT_NOFILE (soft and hard, so that it
cannot lift it) is set low in the child before it starts; the flood is plain non-blocking
connects that never send anything. On both event loops the filter must say so once, back off
instead of spinning, keep serving the sessions it has, and accept again by itself when
connections close.
"""

from __future__ import annotations

import asyncio
import errno
import importlib.util
import logging
import os
import re
import resource
import socket
import time

import pytest

from pytclmilter.accept import MARGIN, Acceptor
from support.tclrun import TclRun, ok, tclrun_factory, warnings

tclrun = pytest.fixture(tclrun_factory, name="tclrun")

SCRIPT = r"""
package require TclMilter
proc eom {ctx} { $ctx addheader X-Filtered yes; return SMFIS_CONTINUE }
milter register eom eom
milter main
"""

LIMIT = 128
ROUND = 50  # clients connecting at once; rounds go on until the filter runs out of descriptors
MAX_CLIENTS = 2000
LOOPS = [pytest.param("uvloop", marks=pytest.mark.skipif(importlib.util.find_spec("uvloop") is None,
                                                          reason="uvloop is not installed")),
         "asyncio"]
CLK_TCK = os.sysconf("SC_CLK_TCK")


def low_limit() -> None:
    """In the child, before exec: soft and hard limit, so `run` cannot lift it to the hard one."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (LIMIT, LIMIT))


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def connect_round(port: int) -> list[socket.socket]:
    socks = []
    for _ in range(ROUND):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass  # still connecting: the listen queue is full, the kernel retries the SYN
        socks.append(s)
    return socks


def flood_until_out_of_descriptors(m: TclRun, clients: list[socket.socket]) -> re.Match[str]:
    """Rounds of connects until the filter warns that accept() failed; the clients go into
    ``clients``. One burst is not enough: connects that find the listen queue full wait for the
    kernel to resend their SYN (after 1, 3, 7 s), so on a slow machine a single burst of a few
    hundred got fewer than the limit accepted within seconds."""
    deadline = time.monotonic() + 20
    while True:
        clients.extend(connect_round(m.port))
        try:
            return m.wait_for(r"WARNING: cannot accept connections: Too many open files \(open-files limit "
                              rf"{LIMIT}, (\d+) connections open\)[^\n]*\n", timeout=0.5)
        except AssertionError:
            if time.monotonic() > deadline or len(clients) >= MAX_CLIENTS:
                raise


def descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def queued(port: int) -> int:
    """Connections waiting in the accept queue of the socket listening on ``port`` (a LISTEN
    line's rx_queue in /proc/net/tcp)."""
    for line in open("/proc/net/tcp", encoding="ascii").read().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and int(fields[1].partition(":")[2], 16) == port:
            return int(fields[4].partition(":")[2], 16)
    raise AssertionError(f"nothing listens on port {port}")


def exhaust_again(m: TclRun, clients: list[socket.socket], session) -> None:
    """Rounds of connects until the filter holds all its LIMIT descriptors while connections wait
    in its listen queue, then one exchange on the open ``session``: the filter's loop has turned
    with the listening socket readable and no descriptor free, so accept() failed (without a
    line: within the minute). Not a fixed number of connects and a sleep: connects that find the
    queue full wait for the kernel to resend their SYN (after 1, 3 s), and in 2 s 350 of them
    took as few as 117 of the 128 descriptors, so accept() never failed."""
    deadline = time.monotonic() + 20
    while not (descriptors(m.child.pid) >= LIMIT and queued(m.port)):
        if time.monotonic() > deadline or len(clients) >= MAX_CLIENTS:
            raise AssertionError(f"{descriptors(m.child.pid)} descriptors, {queued(m.port)} queued")
        if not queued(m.port):  # (else the filter takes those, or they are what is wanted)
            clients.extend(connect_round(m.port))
        time.sleep(0.05)
    served(session)


def served(mta) -> None:
    """The rest of a message on an open session: every step answered, the header added at eom."""
    steps = mta.message()
    assert ok(steps["mail"]) and all(ok(r) for r in steps["rcpt"]), steps
    assert steps["eom"][-1][0] == "c" and ("h", b"X-Filtered\0yes\0") in steps["eom"], steps["eom"]


@pytest.mark.parametrize("loop", LOOPS)
def test_out_of_descriptors_is_one_warning_and_accepting_resumes_by_itself(tclrun, loop):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < MAX_CLIENTS + ROUND + 64:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    # --backlog 32: the limit holds a full queue plus the margin, so no warning at start.
    m = tclrun(SCRIPT, "--backlog", "32", env={"PYTCLMILTER_LOOP": loop}, preexec_fn=low_limit)
    with m.mta() as early:
        early.negotiate()
        assert ok(early.connect())
        clients: list[socket.socket] = []
        try:
            warning = flood_until_out_of_descriptors(m, clients)
            assert LIMIT // 2 < int(warning.group(1)) < LIMIT, warning.group(0)
            cpu_before, t0 = cpu_seconds(m.child.pid), time.monotonic()
            served(early)  # established before the flood, served during it
            time.sleep(4)  # clients still waiting: accept keeps failing, at most every RETRY
            spent = cpu_seconds(m.child.pid) - cpu_before
            elapsed = time.monotonic() - t0
            assert spent < 0.25 * elapsed, f"{spent:.2f} s of CPU in {elapsed:.1f} s: accepting spins"
            text = m.text
            assert len(warnings(text)) == 1, text[-3000:]
            assert "Traceback" not in text and " ERROR: " not in text, text[-3000:]
        finally:
            for s in clients:
                s.close()
    m.wait_for(r"INFO: accepting connections again \(\d+ failed accepts since the last warning\)", timeout=10)
    with m.mta() as late:
        late.negotiate()
        assert ok(late.connect())
        served(late)
    assert m.stop() == 0
    assert len(warnings(m.text)) == 1


def test_an_open_files_limit_below_the_listen_queue_is_a_warning_at_start(tclrun):
    m = tclrun(SCRIPT, preexec_fn=low_limit)  # the default backlog: up to 4096 queued connections
    m.wait_for(rf"WARNING: the open-files limit is {LIMIT} descriptors, fewer than the \d+ that a full listen "
               r"queue \(\d+ connections\) and the process's own files need", since=0)
    assert m.stop() == 0


def _somaxconn() -> int:
    with open("/proc/sys/net/core/somaxconn", encoding="ascii") as f:
        return int(f.read())


@pytest.mark.parametrize("backlog, queue", [
    (100, lambda: 100),  # below the limit, but not with the margin for the process's own files
    (100000, _somaxconn),  # the kernel caps the queue: the warning says the real one
])
def test_the_start_warning_counts_the_margin_and_the_real_queue(tclrun, backlog, queue):
    m = tclrun(SCRIPT, "--backlog", str(backlog), preexec_fn=low_limit)
    n = queue()
    m.wait_for(rf"WARNING: the open-files limit is {LIMIT} descriptors, fewer than the {n + MARGIN} that a full listen "
               rf"queue \({n} connections\) and the process's own files need", since=0)
    assert m.stop() == 0


def test_a_connection_that_failed_before_it_was_taken_is_skipped_without_a_warning(caplog):
    """accept(2) on Linux reports a queued connection's own network error (ECONNABORTED for one
    the client reset): that is no shortage of descriptors, so no "cannot accept connections"
    warning and no pause; the next connection is taken at once."""
    class ResetFirst(socket.socket):
        resets = 1

        def _accept(self):  # what socket.accept() calls; the Acceptor calls it directly
            if self.resets:
                self.resets -= 1
                raise OSError(errno.ECONNABORTED, os.strerror(errno.ECONNABORTED))
            return super()._accept()

    caplog.set_level(logging.INFO, logger="pytclmilter")
    loop = asyncio.new_event_loop()
    listener = ResetFirst(socket.AF_INET, socket.SOCK_STREAM)
    accepted: list[asyncio.BaseTransport] = []

    class Served(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            accepted.append(transport)
            transport.close()

    async def serve() -> None:
        while not accepted:
            await asyncio.sleep(0.01)

    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)
        acceptor = Acceptor(loop, listener, Served)
        acceptor.start()
        with socket.create_connection(listener.getsockname(), timeout=5):
            loop.run_until_complete(asyncio.wait_for(serve(), 5))
        acceptor.close()
    finally:
        loop.close()
        listener.close()
    assert len(accepted) == 1
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_second_shortage_within_the_minute_is_counted_and_its_count_told(tclrun):
    """The warning comes at most once a minute: a shortage that came back within it was counted
    and told only by the next warning, which never came if the shortage did not last: the log
    said accepting worked again and nothing of the second time. Now its count is told once the
    minute is over, or at stop at the latest."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < MAX_CLIENTS + ROUND + 64:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    m = tclrun(SCRIPT, "--backlog", "32", preexec_fn=low_limit)
    clients: list[socket.socket] = []
    try:
        flood_until_out_of_descriptors(m, clients)
    finally:
        for s in clients:
            s.close()
    m.wait_for(r"INFO: accepting connections again \(\d+ failed accepts since the last warning\)", timeout=10)
    clients = []
    with m.mta() as early:
        early.negotiate()
        assert ok(early.connect())
        try:
            exhaust_again(m, clients, early)
        finally:
            for s in clients:
                s.close()
    with m.mta() as late:  # served once they are gone
        late.negotiate()
        assert ok(late.connect())
        served(late)
    assert m.stop() == 0
    text = m.text
    assert len(re.findall(r"WARNING: cannot accept connections", text)) == 1, text[-3000:]
    told = re.findall(r"WARNING: (\d+) more failed accepts \(out of descriptors or memory\) since the last line "
                      r"about them \(warned at most once a minute\)", text)
    assert len(told) == 1 and int(told[0]) > 0, text[-3000:]
