"""`pytclmilter run --workers N`: several processes serve one socket; deaths are replaced; stop stops all."""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
import time
from pathlib import Path

import miltertest
import pexpect
import pytest

from support.tclrun import Mta, ok, tclrun_factory

tclrun = pytest.fixture(tclrun_factory, name="tclrun")

SCRIPT = r"""
package require TclMilter 1.0
set ::count 0
proc rc {ctx l} {
    incr ::count
    $ctx setreply 550 5.7.1 "pid [pid] count $::count"
    return SMFIS_REJECT
}
milter register envrcpt rc
milter main
puts "main returned"
"""


def reply_pid(path: str) -> int:
    """One SMTP session's worth: a rejected recipient whose reply names the worker's pid."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        conn = miltertest.MilterConnection(s)
        conn.optneg_mta()
        conn.send_ar("M", args=["<a@example.org>"])
        cmd, data = conn.send_ar("R", args=["<b@example.org>"])
        assert cmd == "y", (cmd, data)
        text = data["space"] + data["text"] if "text" in data else str(data)
        return int(re.search(r"pid (\d+)", text).group(1))  # type: ignore[union-attr]


def workers_of(parent: int) -> set[int]:
    out = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == parent and fields[0] != "Z":
                out.add(int(entry.name))
    return out


def test_workers_share_the_socket_replace_the_dead_and_stop_together(tmp_path: Path) -> None:
    script = tmp_path / "w.tcl"
    script.write_text(SCRIPT)
    sock = str(tmp_path / "w.sock")
    child = pexpect.spawn(sys.executable, ["-m", "pytclmilter.cli", "run", str(script), "--workers", "2",
                                           "--connection", f"unix:{sock}"], encoding="utf-8", timeout=20)
    try:
        child.expect("listening on unix:")
        child.expect("2 workers serving")
        workers = workers_of(child.pid)
        assert len(workers) == 2
        # Both serve, nobody else does. Which worker accepts is the kernel's choice: sequential
        # connections on a busy machine can go to one worker many times running, so ask until
        # both have answered (a few dozen connections on an idle machine).
        seen: set[int] = set()
        deadline = time.monotonic() + 15
        while len(seen) < 2 and time.monotonic() < deadline:
            seen.add(reply_pid(sock))
        assert seen <= workers and len(seen) == 2, (seen, workers)

        victim = sorted(workers)[0]
        os.kill(victim, signal.SIGKILL)
        child.expect(rf"worker \d \(pid {victim}\) died \(signal 9\); starting a new one")
        deadline = time.monotonic() + 10
        while len(workers_of(child.pid) - {victim}) < 2:
            assert time.monotonic() < deadline, "no replacement worker"
            time.sleep(0.05)
        assert {reply_pid(sock) for _ in range(20)} - {victim}

        child.kill(signal.SIGTERM)
        child.expect("all workers stopped")
        child.expect("main returned")
        child.expect(pexpect.EOF)
        child.wait()
        assert child.exitstatus == 0
        assert not os.path.exists(sock)
    finally:
        if child.isalive():
            child.kill(signal.SIGKILL)


EOM_SCRIPT = r"""
package require TclMilter 1.0
proc eom {ctx} { $ctx addheader X-Worker [pid]; return SMFIS_CONTINUE }
milter register eom eom
milter main
"""


def mid_message(mta: Mta) -> None:
    """A session stopped before its end of message, as when the MTA is still receiving DATA."""
    mta.negotiate()
    assert ok(mta.connect()) and ok(mta.mail("<a@example.org>")) and ok(mta.rcpt("<b@example.org>"))
    assert ok(mta.data()) and ok(mta.header("Subject", "x")) and ok(mta.eoh())
    assert all(ok(r) for r in mta.body(b"Hello\r\n"))


def finish(mta: Mta) -> int:
    """The end of message: the final reply is continue; the pid of the worker that added its header."""
    replies = mta.eom()
    assert replies[-1] == ("c", b""), replies
    headers = [payload for code, payload in replies if code == "h"]
    assert headers and headers[0].startswith(b"X-Worker\0"), replies
    return int(headers[0].split(b"\0")[1])


def connect_refused(port: int) -> bool:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.connect(("127.0.0.1", port))
    except ConnectionRefusedError:
        return True
    finally:
        s.close()
    return False


def test_a_stop_with_workers_refuses_new_connections_at_once_while_open_sessions_finish(tclrun) -> None:
    """Every process closes its copy of the listening socket when the stop starts: before, the
    supervisor kept its own open, so the kernel went on queueing connections nobody would accept
    for the whole grace period, and reset them at the end."""
    grace = 20
    m = tclrun(EOM_SCRIPT, "--workers", "2", "--grace", str(grace))
    m.wait_for("2 workers serving")
    workers = workers_of(m.child.pid)
    with m.mta() as mta:
        mid_message(mta)
        t0 = time.monotonic()
        m.child.kill(signal.SIGTERM)
        while not connect_refused(m.port):  # one that got in before the workers closed is served
            assert time.monotonic() - t0 < 3, "new connections still accepted after SIGTERM"
            time.sleep(0.05)
        refused_after = time.monotonic() - t0
        assert finish(mta) in workers  # the open session finishes within the grace
    assert m.wait_exit(grace) == 0
    m.wait_for("all workers stopped", since=0)
    print(f"refused {refused_after:.2f} s after SIGTERM (grace {grace} s)")
