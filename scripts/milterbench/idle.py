"""idle mode: the resident memory a filter needs per idle milter connection (target: under 50 KB).

Each filter runs alone; N connections do what Postfix does when an SMTP session starts (option
negotiation, connect macros, connect) and are then left idle while VmRSS is read again.
"""

from __future__ import annotations

import argparse
import re
import resource
import select
import socket
import struct
import time
from dataclasses import asdict, dataclass, field

from milterbench import say, warn
from milterbench.measure import proc_fds, proc_nofile, proc_status_kb
from milterbench.report import TARGET_IDLE_KB, machine_info, print_info, save_results
from milterbench.rigs import Filter, make_filters

# What Postfix 3.7 sends when an SMTP session starts and it opens the milter connection:
# option negotiation with its offer (version 6, all actions, protocol mask 0x1FFFFF), then
# the connect macros (milter_connect_macros, the values of M_CONNECT in scripts/loadgen.c)
# and connect. The session then waits for HELO: that is an idle milter connection.
SMFIP_NOCONNECT, SMFIP_NR_CONN = 0x1, 0x1000
IDLE_CONNECT_MACROS = (("j", "mx.bench.test"), ("{daemon_name}", "mx.bench.test"), ("{daemon_addr}", "127.0.0.1"),
                       ("v", "Postfix 3.7.11"), ("_", "client.bench.test [127.0.0.1]"))


def milter_packet(code: bytes, payload: bytes = b"") -> bytes:
    return struct.pack(">I", 1 + len(payload)) + code + payload


OPTNEG_PKT = milter_packet(b"O", struct.pack(">III", 6, 0x1FF, 0x1FFFFF))
CONNECT_MACROS_PKT = milter_packet(b"D", b"C" + b"".join(f"{k}\0{v}\0".encode() for k, v in IDLE_CONNECT_MACROS))
CONNECT_PKT = milter_packet(b"C", b"client.bench.test\0" + b"4" + struct.pack(">H", 40000) + b"127.0.0.1\0")


def recv_exact(sock: socket.socket, n: int, deadline: float) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no reply in time")
        sock.settimeout(left)
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("the filter closed the connection")
        buf += chunk
    return bytes(buf)


def read_reply(sock: socket.socket, deadline: float) -> tuple[bytes, bytes]:
    (n,) = struct.unpack(">I", recv_exact(sock, 4, deadline))
    if not 1 <= n <= 1 << 20:
        raise ConnectionError(f"bad reply length {n}")
    data = recv_exact(sock, n, deadline)
    return data[:1], data[1:]


def open_idle_session(port: int, deadline: float) -> socket.socket:
    """A milter connection that went through negotiation and connect, as Postfix's at session start."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        sock.connect(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(OPTNEG_PKT)
        code, payload = read_reply(sock, deadline)
        if code != b"O" or len(payload) < 12:
            raise ConnectionError(f"negotiation: reply {code!r} ({len(payload)} bytes), expected 'O'")
        proto = struct.unpack(">III", payload[:12])[2]
        # Postfix sends the connect macros even when the filter skips connect.
        sock.sendall(CONNECT_MACROS_PKT + (b"" if proto & SMFIP_NOCONNECT else CONNECT_PKT))
        if not proto & (SMFIP_NOCONNECT | SMFIP_NR_CONN):
            code = b"p"
            while code == b"p":  # progress: keep waiting
                code, _ = read_reply(sock, deadline)
            if code != b"c":
                raise ConnectionError(f"connect: reply {code!r}, expected 'c' (continue)")
    except BaseException:
        sock.close()
        raise
    return sock


def raise_nofile(want: int) -> None:
    """Raise this process's soft RLIMIT_NOFILE to at least want (the hard limit too if root)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft >= want:
        return
    new_hard = hard if hard == resource.RLIM_INFINITY or hard >= want else want
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, new_hard))
    except (ValueError, OSError) as exc:
        raise SystemExit(f"bench: need {want} open files, the limit is {soft} (hard {hard}) and cannot be"
                         f" raised ({exc}): use fewer --conns or raise `ulimit -n`") from None


@dataclass
class IdleRun:
    filter: str
    conns: int  # connections asked for
    opened: int = 0  # connections negotiated and answered
    open_seconds: float = 0.0
    rss_before_kb: int = 0  # VmRSS with no connection
    rss_idle_kb: int = 0  # VmRSS with the connections open and idle
    rss_closed_kb: int = 0  # VmRSS after they were closed
    kb_per_conn: float = 0.0
    status_before: dict[str, int] = field(default_factory=dict)  # all kB fields of /proc/PID/status
    status_idle: dict[str, int] = field(default_factory=dict)
    fds_before: int = 0
    fds_idle: int = 0
    filter_nofile: int = 0  # the filter's soft limit on open files
    lost: int = 0  # idle connections the filter closed (or wrote to) before the second reading
    error: str = ""

    @property
    def complete(self) -> bool:
        """Every connection opened and held, without error: an incomplete run measures nothing."""
        return self.opened == self.conns and not self.lost and not self.error

    @property
    def met(self) -> bool:
        return self.complete and self.kb_per_conn < TARGET_IDLE_KB


def idle_table(runs: list[IdleRun]) -> str:
    head = (f"{'filter':14} {'conns':>5} {'RSS before MB':>13} {'RSS idle MB':>11} {'KB/conn':>8}"
            f" {'RSS closed MB':>13} {'open s':>6} {'target':>7}  notes")
    lines = [head, "-" * len(head)]
    for r in runs:
        notes = []
        if r.opened < r.conns:
            notes.append(f"only {r.opened} of {r.conns} connections")
        if r.lost:
            notes.append(f"{r.lost} closed by the filter while idle")
        if r.error:
            notes.append(r.error)
        per = f"{r.kb_per_conn:8.1f}" if r.opened else f"{'-':>8}"
        closed = f"{r.rss_closed_kb / 1024:13.1f}" if r.rss_closed_kb else f"{'-':>13}"
        target = ("MET" if r.met else "MISSED") if r.complete else "n/a"
        lines.append(f"{r.filter:14} {r.opened:5d} {r.rss_before_kb / 1024:13.1f} {r.rss_idle_kb / 1024:11.1f} {per}"
                     f" {closed} {r.open_seconds:6.1f} {target:>7}  {'; '.join(notes)}".rstrip())
    return "\n".join(lines)


def idle_run(f: Filter, conns: int, settle: float, timeout: float) -> IdleRun:
    run = IdleRun(f.name, conns)
    socks: list[socket.socket] = []
    f.start()
    try:
        pid = f.pid
        time.sleep(settle)
        run.status_before = proc_status_kb(pid)
        run.rss_before_kb = run.status_before.get("VmRSS", 0)
        run.fds_before = proc_fds(pid)
        run.filter_nofile = proc_nofile(pid)
        if 0 <= run.filter_nofile < run.fds_before + conns:
            warn(f"{f.name}: its open-file limit is {run.filter_nofile} and it has {run.fds_before} open:"
                 f" {conns} more connections will not fit")
        t0 = time.monotonic()
        deadline = t0 + timeout
        for i in range(conns):
            try:
                socks.append(open_idle_session(f.port, deadline))
            except (OSError, ConnectionError) as exc:
                what = "timed out" if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
                run.error = f"connection {i + 1}: {what}"
                if not f.alive():
                    run.error += f" (the filter exited {f.returncode})"
                break
        run.open_seconds = time.monotonic() - t0
        run.opened = len(socks)
        time.sleep(settle)
        run.status_idle = proc_status_kb(pid) if f.alive() else {}
        run.rss_idle_kb = run.status_idle.get("VmRSS", 0)
        run.fds_idle = proc_fds(pid)
        # A connection the filter closed (or sent something on) while it should be idle is readable.
        poller = select.poll()
        for s in socks:
            poller.register(s, select.POLLIN)
        run.lost = len(poller.poll(0))
        if run.opened and run.rss_idle_kb:
            run.kb_per_conn = (run.rss_idle_kb - run.rss_before_kb) / run.opened
        for s in socks:
            s.close()
        socks.clear()
        if f.alive():
            time.sleep(settle)
            run.rss_closed_kb = proc_status_kb(pid).get("VmRSS", 0)
        else:
            run.error = run.error or f"the filter exited {f.returncode}"
    finally:
        for s in socks:
            s.close()
        f.stop()
    if run.error:
        warn(f"{f.name}: {run.error}; open-file limit of the filter {run.filter_nofile}; its log:\n{f.log_tail()}")
    return run


def cmd_idle(opts: argparse.Namespace) -> int:
    names = [n for n in opts.filters.split(",") if n]
    if any(re.fullmatch(r"tcl-w\d+", n) for n in names):
        raise SystemExit("bench: idle measures one process; --workers filters (tcl-wN) are not supported")
    if opts.conns < 1:
        raise SystemExit("bench: --conns must be at least 1")
    # The bench holds every connection; the filters inherit this limit as from a shell's `ulimit -n`.
    raise_nofile(opts.conns + 256)
    info = machine_info()
    say("pytclmilter benchmark: idle mode")
    print_info(info)
    say(f"  load:         {opts.conns} milter connections per filter, each negotiated (version 6, actions"
        f" 0x1FF, protocol 0x1FFFFF) and past connect as Postfix at session start, then left idle;"
        f" VmRSS of the filter process {opts.settle:g}s after it listens and {opts.settle:g}s after the last"
        f" connection; filter log level {opts.log_level}")
    filters = make_filters(names, opts.log_level, False)
    runs: list[IdleRun] = []
    say("")
    say(idle_table([]))
    for f in filters:
        run = idle_run(f, opts.conns, opts.settle, opts.timeout)
        runs.append(run)
        say(idle_table([run]).splitlines()[-1])
    say("")
    say("Results (RSS: VmRSS of the filter process; KB/conn: (idle - before) / connections)")
    say(idle_table(runs))
    say("")
    say(f"Target: under {TARGET_IDLE_KB:g} KB of RSS per idle connection")
    for r in runs:
        if r.opened:
            verdict = ("MET" if r.met else "MISSED") if r.complete else "not evaluated (incomplete run)"
            say(f"  {r.filter}: {r.kb_per_conn:.1f} KB per connection over {r.opened} connections"
                f" ({(r.rss_idle_kb - r.rss_before_kb) / 1024:.1f} MB): {verdict}")
        else:
            say(f"  {r.filter}: no connection opened: {r.error}")
    payload = {"info": info, "options": vars(opts),
               "runs": [asdict(r) | {"met": r.met} for r in runs]}
    save_results("idle", payload, opts.json)
    return 0 if all(r.complete for r in runs) else 1
