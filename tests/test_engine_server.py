"""The server as a mail admin sees it: bad input, timeouts, stop/grace, unix sockets, specs, signals.

Expected behaviour comes from docs/protocol.md (cited by section, "docs/protocol.md §x").
Every wait is bounded; the I/O-timeout tests use ``timeout=1``.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import shutil
import signal
import socket
import stat
import struct
import re
import sys
import tempfile
import textwrap
import threading
import time

import pexpect
import pytest

from pytclmilter import CONTINUE, REJECT, Context, Hooks
from pytclmilter.connspec import ConnSpec, ConnSpecError, parse
from support.engine import (
    P_NR_HDR,
    MilterThread,
    RawMTA,
    frame,
    make_milter,
    serving,
    socket_address,
    wait_for,
    z,
)
from support.postfix import free_port

LOG = "pytclmilter"


@pytest.fixture
def sockdir():
    """A short directory for unix sockets (sun_path is limited to 107 bytes)."""
    path = tempfile.mkdtemp(prefix="ptm", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def refused(srv: MilterThread) -> bool:
    """True when a new connection to the milter's address is refused."""
    family, addr = srv.address
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.connect(addr)
    except (ConnectionRefusedError, FileNotFoundError):
        return True
    except ConnectionResetError:  # queued just before the listener closed: ask again
        return False
    finally:
        s.close()
    return False


def recording_milter(**kwargs):
    """A milter recording connect hostnames -> ctx names, and every abort/close."""
    m = make_milter(**kwargs)
    m.names, m.events = {}, []
    m.register("connect", lambda ctx, host, info: m.names.setdefault(host, ctx.name) and CONTINUE)
    m.register("helo", lambda ctx, name: CONTINUE)
    m.register("envfrom", lambda ctx, args: CONTINUE)
    m.register("envrcpt", lambda ctx, args: CONTINUE)
    m.register("eom", lambda ctx: CONTINUE)
    m.register("abort", lambda ctx: m.events.append(("abort", ctx.name)))
    m.register("close", lambda ctx: m.events.append(("close", ctx.name)))
    return m


# ====================================================================== bad input (docs/protocol.md §1.3)

BAD_INPUT = {
    "garbled-connect": frame(b"C", b"host-without-nul"),
    "garbled-mail-no-nul": frame(b"M", b"<a@example.org>"),
    "helo-without-payload": frame(b"H"),
    "zero-length": b"\0\0\0\0H",  # length 0 (< 1: no room even for the command byte)
    "oversize-65536": struct.pack("!I", 65537) + b"B" + b"x" * 4096,
    "oversize-huge": struct.pack("!I", 0x7FFFFFFF) + b"L" + b"x" * 16,
    "unknown-command": frame(b"Z", b"payload"),
    "control-byte-command": frame(b"\x01"),
    "reply-code-as-command": frame(b"c"),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUT))
def test_bad_input_closes_only_that_connection_with_one_log_line(caplog, name):
    caplog.set_level(logging.INFO, logger=LOG)
    m = recording_milter()
    with serving(m) as srv, srv.raw() as good, srv.raw() as bad:
        assert good.connect("good.example") == (b"c", b"")
        assert bad.connect("bad.example") == (b"c", b"")
        bad_name = m.names["bad.example"]
        caplog.clear()
        bad.send_raw(BAD_INPUT[name])
        bad.expect_eof()
        # the other, concurrently open connection keeps working
        assert good.helo() == (b"c", b"")
        assert good.command(b"M", z("<a@example.org>")) == (b"c", b"")
        # and a new connection is served
        with srv.raw() as new:
            assert new.connect("new.example") == (b"c", b"")
        wait_for(lambda: ("close", bad_name) in m.events)
    problems = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(problems) == 1, [r.getMessage() for r in problems]
    assert bad_name in problems[0].getMessage()
    assert ("close", m.names["good.example"]) in m.events  # closed only at the end, by the stop
    assert [e for e in m.events if e[1] == bad_name] == [("close", bad_name)]


def test_bad_input_inside_a_message_runs_abort_then_close():
    m = recording_milter()
    with serving(m) as srv, srv.raw() as mta:
        assert mta.connect("x.example") == (b"c", b"")
        assert mta.mail() == (b"c", b"")
        mta.send_raw(frame(b"Z"))
        mta.expect_eof()
        name = m.names["x.example"]
        wait_for(lambda: ("close", name) in m.events)
    assert m.events == [("abort", name), ("close", name)]


def test_eof_inside_a_packet_is_logged_and_closes(caplog):
    caplog.set_level(logging.INFO, logger=LOG)
    m = recording_milter()
    with serving(m) as srv, srv.raw() as mta:
        assert mta.connect("x.example") == (b"c", b"")
        mta.send_raw(frame(b"H", z("client.example"))[:7])
        mta.sock.shutdown(socket.SHUT_WR)
        mta.expect_eof()
        name = m.names["x.example"]
        wait_for(lambda: ("close", name) in m.events)
    problems = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(problems) == 1 and name in problems[0]


@pytest.mark.parametrize("end", ["quit", "eof"])
def test_quit_or_eof_after_quit_nc_closes_the_connection_and_releases_its_context(end):
    """QUIT_NC runs the close callbacks and keeps the socket for another SMTP session
    (docs/protocol.md §7.5); a QUIT or an EOF then ends the connection. Before, neither did: after
    the QUIT the MTA waited on an open socket until the I/O timeout, and either way the context
    was never released (Hooks.context_closed never ran: a Tcl filter's context command stayed
    until the process ended)."""
    released: list[str] = []
    m = recording_milter(hooks=Hooks(context_closed=lambda ctx: released.append(ctx.name)))
    with serving(m) as srv, srv.raw() as mta:
        mta.envelope()
        assert mta.eom() == [(b"c", b"")]
        mta.send(b"K")
        if end == "quit":
            mta.quit()
        else:
            mta.sock.shutdown(socket.SHUT_WR)
        mta.expect_eof()
        name = m.names["client.example"]
        wait_for(lambda: released == [name])
    assert [e for e in m.events if e[1] == name] == [("close", name)]  # the close callbacks ran once


def test_a_full_65535_byte_chunk_is_accepted():
    """len = 65536 (command byte + 65535 payload) is legitimate MTA traffic (docs/protocol.md §1.2)."""
    m = make_milter()
    sizes = []
    m.register("body", lambda ctx, chunk: sizes.append(len(chunk)) or CONTINUE)
    with serving(m) as srv:
        conn = srv.mt()
        reply = conn.send_get("B", buf="x" * 65535)
        assert reply[0] == "c"
        conn.sock.close()
    assert sizes == [65535]


def test_an_unknown_command_between_rcpt_and_data_leaves_the_message_to_be_filtered(caplog):
    """Postfix and Sendmail send a client's unknown command (``U``) in the middle of a
    transaction; without a data callback the headers come next, with no ``T`` in between."""
    m = make_milter()
    seen = []
    m.register("envrcpt", lambda ctx, args: CONTINUE)
    m.register("unknown", lambda ctx, line: seen.append(line) or CONTINUE)
    m.register("eom", lambda ctx: seen.append("eom") or REJECT)
    with serving(m) as srv, srv.raw() as mta, caplog.at_level(logging.WARNING, "pytclmilter"):
        mta.envelope()
        assert mta.command(b"U", b"XFOO bar\0") == (b"c", b"")
        assert mta.eoh() == (b"c", b"")
        assert mta.body(b"hello\r\n") == (b"c", b"")
        assert mta.eom() == [(b"r", b"")]
        mta.quit()
    assert seen == ["XFOO bar", "eom"]
    assert not caplog.records


# ====================================================================== I/O timeout (docs/protocol.md §9.3)


def test_a_client_sending_half_a_frame_is_dropped_after_the_timeout(caplog):
    caplog.set_level(logging.INFO, logger=LOG)
    m = recording_milter(timeout=1)
    with serving(m) as srv, srv.raw() as mta:
        assert mta.connect("slow.example") == (b"c", b"")
        mta.send_raw(frame(b"H", z("client.example"))[:6])
        waited = mta.expect_eof(timeout=5)
        name = m.names["slow.example"]
        wait_for(lambda: ("close", name) in m.events)
    assert 0.7 <= waited <= 3.0, waited
    assert any(r.levelno == logging.WARNING and name in r.getMessage() for r in caplog.records)


def test_an_idle_client_is_dropped_after_the_timeout_and_an_active_one_is_not():
    m = recording_milter(timeout=1)
    with serving(m) as srv, srv.raw() as idle, srv.raw() as busy:
        assert idle.connect("idle.example") == (b"c", b"")
        assert busy.connect("busy.example") == (b"c", b"")
        start = time.monotonic()
        while idle.is_open(0.3):
            assert busy.helo() == (b"c", b""), "an active connection is not timed out"
            assert time.monotonic() - start < 4, "idle connection not dropped"
        assert time.monotonic() - start >= 0.7
        assert busy.helo() == (b"c", b"")


def test_an_mta_streaming_headers_without_replies_is_not_idle():
    """Headers under NR_HDR get no reply, so only their arrival shows that the MTA is there: the
    idle clock starts again at every packet read, not only at every reply written."""
    m = make_milter(timeout=1)
    m.register("header", lambda ctx, name, value: CONTINUE)
    m.register("eoh", lambda ctx: CONTINUE)
    with serving(m) as srv, srv.raw() as mta:
        assert mta.negotiated[2] & P_NR_HDR
        for i in range(8):  # 2 s of headers, longer than the 1 s timeout
            mta.send(b"L", z(f"X-Part-{i}", "yes"))
            time.sleep(0.25)
        assert mta.command(b"N") == (b"c", b""), "the connection was dropped as idle"


def test_a_connection_reset_by_the_mta_is_logged_as_an_error(caplog):
    """A peer gone with a TCP reset is not a routine end: its close line says the error."""
    caplog.set_level(logging.INFO, logger=LOG)
    m = make_milter()
    m.register("connect", lambda ctx, host, info: CONTINUE)
    with serving(m) as srv, srv.raw() as mta:
        assert mta.connect("reset.example") == (b"c", b"")
        mta.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        mta.sock.close()
        wait_for(lambda: any(" closed (" in r.getMessage() for r in caplog.records))
    (closed,) = [r.getMessage() for r in caplog.records if " closed (" in r.getMessage()]
    assert "closed (error: " in closed and "reset" in closed, closed


def test_progress_sends_p_and_resets_the_timer():
    m = make_milter(timeout=1)

    async def eom(ctx):
        for _ in range(4):  # 1.6 s in all, longer than the 1 s timeout
            await asyncio.sleep(0.4)
            ctx.progress()
        return CONTINUE

    m.register("envfrom", lambda ctx, args: CONTINUE)
    m.register("eom", eom)
    with serving(m) as srv, srv.raw() as mta:
        assert mta.mail() == (b"c", b"")
        mta.send(b"E")
        progress: list[int] = []
        assert mta.reply(timeout=5, progress=progress) == (b"c", b"")
        assert len(progress) == 4
        assert mta.mail() == (b"c", b""), "the connection is still open and served"


def test_a_slow_callback_does_not_make_the_timeout_cut_the_next_command():
    """The timeout bounds waiting for the MTA (docs/protocol.md §9.3: it limits waits for the MTA,
    not callbacks); the clock must start again when we have answered."""
    m = make_milter(timeout=1)

    def eom(ctx):
        time.sleep(1.3)  # a slow synchronous callback (e.g. a Tcl one doing a DNS lookup)
        return CONTINUE

    m.register("envfrom", lambda ctx, args: CONTINUE)
    m.register("eom", eom)
    with serving(m) as srv, srv.raw() as mta:
        assert mta.mail() == (b"c", b"")
        assert mta.eom(timeout=5) == [(b"c", b"")]
        time.sleep(0.1)  # a quick MTA: well within the 1 s idle limit
        assert mta.mail() == (b"c", b""), "connection dropped right after our reply"


def test_an_async_callback_running_past_the_timeout_keeps_its_connection():
    """docs/protocol.md §9.3: a connection idle past the I/O timeout is closed only "with no
    callback of its running". An async callback lets the loop, and the idle sweep, run while it
    waits (a slow DNS or Redis lookup): its connection must not be closed under it."""
    m = make_milter(timeout=1)

    async def eom(ctx):
        await asyncio.sleep(2.5)  # no progress(): twice the timeout, and more
        return CONTINUE

    m.register("envfrom", lambda ctx, args: CONTINUE)
    m.register("eom", eom)
    with serving(m) as srv, srv.raw() as mta:
        assert mta.mail() == (b"c", b"")
        assert mta.eom(timeout=5) == [(b"c", b"")]
        assert mta.mail() == (b"c", b"")


# ====================================================================== stop and grace


def test_stop_from_another_thread_returns_and_closes_the_listener():
    m = make_milter()
    srv = MilterThread(m).start()
    assert m.running and m.listening.port != 0
    with srv.raw() as mta:
        mta.quit()
        mta.expect_eof()
    started = time.monotonic()
    srv.stop(timeout=5)
    assert time.monotonic() - started < 2
    assert srv.error is None
    assert not m.running and m.listening is None
    assert refused(srv)


def test_a_tick_that_raises_is_logged_once_and_the_ticks_go_on(caplog):
    """Hooks.tick (the Tcl host's event loop turn) that raised ended the tick task for good:
    no timer or file event of the script ran again, and nothing said so."""
    calls = []

    def tick() -> None:
        calls.append(time.monotonic())
        raise RuntimeError("tick broke")

    m = make_milter(hooks=Hooks(tick=tick))
    m.tick_interval = 0.01
    with caplog.at_level(logging.ERROR, logger=LOG):
        srv = MilterThread(m).start()
        try:
            wait_for(lambda: len(calls) >= 20, timeout=5)
        finally:
            srv.stop(timeout=5)
    failed = [r for r in caplog.records if "event tick failed" in r.getMessage()]
    assert len(failed) == 1 and "tick broke" in caplog.text, caplog.text


def test_stop_before_run_makes_run_return_at_once():
    """...without binding the socket or calling the listening hook (it did both, then returned)."""
    heard = []
    m = make_milter(hooks=Hooks(listening=heard.append))
    m.stop()
    t = threading.Thread(target=m.run, daemon=True)
    t.start()
    t.join(5)
    assert not t.is_alive()
    assert heard == []


def test_a_stop_signal_handled_while_the_server_holds_its_lock_stops_it():
    """`run` turns a stop signal into Milter.stop() in a Python handler, which Python runs on the
    main thread between two steps of whatever it was doing: if that was serve() or stop_asked()
    holding the server's lock, a plain lock hung the process for good. Here the handler's case
    is made by hand (stop() while this thread holds the lock); then run() returns at once."""
    m = make_milter()
    done = threading.Event()

    def handler_while_locked() -> None:
        with m._server._lock:
            m.stop()
        done.set()

    t = threading.Thread(target=handler_while_locked, daemon=True)
    t.start()
    assert done.wait(5), "stop() hung on the lock its own thread held"
    runner = threading.Thread(target=m.run, daemon=True)
    runner.start()
    runner.join(5)
    assert not runner.is_alive(), "the stop was lost"


def test_stop_from_inside_a_callback():
    m = make_milter(grace=10)

    def envfrom(ctx, args):
        m.stop()
        return CONTINUE

    m.register("envfrom", envfrom)
    m.register("envrcpt", lambda ctx, args: REJECT)
    srv = MilterThread(m).start()
    with srv.raw() as mta:
        assert mta.mail() == (b"c", b"")
        wait_for(lambda: refused(srv))
        assert mta.rcpt() == (b"r", b""), "the open session is still served"
        mta.quit()
        mta.expect_eof()
    srv.join(timeout=3)  # returns when the last session ended, long before the 10 s grace


def test_run_can_be_called_again_after_it_returned():
    """With call_timeout back to its own (a stop holds callbacks to its grace, here none at all)."""
    m = make_milter(grace=0)

    async def envfrom(ctx, args):
        await asyncio.sleep(0.2)
        return REJECT

    m.register("envfrom", envfrom)
    for round_ in range(3):
        with serving(m) as srv, srv.raw() as mta:
            assert mta.mail() == (b"r", b""), f"round {round_}"


def test_serve_while_serving_is_refused_and_stop_still_stops():
    """A second serve() on the same milter took over its stop event (and bound a second socket):
    stop() then stopped the second only, and the first served on for ever."""
    m = make_milter()

    async def main() -> tuple[str, str, bool]:
        first = asyncio.ensure_future(m.serve())
        while not m.running:
            await asyncio.sleep(0.01)
        second = asyncio.ensure_future(m.serve())
        await asyncio.wait([second], timeout=2)
        refused = repr(second.exception()) if second.done() else "still serving"
        await asyncio.sleep(0)
        failed: list[str] = []
        other = threading.Thread(target=_record, args=(m.run, failed))  # run() from another thread
        other.start()
        other.join(5)
        m.stop()
        done, _ = await asyncio.wait([first], timeout=5)
        if not second.done():
            m.stop()
            await asyncio.wait([second], timeout=5)
        return refused, failed[0] if failed else "", bool(done)

    refused, from_run, stopped = asyncio.run(main())
    message = "milter 'pytclmilter' is already serving: serve() and run() may be called again once they have returned"
    assert refused == f"RuntimeError({message!r})"
    assert from_run == message
    assert stopped, "stop() did not stop the first serve()"
    assert not m.running
    with serving(m) as srv, srv.raw() as mta:  # and it serves again afterwards
        assert mta.mail() == (b"c", b"")


def test_a_serve_that_could_not_bind_leaves_the_milter_able_to_serve():
    """The refusal of a second serve() must not count one that failed to bind as serving."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        m = make_milter(connection=f"inet:{taken.getsockname()[1]}@127.0.0.1")
        with pytest.raises(ValueError, match="Address already in use"):
            m.run()
    m.connection = "inet:0@127.0.0.1"
    with serving(m) as srv, srv.raw() as mta:
        assert mta.mail() == (b"c", b"")


def _record(func, failed: list[str]) -> None:
    try:
        func()
    except RuntimeError as exc:
        failed.append(str(exc))


def test_grace_lets_an_open_session_finish():
    m = recording_milter(grace=5)
    srv = MilterThread(m).start()
    with srv.raw() as mta:
        assert mta.connect("g.example") == (b"c", b"")
        assert mta.mail() == (b"c", b"")
        m.stop()
        wait_for(lambda: refused(srv))  # no new connections
        assert mta.rcpt() == (b"c", b"")
        assert mta.eom() == [(b"c", b"")]
        mta.quit()
        mta.expect_eof()
    started = time.monotonic()
    srv.join(timeout=3)
    assert time.monotonic() - started < 2, "run() waits for the grace period although no session is open"
    assert ("abort", m.names["g.example"]) not in m.events


def test_after_the_grace_period_open_sessions_are_closed_with_abort_and_close(caplog):
    caplog.set_level(logging.WARNING, logger=LOG)
    m = recording_milter(grace=0.5)
    srv = MilterThread(m).start()
    with srv.raw() as mta:
        assert mta.connect("g.example") == (b"c", b"")
        assert mta.mail() == (b"c", b"")
        started = time.monotonic()
        m.stop()
        mta.expect_eof(timeout=5)
        waited = time.monotonic() - started
    srv.join(timeout=3)
    name = m.names["g.example"]
    assert 0.3 <= waited <= 3, waited
    assert m.events == [("abort", name), ("close", name)]
    assert [r.getMessage() for r in caplog.records] == [
        "stopping: 1 conversation still open at the end of the 0.5 s grace cut short (the MTA applies its "
        "default action to each)"]


# ====================================================================== unix sockets (docs/protocol.md §9.2)


def unix_milter(path, **kwargs):
    m = make_milter(connection=f"unix:{path}", **kwargs)
    m.register("envfrom", lambda ctx, args: REJECT)
    return m


def run_expecting_error(m) -> BaseException:
    t = MilterThread(m)
    t.thread.start()
    t.join(5)
    assert t.error is not None, "run() should have refused to start"
    return t.error


def test_unix_socket_served_and_removed_at_exit(sockdir):
    path = os.path.join(sockdir, "m.sock")
    m = unix_milter(path, socket_mode=0o660)
    with serving(m) as srv:
        assert srv.spec == ConnSpec("unix", path=path)
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
        with srv.raw() as mta:
            assert mta.mail() == (b"r", b"")
    assert not os.path.exists(path)


def test_a_protocol_error_on_a_unix_socket_names_the_socket_as_its_peer(sockdir, caplog):
    """A unix client has no address (getpeername gives ""): the warning says what it came over."""
    caplog.set_level(logging.WARNING, logger=LOG)
    m = unix_milter(os.path.join(sockdir, "m.sock"))
    with serving(m) as srv, srv.raw(negotiate=False) as mta:
        mta.send_raw(b"\0\0\0\0H")  # a packet of length 0
        mta.expect_eof()
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "protocol error from unix socket, closing the connection" in warning, warning


def test_stale_socket_file_is_removed_at_start(sockdir):
    path = os.path.join(sockdir, "stale.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()  # the file stays behind, nobody listens
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    with serving(unix_milter(path)) as srv, srv.raw() as mta:
        assert mta.mail() == (b"r", b"")
    assert not os.path.exists(path)


def test_live_socket_is_refused_and_left_alone(sockdir):
    path = os.path.join(sockdir, "live.sock")
    other = subprocess_listener(path)
    try:
        before = os.lstat(path)
        err = run_expecting_error(unix_milter(path))
        assert isinstance(err, ConnSpecError)
        assert path in str(err) and "in use" in str(err)
        after = os.lstat(path)
        assert (after.st_ino, after.st_dev) == (before.st_ino, before.st_dev)
        probe = socket.socket(socket.AF_UNIX)
        probe.settimeout(2)
        probe.connect(path)  # the other process still has it
        probe.close()
    finally:
        other.terminate()
        other.wait(5)


def subprocess_listener(path):
    """Another process listening on a unix socket; returns once it listens."""
    import subprocess

    code = textwrap.dedent(
        f"""
        import socket, sys, time
        s = socket.socket(socket.AF_UNIX)
        s.bind({path!r}); s.listen(5)
        print("ready", flush=True)
        time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_regular_file_at_the_socket_path_is_refused_and_left_alone(sockdir):
    path = os.path.join(sockdir, "precious")
    with open(path, "w") as f:
        f.write("do not delete\n")
    err = run_expecting_error(unix_milter(path))
    assert isinstance(err, ConnSpecError) and "not a socket" in str(err)
    with open(path) as f:
        assert f.read() == "do not delete\n"


def test_a_socket_file_replaced_while_running_is_not_removed(sockdir):
    path = os.path.join(sockdir, "m.sock")
    m = unix_milter(path)
    with serving(m):
        os.unlink(path)
        other = socket.socket(socket.AF_UNIX)
        other.bind(path)  # someone else's socket now
    try:
        assert stat.S_ISSOCK(os.lstat(path).st_mode), "removed a socket that is not ours"
    finally:
        other.close()


@pytest.mark.parametrize("prefix", ["unix:", "local:", "LOCAL:", ":", ""])
def test_unix_spec_forms_listen(sockdir, prefix):
    path = os.path.join(sockdir, "f.sock")
    m = make_milter(connection=prefix + path)
    m.register("envfrom", lambda ctx, args: REJECT)
    with serving(m) as srv, srv.raw() as mta:
        assert srv.spec.family == "unix" and srv.spec.path == path
        assert mta.mail() == (b"r", b"")
    assert not os.path.exists(path)


def test_inet_zero_port_reports_the_real_port_and_serves():
    m = make_milter(connection="inet:0@127.0.0.1")
    with serving(m) as srv:
        assert srv.spec.family == "inet" and srv.spec.host == "127.0.0.1" and srv.spec.port > 0
        assert socket_address(srv.spec) == (socket.AF_INET, ("127.0.0.1", srv.spec.port))
        with srv.raw() as mta:
            assert mta.connect()[0] == b"c"


def test_a_port_is_served_again_at_once_after_sessions_the_milter_closed():
    """The milter closes a session at QUIT first, which leaves its side in TIME_WAIT for a
    minute: a restart must bind the port all the same (SO_REUSEADDR, as libmilter sets). The
    port is free_port()'s, below the ephemeral range: no connect() or bind(0) of the other
    xdist worker can take it between the two runs, as one could take a port from inet:0."""
    m = make_milter(connection=f"inet:{free_port()}@127.0.0.1")
    m.register("envfrom", lambda ctx, args: REJECT)
    with serving(m) as srv, srv.raw() as mta:
        port = srv.spec.port
        assert mta.mail() == (b"r", b"")
        mta.send(b"Q")
        mta.expect_eof()
    m.connection = f"inet:{port}@127.0.0.1"
    with serving(m) as srv, srv.raw() as mta:
        assert mta.mail() == (b"r", b"")


def _need_ipv6() -> None:
    try:
        probe = socket.socket(socket.AF_INET6)
        probe.bind(("::1", 0))
        probe.close()
    except OSError:
        pytest.skip("no IPv6 loopback")


def test_inet6_loopback_serves():
    _need_ipv6()
    m = make_milter(connection="inet6:0@[::1]")
    m.register("helo", lambda ctx, name: REJECT)
    with serving(m) as srv, srv.raw() as mta:
        assert srv.spec.family == "inet6" and srv.spec.host == "::1"
        assert mta.helo() == (b"r", b"")


def test_inet6_on_every_address_leaves_the_ipv4_port_to_an_inet_milter():
    """docs/protocol.md: inet6:PORT is IPv6's every address, not IPv4's too (IPV6_V6ONLY): a
    milter on inet:PORT can serve beside it."""
    _need_ipv6()
    v6 = make_milter(connection="inet6:0")
    v6.register("helo", lambda ctx, name: REJECT)
    with serving(v6) as srv6:
        v4 = make_milter(connection=f"inet:{srv6.spec.port}@127.0.0.1")
        v4.register("helo", lambda ctx, name: CONTINUE)
        with serving(v4) as srv4, srv4.raw() as mta:
            assert mta.helo() == (b"c", b"")


def test_port_in_use_is_a_clear_error():
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        port = busy.getsockname()[1]
        err = run_expecting_error(make_milter(connection=f"inet:{port}@127.0.0.1"))
        assert isinstance(err, ConnSpecError) and str(port) in str(err)
    finally:
        busy.close()


# ====================================================================== connection specs (docs/protocol.md §9.1)


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("unix:/var/run/f.sock", ConnSpec("unix", path="/var/run/f.sock")),
        ("local:/var/run/f.sock", ConnSpec("unix", path="/var/run/f.sock")),
        ("Unix:/var/run/f.sock", ConnSpec("unix", path="/var/run/f.sock")),
        ("/var/run/f.sock", ConnSpec("unix", path="/var/run/f.sock")),
        (":/var/run/f.sock", ConnSpec("unix", path="/var/run/f.sock")),
        ("inet:8899", ConnSpec("inet", host=None, port=8899)),
        ("inet:8899@127.0.0.1", ConnSpec("inet", host="127.0.0.1", port=8899)),
        ("inet:8899@[127.0.0.1]", ConnSpec("inet", host="127.0.0.1", port=8899)),
        ("inet:8899@localhost", ConnSpec("inet", host="127.0.0.1", port=8899)),
        ("inet:8899@0.0.0.0", ConnSpec("inet", host="0.0.0.0", port=8899)),
        ("INET:25@[10.1.2.3]", ConnSpec("inet", host="10.1.2.3", port=25)),
        ("inet:smtp@127.0.0.1", ConnSpec("inet", host="127.0.0.1", port=25)),  # service name
        ("inet6:8899", ConnSpec("inet6", host=None, port=8899)),
        ("inet6:8899@[::1]", ConnSpec("inet6", host="::1", port=8899)),
        ("inet6:8899@[::]", ConnSpec("inet6", host="::", port=8899)),
        ("inet6:smtp@[::1]", ConnSpec("inet6", host="::1", port=25)),
    ],
)
def test_connection_spec_parsing(spec, expected):
    assert parse(spec) == expected


@pytest.mark.parametrize(
    "spec, words",
    [
        ("tcp:25@127.0.0.1", "unknown socket type"),
        ("/tmp/a:b", "unknown socket type"),
        ("", "empty"),
        ("unix:", "path"),
        ("inet:", "port"),
        ("inet:@127.0.0.1", "port"),
        ("inet:nosuchservice-xyz@127.0.0.1", "nosuchservice-xyz"),
        ("inet:25@[127.0.0.1", "]"),
        ("inet:25@[::1]", "::1"),
        ("inet6:25@[127.0.0.1]", "127.0.0.1"),
        ("inet:25@[not-an-address]", "not-an-address"),
        ("inet:25@no-such-host.invalid", "no-such-host.invalid"),
        ("inet:70000", "70000"),
        ("inet:25abc@[10.1.2.3]", 'port "25abc" is not a number'),  # libmilter's atoi: 25
    ],
)
def test_connection_spec_errors(spec, words):
    with pytest.raises(ConnSpecError) as info:
        parse(spec)
    assert words in str(info.value)


@pytest.mark.parametrize("host, addr", [("::1%lo", "::1"), ("[::1%lo]", "::1"), ("::1%{index}", "::1"),
                                        ("[2001:db8::1%lo]", "2001:db8::1"),
                                        ("[::ffff:127.0.0.1%lo]", "::ffff:127.0.0.1")])
def test_a_zone_on_an_address_that_is_not_link_local_is_refused_saying_why(host, addr):
    """`inet6:8891@::1%lo` said `cannot resolve "::1%lo"` (bracketed: "not an inet6 address"),
    which tells the admin nothing; `::1%1` failed at `milter main`, `cannot listen on
    inet6:8891@::1%lo: Name or service not known`. libmilter takes no zone at all; Linux ignores
    one on an address that is not link-local, so it limits nothing."""
    host = host.format(index=socket.if_nametoindex("lo"))
    written = host.strip("[]")
    with pytest.raises(ConnSpecError) as info:
        parse(f"inet6:8891@{host}")
    assert str(info.value) == (f'connection "inet6:8891@{host}": "{written}": a zone (%{written.partition("%")[2]}) '
                               "is only meaningful on a link-local address (fe80::/10); Linux ignores it on "
                               f"{addr}, so it would not limit the socket to that interface: write inet6:8891@{addr}")


@pytest.mark.parametrize("host, said", [
    ("::1%", '"::1%": an empty zone (%) is only meaningful on a link-local address (fe80::/10); Linux ignores '
             "it on ::1, so it would not limit the socket to that interface: write inet6:8891@::1"),
    ("[::1%]", '"::1%": an empty zone (%) is only meaningful'),
    ("fe80::1%", '"fe80::1%" is a link-local address, which means nothing without its interface: name it, as in '
                 "inet6:8891@fe80::1%"),
    ("[fe80::1%]", '"fe80::1%" is a link-local address, which means nothing without its interface'),
    ("[::ffff:224.0.0.1%lo]", '"::ffff:224.0.0.1%lo" (::ffff:224.0.0.1) is a multicast address: no MTA can '
                              "connect to it (TCP connects to one host's address)"),
    ("ff05::1%lo", '"ff05::1%lo" (ff05::1) is a multicast address'),
    ("[ff05::1%]", '"ff05::1%" (ff05::1) is a multicast address'),
])
def test_an_empty_zone_or_a_zone_on_a_multicast_address_is_refused_saying_why(host, said):
    """An empty zone said `cannot resolve "::1%"` (bracketed: "not an inet6 address"), and a
    multicast address with a zone "not an inet6 address": the zone's and the multicast
    address's own refusals say why."""
    with pytest.raises(ConnSpecError) as info:
        parse(f"inet6:8891@{host}")
    assert str(info.value).startswith(f'connection "inet6:8891@{host}": {said}'), str(info.value)


def test_unix_path_length_limit_is_libmilters():
    """libmilter: strlen(path) + 1 < sizeof(sun_path) = 108 on Linux, so 106 bytes fit (docs/protocol.md §9.1)."""
    path = "/" + "p" * 105  # 106 bytes
    assert parse("unix:" + path) == ConnSpec("unix", path=path)
    with pytest.raises(ConnSpecError):
        parse("unix:/" + "p" * 106)  # 107 bytes


def test_connspec_str_and_postfix_forms():
    assert str(parse("inet:8899@127.0.0.1")) == "inet:8899@127.0.0.1"
    assert parse("inet:8899@127.0.0.1").postfix() == "inet:127.0.0.1:8899"
    assert parse("inet6:8899@[::1]").postfix() == "inet:[::1]:8899"
    assert parse("local:/r/f.sock").postfix() == "unix:/r/f.sock"


# ====================================================================== signals (docs/protocol.md §9.3)

SCRIPT = textwrap.dedent(
    """
    import logging, sys
    from pytclmilter import Hooks, Milter, REJECT
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(levelname)s %(message)s")
    m = Milter(connection="unix:" + sys.argv[1], grace=float(sys.argv[2]),
               hooks=Hooks(listening=lambda spec: print("LISTENING", spec, flush=True)))
    m.register("envfrom", lambda ctx, args: REJECT)
    m.run()
    print("EXITED", flush=True)
    """
)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
def test_signals_stop_the_milter_cleanly(sockdir, sig):
    script = os.path.join(sockdir, "run.py")
    with open(script, "w") as f:
        f.write(SCRIPT)
    path = os.path.join(sockdir, "sig.sock")
    child = pexpect.spawn(sys.executable, [script, path, "5"], timeout=10, encoding="utf-8", use_poll=True)
    try:
        child.expect("LISTENING unix:" + path)
        assert os.path.exists(path)
        with RawMTA(_unix(path)) as mta:
            mta.optneg()
            assert mta.mail() == (b"r", b"")
            child.kill(sig)
            child.expect(f"received {sig.name}")
            wait_for(lambda: not os.path.exists(path))  # stops accepting at once
            if sig is not signal.SIGINT:  # SIGHUP/SIGTERM let sessions finish, SIGINT may cut them (docs/protocol.md §9.3)
                assert mta.mail() == (b"r", b""), "an open session may finish"
            mta.quit()
        child.expect("EXITED")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0 and child.signalstatus is None, (child.exitstatus, child.signalstatus)
    assert not os.path.exists(path)


FAILING_SIGNAL_HOOK = textwrap.dedent(
    """
    import logging, sys
    from pytclmilter import Hooks, Milter
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(levelname)s %(message)s")
    class Fault(BaseException):
        pass
    def hook(sig):
        if sys.argv[3] == "exit":
            sys.exit(3)
        raise (Fault if sys.argv[3] == "fault" else RuntimeError)("the hook broke")
    m = Milter(connection="unix:" + sys.argv[1], grace=1.0,
               hooks=Hooks(signal=hook, listening=lambda spec: print("LISTENING", spec, flush=True)))
    m.workers = int(sys.argv[2])
    m.register("eom", lambda ctx: None)
    m.run()
    print("EXITED", flush=True)
    """
)


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("failure", ["raise", "exit", "fault"])
def test_a_signal_hook_that_fails_is_logged_and_the_milter_stops_all_the_same(sockdir, workers, failure):
    """Hooks.signal is called "before the milter stops": one that raised swallowed the SIGTERM
    (asyncio logged "Exception in callback" and the milter served on, to be SIGKILLed by systemd)
    or, with workers, ended run() in a traceback, the socket file left behind."""
    script = os.path.join(sockdir, "hook.py")
    with open(script, "w") as f:
        f.write(FAILING_SIGNAL_HOOK)
    path = os.path.join(sockdir, "hook.sock")
    child = pexpect.spawn(sys.executable, [script, path, str(workers), failure], timeout=15, encoding="utf-8",
                          use_poll=True)
    try:
        child.expect("LISTENING unix:" + path)
        child.kill(signal.SIGTERM)
        shown = "SystemExit(3)" if failure == "exit" else "the hook broke"
        child.expect(rf"ERROR the signal hook hook failed \({re.escape(shown)}\); stopping all the same")
        child.expect("EXITED")
        child.expect(pexpect.EOF)
        output = child.before
    finally:
        child.close(force=True)
    assert child.exitstatus == 0 and child.signalstatus is None, (child.exitstatus, child.signalstatus, output)
    assert "Exception in callback" not in output and not os.path.exists(path)


def _unix(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(path)
    return s


# ====================================================================== memory


def live_contexts() -> int:
    return sum(1 for o in gc.get_objects() if type(o) is Context)


def test_a_closed_connection_is_freed_at_once_not_by_the_cycle_collector():
    """A mail server opens a connection per SMTP session: each must be freed when it closes,
    not left as cyclic garbage (it was 18 objects per connection) for the collector to find."""
    m = make_milter()
    m.register("connect", lambda ctx, host, info: CONTINUE)
    gc.collect()
    gc.disable()
    try:
        with serving(m) as srv:
            before = live_contexts()
            for _ in range(3):
                with srv.raw() as mta:
                    assert mta.connect("x.example") == (b"c", b"")
                    assert live_contexts() == before + 1  # the count sees a live connection
                    mta.send(b"Q")
                    mta.expect_eof()
            assert wait_for(lambda: live_contexts() == before)
    finally:
        gc.enable()


def test_a_signal_the_event_loop_cannot_handle_is_reported(caplog) -> None:
    """On an event loop without signal support, serving goes on, and the log says which signals
    will not stop the milter gracefully. (A stand-in loop: Linux's loops all support signals.)"""
    from pytclmilter import Milter
    from pytclmilter.server import MilterServer

    class NoSignals:
        def add_signal_handler(self, *args: object) -> None:
            raise NotImplementedError

    server = MilterServer(Milter(name="t").shared)
    with caplog.at_level(logging.WARNING, logger="pytclmilter"):
        assert server._install_signals(NoSignals()) == []
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [w.split()[0] for w in warned] == ["SIGTERM", "SIGINT", "SIGHUP"]
    assert all("will not stop the milter gracefully" in w for w in warned)
