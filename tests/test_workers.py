"""`pytclmilter run --workers N`: several processes serve one socket; deaths are replaced; stop stops all."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import miltertest
import pexpect
import pytest

from support.postfix import free_port
from support.tclrun import Mta, _pytclmilter_command, child_env, children_of, ok, tclrun_factory

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


@contextlib.contextmanager
def session(path: str) -> Iterator[miltertest.MilterConnection]:
    """An MTA connection, negotiated, its sender given."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        conn = miltertest.MilterConnection(s)
        conn.optneg_mta()
        conn.send_ar("M", args=["<a@example.org>"])
        yield conn


def reply_pid(path: str) -> int:
    """One SMTP session's worth: a rejected recipient whose reply names the worker's pid."""
    with session(path) as conn:
        return rejected_by(conn, "<b@example.org>")


def rejected_by(conn: miltertest.MilterConnection, rcpt: str) -> int:
    """The pid of the worker that rejected the recipient (the script's reply names it)."""
    cmd, data = conn.send_ar("R", args=[rcpt])
    assert cmd == "y", (cmd, data)
    text = data["space"] + data["text"] if "text" in data else str(data)
    return int(re.search(r"pid (\d+)", text).group(1))


def stop_all(child: pexpect.spawn) -> None:
    """SIGTERM to the supervisor: every worker stops, exit status 0."""
    child.kill(signal.SIGTERM)
    child.expect("all workers stopped")
    child.expect(pexpect.EOF)
    child.wait()
    assert child.exitstatus == 0


def two_workers(tmp_path: Path) -> tuple[pexpect.spawn, str]:
    """`run SCRIPT --workers 2` on a unix socket, once both workers answered; and the socket.

    "2 workers serving" comes once both are forked, before they install their signal handlers (a
    stop signal sent meanwhile waits for them: test_a_stop_sent_to_a_worker_the_moment_it_is_forked_
    stops_it_cleanly), and a test of what another signal does (SIGUSR1: ignored only once serving)
    could pass or fail by that. A worker answers only once its loop turns, after serve() installed
    its handlers."""
    script = tmp_path / "w.tcl"
    script.write_text(SCRIPT)
    sock = str(tmp_path / "w.sock")
    child = pexpect.spawn(sys.executable, ["-m", "pytclmilter.cli", "run", str(script), "--workers", "2",
                                           "--connection", f"unix:{sock}"], encoding="utf-8", timeout=20, use_poll=True)
    child.expect("listening on unix:")
    child.expect("2 workers serving")
    try:
        assert len(answering(sock)) == 2, "the two workers did not both answer"
    except BaseException:
        child.kill(signal.SIGKILL)
        raise
    return child, sock


def answering(sock: str) -> set[int]:
    """The workers that answered, asked until two did. Which worker accepts is the kernel's choice:
    sequential connections on a busy machine can go to one worker many times running (a few dozen
    connections on an idle machine)."""
    seen: set[int] = set()
    deadline = time.monotonic() + 15
    while len(seen) < 2 and time.monotonic() < deadline:
        seen.add(reply_pid(sock))
    return seen


def test_workers_share_the_socket_replace_the_dead_and_stop_together(tmp_path: Path) -> None:
    child, sock = two_workers(tmp_path)
    try:
        workers = children_of(child.pid)
        assert len(workers) == 2
        seen = answering(sock)  # both serve, nobody else does
        assert seen <= workers and len(seen) == 2, (seen, workers)

        victim = sorted(workers)[0]
        os.kill(victim, signal.SIGKILL)
        child.expect(rf"worker \d \(pid {victim}\) died \(signal 9\); starting a new one")
        deadline = time.monotonic() + 10
        while len(children_of(child.pid) - {victim}) < 2:
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


def test_a_worker_stopped_by_a_signal_sent_to_it_finishes_its_open_session(tmp_path: Path) -> None:
    """docs/deployment.md: a `kill` of a worker's pid loses no mail: its open session is served to
    its end (the grace of a stop), then the worker is replaced."""
    child, sock = two_workers(tmp_path)
    try:
        with session(sock) as conn:
            victim = rejected_by(conn, "<b@example.org>")
            os.kill(victim, signal.SIGTERM)
            child.expect(r"stopping: no new connections; 1 open")
            assert rejected_by(conn, "<c@example.org>") == victim  # the open session is still served
        child.expect(rf"WARNING: worker \d \(pid {victim}\) was stopped by SIGTERM sent to it; starting a new one")
        stop_all(child)
    finally:
        if child.isalive():
            child.kill(signal.SIGKILL)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_stop_signal_sent_to_one_worker_replaces_it_and_the_milter_serves_on(tmp_path: Path, sig: int) -> None:
    """`kill` of a worker's pid (or a `pkill -f` that matches the workers too) stopped the whole
    milter with exit status 0, which systemd's Restart=on-failure does not restart: all mail was
    tempfailed. A SIGUSR1 sent to a worker vanished without a word."""
    child, sock = two_workers(tmp_path)
    try:
        workers = children_of(child.pid)
        victim = sorted(workers)[0]
        os.kill(victim, sig)
        child.expect(rf"WARNING: worker \d \(pid {victim}\) was stopped by {signal.Signals(sig).name} sent to it; "
                     rf"starting a new one \(to stop the milter, signal the supervisor, pid {child.pid}\)")
        deadline = time.monotonic() + 10
        while len(children_of(child.pid) - {victim}) < 2:
            assert time.monotonic() < deadline, "no replacement worker"
            time.sleep(0.05)
        assert {reply_pid(sock) for _ in range(10)} - {victim}
        other = sorted(workers - {victim})[0]
        os.kill(other, signal.SIGUSR1)
        child.expect(rf"WARNING: received SIGUSR1 in a worker: reloading is the supervisor's \(pid {child.pid}\); "
                     "ignored")
        assert other in children_of(child.pid)
        stop_all(child)
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
                                               "--connection", f"unix:{sock}"], encoding="utf-8", timeout=15,
                              use_poll=True)
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
    workers = children_of(m.child.pid)
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


def start_detached(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    """As a service manager starts it: a session of its own and no terminal, so that no SIGHUP from
    a terminal whose controlling process died reaches the workers (pexpect's pty would send one)."""
    with open(log, "wb") as out:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env=child_env(), start_new_session=True)


def wait_log(log: Path, pattern: str, count: int = 1, timeout: float = 15) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = log.read_text(errors="replace")
        if len(re.findall(pattern, text)) >= count:
            return text
        assert time.monotonic() < deadline, f"{pattern!r} x{count} not seen in:\n{text}"
        time.sleep(0.05)


def alive(pid: int) -> bool:
    """Running (a zombie waiting for whoever adopted it has exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("family", ["inet", "unix"])
def test_workers_whose_supervisor_was_killed_finish_their_sessions_and_exit(tmp_path: Path, family: str) -> None:
    """SIGKILL leaves the supervisor no chance to stop its workers: each notices by itself, stops
    accepting (so the same command can start again and bind at once; a unix socket's file is
    then stale and replaced), finishes its open sessions within the grace and exits. Before,
    they served on unsupervised and a restart failed with "Address already in use" (or found
    the unix socket "in use by another process")."""
    script = tmp_path / "w.tcl"
    script.write_text(EOM_SCRIPT)
    address: int | str = free_port() if family == "inet" else str(tmp_path / "w.sock")
    spec = f"inet:{address}@127.0.0.1" if family == "inet" else f"unix:{address}"
    argv = _pytclmilter_command() + ["run", str(script), "--workers", "2", "--grace", "20", "--connection", spec]
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    first = start_detached(argv, first_log)
    second = None
    workers: set[int] = set()
    try:
        wait_log(first_log, "2 workers serving")
        workers = children_of(first.pid)
        assert len(workers) == 2
        mta = Mta(address)
        mid_message(mta)
        first.kill()
        first.wait()
        wait_log(first_log, r"WARNING: worker \d: the supervisor \(pid \d+\) died: stopping", count=2, timeout=5)

        second = start_detached(argv, second_log)  # binds while an old worker still finishes a session
        text = wait_log(second_log, "2 workers serving")
        assert family == "inet" or f"removed stale socket {address}" in text, text
        assert finish(mta) in workers
        mta.close()
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in workers):
            assert time.monotonic() < deadline, f"workers still running:\n{first_log.read_text()}"
            time.sleep(0.05)
        with Mta(address) as fresh:
            mid_message(fresh)
            assert finish(fresh) in children_of(second.pid)
        second.send_signal(signal.SIGTERM)
        assert second.wait(20) == 0
        assert "Traceback" not in first_log.read_text() + second_log.read_text()
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
        for pid in workers:  # orphans must not keep the port
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_the_workers_line_escapes_the_scripts_socket_path(tmp_path: Path) -> None:
    """-connection is the script's text: the supervisor's "N workers serving" line escapes it,
    as the listening line does, so that a control character in it cannot start a line of its own."""
    script = tmp_path / "w.tcl"
    script.write_text(SCRIPT)
    sock = str(tmp_path / "w\u009b\u0085FAKE.sock")  # (C0 controls are refused in a path: connspec.py)
    child = pexpect.spawn(sys.executable, ["-m", "pytclmilter.cli", "run", str(script), "--workers", "2",
                                           "--connection", f"unix:{sock}"], encoding="utf-8", timeout=20, use_poll=True)
    try:
        child.expect(r"2 workers serving (\S+)\r?\n")
        assert child.match.group(1) == f"unix:{tmp_path}/w\\u009b\\u0085FAKE.sock"
    finally:
        child.kill(signal.SIGTERM)
        child.expect(pexpect.EOF)


DIES_AT_ONCE = r"""
package require TclMilter 1.0
after 10 { puts "WORKER [pid]"; flush stdout; exit 3 }
milter main
"""


def test_workers_that_keep_dying_are_respawned_slowly_and_logged_once(tclrun) -> None:
    """A worker that dies as soon as it starts (here Tcl's exit; in life a crash, the OOM killer
    under load): after a burst the respawns slow to one a second, and the log says so in one
    line, not an ERROR line a death for as long as it lasts (before: 3 600 lines an hour)."""
    m = tclrun(DIES_AT_ONCE, "--workers", "2")
    started = time.monotonic()
    deadline = started + 30
    while m.text.count("WORKER ") < 12:  # deaths past the burst, respawned one a second
        assert time.monotonic() < deadline and m.alive(), m.text
        time.sleep(0.1)
    # the 7th to the 12th after a second each (without that pause, a fork loop: all 12 in a moment)
    assert time.monotonic() - started >= 4.0, m.text
    died = re.findall(r"ERROR: worker \d \(pid \d+\) died \(exit status 3\)(.*)", m.text)
    assert len(died) <= 6, m.text  # the burst of 5 one by one, then one line for the rest
    assert "worker deaths within 10 s: starting one a second at most, the deaths logged once in " \
           "60 s" in died[-1], m.text
    # (a worker that happens to die as the stop comes does not end as a stop ends: the stop failed)
    assert m.stop() == 0 or re.search(r"not cleanly: worker \d \(pid \d+\) exit status 3\r?\n", m.text), m.text



# Loaded by the supervisor with the script: SIGUSR2 turns its fork()s off and on again, with the
# soft RLIMIT_NPROC (0: the kernel refuses every fork of a process not run by root).
NO_FORKS_ON_USR2 = """
import resource
import signal


def toggle(signum, frame):
    soft, hard = resource.getrlimit(resource.RLIMIT_NPROC)
    resource.setrlimit(resource.RLIMIT_NPROC, (hard if soft == 0 else 0, hard))


def setup(milter):
    signal.signal(signal.SIGUSR2, toggle)
"""


def test_a_worker_that_cannot_be_forked_is_tried_again_while_the_others_serve(tclrun) -> None:
    """fork() failing (no process or memory left) when a dead worker is replaced ended the
    supervisor, and with it the filter. Made real with RLIMIT_NPROC, which binds the supervisor
    once --user has made it nobody."""
    m = tclrun(SCRIPT, "--workers", "2", "--user", "nobody", python=[NO_FORKS_ON_USR2])
    m.wait_for(r"2 workers serving")
    supervisor = m.child.pid
    workers = sorted(children_of(supervisor))
    assert len(workers) == 2, workers
    os.kill(supervisor, signal.SIGUSR2)
    time.sleep(0.5)
    os.kill(workers[0], signal.SIGKILL)
    m.wait_for(r"ERROR: cannot start worker \d: fork: Resource temporarily unavailable; serving with 1 "
               r"workers, trying again every second")
    with Mta(m.port) as mta:  # the other worker serves meanwhile
        mta.negotiate()
        mta.mail("<a@example.org>")
        assert mta.rcpt("<b@example.org>")[0] == "y"
    time.sleep(2.5)
    assert m.alive() and len(children_of(supervisor)) == 1
    os.kill(supervisor, signal.SIGUSR2)
    m.wait_for(r"worker \d started, after its fork had failed")
    assert len(children_of(supervisor)) == 2
    assert m.text.count("cannot start worker") == 1, m.text  # tried every second, logged once
    assert m.stop() == 0



#: A worker dies as it starts while the file $env(DIE) exists.
DIES_WHILE_THE_FILE_IS_THERE = r"""
package require TclMilter 1.0
after 10 { if {[file exists $env(DIE)]} { puts "WORKER DIES"; flush stdout; exit 3 } }
proc rc {ctx l} { return SMFIS_REJECT }
milter register envrcpt rc
milter main
"""

#: Loaded by the supervisor: the deaths' window of 3 s, not a minute (a test waits for its end).
SHORT_DEATHS_WINDOW = """
from pytclmilter import workers


def setup(milter):
    workers._DEATHS_WINDOW = 3.0
"""


def test_every_death_of_a_worker_is_logged_or_counted_and_the_count_told(tclrun, tmp_path: Path) -> None:
    """Workers that die at every start, then no longer (the disk they need is back): the deaths
    past the burst were counted and told by the next line about a death, which never came: the
    log ended in "the deaths logged once a minute" and said nothing of the 20 deaths after it.
    Now the count is told once the window is over, each death is in a line or a count (once:
    the workers forked after a count do not tell it again), and the milter serves again."""
    die = tmp_path / "die"
    die.touch()
    m = tclrun(DIES_WHILE_THE_FILE_IS_THERE, "--workers", "2", env={"DIE": str(die)}, python=[SHORT_DEATHS_WINDOW])
    deadline = time.monotonic() + 30
    while m.text.count("WORKER DIES") < 16:  # past the burst, one a second, over windows
        assert time.monotonic() < deadline and m.alive(), m.text
        time.sleep(0.1)
    die.unlink()
    m.wait_for(r"ERROR: \d+ more worker deaths? since the last line about them", timeout=10)
    with Mta(m.port) as mta:
        mta.negotiate()
        mta.mail("<a@example.org>")
        assert mta.rcpt("<b@example.org>")[0] == "r"
    assert m.stop() == 0
    text = m.text
    lines = re.findall(r"ERROR: worker \d \(pid \d+\) died \(exit status 3\); ([^\n]*)", text)
    counts = [int(n) for n in re.findall(r"ERROR: (\d+) more worker deaths? since the last line about them, each "
                                         r"replaced \(not logged one by one: ", text)]
    counts += [int(n) for line in lines for n in re.findall(r"\((\d+) more since the last line\)$", line)]
    assert len(lines) + sum(counts) == text.count("WORKER DIES"), text
    assert len(lines) <= 5 + 16 // 3 + 2 and lines[5].startswith("6 worker deaths within 10 s: starting one a "
                                                                 "second at most"), text


# Loaded by the supervisor (and again at each reload): SIGUSR2 makes its fork()s fail, and work again.
FORKS_FAIL_ON_USR2 = """
import errno
import os
import signal


def setup(milter):
    if hasattr(os, "_real_fork"):  # a reload: already in place
        return
    os._real_fork, os._forks_fail = os.fork, False

    def fork():
        if os._forks_fail:
            raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))
        return os._real_fork()

    def toggle(signum, frame):
        os._forks_fail = not os._forks_fail

    os.fork = fork
    signal.signal(signal.SIGUSR2, toggle)
"""


def test_a_reload_starts_a_whole_set_and_forgets_the_worker_whose_fork_failed(tclrun) -> None:
    """A worker whose fork failed is tried again every second; a reload meanwhile forks a whole
    new set, so that worker is no longer owed: trying it again as well would serve with one
    worker more than --workers, for as long as the milter runs."""
    m = tclrun(SCRIPT, "--workers", "2", python=[FORKS_FAIL_ON_USR2])
    m.wait_for(r"2 workers serving")
    supervisor = m.child.pid
    workers = sorted(children_of(supervisor))
    os.kill(supervisor, signal.SIGUSR2)  # forks fail
    time.sleep(0.3)
    os.kill(workers[0], signal.SIGKILL)
    m.wait_for(r"ERROR: cannot start worker \d: fork: Resource temporarily unavailable; serving with 1 workers")
    os.kill(supervisor, signal.SIGUSR2)  # forks work again, and at once (before the retry) a reload
    os.kill(supervisor, signal.SIGUSR1)
    m.wait_for(r"reload: generation 1 is gone \(its last session is over\); generation 2 serves")
    time.sleep(1.5)  # (the supervisor's retries come every second)
    assert len(children_of(supervisor)) == 2, m.text
    assert "after its fork had failed" not in m.text, m.text
    assert m.stop() == 0


def test_sigusr1_sent_to_a_worker_again_and_again_is_one_line_and_a_count(tclrun, tmp_path: Path) -> None:
    """SIGUSR1 sent to a worker, not the supervisor (a script's `pkill -USR1 -f`, repeated): each
    was one warning, 50 signals up to 50 lines. Now one line, the others counted and told in one
    more (here at the stop, else once the minute is over)."""
    sock = str(tmp_path / "w.sock")
    m = tclrun(SCRIPT, "--workers", "2", connection=f"unix:{sock}")
    worker = reply_pid(sock)  # (serving: its handler is in place)
    for _ in range(50):
        os.kill(worker, signal.SIGUSR1)
        time.sleep(0.01)
    m.wait_for(r"received SIGUSR1 in a worker")
    time.sleep(0.5)
    assert m.stop() == 0
    lines = [line for line in m.text.splitlines() if "received SIGUSR1 in a worker" in line]
    assert len(lines) == 2, lines
    assert re.search(r"\(pid \d+\); ignored \(\d+ more within the minute\)$", lines[1]), lines


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigusr2_to_run_or_its_supervisor_is_ignored_with_one_line_and_a_count(tclrun, tmp_path: Path,
                                                                              workers: str) -> None:
    """SIGUSR2 is the supervisor's word to a worker a reload replaced. Sent to `run` serving alone
    or to the supervisor (`systemctl kill -s USR2`), its default action ended the process, status
    140, without a line (the workers then logged that the supervisor died). Now it is ignored, one
    warning and a count; a reload still replaces the workers with it, as before."""
    sock = str(tmp_path / "w.sock")
    m = tclrun(SCRIPT, "--workers", workers, connection=f"unix:{sock}")
    served = reply_pid(sock)  # (serving)
    for _ in range(5):
        os.kill(m.child.pid, signal.SIGUSR2)
        time.sleep(0.05)
    m.wait_for(r"WARNING: received SIGUSR2, which means nothing to this process \(pytclmilter sends it only to a "
               r"--workers worker a reload replaced\); ignored")
    time.sleep(0.3)
    assert m.alive() and reply_pid(sock) > 0, m.text
    if workers == "2":  # its workers still finish when a reload replaces them
        assert served in children_of(m.child.pid)
        os.kill(m.child.pid, signal.SIGUSR1)
        m.wait_for(r"reload: generation 1 is gone \(its last session is over\); generation 2 serves")
    assert m.stop() == 0
    lines = [line for line in m.text.splitlines() if "received SIGUSR2" in line]
    assert len(lines) == 2, m.text
    assert re.search(r"; ignored \(\d+ more within the minute\)$", lines[1]), lines
    assert "died" not in m.text, m.text


HELD = r"""
package require TclMilter 1.0
milter configure -calltimeout 60
proc from {ctx args} { exec sleep 8; return SMFIS_CONTINUE }
milter register envfrom from
milter main
"""


def test_a_worker_a_reload_replaced_and_a_callback_holds_is_not_said_to_stop(tclrun, tmp_path: Path) -> None:
    """A reload replaces the workers while a callback of one is held in C (`exec sleep`) past the
    1 s grace: that worker ends 1 + 4 s later (overdue.py), and its line said "stopping: ...
    after the stop signal" when nothing was stopping: the milter serves on with the new set."""
    sock = str(tmp_path / "w.sock")
    m = tclrun(HELD, "--workers", "2", "--grace", "1", connection=f"unix:{sock}")
    with Mta(sock) as mta:
        mta.negotiate()
        assert ok(mta.connect())
        mta.send_raw("M", b"<a@example.org>\0")
        time.sleep(0.5)
        os.kill(m.child.pid, signal.SIGUSR1)
        m.wait_for(r"ERROR: replaced by a reload: conn#1's envfrom callback from still held the milter \d+\.\d s after "
                   r"the reload, past the 1 s grace, in code the grace cannot stop .*: exiting without it, exit status 1",
                   timeout=20)
    assert "stopping:" not in m.text, m.text
    assert m.stop() == 0


HELD_AT_STOP = HELD.replace("exec sleep 8", "exec sleep 30") + 'puts "main returned"\n'


@pytest.mark.parametrize("ending", ["", "exit 0"])
def test_a_worker_stop_that_was_not_clean_fails_the_supervisor(tclrun, tmp_path: Path, ending: str) -> None:
    """SIGTERM while a worker's callback is held in C (`exec sleep 30`) past the 1 s grace: the
    worker ends with exit status 1 (overdue.py), but the supervisor exited 0, so systemd saw a
    clean stop. Now the supervisor names the worker and exits 1 once the script has gone on after
    its `milter main` (an `exit 0` there too: the stop failed)."""
    sock = str(tmp_path / "w.sock")
    m = tclrun(HELD_AT_STOP + ending, "--workers", "2", "--grace", "1", connection=f"unix:{sock}")
    with Mta(sock) as mta:
        mta.negotiate()
        assert ok(mta.connect())
        mta.send_raw("M", b"<a@example.org>\0")
        time.sleep(0.5)
        assert m.stop(timeout=20) == 1, m.text
    m.wait_for(r"ERROR: all workers stopped, 1 not cleanly: worker \d \(pid \d+\) exit status 1\r?\n", since=0)
    m.wait_for(r"main returned", since=0)


def test_a_clean_stop_of_the_workers_exits_0(tclrun, tmp_path: Path) -> None:
    """The stop's other half: sessions that finish within the grace leave exit status 0."""
    sock = str(tmp_path / "w.sock")
    m = tclrun(HELD_AT_STOP.replace("exec sleep 30", "after 500"), "--workers", "2", "--grace", "5",
               connection=f"unix:{sock}")
    with Mta(sock) as mta:
        mta.negotiate()
        assert ok(mta.connect())
        mta.send_raw("M", b"<a@example.org>\0")
        assert m.stop(timeout=20) == 0, m.text
    m.wait_for(r"INFO: all workers stopped\r?\n", since=0)


def test_the_supervisor_forks_from_one_thread_after_a_reload(tclrun, tmp_path: Path) -> None:
    """A reload loads the new script in the supervisor under the Python limit, whose watchdog
    thread then stayed for the supervisor's life, waking ten times a second, and every later
    worker was forked from a process with two threads. Now the supervisor ends it before it forks."""
    sock = str(tmp_path / "w.sock")
    m = tclrun(SCRIPT, "--workers", "2", connection=f"unix:{sock}")
    supervisor = m.child.pid
    assert os.listdir(f"/proc/{supervisor}/task") == [str(supervisor)]
    m.child.kill(signal.SIGUSR1)
    m.wait_for(r"reload: generation 1 is gone \(its last session is over\); generation 2 serves")
    assert os.listdir(f"/proc/{supervisor}/task") == [str(supervisor)]
    assert len(answering(sock)) == 2  # the new set serves
    assert m.stop() == 0


def test_a_second_stop_signal_after_an_unclean_stop_keeps_its_failure(tclrun, tmp_path: Path) -> None:
    """After a stop some worker did not end cleanly, the script goes on after its `milter main`
    (a cleanup that takes a while); a second SIGTERM meanwhile ended the process with exit
    status 0, where the script's own end exits 1: the failed stop was lost to systemd."""
    sock = str(tmp_path / "w.sock")
    m = tclrun(HELD_AT_STOP + "after 30000\n", "--workers", "2", "--grace", "1", connection=f"unix:{sock}")
    with Mta(sock) as mta:
        mta.negotiate()
        assert ok(mta.connect())
        mta.send_raw("M", b"<a@example.org>\0")
        time.sleep(0.5)
        m.child.kill(signal.SIGTERM)
        m.wait_for(r"ERROR: all workers stopped, 1 not cleanly", timeout=20)
        m.wait_for(r"main returned")
    assert m.stop() == 1, m.text
    m.wait_for(r"WARNING: stopped by SIGTERM while running .* after its milter main", since=0)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_stop_before_milter_main_makes_it_return_bound_to_nothing(tmp_path: Path, workers: str) -> None:
    """`milter stop` before `milter main`: main returns at once, without binding or the listening
    line, with --workers 2 as with one process. Before, the supervisor bound the socket, printed
    the line (systemd heard READY=1, the pid file was written, --user took effect), forked no
    worker and returned."""
    script = tmp_path / "s.tcl"
    script.write_text("package require TclMilter 1.0\nmilter stop\nmilter main\nputs returned\n")
    pidfile = tmp_path / "s.pid"
    done = subprocess.run([*_pytclmilter_command(), "run", str(script), "--workers", workers, "--pidfile",
                           str(pidfile), "--connection", f"unix:{tmp_path / 's.sock'}"],
                          capture_output=True, text=True, timeout=60, env=child_env())
    assert done.returncode == 0, done.stderr
    assert done.stdout == "returned\n", done.stdout
    assert "stopped; verdicts:" in done.stderr and not pidfile.exists()


def stopped_at_a_recipient(m, reply: str) -> None:
    """Once 2 workers serve, a message whose recipient gets ``reply`` from a callback that calls
    `milter stop`; the milter then ends, status 0."""
    m.wait_for("2 workers serving")
    with m.mta() as mta:
        mta.negotiate()
        assert ok(mta.connect())
        mta.mail("<a@example.org>")
        assert mta.rcpt("<b@example.org>")[0] == reply
    assert m.wait_exit(20) == 0, m.text


def test_a_workers_milter_stop_is_logged_as_its_own_not_as_a_sigterm(tclrun) -> None:
    """A worker's `milter stop` reaches the supervisor as a SIGTERM, which the supervisor logged as
    `received SIGTERM: stopping 2 workers`: an admin looked for who sent it (systemd? a kill?)."""
    script = SCRIPT.replace("incr ::count", "milter stop")
    m = tclrun(script, "--workers", "2")
    stopped_at_a_recipient(m, "y")
    m.wait_for(r"INFO: worker \d \(pid \d+\) called milter stop: stopping 2 workers\r?\n", since=0)
    assert "received SIGTERM: stopping 2 workers" not in m.text
    m.wait_for("main returned", since=0)


def _pidfds_of(pid: int) -> list[int]:
    """The processes that ``pid``'s pidfds name (their fdinfo's ``Pid:`` line)."""
    named = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            if os.readlink(fd) == "anon_inode:[pidfd]":
                info = (Path(f"/proc/{pid}/fdinfo") / fd.name).read_text()
                named += [int(m) for m in re.findall(r"^Pid:\s+(-?\d+)$", info, re.M)]
    return named


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="no pidfds here")
def test_a_workers_milter_stop_reaches_its_supervisor_through_a_pidfd(tclrun) -> None:
    """A worker's `milter stop` checked that its parent was still the supervisor, then sent
    SIGTERM to that pid: a supervisor dying in between left its pid to be reused, and the signal
    could reach another process. Each worker now holds a pidfd of the supervisor, taken at its
    fork, and signals through it; the stop still reaches the supervisor and stops all."""
    m = tclrun(SCRIPT.replace("incr ::count", "milter stop"), "--workers", "2")
    m.wait_for("2 workers serving", advance=False)
    workers = children_of(m.child.pid)
    deadline = time.monotonic() + 10  # (each opens it as it starts)
    while not (len(workers) == 2 and all(_pidfds_of(pid) == [m.child.pid] for pid in workers)):
        assert time.monotonic() < deadline, {pid: _pidfds_of(pid) for pid in workers}
        time.sleep(0.05)
    stopped_at_a_recipient(m, "y")
    m.wait_for(r"INFO: worker \d \(pid \d+\) called milter stop: stopping 2 workers\r?\n", since=0)
    m.wait_for("main returned", since=0)


# A worker's callback that writes bytes of its own to the stop pipe (the one write-only pipe of the
# worker whose other end it does not hold), then calls `milter stop`.
JUNK_ON_STOP_PIPE = r"""
package require TclMilter 1.0
proc rc {ctx l} {
    foreach f [glob /proc/self/fd/*] {
        if {[catch {file readlink $f} link] || ![string match pipe:* $link]} continue
        set fh [open /proc/self/fdinfo/[file tail $f]]; regexp {flags:\s+0*(\d+)} [read $fh] -> flags; close $fh
        lappend ends($link) [file tail $f] $flags
    }
    foreach {link fds} [array get ends] {
        lassign $fds fd flags
        if {[llength $fds] == 2 && $flags % 10 == 1} { set stop $fd }
    }
    set out [open /proc/self/fd/$stop WRONLY]
    fconfigure $out -translation binary
    puts -nonewline $out "\xff\xfe\x1b\[31mforged\nworker 9 (pid 1) \xff\n"
    close $out
    milter stop
    return SMFIS_REJECT
}
milter register envrcpt rc
milter main
puts "main returned"
"""


def test_bytes_a_script_writes_to_the_stop_pipe_do_not_break_the_stop(tclrun) -> None:
    """The supervisor decoded the stop pipe as UTF-8 in its SIGTERM handler: a script's non-UTF-8
    bytes there raised UnicodeDecodeError in it. What no worker's `milter stop` wrote is not
    taken as a worker's name (nor its control characters written to the log)."""
    m = tclrun(JUNK_ON_STOP_PIPE, "--workers", "2")
    stopped_at_a_recipient(m, "r")
    m.wait_for(r"INFO: worker \d \(pid \d+\) called milter stop \(and 33 bytes on the stop pipe that are no worker's "
               r"name, ignored\): stopping 2 workers\r?\n", since=0)
    assert "Traceback" not in m.text and "forged" not in m.text and "\x1b" not in m.text, m.text
    m.wait_for("main returned", since=0)


def test_a_flood_of_worker_names_on_the_stop_pipe_names_a_few_once(tclrun) -> None:
    """A script writing well-formed names on the stop pipe made one log line of every name it
    wrote (64 KiB: 3,600 names): each is named once, four at most, and the rest counted."""
    flood = 'puts -nonewline $out [string repeat "worker 7 (pid 7)\\n" 500]\n' + \
        '    for {set i 10} {$i < 60} {incr i} { puts -nonewline $out "worker $i (pid $i)\\n" }'
    script = JUNK_ON_STOP_PIPE.replace('puts -nonewline $out "\\xff\\xfe\\x1b\\[31mforged\\nworker 9 (pid 1) \\xff\\n"',
                                       flood)
    assert script != JUNK_ON_STOP_PIPE
    m = tclrun(script, "--workers", "2")
    stopped_at_a_recipient(m, "r")
    m.wait_for(r"INFO: worker 7 \(pid 7\), worker 10 \(pid 10\), worker 11 \(pid 11\), worker 12 \(pid 12\) "
               r"and 48 more called milter stop: stopping 2 workers\r?\n", since=0)
    m.wait_for("main returned", since=0)


@pytest.mark.parametrize("code", ["0", "3"])
def test_a_workers_exit_stops_all_with_0_and_is_replaced_otherwise(tclrun, code: str) -> None:
    """`exit 0` in a worker's callback stops the whole milter, as `milter stop`, and says so (the
    line said `stopped the milter`, as if the script had called `milter stop`); `exit 3` is a
    death, logged, and the worker replaced (docs/tcl-reference.md, `exit`)."""
    m = tclrun(SCRIPT.replace("incr ::count", f"exit {code}"), "--workers", "2")
    m.wait_for("2 workers serving")
    with m.mta() as mta:
        mta.negotiate()
        assert ok(mta.connect())
        mta.mail("<a@example.org>")
        mta.send_raw("R", b"<b@example.org>\0")
    if code == "0":
        assert m.wait_exit(20) == 0
        m.wait_for(r"INFO: worker \d \(pid \d+\) ended with exit status 0 \(the script's exit 0\): stopping all "
                   r"workers\r?\n", since=0)
        m.wait_for("main returned", since=0)
    else:
        m.wait_for(r"ERROR: worker \d \(pid \d+\) died \(exit status 3\); starting a new one\r?\n", since=0)
        assert m.stop() == 0


def _process_with_pid(pid: int) -> subprocess.Popen[bytes] | None:
    """A `sleep` given ``pid`` (free again), by the kernel's next pid (root only); None if another
    process took it first."""
    for _ in range(20):
        Path("/proc/sys/kernel/ns_last_pid").write_text(str(pid - 1))
        decoy = subprocess.Popen(["sleep", "60"])
        if decoy.pid == pid:
            return decoy
        decoy.kill()
        decoy.wait()
    return None


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a process a chosen pid (ns_last_pid) needs root")
def test_a_workers_milter_stop_after_its_supervisor_died_signals_no_other_process(tmp_path: Path) -> None:
    """A callback that calls `milter stop` while the supervisor was SIGKILLed (the lifeline is read
    on the loop the callback holds): the worker sent SIGTERM to the supervisor's pid, by then
    another process's. It stops itself alone instead, and says so."""
    script = tmp_path / "w.tcl"
    script.write_text(EOM_SCRIPT.replace("proc eom {ctx} {", "proc eom {ctx} {\n"
                                         "    puts stderr {in eom}; after 2000; milter stop\n"))
    argv = _pytclmilter_command() + ["run", str(script), "--workers", "2", "--grace", "1",
                                     "--connection", f"unix:{tmp_path}/w.sock"]
    log = tmp_path / "run.log"
    # In the test's process group: a supervisor that leads its own (systemd's setsid) keeps its
    # pid from reuse while its workers live in that group, so the fault needs a start without one.
    with open(log, "wb") as out:
        supervisor = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                      env=child_env())
    decoy, workers = None, set()
    try:
        wait_log(log, "2 workers serving")
        workers = children_of(supervisor.pid)
        mta = Mta(str(tmp_path / "w.sock"))
        mid_message(mta)
        answer = threading.Thread(target=lambda: mta.eom(), daemon=True)
        answer.start()
        wait_log(log, "in eom")
        supervisor.kill()
        supervisor.wait()
        decoy = _process_with_pid(supervisor.pid)
        assert decoy is not None, "the supervisor's pid was taken by another process first"
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in workers):
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        assert decoy.poll() is None, f"the worker's milter stop signalled the process that took the pid:\n{log.read_text()}"
        wait_log(log, rf"WARNING: worker \d called milter stop, but the supervisor \(pid {supervisor.pid}\) "
                      r"died: stopping this worker alone")
    finally:
        for proc in (supervisor, decoy):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def _zombie(pid: int) -> bool:
    """Whether ``pid`` has ended and waits for its parent to reap it."""
    return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split() or ["?"])[0] == "Z"


def test_a_worker_killed_while_a_reload_loads_is_a_death_not_the_stops_failure(tclrun, tmp_path: Path) -> None:
    """A worker SIGKILLed while the supervisor loaded a reload (it reaps nothing meanwhile), then
    a stop that abandons the load: the death was reaped only once the stop had begun and counted
    as the stop's failure (`1 not cleanly: ... signal 9`, exit 1), where the same death reaped a
    moment earlier is logged and replaced and the stop exits 0. A worker already dead as the stop
    begins died while serving: logged as a death, not replaced, and the stop's status is its own."""
    sock, script = str(tmp_path / "w.sock"), tmp_path / "w.tcl"
    script.write_text(SCRIPT)
    m = tclrun(script, "--workers", "2", connection=f"unix:{sock}")
    m.wait_for(r"2 workers serving")
    killed = min(children_of(m.child.pid))
    script.write_text("after 5000\n" + SCRIPT)  # a load the stop abandons
    m.child.kill(signal.SIGUSR1)
    m.wait_for(r"reload: loading generation 2")
    time.sleep(0.5)  # (in its `after`: a stop at the load's first instant is another matter)
    os.kill(killed, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while not _zombie(killed):
        assert time.monotonic() < deadline, m.text
        time.sleep(0.01)
    assert m.stop(timeout=20) == 0, m.text
    assert re.search(rf"ERROR: worker \d \(pid {killed}\) died \(signal 9\) before the stop; not replaced\r?\n",
                     m.text), m.text
    assert "not cleanly" not in m.text and "INFO: all workers stopped" in m.text, m.text


@contextlib.contextmanager
def _detached_run(tmp_path: Path, workers: str) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    """`run SCRIPT --workers N --grace 10` on a unix socket, started as a service manager does, once
    it listens; its socket, its log. It must have exited 0 when the block ends."""
    script, sock, log = tmp_path / "w.tcl", str(tmp_path / "w.sock"), tmp_path / "w.log"
    script.write_text(SCRIPT)
    proc = start_detached([*_pytclmilter_command(), "run", str(script), "--workers", workers, "--grace", "10",
                           "--connection", f"unix:{sock}"], log)
    try:
        wait_log(log, r"listening on unix:")
        yield proc, sock, log
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _lines_of(text: str, pid: int, pattern: str) -> int:
    """How many of process ``pid``'s log lines match ``pattern``."""
    return len(re.findall(rf"pytclmilter\[{pid}\] {pattern}\r?$", text, re.M))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_sent_to_the_whole_group_is_one_line_in_each_process(tmp_path: Path, sig: signal.Signals) -> None:
    """systemd's default KillMode=control-group signals every process of the unit, a Ctrl-C at a
    terminal its whole process group: each worker got the stop twice, from outside and from the
    supervisor, and logged `received SIGTERM: stopping` for each (and SIGINT then SIGTERM), one
    line per copy. The supervisor's own line says it passes the stop on; each worker stops once,
    whatever copies come later (one sent while its session holds the grace, here)."""
    with _detached_run(tmp_path, "2") as (proc, sock, log):
        wait_log(log, r"2 workers serving")
        with contextlib.ExitStack() as sessions:  # one open session in each worker: their stops wait for it
            held: set[int] = set()
            deadline = time.monotonic() + 15
            while len(held) < 2:
                assert time.monotonic() < deadline, held
                conn = sessions.enter_context(session(sock))
                held.add(rejected_by(conn, "<b@example.org>"))
            os.killpg(proc.pid, sig)
            # (a worker's line names the copy that came first: the supervisor's SIGTERM may be it)
            wait_log(log, r"\] INFO: received SIG[A-Z]+: stopping\r?\n", count=2)
            time.sleep(0.3)  # (the supervisor's copy has come too)
            for pid in held:  # a late copy, as one sent by pid (systemd's, a `kill` of every pid)
                os.kill(pid, sig)
            time.sleep(0.3)
    text = log.read_text(errors="replace")
    assert _lines_of(text, proc.pid, rf"INFO: received {sig.name}: stopping 2 workers") == 1, text
    assert len(re.findall(r"received \w+: stopping", text)) == 3, text
    for pid in held:
        assert _lines_of(text, pid, rf"INFO: received (?:{sig.name}|SIGTERM): stopping") == 1, text
        assert _lines_of(text, pid, r"INFO: TclMilter stopped; verdicts: reject=\d+, callback errors=0") == 1, text


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_second_stop_signal_during_the_grace_is_told_once_as_what_it_is(tmp_path: Path, workers: str) -> None:
    """An admin who sends SIGTERM again while the stop waits for open sessions (or a second
    Ctrl-C) learns that it was received and what it does: nothing more, the grace runs on. One
    line, however many come; the first stop's line stays the only `stopping` one."""
    with _detached_run(tmp_path, workers) as (proc, sock, log):
        with session(sock) as conn:
            rejected_by(conn, "<b@example.org>")  # served: it is open while the stop waits
            proc.send_signal(signal.SIGTERM)
            wait_log(log, r"stopping: no new connections; 1 open")
            for _ in range(3):
                proc.send_signal(signal.SIGTERM)
                time.sleep(0.2)
            wait_log(log, rf"pytclmilter\[{proc.pid}\] INFO: received SIGTERM while stopping")
    text = log.read_text(errors="replace")
    # (a worker whose session is over may have ended by then)
    ours = "the sessions still open keep the rest of the 10 s grace" if workers == "1" else \
        "the (?:worker|2 workers) still stopping keeps? the rest of the grace"
    assert _lines_of(text, proc.pid, rf"INFO: received SIGTERM while stopping: the stop goes on \({ours}\)") == 1, text
    assert len(re.findall(r"received SIGTERM while stopping", text)) == 1, text
    assert len(re.findall(r"received SIGTERM: stopping", text)) == int(workers) + (workers != "1"), text


def test_a_ctrl_c_is_answered_once_at_the_terminal(tmp_path: Path) -> None:
    """A Ctrl-C reaches the supervisor and every worker (the terminal's process group), and each
    printed `pytclmilter: interrupted, stopping` on the terminal: three for `--workers 2`."""
    child, sock = two_workers(tmp_path)  # (both serve: the signal finds their handlers)
    seen = io.StringIO()
    child.logfile_read = seen
    try:
        child.sendintr()
        child.expect("all workers stopped")
        child.expect(pexpect.EOF)
        child.wait()
        assert child.exitstatus == 0
        text = seen.getvalue()
        assert text.count("pytclmilter: interrupted, stopping") == 1, text
        assert "received SIGINT: stopping 2 workers" in text, text
        assert len(re.findall(r"\] INFO: TclMilter stopped", text)) == 2, text
    finally:
        if child.isalive():
            child.kill(signal.SIGKILL)


#: A script that leaves 900000 bytes in its buffer for a program that never reads (the pipe takes
#: 64 KiB of them): a blocking flush of the channel waits for ever. Its pipe is opened only while the
#: file FLAG exists (a reload's generation, here).
UNREAD_PIPE = r"""
package require TclMilter 1.0
if {[file exists [file join [file dirname [info script]] FLAG]]} {
    set f [open "|sleep 61" w]
    fconfigure $f -buffersize 1048576
    puts -nonewline $f [string repeat x 900000]
}
proc rc {ctx l} { return SMFIS_CONTINUE }
milter register envrcpt rc
milter main
"""


@contextlib.contextmanager
def _unread_pipe(tmp_path: Path, *options: str, flag: bool = True) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """`run UNREAD_PIPE OPTIONS` started detached; its log. Every process it left is killed after."""
    script, log = tmp_path / "u.tcl", tmp_path / "u.log"
    script.write_text(UNREAD_PIPE)
    if flag:
        (tmp_path / "FLAG").write_text("")
    proc = start_detached([*_pytclmilter_command(), "run", str(script), "--connection",
                           f"unix:{tmp_path / 'u.sock'}", *options], log)
    seen: set[int] = set()
    try:
        yield proc, log
    finally:
        seen |= children_of(proc.pid)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in seen:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def _sleeper(proc: subprocess.Popen[bytes]) -> int:
    """The `sleep 61` the script's pipe runs, once it exists (then its 900000 bytes are queued)."""
    deadline = time.monotonic() + 15
    while True:
        for pid in children_of(proc.pid):
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/cmdline").read_bytes() == b"sleep\x0061\x00":
                    return pid
        assert time.monotonic() < deadline and proc.poll() is None, "no sleep 61"
        time.sleep(0.02)


def _terminated(proc: subprocess.Popen[bytes], log: Path) -> tuple[int, float, str]:
    """SIGTERM to ``proc``: its exit status, the seconds it took to exit, its log."""
    proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    try:
        status = proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"SIGTERM did not end it:\n{log.read_text()}") from None
    return status, time.monotonic() - t0, log.read_text(errors="replace")


def test_a_pipe_nobody_reads_refuses_the_fork_with_one_error_not_a_hang(tmp_path: Path) -> None:
    """Before the workers are forked the script's channels are flushed, or a buffer both workers
    inherit is written twice. That flush waited for a reader that never reads: the supervisor hung
    in a write, before any line, and a SIGTERM did not end it. Now the flush waits a bounded time
    and `milter main` fails, naming the channel and what to do; the bytes are then dropped at
    exit with one warning."""
    with _unread_pipe(tmp_path, "--workers", "2") as (proc, log):
        sleeper = _sleeper(proc)
        try:
            status = proc.wait(timeout=12)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running 12 s on: {Path(f'/proc/{proc.pid}/wchan').read_text()}\n"
                                 f"{log.read_text()}") from None
        text = log.read_text(errors="replace")
        assert status == 1, text
        held = re.findall(r"milter main: --workers 2 forks the serving processes, but channel (file\d+) \(to pid "
                          rf"{sleeper}\) still holds (\d+) bytes its reader did not take \(none for 3 s, or not all "
                          r"in 30 s\): ", text)
        assert len(held) == 1 and 800000 < int(held[0][1]) <= 900000, text  # (the pipe takes 64 KiB)
        assert "Flush or close it before `milter main`" in text, text
        assert len(re.findall(rf"WARNING: channel {held[0][0]} \(to pid {sleeper}\): {held[0][1]} bytes not written "
                              r"within 3 s, dropped as the process ends", text)) == 1, text
        assert "workers serving" not in text, text


def test_a_stop_while_the_fork_waits_for_a_pipe_ends_it_at_once(tmp_path: Path) -> None:
    """A SIGTERM while the flush before the fork waits for the pipe's reader: the wait ends, nothing
    is forked, status 0 (before, the supervisor stayed in its write for good)."""
    with _unread_pipe(tmp_path, "--workers", "2") as (proc, log):
        _sleeper(proc)
        time.sleep(0.2)
        status, took, text = _terminated(proc, log)
        assert status == 0 and took < 1.5, (took, text)  # (no second wait at exit either)
        assert "INFO: received SIGTERM: stopping" in text and "still holds" not in text, text
        assert len(re.findall(r"WARNING: channel file\d+ \(to pid \d+\): \d+ bytes not written", text)) == 1, text
        assert "workers serving" not in text, text


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_pipe_nobody_reads_is_dropped_at_the_stop_with_one_warning(tmp_path: Path, workers: str) -> None:
    """One process serving, the pipe's 900000 bytes queued, then a SIGTERM: the stop ends at once
    (the flush at exit waits for no reader, and a bounded time for a pipe whose reader does), and
    what stays unwritten is told, channel and count, not lost without a word. With --workers, the
    same after a reload whose new generation left the bytes: the reload is refused, naming the
    channel, and the first generation serves on and stops."""
    with _unread_pipe(tmp_path, "--workers", workers, flag=workers == "1") as (proc, log):
        wait_log(log, r"listening on unix:")
        if workers == "2":
            wait_log(log, r"2 workers serving")
            (tmp_path / "FLAG").write_text("")
            proc.send_signal(signal.SIGUSR1)
            wait_log(log, r"reload: generation 2 not loaded, generation 1 serves on unchanged: --workers 2 forks "
                          r"the serving processes, but channel file\d+ \(to pid \d+\) still holds \d+ bytes")
        sleeper = _sleeper(proc)
        status, took, text = _terminated(proc, log)
        assert status == 0 and took < 6, (took, text)
        warned = rf"WARNING: channel file\d+ \(to pid {sleeper}\): \d+ bytes not written within 3 s, dropped"
        assert len(re.findall(warned, text)) == (workers == "1"), text  # (a refused generation's interpreter is gone)


def test_a_pipe_whose_reader_reads_is_written_once_before_the_fork(tmp_path: Path) -> None:
    """The bounded flush before the fork still writes all a reading pipe is given, once (not once
    more in each worker), and leaves the channel blocking as the script made it."""
    script, log, out = tmp_path / "r.tcl", tmp_path / "r.log", tmp_path / "out"
    script.write_text(r"""
package require TclMilter 1.0
set f [open [list | cat > [file join [file dirname [info script]] out]] w]
fconfigure $f -buffersize 1048576
puts -nonewline $f [string repeat x 900000]
proc rc {ctx l} { $ctx setreply 550 5.7.1 "blocking [fconfigure $::f -blocking]"; return SMFIS_REJECT }
milter register envrcpt rc
milter main
""")
    def blocking(sock: str) -> None:
        with session(sock) as conn:
            cmd, data = conn.send_ar("R", args=["<b@example.org>"])
            assert "blocking 1" in str(data), data

    _written_once_by_workers(script, log, out, 900000, blocking)


def _written_once_by_workers(script: Path, log: Path, out: Path, size: int,
                             serving: Callable[[str], None] = lambda sock: None) -> None:
    """`run SCRIPT --workers 2` serves (``serving(its socket)`` then) and stops, status 0; then the
    file ``out`` its pipe's program writes holds ``size`` bytes (once), and nothing was dropped."""
    sock = str(script.with_suffix(".sock"))
    proc = start_detached([*_pytclmilter_command(), "run", str(script), "--workers", "2", "--connection",
                           f"unix:{sock}"], log)
    try:
        wait_log(log, r"2 workers serving|still holds")
        assert "workers serving" in log.read_text(), log.read_text()
        serving(sock)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    deadline = time.monotonic() + 5
    while out.stat().st_size < size and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    assert out.stat().st_size == size, (out.stat().st_size, log.read_text())
    assert "not written" not in log.read_text()


def _new_child(parent: int, known: set[int], deadline: float) -> int:
    """The first child of ``parent`` not in ``known``, as soon as the kernel lists it (the
    supervisor's main thread's children: it forks every worker)."""
    path = Path(f"/proc/{parent}/task/{parent}/children")
    while True:
        fresh = [int(p) for p in path.read_text().split()]
        for pid in fresh:
            if pid not in known:
                return pid
        assert time.monotonic() < deadline, "no new worker"


def test_a_stop_sent_to_a_worker_the_moment_it_is_forked_stops_it_cleanly(tmp_path: Path) -> None:
    """A worker's stop signals were unblocked right after the fork, before serve() installed
    its handlers: a SIGTERM sent to it then met the default action, and the supervisor logged
    `died (signal 15)` (an error, a death) where an admin had stopped it. Blocked until the
    handlers take them, each is the worker's clean stop. Twenty workers, each signalled as soon
    as its pid shows in /proc (the two first, then each replacement)."""
    script = tmp_path / "w.tcl"
    script.write_text(SCRIPT)
    sock = str(tmp_path / "w.sock")
    out = io.StringIO()
    child = pexpect.spawn(sys.executable, ["-m", "pytclmilter.cli", "run", str(script), "--workers", "2",
                                           "--connection", f"unix:{sock}"], encoding="utf-8", timeout=20,
                          use_poll=True)
    child.logfile_read = out
    try:
        child.expect("listening on unix:")
        known: set[int] = set()
        deadline = time.monotonic() + 20
        for _ in range(20):
            victim = _new_child(child.pid, known, deadline)
            known.add(victim)
            os.kill(victim, signal.SIGTERM)
        ended = re.compile(r"worker \d \(pid (\d+)\) (was stopped by SIGTERM sent to it|died)")
        while {int(m[1]) for m in ended.finditer(out.getvalue())} < known:
            child.expect([ended, pexpect.TIMEOUT], timeout=max(deadline - time.monotonic(), 0.1))
            assert time.monotonic() < deadline, out.getvalue()
        stop_all(child)
    finally:
        if child.isalive():
            child.kill(signal.SIGKILL)
    text = out.getvalue()
    assert "died" not in text and "ERROR" not in text, text
    assert len(re.findall(r"was stopped by SIGTERM sent to it; starting a new one", text)) == 20, text


#: A reader that takes the script's 3 MB a third at a time, each after a pause of 1.2 s: slow
#: (3.6 s in all, past a wait of 3 s in all), never stalled for 3 s (1.8 s to spare for a loaded
#: machine's scheduling).
SLOW_READER = r"""
import sys, time
out = open(sys.argv[1], "wb")
for n in (1000000, 1000000, None):
    time.sleep(1.2)
    out.write(sys.stdin.buffer.read(n) if n else sys.stdin.buffer.read())
    out.flush()
"""


def test_a_pipe_whose_reader_is_slow_but_steady_is_written_before_the_fork(tmp_path: Path) -> None:
    """The flush before the fork waits while the reader takes what is queued: 3 s without
    progress end it, not 3 s in all. A script's non-blocking pipe holds 3 MB for a program that
    reads a third every 1.2 s: written whole, once, and the workers serve.
    FAILED before: refused at 3 s (`milter main: --workers 2 forks the serving processes, but
    channel file6 (to pid N) still holds 931520 bytes`), status 1."""
    script, log, out, reader = tmp_path / "s.tcl", tmp_path / "s.log", tmp_path / "out", tmp_path / "reader.py"
    reader.write_text(SLOW_READER)
    script.write_text(rf"""
package require TclMilter 1.0
set f [open [list | {sys.executable} {reader} {out}] w]
fconfigure $f -blocking 0
puts -nonewline $f [string repeat x 3000000]
proc rc {{ctx l}} {{ return SMFIS_CONTINUE }}
milter register envrcpt rc
milter main
""")
    _written_once_by_workers(script, log, out, 3000000)
