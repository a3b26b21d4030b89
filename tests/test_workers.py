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


def test_a_stop_right_after_the_listening_line_stops_every_worker(tmp_path: Path) -> None:
    """systemd may stop a unit the moment it started: SIGTERM at the listening line, while the
    workers are still being forked, stops them all, the parent included, and removes the socket
    (five tries, three workers each)."""
    script = tmp_path / "w.tcl"
    script.write_text(SCRIPT)
    for attempt in range(5):
        sock = str(tmp_path / f"w{attempt}.sock")
        child = pexpect.spawn(sys.executable, ["-m", "pytclmilter.cli", "run", str(script), "--workers", "3",
                                               "--connection", f"unix:{sock}"], encoding="utf-8", timeout=15)
        try:
            child.expect("listening on unix:")
            child.kill(signal.SIGTERM)
            child.expect("all workers stopped")
            child.expect("main returned")
            child.expect(pexpect.EOF)
            child.wait()
            assert child.exitstatus == 0, attempt
            assert not os.path.exists(sock)
        finally:
            if child.isalive():
                child.kill(signal.SIGKILL)
